// Test top for tests/fpga/rtl/fp32_units_test.cc: the fp32 units of fpga/rtl/mempipe_fp32.sv,
// combinational (PIPE = 0: p, s) and as the kernel instantiates them (pipelined: pp after
// MUL_STAGES - 1 = 4 clocks, sp after ADD_STAGES - 1 = 3 clocks).
module fp32_units_top (
    input  logic        clk,
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic [31:0] p,
    output logic [31:0] s,
    output logic        gt,
    output logic [31:0] h2f,
    output logic [31:0] pp,
    output logic [31:0] sp
);
  mempipe_fp32_mul #(.PIPE(1'b0)) u_mul (.clk, .a(a), .b(b), .p(p));
  mempipe_fp32_add #(.PIPE(1'b0)) u_add (.clk, .a(a), .b(b), .s(s));
  mempipe_fp32_mul u_mul_p (.clk, .a(a), .b(b), .p(pp));
  mempipe_fp32_add u_add_p (.clk, .a(a), .b(b), .s(sp));
  mempipe_fp32_gt u_gt (.a(a), .b(b), .gt(gt));
  mempipe_half_to_fp32 u_h2f (.h(a[15:0]), .f(h2f));
endmodule
