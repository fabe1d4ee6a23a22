// Test top for tests/fpga/rtl/fp32_units_test.cc: the fp32 units of fpga/rtl/mempipe_fp32.sv.
module fp32_units_top (
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic [31:0] p,
    output logic [31:0] s,
    output logic        gt,
    output logic [31:0] h2f
);
  mempipe_fp32_mul u_mul (.a(a), .b(b), .p(p));
  mempipe_fp32_add u_add (.a(a), .b(b), .s(s));
  mempipe_fp32_gt u_gt (.a(a), .b(b), .gt(gt));
  mempipe_half_to_fp32 u_h2f (.h(a[15:0]), .f(h2f));
endmodule
