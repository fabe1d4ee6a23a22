// mempipe fpga rtl: the selection of retriever/select.h for one row (sequence) at a time.
//
// Scores arrive in page order. Each is stored (as an order-preserving key, NaN ranked as -inf
// and -0 equal to +0) and, if it is a middle page (sinks <= p < n - locals) of a row with more
// than k pages, offered to an insertion array that keeps the best `want = k - sinks - locals`
// middle pages, one page per clock. Pages compare by the 48-bit composite {key, ~page}: higher
// key wins, then the lower page index, a strict total order, so the kept set is exactly
// SelectPages' and the threshold T (the want-th best) decides membership: composite >= T.
// Then an emit pass writes, in ascending page order, sinks, middle pages >= T and locals
// (every page when n <= k), pads the row with -1 to max_selected and writes the count.
//
// The array keeps its entries at the top end, slots [MAX_TOPK - want, MAX_TOPK) in descending
// order, so T is always the last slot (no wide multiplexer).
module mempipe_topk_select #(
    parameter int MAX_TOPK = 1024,
    parameter int MAX_PAGES = 65536  // pages per sequence (score buffer depth)
) (
    input  logic        clk,
    input  logic        rst,
    input  logic        start,  // a run begins: latch the output bases
    input  logic [31:0] k,
    input  logic [31:0] sinks,
    input  logic [31:0] locals,
    input  logic [31:0] max_selected,
    input  logic [63:0] pages_base,
    input  logic [63:0] counts_base,
    // pages per sequence
    input  logic        n_valid,
    input  logic [31:0] n_data,
    output logic        n_pop,
    // scores in page order
    input  logic        score_valid,
    input  logic [31:0] score_data,
    output logic        score_pop,
    // 32-bit writes to device memory
    output logic        wr_valid,
    output logic [63:0] wr_addr,
    output logic [31:0] wr_data,
    input  logic        wr_ready,
    output logic        row_done,  // pulses when a row's count has been handed to the writer
    output logic        busy
);
  localparam int IW = $clog2(MAX_PAGES);
  localparam int CW = 32 + IW;
  localparam int KW = $clog2(MAX_TOPK + 1);

  // ---- order-preserving key --------------------------------------------------------------------
  logic [31:0] in_key;
  wire in_nan = score_data[30:23] == 8'hff && score_data[22:0] != 0;
  mempipe_fp32_key u_key (.a(in_nan ? 32'hff80_0000 : score_data), .key(in_key));  // NaN: -inf

  typedef enum logic [2:0] {
    S_N,
    S_COLLECT,
    S_EMIT,
    S_DRAIN,
    S_PAD,
    S_COUNT
  } state_t;
  state_t st;
  logic [31:0] n, p, cnt, lo, hi, want;
  logic all_pages;
  logic [63:0] row_addr, count_addr;
  (* ram_style = "block" *) logic [31:0] key_mem[MAX_PAGES];  // BRAM (Yosys would pick LUTRAM)

  // ---- insertion array -----------------------------------------------------------------------------
  logic [CW-1:0] arr_c[MAX_TOPK];
  logic [MAX_TOPK-1:0] arr_v;
  logic [KW-1:0] base;  // MAX_TOPK - want: first active slot
  wire [CW-1:0] cand = {in_key, ~p[IW-1:0]};
  wire collect = st == S_COLLECT && score_valid;
  wire offer = collect && !all_pages && p >= lo && p < hi && want != 0;
  logic [MAX_TOPK-1:0] beats;
  for (genvar i = 0; i < MAX_TOPK; i++) begin : g_arr
    assign beats[i] = (KW'(i) >= base) && (!arr_v[i] || cand > arr_c[i]);
    always_ff @(posedge clk) begin
      if (st == S_N) begin
        arr_v[i] <= 1'b0;
      end else if (offer && beats[i]) begin
        if (i > 0 && beats[(i>0)?i-1:0]) begin
          arr_c[i] <= arr_c[(i>0)?i-1:0];
          arr_v[i] <= arr_v[(i>0)?i-1:0];
        end else begin
          arr_c[i] <= cand;
          arr_v[i] <= 1'b1;
        end
      end
    end
  end
  wire [CW-1:0] thresh = arr_c[MAX_TOPK-1];

  // ---- emit pass: read key p at clock t, decide at t + 1; writes queue in a small FIFO ------------
  logic rd_v;
  logic [31:0] rd_p;
  logic [31:0] rd_key;
  logic [3:0] wq_count;
  logic wq_full, wq_empty;
  logic push;
  logic [95:0] push_d;
  wire emit_sel = all_pages || rd_p < lo || rd_p >= hi ||
                  (want != 0 && {rd_key, ~rd_p[IW-1:0]} >= thresh);
  wire rd_issue = st == S_EMIT && p < n && 4'(wq_count + rd_v) < 4'd7;
  mempipe_fifo #(.W(96), .DEPTH(8)) u_wq (
      .clk, .rst, .push, .din(push_d), .full(wq_full), .pop(wr_valid && wr_ready),
      .dout({wr_addr, wr_data}), .empty(wq_empty), .count(wq_count));
  assign wr_valid = !wq_empty;
  wire room = wq_count < 4'd7;

  always_comb begin
    push = 1'b0;
    push_d = {row_addr + {30'd0, cnt, 2'b00}, rd_p};
    case (st)
      S_EMIT, S_DRAIN: push = rd_v && emit_sel;
      S_PAD: begin
        push = room && cnt < max_selected;
        push_d[31:0] = 32'hffff_ffff;
      end
      S_COUNT: begin
        push = room;
        push_d = {count_addr, all_pages ? n : k};
      end
      default: ;
    endcase
  end

  always_ff @(posedge clk) begin
    if (collect) key_mem[p[IW-1:0]] <= in_key;
    rd_key <= key_mem[p[IW-1:0]];
  end

  assign n_pop = st == S_N && n_valid;
  assign score_pop = collect;
  assign busy = st != S_N || !wq_empty;

  always_ff @(posedge clk) begin
    row_done <= 1'b0;
    if (rst) begin
      st <= S_N;
      rd_v <= 1'b0;
    end else begin
      if (push) cnt <= cnt + 1;
      case (st)
        S_N: begin
          if (start) begin
            row_addr <= pages_base;
            count_addr <= counts_base;
          end
          if (n_valid) begin
            n <= n_data;
            p <= '0;
            cnt <= '0;
            all_pages <= n_data <= k;
            lo <= sinks;
            hi <= n_data - locals;
            want <= k - sinks - locals;
            base <= KW'(MAX_TOPK) - KW'(k - sinks - locals);
            st <= n_data == 0 ? S_PAD : S_COLLECT;
          end
        end
        S_COLLECT:
        if (score_valid) begin
          p <= p + 1;
          if (p == n - 1) begin
            p <= '0;
            st <= S_EMIT;
          end
        end
        S_EMIT, S_DRAIN: begin
          rd_v <= rd_issue;
          if (rd_issue) begin
            rd_p <= p;
            p <= p + 1;
          end
          if (st == S_EMIT && p == n) st <= S_DRAIN;
          if (st == S_DRAIN && !rd_v) st <= S_PAD;
        end
        S_PAD: if (!(cnt < max_selected)) st <= S_COUNT;
        default:
        if (room) begin  // S_COUNT: the number of valid entries
          row_addr <= row_addr + {30'd0, max_selected, 2'b00};
          count_addr <= count_addr + 64'd4;
          row_done <= 1'b1;
          st <= S_N;
        end
      endcase
    end
  end
endmodule
