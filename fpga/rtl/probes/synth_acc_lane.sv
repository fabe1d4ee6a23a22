// Synthesis probe (fpga/rtl/synth.sh only, not part of the kernel): one lane of the score core's
// accumulator loop as mempipe_score_core.sv builds it (a 16-entry LUTRAM of running sums read
// asynchronously by head, the +0 / -0 operand multiplexers, the pipelined fp32 adder, the write
// back ADD_STAGES - 1 clocks later), so `ltp` measures the loop's register-to-register paths.
module synth_acc_lane (
    input  logic        clk,
    input  logic [3:0]  g_rd,
    input  logic [3:0]  g_wr,
    input  logic        init,
    input  logic        en,
    input  logic        wr,
    input  logic [31:0] t,
    output logic [31:0] sum_q
);
  logic [31:0] acc_mem[16];
  logic [31:0] sum;
  mempipe_fp32_add u_add (
      .clk, .a(init && en ? 32'd0 : acc_mem[g_rd]), .b(en ? t : 32'h8000_0000), .s(sum));
  always_ff @(posedge clk) begin
    if (wr) acc_mem[g_wr] <= sum;
    sum_q <= sum;
  end
endmodule
