// mempipe fpga rtl: the page-score datapath of mempipe_score_topk (retriever/relevancy.h order).
//
// Per sequence: pop n (pages), load the group's query rows (group x head_dim fp32, from the query
// word stream) into two 512-bit banks, then score n pages from the digest word stream (each page
// its max row then its min row, row_words words each). One (query head, digest word) pair per
// clock: 32 lanes x 2 fp32 multipliers, max, lane accumulate; then the adder tree
// lane[i] += lane[i + s], s = 16, 8, 4, 2, 1 (5 registered levels) and the group aggregation
// (max or sum, head order). Pages are double-buffered, so loading page p+1 overlaps scoring p:
//   clocks per page = row_words * max(group, 2)    (2: the page's two rows arrive 1 word/clock)
//
// Canonical lane order: 16-bit types hold 32 channels per word, channel c = 32w + e in lane e;
// fp32 holds 16, channel c = 16w + e in lane 16 (w mod 2) + e. Each lane starts at +0 and adds
// its terms max(q*mx, q*mn) in increasing channel order, exactly as PageBound does.
module mempipe_score_core #(
    parameter int MAX_GROUP = 16,
    parameter int SCORE_CREDITS = 16  // depth of the score FIFO after this core
) (
    input  logic         clk,
    input  logic         rst,
    // configuration, stable during a run
    input  logic [4:0]   group,      // 1..MAX_GROUP
    input  logic [4:0]   row_words,  // digest row words: 2..16
    input  logic [4:0]   q_row_words,  // query row words: 4..16
    input  logic [1:0]   dtype,      // 0 fp32, 1 fp16, 2 bf16
    input  logic         agg_sum,    // 0 max, 1 sum
    // pages per sequence
    input  logic         n_valid,
    input  logic [31:0]  n_data,
    output logic         n_pop,
    // query words
    input  logic         q_valid,
    input  logic [511:0] q_data,
    output logic         q_pop,
    // digest words
    input  logic         dg_valid,
    input  logic [511:0] dg_data,
    output logic         dg_pop,
    // page scores, in page order; score_ret returns one credit (the consumer popped a score)
    output logic         score_valid,
    output logic [31:0]  score_data,
    input  logic         score_ret,
    output logic         busy
);
  localparam int QDEPTH = MAX_GROUP * 8;  // 512-bit words per bank (max group x 256 fp32 / 2)
  localparam int QAW = $clog2(QDEPTH);
  localparam int NSLOT = 2;

  wire dt32 = dtype == 2'd0;
  wire dtbf = dtype == 2'd2;

  // ---- page buffer: NSLOT slots of (max row, min row), 16 words each --------------------------
  logic [511:0] mx_mem[NSLOT * 16];
  logic [511:0] mn_mem[NSLOT * 16];
  logic [0:0] ld_slot;
  logic [4:0] ld_word;
  logic [1:0] slots_full;
  wire ld_is_mn = ld_word >= row_words;
  wire [4:0] ld_row_w = ld_is_mn ? ld_word - row_words : ld_word;
  assign dg_pop = dg_valid && slots_full < NSLOT;
  wire ld_page_done = dg_pop && ld_word == 2 * row_words - 1;
  always_ff @(posedge clk) begin
    if (dg_pop && !ld_is_mn) mx_mem[{ld_slot, ld_row_w[3:0]}] <= dg_data;
    if (dg_pop && ld_is_mn) mn_mem[{ld_slot, ld_row_w[3:0]}] <= dg_data;
    if (rst) begin
      ld_slot <= '0;
      ld_word <= '0;
    end else if (dg_pop) begin
      ld_word <= ld_page_done ? 5'd0 : ld_word + 5'd1;
      if (ld_page_done) ld_slot <= ld_slot + 1'b1;
    end
  end

  // ---- query banks: word j of the group's rows in bank j mod 2 at j / 2 ------------------------
  logic [511:0] q_bank0[QDEPTH];
  logic [511:0] q_bank1[QDEPTH];

  // ---- issue: per sequence, queries then pages x heads x words ---------------------------------
  typedef enum logic [1:0] {
    S_N,
    S_Q,
    S_P
  } state_t;
  state_t st;
  logic [31:0] n_left;  // pages still to issue in this sequence
  logic [8:0] q_cnt;
  logic [4:0] g, w;
  logic [QAW-1:0] q_head_base;  // g * q_row_words / 2
  logic [0:0] rd_slot;
  logic [$clog2(SCORE_CREDITS):0] credits;
  wire [8:0] q_total = 9'(group) * 9'(q_row_words);
  wire page_start = st == S_P && g == 0 && w == 0;
  wire can_issue = st == S_P && (!page_start || (slots_full != 0 && credits != 0));
  wire last_w = w == row_words - 1;
  wire last_g = g == group - 1;
  wire issue = can_issue;
  wire page_end = issue && last_w && last_g;
  assign n_pop = st == S_N && n_valid;
  assign q_pop = st == S_Q && q_valid;

  always_ff @(posedge clk) begin
    if (q_pop && !q_cnt[0]) q_bank0[q_cnt[QAW:1]] <= q_data;
    if (q_pop && q_cnt[0]) q_bank1[q_cnt[QAW:1]] <= q_data;
  end

  always_ff @(posedge clk) begin
    if (rst) begin
      st <= S_N;
      slots_full <= '0;
      credits <= ($clog2(SCORE_CREDITS) + 1)'(SCORE_CREDITS);
      rd_slot <= '0;
      g <= '0;
      w <= '0;
      q_cnt <= '0;
      n_left <= '0;
      q_head_base <= '0;
    end else begin
      slots_full <= slots_full + (ld_page_done ? 2'd1 : 2'd0) - (page_end ? 2'd1 : 2'd0);
      credits <= credits + (score_ret ? 1'b1 : 1'b0) - (issue && page_start ? 1'b1 : 1'b0);
      case (st)
        S_N:
        if (n_valid) begin
          n_left <= n_data;
          q_cnt <= '0;
          st <= S_Q;
        end
        S_Q:
        if (q_valid) begin
          q_cnt <= q_cnt + 9'd1;
          if (q_cnt == q_total - 1) st <= n_left == 0 ? S_N : S_P;
        end
        default:
        if (issue) begin
          if (last_w) begin
            w <= '0;
            if (last_g) begin
              g <= '0;
              q_head_base <= '0;
              rd_slot <= rd_slot + 1'b1;
              n_left <= n_left - 1;
              if (n_left == 1) st <= S_N;
            end else begin
              g <= g + 5'd1;
              q_head_base <= q_head_base + QAW'(q_row_words >> 1);
            end
          end else begin
            w <= w + 5'd1;
          end
        end
      endcase
    end
  end
  assign busy = st != S_N || slots_full != 0;

  // ---- S1: synchronous reads of the page rows and the query words --------------------------------
  logic [511:0] s1_mx, s1_mn, s1_q0, s1_q1;
  logic s1_v, s1_half, s1_init, s1_lastw, s1_firstg, s1_lastg;
  wire [QAW-1:0] q_addr = q_head_base + QAW'(dt32 ? w >> 1 : w);
  always_ff @(posedge clk) begin
    s1_mx <= mx_mem[{rd_slot, w[3:0]}];
    s1_mn <= mn_mem[{rd_slot, w[3:0]}];
    s1_q0 <= q_bank0[q_addr];
    s1_q1 <= q_bank1[q_addr];
    s1_v <= !rst && issue;
    s1_half <= w[0];
    s1_init <= dt32 ? w < 2 : w == 0;
    s1_lastw <= last_w;
    s1_firstg <= g == 0;
    s1_lastg <= last_g;
  end

  // ---- S2: decode and multiply (64 fp32 multipliers) ----------------------------------------------
  logic [32*32-1:0] s2_pa, s2_pb;  // lane l at [32l +: 32]
  logic [31:0] s2_en;
  logic s2_v, s2_init, s2_lastw, s2_firstg, s2_lastg;
  for (genvar l = 0; l < 32; l++) begin : g_mul
    logic [31:0] q, mx, mn, hmx, hmn, pa, pb;
    assign q = l < 16 ? s1_q0[32*(l%16)+:32] : s1_q1[32*(l%16)+:32];
    mempipe_half_to_fp32 u_hmx (.h(s1_mx[16*l+:16]), .f(hmx));
    mempipe_half_to_fp32 u_hmn (.h(s1_mn[16*l+:16]), .f(hmn));
    assign mx = dt32 ? s1_mx[32*(l%16)+:32] : dtbf ? {s1_mx[16*l+:16], 16'd0} : hmx;
    assign mn = dt32 ? s1_mn[32*(l%16)+:32] : dtbf ? {s1_mn[16*l+:16], 16'd0} : hmn;
    mempipe_fp32_mul u_pa (.a(q), .b(mx), .p(pa));
    mempipe_fp32_mul u_pb (.a(q), .b(mn), .p(pb));
    always_ff @(posedge clk) begin
      s2_pa[32*l+:32] <= pa;
      s2_pb[32*l+:32] <= pb;
      s2_en[l] <= !dt32 || (s1_half == (l >= 16));
    end
  end
  always_ff @(posedge clk) begin
    s2_v <= !rst && s1_v;
    s2_init <= s1_init;
    s2_lastw <= s1_lastw;
    s2_firstg <= s1_firstg;
    s2_lastg <= s1_lastg;
  end

  // ---- S3: term = a > b ? a : b ---------------------------------------------------------------------
  logic [32*32-1:0] s3_t;
  logic [31:0] s3_en;
  logic s3_v, s3_init, s3_lastw, s3_firstg, s3_lastg;
  for (genvar l = 0; l < 32; l++) begin : g_max
    logic a_gt_b;
    mempipe_fp32_gt u_gt (.a(s2_pa[32*l+:32]), .b(s2_pb[32*l+:32]), .gt(a_gt_b));
    always_ff @(posedge clk) s3_t[32*l+:32] <= a_gt_b ? s2_pa[32*l+:32] : s2_pb[32*l+:32];
  end
  always_ff @(posedge clk) begin
    s3_v <= !rst && s2_v;
    s3_en <= s2_en;
    s3_init <= s2_init;
    s3_lastw <= s2_lastw;
    s3_firstg <= s2_firstg;
    s3_lastg <= s2_lastg;
  end

  // ---- S4: lane accumulators (+0 at a head's first term) ------------------------------------------
  logic [32*32-1:0] acc;
  logic s4_fin, s4_firstg, s4_lastg;
  for (genvar l = 0; l < 32; l++) begin : g_acc
    logic [31:0] sum;
    mempipe_fp32_add u_add (.a(s3_init ? 32'd0 : acc[32*l+:32]), .b(s3_t[32*l+:32]), .s(sum));
    always_ff @(posedge clk) if (s3_v && s3_en[l]) acc[32*l+:32] <= sum;
  end
  always_ff @(posedge clk) begin
    s4_fin <= !rst && s3_v && s3_lastw;
    s4_firstg <= s3_firstg;
    s4_lastg <= s3_lastg;
  end

  // ---- adder tree: level k adds lane[i] + lane[i + 32 >> k] -----------------------------------------
  logic [16*32-1:0] t1;
  logic [8*32-1:0] t2;
  logic [4*32-1:0] t3;
  logic [2*32-1:0] t4;
  logic [31:0] t5;
  logic [5:1] tv, tfirst, tlast;
  for (genvar i = 0; i < 16; i++) begin : g_t1
    logic [31:0] s;
    mempipe_fp32_add u (.a(acc[32*i+:32]), .b(acc[32*(i+16)+:32]), .s(s));
    always_ff @(posedge clk) t1[32*i+:32] <= s;
  end
  for (genvar i = 0; i < 8; i++) begin : g_t2
    logic [31:0] s;
    mempipe_fp32_add u (.a(t1[32*i+:32]), .b(t1[32*(i+8)+:32]), .s(s));
    always_ff @(posedge clk) t2[32*i+:32] <= s;
  end
  for (genvar i = 0; i < 4; i++) begin : g_t3
    logic [31:0] s;
    mempipe_fp32_add u (.a(t2[32*i+:32]), .b(t2[32*(i+4)+:32]), .s(s));
    always_ff @(posedge clk) t3[32*i+:32] <= s;
  end
  for (genvar i = 0; i < 2; i++) begin : g_t4
    logic [31:0] s;
    mempipe_fp32_add u (.a(t3[32*i+:32]), .b(t3[32*(i+2)+:32]), .s(s));
    always_ff @(posedge clk) t4[32*i+:32] <= s;
  end
  logic [31:0] t5_s;
  mempipe_fp32_add u_t5 (.a(t4[31:0]), .b(t4[63:32]), .s(t5_s));
  always_ff @(posedge clk) begin
    t5 <= t5_s;
    tv <= rst ? 5'd0 : {tv[4:1], s4_fin};
    tfirst <= {tfirst[4:1], s4_firstg};
    tlast <= {tlast[4:1], s4_lastg};
  end

  // ---- group aggregation, head order: v > agg ? v : agg, or agg + v -------------------------------
  logic [31:0] agg, agg_sum_v, agg_next;
  logic v_gt_agg;
  mempipe_fp32_add u_agg (.a(agg), .b(t5), .s(agg_sum_v));
  mempipe_fp32_gt u_agg_gt (.a(t5), .b(agg), .gt(v_gt_agg));
  always_comb begin
    if (tfirst[5]) agg_next = t5;
    else if (agg_sum) agg_next = agg_sum_v;
    else agg_next = v_gt_agg ? t5 : agg;
  end
  always_ff @(posedge clk) begin
    if (tv[5]) agg <= agg_next;
    score_valid <= !rst && tv[5] && tlast[5];
    score_data <= agg_next;
  end
endmodule
