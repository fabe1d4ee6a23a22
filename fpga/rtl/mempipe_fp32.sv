// mempipe fpga rtl: IEEE-754 binary32 arithmetic, bit-exact with the C++ reference on x86-64.
//
// The reference (retriever/relevancy.h) is built with -ffp-contract=off and default MXCSR: fp32
// products and sums, round to nearest even, subnormal inputs and outputs kept (no flush to zero),
// overflow to infinity. These units do exactly that; the multiplier and the adder are pipelined
// (MUL_STAGES = 5, ADD_STAGES = 4: the result follows the operands by that many clocks once the
// caller registers it; PIPE = 0 gives the same logic without the inner registers). NaNs follow SSE: a NaN operand is returned quieted (the first operand's if both
// are NaN); an invalid operation (inf * 0, inf - inf) returns the default NaN 0xFFC00000.
//
//   mempipe_fp32_mul m(.clk, .a(x), .b(y), .p(x_times_y));   // 4 clocks later, combinational
//   mempipe_fp32_add s(.clk, .a(x), .b(y), .s(x_plus_y));    // 3 clocks later, combinational
//   mempipe_fp32_gt  g(.a(x), .b(y), .gt(x_greater_than_y));   // false if either is NaN
//   mempipe_half_to_fp32 h(.h(bits16), .f(bits32));           // exact, as Half::ToFloat

// Order-preserving unsigned key of a non-NaN float: a > b <=> key(a) > key(b), and
// key(+0) == key(-0).
module mempipe_fp32_key (
    input  logic [31:0] a,
    output logic [31:0] key
);
  always_comb begin
    if (a[30:0] == 31'd0) key = 32'h8000_0000;
    else if (a[31]) key = ~a;
    else key = {1'b1, a[30:0]};
  end
endmodule

module mempipe_fp32_gt (
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic        gt
);
  logic [31:0] ka, kb;
  mempipe_fp32_key uka (.a(a), .key(ka));
  mempipe_fp32_key ukb (.a(b), .key(kb));
  wire a_nan = a[30:23] == 8'hff && a[22:0] != 23'd0;
  wire b_nan = b[30:23] == 8'hff && b[22:0] != 23'd0;
  assign gt = !a_nan && !b_nan && ka > kb;
endmodule

// One pipeline boundary: a register when EN, a wire otherwise (the combinational variants the
// unit test drives without a clock).
module mempipe_pipe_reg #(
    parameter int W = 1,
    parameter bit EN = 1'b1
) (
    input  logic         clk,
    input  logic [W-1:0] d,
    output logic [W-1:0] q
);
  if (EN) begin : g_reg
    always_ff @(posedge clk) q <= d;
  end else begin : g_wire
    assign q = d;
  end
endmodule

// Product in MUL_STAGES = 5 stages (4 internal registers when PIPE; the result is combinational
// from the last stage, so a caller that registers it sees it 5 clocks after the operands):
//   1 significand product (DSP48E2) and special cases, 2 leading one and exponent,
//   3 normalize, 4 subnormal shift and sticky, 5 round and select.
module mempipe_fp32_mul #(
    parameter bit PIPE = 1'b1
) (
    input  logic        clk,
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic [31:0] p
);
  // Position of the highest set bit (0 if none), as a two-level tree: a priority within each
  // 8-bit group, then over the groups (a flat priority loop maps to a long multiplexer chain).
  function automatic logic [5:0] msb48(input logic [47:0] x);
    logic [5:0] any;
    logic [17:0] pos;  // 3 bits per group
    logic [2:0] top;
    for (int j = 0; j < 6; j++) begin
      any[j] = |x[8*j+:8];
      pos[3*j+:3] = 3'd0;
      for (int i = 0; i < 8; i++) if (x[8*j+i]) pos[3*j+:3] = i[2:0];
    end
    top = 3'd0;
    for (int j = 0; j < 6; j++) if (any[j]) top = j[2:0];
    msb48 = {top, pos[3*top+:3]};
  endfunction
  // ---- stage 1 ----
  wire        sa = a[31], sb = b[31];
  wire  [7:0] ea = a[30:23], eb = b[30:23];
  wire [22:0] fa = a[22:0], fb = b[22:0];
  wire a_nan = ea == 8'hff && fa != 0, b_nan = eb == 8'hff && fb != 0;
  wire a_inf = ea == 8'hff && fa == 0, b_inf = eb == 8'hff && fb == 0;
  wire a_zero = ea == 0 && fa == 0, b_zero = eb == 0 && fb == 0;
  // Significands with the hidden bit; a subnormal has exponent 1 and no hidden bit.
  wire [23:0] ma = {ea != 0, fa}, mb = {eb != 0, fb};
  wire [47:0] prod1 = ma * mb;
  wire signed [11:0] esum1 = {4'd0, (ea == 0) ? 8'd1 : ea} + {4'd0, (eb == 0) ? 8'd1 : eb};
  // Special results (NaN, inf, zero) decided from the operands alone.
  logic spec1;
  logic [31:0] spec_val1;
  always_comb begin
    spec1 = 1'b1;
    if (a_nan) spec_val1 = a | 32'h0040_0000;
    else if (b_nan) spec_val1 = b | 32'h0040_0000;
    else if ((a_inf && b_zero) || (a_zero && b_inf)) spec_val1 = 32'hffc0_0000;
    else if (a_inf || b_inf) spec_val1 = {sa ^ sb, 8'hff, 23'd0};
    else if (a_zero || b_zero) spec_val1 = {sa ^ sb, 31'd0};
    else begin
      spec1 = 1'b0;
      spec_val1 = 32'd0;
    end
  end
  logic [47:0] prod2;
  logic signed [11:0] esum2;
  logic sp2, spec2;
  logic [31:0] spec_val2;
  mempipe_pipe_reg #(.W(48 + 12 + 1 + 1 + 32), .EN(PIPE)) r12 (
      .clk, .d({prod1, esum1, sa ^ sb, spec1, spec_val1}),
      .q({prod2, esum2, sp2, spec2, spec_val2}));

  // ---- stage 2: leading one, exponent, subnormal shift amount ----
  logic [5:0] lead2;  // position of the product's leading one
  logic signed [11:0] e_unb2;  // biased exponent of the result before subnormal shift
  logic [5:0] rsh2;  // extra right shift for a subnormal result (saturated)
  always_comb begin
    lead2 = msb48(prod2);
    e_unb2 = $signed({6'd0, lead2}) + esum2 - 12'sd173;
    if (e_unb2 >= 1) rsh2 = 6'd0;
    else if (e_unb2 < -47) rsh2 = 6'd49;
    else rsh2 = 6'(12'sd1 - e_unb2);
  end
  logic [47:0] prod3;
  logic [5:0] lead3, rsh3;
  logic signed [11:0] e_unb3;
  logic sp3, spec3;
  logic [31:0] spec_val3;
  mempipe_pipe_reg #(.W(48 + 6 + 6 + 12 + 1 + 1 + 32), .EN(PIPE)) r23 (
      .clk, .d({prod2, lead2, rsh2, e_unb2, sp2, spec2, spec_val2}),
      .q({prod3, lead3, rsh3, e_unb3, sp3, spec3, spec_val3}));

  // ---- stage 3: normalize (leading one to bit 47) ----
  wire [47:0] pn3 = prod3 << (6'd47 - lead3);
  logic [47:0] pn4;
  logic [5:0] rsh4;
  logic signed [11:0] e_unb4;
  logic sp4, spec4;
  logic [31:0] spec_val4;
  mempipe_pipe_reg #(.W(48 + 6 + 12 + 1 + 1 + 32), .EN(PIPE)) r34 (
      .clk, .d({pn3, rsh3, e_unb3, sp3, spec3, spec_val3}),
      .q({pn4, rsh4, e_unb4, sp4, spec4, spec_val4}));

  // ---- stage 4: subnormal right shift, guard and sticky ----
  logic sticky_sh4;
  logic [47:0] q4;
  always_comb begin
    sticky_sh4 = 1'b0;
    for (int i = 0; i < 48; i++) if (i < rsh4 && pn4[i]) sticky_sh4 = 1'b1;
    q4 = (rsh4 >= 6'd48) ? 48'd0 : (pn4 >> rsh4);
  end
  wire [7:0] e_field4 = (e_unb4 >= 1) ? e_unb4[7:0] : 8'd0;
  wire guard4 = q4[23];
  wire round_up4 = guard4 && ((|q4[22:0]) || sticky_sh4 || q4[24]);
  wire ovf4 = e_unb4 >= 255;
  logic [30:0] mag5;
  logic round_up5, ovf5, sp5, spec5;
  logic [31:0] spec_val5;
  mempipe_pipe_reg #(.W(31 + 1 + 1 + 1 + 1 + 32), .EN(PIPE)) r45 (
      .clk, .d({e_field4, q4[46:24], round_up4, ovf4, sp4, spec4, spec_val4}),
      .q({mag5, round_up5, ovf5, sp5, spec5, spec_val5}));

  // ---- stage 5: round to nearest even (may carry into the exponent), select ----
  wire [30:0] mag_inc5 = mag5 + 31'd1;  // in parallel with the rounding decision
  wire [30:0] mag_r5 = round_up5 ? mag_inc5 : mag5;
  always_comb begin
    if (spec5) p = spec_val5;
    else if (ovf5) p = {sp5, 8'hff, 23'd0};
    else p = {sp5, mag_r5};
  end
endmodule

// Sum in ADD_STAGES = 4 stages (3 internal registers when PIPE; the result is combinational from
// the last stage): 1 magnitude compare, swap, exponent difference and special cases,
// 2 alignment shift with sticky bit and the significand add, 3 leading zeros and exponent,
// 4 normalize shift, round and select.
module mempipe_fp32_add #(
    parameter bit PIPE = 1'b1
) (
    input  logic        clk,
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic [31:0] s
);
  // Position of the highest set bit (0 if none), as a two-level tree: a priority within each
  // 8-bit group, then over the groups (a flat priority loop maps to a long multiplexer chain).
  function automatic logic [5:0] msb48(input logic [47:0] x);
    logic [5:0] any;
    logic [17:0] pos;  // 3 bits per group
    logic [2:0] top;
    for (int j = 0; j < 6; j++) begin
      any[j] = |x[8*j+:8];
      pos[3*j+:3] = 3'd0;
      for (int i = 0; i < 8; i++) if (x[8*j+i]) pos[3*j+:3] = i[2:0];
    end
    top = 3'd0;
    for (int j = 0; j < 6; j++) if (any[j]) top = j[2:0];
    msb48 = {top, pos[3*top+:3]};
  endfunction
  // ---- stage 1 ----
  wire a_nan = a[30:23] == 8'hff && a[22:0] != 0, b_nan = b[30:23] == 8'hff && b[22:0] != 0;
  wire a_inf = a[30:23] == 8'hff && a[22:0] == 0, b_inf = b[30:23] == 8'hff && b[22:0] == 0;
  // x: the operand of larger magnitude.
  wire swap = b[30:0] > a[30:0];
  wire [31:0] x = swap ? b : a, y = swap ? a : b;
  wire [7:0] ea_eff = (a[30:23] == 0) ? 8'd1 : a[30:23];
  wire [7:0] eb_eff = (b[30:23] == 0) ? 8'd1 : b[30:23];
  // Both differences in parallel with the compare, then a select.
  wire [7:0] d_ab = ea_eff - eb_eff, d_ba = eb_eff - ea_eff;
  logic spec1;
  logic [31:0] spec_val1;
  always_comb begin
    spec1 = 1'b1;
    if (a_nan) spec_val1 = a | 32'h0040_0000;
    else if (b_nan) spec_val1 = b | 32'h0040_0000;
    else if (a_inf && b_inf && a[31] != b[31]) spec_val1 = 32'hffc0_0000;
    else if (a_inf) spec_val1 = a;
    else if (b_inf) spec_val1 = b;
    else begin
      spec1 = 1'b0;
      spec_val1 = 32'd0;
    end
  end
  logic [7:0] ex2, d2;
  logic [23:0] mx2, my2;  // significands with the hidden bit
  logic sub2, sx2, szero2, spec2;
  logic [31:0] spec_val2;
  mempipe_pipe_reg #(.W(8 + 8 + 24 + 24 + 4 + 32), .EN(PIPE)) r12 (
      .clk,
      .d({swap ? eb_eff : ea_eff, swap ? d_ba : d_ab, x[30:23] != 0, x[22:0], y[30:23] != 0,
          y[22:0], x[31] ^ y[31], x[31], x[31] & y[31], spec1, spec_val1}),
      .q({ex2, d2, mx2, my2, sub2, sx2, szero2, spec2, spec_val2}));

  // ---- stage 2: align y (guard, round and sticky bits), add or subtract ----
  wire [26:0] my0 = {my2, 3'b000};
  logic [26:0] my;
  logic st;
  logic [27:0] sum2;
  always_comb begin
    st = 1'b0;
    for (int i = 0; i < 27; i++) if (i < d2 && my0[i]) st = 1'b1;
    my = (d2 >= 8'd27) ? 27'd0 : (my0 >> d2);
    my[0] = my[0] | st;
    sum2 = sub2 ? ({1'b0, mx2, 3'b000} - {1'b0, my}) : ({1'b0, mx2, 3'b000} + {1'b0, my});
  end
  logic [27:0] sum3;
  logic [7:0] ex3;
  logic sx3, szero3, spec3;
  logic [31:0] spec_val3;
  mempipe_pipe_reg #(.W(28 + 8 + 3 + 32), .EN(PIPE)) r23 (
      .clk, .d({sum2, ex2, sx2, szero2, spec2, spec_val2}),
      .q({sum3, ex3, sx3, szero3, spec3, spec_val3}));

  // ---- stage 3: normalization amount and exponent ----
  // Leading zeros of the 27-bit sum (27 if zero); the shift stops at exponent 1 (a subnormal).
  wire [5:0] msb3 = msb48({21'd0, sum3[26:0]});
  wire [4:0] lz3 = sum3[26:0] == 27'd0 ? 5'd27 : 5'(6'd26 - msb3);
  wire [7:0] lsh3 = ({3'd0, lz3} < ex3 - 8'd1) ? {3'd0, lz3} : ex3 - 8'd1;
  wire carry3 = sum3[27];  // carry out: shift right one, keeping the sticky bit
  wire [8:0] e_inc3 = {1'b0, ex3} + 9'd1;
  wire [7:0] e3 = carry3 ? e_inc3[7:0] : ex3 - lsh3;
  wire overflow3 = carry3 && e_inc3 >= 9'd255;
  wire exact_zero3 = sum3 == 28'd0;
  logic [27:0] sum4;
  logic [4:0] lsh4;
  logic [7:0] e4;
  logic carry4, overflow4, exact_zero4, sx4, szero4, spec4;
  logic [31:0] spec_val4;
  mempipe_pipe_reg #(.W(28 + 5 + 8 + 6 + 32), .EN(PIPE)) r34 (
      .clk,
      .d({sum3, lsh3[4:0], e3, carry3, overflow3, exact_zero3, sx3, szero3, spec3, spec_val3}),
      .q({sum4, lsh4, e4, carry4, overflow4, exact_zero4, sx4, szero4, spec4, spec_val4}));

  // ---- stage 4: normalize, round to nearest even, select ----
  wire [27:0] sn4 = sum4 << lsh4;
  wire [26:0] sig4 = carry4 ? {sum4[27:2], sum4[1] | sum4[0]} : sn4[26:0];
  wire [7:0] e_field4 = sig4[26] ? e4 : 8'd0;
  wire round_up4 = sig4[2] && (sig4[1] || sig4[0] || sig4[3]);
  wire [30:0] mag4 = {e_field4, sig4[25:3]};
  wire [30:0] mag_inc4 = mag4 + 31'd1;  // in parallel with the rounding decision
  always_comb begin
    if (spec4) s = spec_val4;
    else if (exact_zero4) s = {szero4, 31'd0};  // x - x = +0; -0 + -0 = -0
    else if (overflow4) s = {sx4, 8'hff, 23'd0};
    else s = {sx4, round_up4 ? mag_inc4 : mag4};
  end
endmodule

// IEEE binary16 -> binary32, exact (fpga/hls/kernel_common.h HalfBitsToFloat).
module mempipe_half_to_fp32 (
    input  logic [15:0] h,
    output logic [31:0] f
);
  logic [3:0] k;
  logic [22:0] frac;
  always_comb begin
    k = 4'd0;
    for (int i = 0; i < 10; i++) if (h[i]) k = i[3:0];
    frac = 23'({h[9:0], 13'd0} << (4'd10 - k));
    if (h[14:10] == 5'h1f) f = {h[15], 8'hff, h[9:0], 13'd0};
    else if (h[14:10] != 0) f = {h[15], 3'd0, h[14:10], 23'd0} + {1'b0, 8'd112, h[9:0], 13'd0};
    else if (h[9:0] == 0) f = {h[15], 31'd0};
    else f = {h[15], 8'(8'd103 + {4'd0, k}), frac};
  end
endmodule
