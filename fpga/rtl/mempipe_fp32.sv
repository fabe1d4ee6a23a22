// mempipe fpga rtl: IEEE-754 binary32 arithmetic, bit-exact with the C++ reference on x86-64.
//
// The reference (retriever/relevancy.h) is built with -ffp-contract=off and default MXCSR: fp32
// products and sums, round to nearest even, subnormal inputs and outputs kept (no flush to zero),
// overflow to infinity. These units do exactly that, combinationally (the caller registers
// around them). NaNs follow SSE: a NaN operand is returned quieted (the first operand's if both
// are NaN); an invalid operation (inf * 0, inf - inf) returns the default NaN 0xFFC00000.
//
//   mempipe_fp32_mul m(.a(x), .b(y), .p(x_times_y));
//   mempipe_fp32_add s(.a(x), .b(y), .s(x_plus_y));
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

module mempipe_fp32_mul (
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic [31:0] p
);
  wire        sa = a[31], sb = b[31];
  wire  [7:0] ea = a[30:23], eb = b[30:23];
  wire [22:0] fa = a[22:0], fb = b[22:0];
  wire a_nan = ea == 8'hff && fa != 0, b_nan = eb == 8'hff && fb != 0;
  wire a_inf = ea == 8'hff && fa == 0, b_inf = eb == 8'hff && fb == 0;
  wire a_zero = ea == 0 && fa == 0, b_zero = eb == 0 && fb == 0;
  wire sp = sa ^ sb;

  // Significands with the hidden bit; a subnormal has exponent 1 and no hidden bit.
  wire [23:0] ma = {ea != 0, fa}, mb = {eb != 0, fb};
  wire [47:0] prod = ma * mb;
  wire signed [11:0] ea_eff = {4'd0, (ea == 0) ? 8'd1 : ea};
  wire signed [11:0] eb_eff = {4'd0, (eb == 0) ? 8'd1 : eb};

  logic [5:0] lead;  // position of the product's leading one
  logic signed [11:0] e_unb;  // biased exponent of the result before subnormal shift
  logic [47:0] pn;  // product, leading one at bit 47
  logic [5:0] rsh;  // extra right shift for a subnormal result (saturated)
  logic [47:0] q;
  logic sticky_sh;
  logic [7:0] e_field;
  logic guard, sticky;
  logic [30:0] mag;
  always_comb begin
    lead = 6'd0;
    for (int i = 0; i < 48; i++) if (prod[i]) lead = i[5:0];
    e_unb = $signed({6'd0, lead}) + ea_eff + eb_eff - 12'sd173;
    pn = prod << (6'd47 - lead);
    if (e_unb >= 1) rsh = 6'd0;
    else if (e_unb < -47) rsh = 6'd49;
    else rsh = 6'(12'sd1 - e_unb);
    sticky_sh = 1'b0;
    for (int i = 0; i < 48; i++) if (i < rsh && pn[i]) sticky_sh = 1'b1;
    q = (rsh >= 6'd48) ? 48'd0 : (pn >> rsh);
    e_field = (e_unb >= 1) ? e_unb[7:0] : 8'd0;
    guard = q[23];
    sticky = (|q[22:0]) | sticky_sh;
    mag = {e_field, q[46:24]};
    if (guard && (sticky || q[24])) mag = mag + 31'd1;  // may carry into the exponent
    if (a_nan) p = a | 32'h0040_0000;
    else if (b_nan) p = b | 32'h0040_0000;
    else if ((a_inf && b_zero) || (a_zero && b_inf)) p = 32'hffc0_0000;
    else if (a_inf || b_inf) p = {sp, 8'hff, 23'd0};
    else if (a_zero || b_zero) p = {sp, 31'd0};
    else if (e_unb >= 255) p = {sp, 8'hff, 23'd0};
    else p = {sp, mag};
  end
endmodule

module mempipe_fp32_add (
    input  logic [31:0] a,
    input  logic [31:0] b,
    output logic [31:0] s
);
  wire a_nan = a[30:23] == 8'hff && a[22:0] != 0, b_nan = b[30:23] == 8'hff && b[22:0] != 0;
  wire a_inf = a[30:23] == 8'hff && a[22:0] == 0, b_inf = b[30:23] == 8'hff && b[22:0] == 0;
  // x: the operand of larger magnitude.
  wire swap = b[30:0] > a[30:0];
  wire [31:0] x = swap ? b : a, y = swap ? a : b;
  wire [7:0] ex_eff = (x[30:23] == 0) ? 8'd1 : x[30:23];
  wire [7:0] ey_eff = (y[30:23] == 0) ? 8'd1 : y[30:23];
  wire [7:0] d = ex_eff - ey_eff;
  // Significand, then guard, round and sticky bits.
  wire [26:0] mx = {x[30:23] != 0, x[22:0], 3'b000};
  wire [26:0] my0 = {y[30:23] != 0, y[22:0], 3'b000};
  wire sub = x[31] ^ y[31];

  logic [26:0] my;
  logic st;
  logic [27:0] sum;
  logic [4:0] lz;
  logic [8:0] e;
  logic [7:0] lsh;
  logic [27:0] sn;
  logic [26:0] sig;
  logic [7:0] e_field;
  logic [30:0] mag;
  logic exact_zero, overflow;
  always_comb begin
    st = 1'b0;
    for (int i = 0; i < 27; i++) if (i < d && my0[i]) st = 1'b1;
    my = (d >= 8'd27) ? 27'd0 : (my0 >> d);
    my[0] = my[0] | st;
    sum = sub ? ({1'b0, mx} - {1'b0, my}) : ({1'b0, mx} + {1'b0, my});
    exact_zero = sum == 28'd0;
    overflow = 1'b0;
    sig = 27'd0;
    e = {1'b0, ex_eff};
    lz = 5'd0;
    lsh = 8'd0;
    sn = 28'd0;
    if (sum[27]) begin  // carry out: shift right one, keeping the sticky bit
      sig = {sum[27:2], sum[1] | sum[0]};
      e = e + 9'd1;
      overflow = e >= 9'd255;
    end else begin
      lz = 5'd27;
      for (int i = 0; i < 27; i++) if (sum[i]) lz = 5'(26 - i);
      // Normalize, but no further than exponent 1 (a subnormal result).
      lsh = ({3'd0, lz} < ex_eff - 8'd1) ? {3'd0, lz} : ex_eff - 8'd1;
      sn = sum << lsh;
      sig = sn[26:0];
      e = {1'b0, ex_eff - lsh};
    end
    e_field = sig[26] ? e[7:0] : 8'd0;
    mag = {e_field, sig[25:3]};
    if (sig[2] && (sig[1] || sig[0] || sig[3])) mag = mag + 31'd1;
    if (a_nan) s = a | 32'h0040_0000;
    else if (b_nan) s = b | 32'h0040_0000;
    else if (a_inf && b_inf && a[31] != b[31]) s = 32'hffc0_0000;
    else if (a_inf) s = a;
    else if (b_inf) s = b;
    else if (exact_zero) s = {x[31] & y[31], 31'd0};  // x - x = +0; -0 + -0 = -0
    else if (overflow) s = {x[31], 8'hff, 23'd0};
    else s = {x[31], mag};
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
