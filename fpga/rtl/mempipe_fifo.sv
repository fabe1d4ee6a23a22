// mempipe fpga rtl: synchronous first-word-fall-through FIFO (distributed-RAM sized).
//
//   mempipe_fifo #(.W(512), .DEPTH(64)) f (.clk, .rst, .push, .din, .full, .pop, .dout, .empty,
//                                          .count);
// `dout` is valid while !empty; pop and push in the same cycle are allowed.
module mempipe_fifo #(
    parameter int W = 32,
    parameter int DEPTH = 16  // a power of two
) (
    input  logic                     clk,
    input  logic                     rst,
    input  logic                     push,
    input  logic [W-1:0]             din,
    output logic                     full,
    input  logic                     pop,
    output logic [W-1:0]             dout,
    output logic                     empty,
    output logic [$clog2(DEPTH):0]   count
);
  localparam int AW = $clog2(DEPTH);
  logic [W-1:0] mem[DEPTH];
  logic [AW-1:0] wp, rp;
  assign full = count == (AW + 1)'(DEPTH);
  assign empty = count == 0;
  assign dout = mem[rp];
  wire do_push = push && !full;
  wire do_pop = pop && !empty;
  always_ff @(posedge clk) begin
    if (do_push) mem[wp] <= din;
    if (rst) begin
      wp <= '0;
      rp <= '0;
      count <= '0;
    end else begin
      if (do_push) wp <= wp + 1'b1;
      if (do_pop) rp <= rp + 1'b1;
      count <= count + (do_push ? 1'b1 : 1'b0) - (do_pop ? 1'b1 : 1'b0);
    end
  end
endmodule
