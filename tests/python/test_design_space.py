"""Tests of the design-space model (integration/bench/design_space.py) and plots.py.

Limits a correct model must meet, properties that catch a wrong one, the validation against the
measured H200 points (and that a known-wrong parameter fails it), the U55C parameters read from
fpga/emulation/u55c_params.h (and that a changed header changes the model), and the plotting tool."""

import itertools
import json
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

import design_space as ds  # integration/bench, on pytest's pythonpath (pyproject.toml)
import plots

ROOT = Path(__file__).resolve().parents[2]

CONTEXTS = (4096, 32768, 131072, 524288, 1048576)
BATCHES = (1, 3, 8)


def system(**kw):
    return ds.System(ds.h200(), ds.FpgaSpec.from_header(), **kw)


def workload(context=131072, batch=1, shape=None, **kw):
    sel = {k: kw.pop(k) for k in list(kw) if k in {f.name for f in fields(ds.Selection)}}
    return ds.Workload(shape or ds.llama3_8b(), ds.Selection(**sel), context, batch, **kw)


# --- the U55C parameters come from fpga/emulation/u55c_params.h ---------------------------------------

def test_u55c_parsed_from_header_with_sources():
    parsed = ds.parse_u55c_params()
    f = ds.FpgaSpec.from_header()
    text = (ROOT / "fpga" / "emulation" / "u55c_params.h").read_text()
    # Every field the header declares is parsed, and every one the model uses agrees with it.
    declared = [line.split("=")[0].split()[-1] for line in text.splitlines()
                if line.strip().startswith(("int ", "double ")) and "=" in line]
    assert sorted(declared) == sorted(parsed)
    for name, src in f.sources:
        assert getattr(f, name) == parsed[name]["value"]
        assert src.startswith("fpga/emulation/u55c_params.h: ") and len(src) > 30, name
    # The header's own arithmetic at the Vitis targets (the what-if): 417 / 460 of 14.375 GB/s
    # per channel, 32 channels.
    vitis = replace(f, vitis_target_what_if=True)
    assert vitis.card_read_bps() == pytest.approx(417e9, rel=1e-9)
    # As the RTL prices it (the default): the CUs that fit, each port at the RTL's clock estimate.
    hz = min(f.kernel_clock_hz, f.rtl_clock_estimate_hz)
    assert f.priced_clock_hz() == hz and hz < 300e6
    assert f.card_read_bps() == pytest.approx(
        min(f.num_cus, f.rtl_cus_that_fit) * min(14.375e9 * 417 / 460, 64 * hz), rel=1e-9)
    assert f.card_read_bps() < vitis.card_read_bps() / 2


def test_changed_header_changes_the_model(tmp_path):
    text = (ROOT / "fpga" / "emulation" / "u55c_params.h").read_text()
    assert "double launch_latency_s = 50e-6;" in text
    changed = tmp_path / "u55c_params.h"
    changed.write_text(text.replace("double launch_latency_s = 50e-6;",
                                    "double launch_latency_s = 100e-6;"))
    a = ds.FpgaSpec.from_header()
    b = ds.FpgaSpec.from_header(changed)
    assert b.launch_latency_s == 100e-6
    w = workload(32768)
    ta = ds.evaluate("fpga", w, ds.System(ds.h200(), a)).step_s
    tb = ds.evaluate("fpga", w, ds.System(ds.h200(), b)).step_s
    # 30 sparse layers x (score + update call) x 50 us more launch latency.
    assert tb - ta == pytest.approx(30 * 2 * 50e-6, rel=1e-6)


def test_header_errors_are_clear(tmp_path):
    bad = tmp_path / "u55c_params.h"
    bad.write_text("struct U55cParams {\n  // source\n  double x = sqrt(2);\n};\n")
    with pytest.raises(ValueError, match="unsupported initializer"):
        ds.parse_u55c_params(bad)
    bad.write_text("struct U55cParams {\n  double x = 2;\n};\n")
    with pytest.raises(ValueError, match="x has no source"):
        ds.parse_u55c_params(bad)
    bad.write_text("struct Other {};\n")
    with pytest.raises(ValueError, match="no `struct U55cParams"):
        ds.parse_u55c_params(bad)


def test_fpga_calls_agree_with_the_cpp_emulator():
    e = ds.validate_emulator()
    assert abs(e["error"]) < 1e-9, e
    # A known-wrong parameter (the DMA overhead doubled) is caught by this check.
    f = replace(ds.FpgaSpec.from_header(), dma_transfer_overhead_s=10e-6)
    assert abs(ds.validate_emulator(fpga=f)["error"]) > 0.05


# --- every parameter names its source ---------------------------------------------------------

@pytest.mark.parametrize("gpu", [ds.h200(), ds.mi210()], ids=["h200", "mi210"])
def test_every_parameter_has_a_source(gpu):
    for name, value, src in ds.parameter_table(gpu):
        assert isinstance(src, str) and len(src) >= 10, (name, src)
    assert "assumption" in ds.gpu_sources(ds.mi210())["select_eff"]


# --- limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("context", CONTEXTS)
def test_dense_is_bytes_over_bandwidth_without_linear_layers(context):
    g = replace(ds.h200(), decode_fixed_s=0.0, launch_s=0.0)
    shape = ds.attention_only(ds.llama3_8b())
    r = ds.evaluate("dense", workload(context, 1, shape), ds.System(g, ds.FpgaSpec.from_header()))
    kv = shape.layers * context * 2 * shape.kv_heads * shape.head_dim * 2
    # Only the appended token's K/V remain beyond the cache bytes.
    append = shape.layers * 2 * shape.kv_heads * shape.head_dim * 2
    assert r.step_s == pytest.approx((kv + append) / g.hbm_bps, rel=1e-12)
    assert r.bytes["kv"] == kv


def test_linear_layers_are_the_measured_weight_stream():
    shape = ds.llama3_8b()
    assert shape.weight_bytes() == pytest.approx(15.0e9, rel=0.03)  # ANCHORS.md: 15 GB
    t = ds.gpu_linear(ds.h200(), shape, 1, shape.weight_bytes())
    assert t == pytest.approx(4.3e-3, rel=0.03)  # ANCHORS.md: measured 4.3 ms at batch 1


def test_kv_capacity_flags():
    # 128K x 8 of Llama-3-8B is 137 GB of KV: with 15 GB of weights it exceeds one H200.
    assert ds.evaluate("dense", workload(131072, 4), system()).fits
    assert not ds.evaluate("dense", workload(131072, 8), system()).fits


# --- properties -------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,io,striping", list(itertools.product(
    ds.SCHEMES, ("as_built", "coalesced"), ("per_head", "all"))))
def test_fpga_never_faster_than_its_card_or_the_gpu_work(scheme, io, striping):
    s = system(io=io, striping=striping)
    shapes = (ds.llama3_8b(), ds.attention_only(ds.llama3_8b()))
    for L, B, shape, C in itertools.product(CONTEXTS, BATCHES, shapes, (1, 16)):
        m = min(4, B) if scheme == "pipelined" else 1
        w = workload(L, B, shape, scheme=scheme, micro_batches=m, reuse=C)
        r = ds.evaluate("fpga", w, s)
        assert r.step_s >= r.card_busy_s * (1 - 1e-12)
        assert r.step_s >= r.gpu_busy_s * (1 - 1e-12)
        assert r.step_s == pytest.approx(sum(r.steps_s.values()), rel=1e-12)
        # The whole sparse step is never cheaper than the GPU's part of the gpu placement.
        gpu = ds.evaluate("gpu", w, s)
        own = gpu.step_s - gpu.steps_s["relevancy"] - gpu.steps_s["retrieval"]
        assert r.step_s >= own * (1 - 1e-9)


@pytest.mark.parametrize("placement", ["gpu", "fpga"])
def test_more_budget_never_lowers_sparse_time(placement):
    for L, B, io in itertools.product(CONTEXTS, BATCHES, ("as_built", "coalesced")):
        times = [ds.evaluate(placement, workload(L, B, budget=k), system(io=io)).step_s
                 for k in (256, 1024, 4096, 16384)]
        assert all(a <= b * (1 + 1e-12) for a, b in zip(times, times[1:])), (L, B, times)


def test_levers_never_hurt_the_fpga_time():
    for L, B in itertools.product(CONTEXTS, BATCHES):
        base = ds.evaluate("fpga", workload(L, B), system()).step_s
        for w, s in [(workload(L, B), system(cards=2)), (workload(L, B), system(cards=8)),
                     (workload(L, B), system(io="coalesced")),
                     (workload(L, B), system(striping="all")),
                     (workload(L, B, reuse=4), system()),
                     (workload(L, B, digest="int8"), system()),
                     (workload(L, B), ds.System(ds.h200(),
                                                ds.FpgaSpec.from_header().scaled("x2", 2.0)))]:
            assert ds.evaluate("fpga", w, s).step_s <= base * (1 + 1e-12)


def test_sparse_beats_dense_at_long_context_and_sparse_costs_more_when_short():
    s = system()
    assert ds.evaluate("gpu", workload(1048576, 1), s).step_s < \
        ds.evaluate("dense", workload(1048576, 1), s).step_s / 3
    # Below the budget a sparse step reads all K/V plus the digests: no cheaper than dense.
    assert ds.evaluate("gpu", workload(2048, 1), s).step_s >= \
        ds.evaluate("dense", workload(2048, 1), s).step_s


@pytest.mark.parametrize("scheme", ds.SCHEMES)
def test_the_gpu_waits_for_the_card_except_in_async_reuse(scheme):
    # A huge GPU<->host copy latency: every scheme but async reuse waits for it once per
    # sparse layer and selection; async never does.
    # The card at the Vitis targets (the what-if): fast enough that only the latency matters
    # (priced as the RTL, the card itself is slower than this floor at 128K x 4).
    g = replace(ds.h200(), host_copy_latency_s=5e-3)
    s = ds.System(g, replace(ds.FpgaSpec.from_header(), vitis_target_what_if=True),
                  io="coalesced", striping="all")
    for C in (1, 4):
        r = ds.evaluate("fpga", workload(131072, 4, scheme=scheme, reuse=C), s)
        floor = 30 * 2 * 5e-3 / C
        if scheme == "async":
            assert r.step_s < floor / 2
        else:
            assert r.step_s >= floor


def test_score_kernel_mirrors_u55c_model_by_hand():
    f = ds.FpgaSpec.from_header()
    sel, sh = ds.Selection(), ds.llama3_8b()
    n = 1048576 // 16
    q, table, out = 4 * 128 * 4, n * 4, 256 * 4
    hbm = n * 2 * 256 + q + table + 4 + out + 4
    # Priced at the RTL's clock estimate (below the 300 MHz Vitis target): the port, 64 B a
    # clock, may be slower than the channel.
    hz = min(300e6, f.rtl_clock_estimate_hz)
    mem = hbm / min(14.375e9 * 417 / 460, 64 * hz)
    # The RTL kernel's timing (fpga/rtl): 4 row words x max(group 4, 4 adder stages) clocks per
    # page in the score core; the emit pass (a clock per page plus k) and the query load
    # (4 x 128 / 16 words) after it; the pipeline fill (fitted to the RTL simulation,
    # fpga/rtl/cycles.md).
    score = n * 4 * 4 / hz
    serial = (n + 256 + 4 * 128 / 16) / hz
    fill = f.pipeline_fill_clocks / hz
    # The 8 KV heads run on the CUs that fit (5: rtl_cus_that_fit), two rounds.
    rounds = -(-8 // min(32, f.rtl_cus_that_fit))
    c = ds.fpga_score_call(ds.System(ds.h200(), f), sh, sel, 1048576, 1)
    assert c.kernel_s == pytest.approx(rounds * (max(mem, score) + serial + fill), rel=1e-12)
    assert c.launch_s == pytest.approx(50e-6 + 7 * 2e-6)
    # 4.4 us per transfer; its first MiB at the small-transfer rate (u55c_params.h)
    dma_in = 4.4e-6 + (4096 + 262144 + 4096) / 4.3e9
    dma_out = 4.4e-6 + (4096 + 4096) / 4.5e9
    assert c.to_card_s == pytest.approx(8 * dma_in) and c.from_card_s == pytest.approx(8 * dma_out)
    # A card with 8x the bandwidth (and an 8x wider word, half a word per digest row): the score
    # core (group 4 x 0.5 word clocks per page) sets the pace.
    fast = f.scaled("x8", 8.0)
    score_fast = n * 0.5 * 4 / hz
    assert hbm / fast.channel_read_bps() < score_fast
    c = ds.fpga_score_call(ds.System(ds.h200(), fast), sh, sel, 1048576, 1)
    assert c.kernel_s == pytest.approx(rounds * (score_fast + serial + fill), rel=1e-12)


@pytest.mark.parametrize("context", [16, 1000, 4096])
def test_below_the_budget_sparse_reads_every_token(context):
    s = system()
    d = ds.evaluate("dense", workload(context, 2), s)
    for placement in ("gpu", "fpga"):
        assert ds.evaluate(placement, workload(context, 2), s).bytes["kv"] == d.bytes["kv"]
    assert ds.evaluate("gpu", workload(8192, 2), s).bytes["kv"] < \
        ds.evaluate("dense", workload(8192, 2), s).bytes["kv"]


def test_micro_batches_reread_the_weights():
    s = system(io="coalesced", striping="all")
    one = ds.evaluate("fpga", workload(131072, 8, scheme="pipelined", micro_batches=1), s)
    four = ds.evaluate("fpga", workload(131072, 8, scheme="pipelined", micro_batches=4), s)
    assert four.steps_s["linear"] > 3 * one.steps_s["linear"]


def test_lookahead_pays_the_speculated_query_gemv():
    """Look-ahead speculates each sparse layer's query from the layer before (one more GEMV with
    that layer's W_q, [q_heads * head_dim, hidden]): `linear` and the weight bytes grow by one
    W_q GEMV per sparse layer over the sync scheme's; where the card keeps up (reuse 16, 8K) the
    GEMV is on the critical path. Known-wrong: the sync scheme's linear, or a GEMV of the whole
    QKV weight, do not match."""
    s = system(io="coalesced", striping="all")
    sh = ds.llama3_8b()
    n_sparse = sh.layers - sh.dense_layers
    wq = sh.hidden * sh.q_heads * sh.head_dim * sh.elt_bytes
    assert sh.q_weight_bytes() == wq == 4096 * 4096 * 2
    for L, B, C in itertools.product((8192, 131072), (1, 8), (1, 16)):
        look = ds.evaluate("fpga", workload(L, B, scheme="lookahead", reuse=C), s)
        sync = ds.evaluate("fpga", workload(L, B, scheme="sync", reuse=C), s)
        gemv = ds.gpu_linear(s.gpu, sh, B, wq)
        extra = look.steps_s["linear"] - sync.steps_s["linear"]
        assert extra == pytest.approx(n_sparse * gemv, rel=1e-9), (L, B, C)
        qkv = (sh.q_heads + 2 * sh.kv_heads) * sh.head_dim * sh.hidden * sh.elt_bytes
        assert not extra == pytest.approx(n_sparse * ds.gpu_linear(s.gpu, sh, B, qkv), rel=1e-3)
        assert not extra == pytest.approx(0.0, abs=1e-12)
        assert look.bytes["weights"] - sync.bytes["weights"] == n_sparse * wq
        assert any("speculated-query GEMVs" in n for n in look.notes)
        assert look.step_s >= look.gpu_busy_s * (1 - 1e-12)
    # The card keeps up: the step is the GPU's own work, the GEMVs included.
    look = ds.evaluate("fpga", workload(8192, 1, scheme="lookahead", reuse=16), s)
    gpu = ds.evaluate("gpu", workload(8192, 1, reuse=16), s)
    own = gpu.step_s - gpu.steps_s["relevancy"] - gpu.steps_s["retrieval"]
    assert look.step_s >= own + n_sparse * ds.gpu_linear(s.gpu, sh, 1, wq) * (1 - 1e-9)
    # No linear layers (the single-layer view): nothing to speculate with, nothing added.
    attn = ds.attention_only(sh)
    a = ds.evaluate("fpga", workload(8192, 1, attn, scheme="lookahead"), s)
    assert a.steps_s["linear"] == 0 and a.bytes["weights"] == 0


def test_reuse_divides_the_selection_bytes():
    s = system()
    a = ds.evaluate("gpu", workload(524288, 1), s)
    b = ds.evaluate("gpu", workload(524288, 1, reuse=4), s)
    assert b.bytes["digests"] == pytest.approx(a.bytes["digests"] / 4)
    assert b.steps_s["relevancy"] == pytest.approx(a.steps_s["relevancy"] / 4)


def test_int8_and_hierarchy_shrink_the_digests():
    sel = ds.Selection()
    assert ds.Selection(digest="int8").digest_bytes_per_page(128) == \
        pytest.approx(sel.digest_bytes_per_page(128) / 2 + 8)
    h = ds.Selection(super_page=64)
    assert h.scanned_pages(1048576) == 1048576 // 64 + 2 * 4096 // 16
    assert h.scanned_pages(2048) == sel.scanned_pages(2048)  # under the budget: flat


def test_energy_accounts_idle_power():
    r = ds.evaluate("fpga", workload(32768, 1), system())
    f = ds.FpgaSpec.from_header()
    # The card idles at least during the GPU's own work.
    assert r.card_energy_j >= f.board_power_idle_w * (r.step_s - r.card_busy_s) * (1 - 1e-9)
    g = ds.h200()
    assert r.step_s > r.gpu_busy_s * 1.01  # the GPU waits on the card as built
    assert r.gpu_energy_j == pytest.approx(g.power_active_w * r.gpu_busy_s +
                                           g.power_idle_w * (r.step_s - r.gpu_busy_s))
    d = ds.evaluate("dense", workload(32768, 1), system())
    assert d.card_energy_j == 0 and d.gpu_energy_j == pytest.approx(700 * d.step_s)


# --- validation against the measured H200 points ---------------------------------------------

def test_validation_passes_with_the_documented_parameters():
    v = ds.validate()
    s = v["summary"]
    assert s["passed"], s
    assert s["held_out"] >= 50  # v10 file: 55 held-out points
    assert all(abs(r["error"]) < ds.MAX_ERR_BOUND for r in v["rows"] if not r["superseded"])


@pytest.mark.parametrize("name,value", [("hbm_bps", 4.27e12 * 0.75), ("hbm_bps", 4.27e12 * 1.3),
                                        ("select_eff", 0.32), ("decode_fixed_s", 200e-6),
                                        ("dense_eff", 0.6)])
def test_a_known_wrong_parameter_fails_validation(name, value):
    v = ds.validate(replace(ds.h200(), **{name: value}))
    assert not v["summary"]["passed"], (name, value, v["summary"])


# --- bad input --------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,msg", [
    (dict(context=0), "context must be >= 1, got 0"),
    (dict(batch=-2), "batch must be >= 1, got -2"),
    (dict(budget=1000), "multiple of the page size 16, got 1000"),
    (dict(page=48), "page must be 16, 32 or 64, got 48"),
    (dict(digest="fp8"), "digest must be bf16 or int8, got 'fp8'"),
    (dict(reuse=0), "reuse must be >= 1, got 0"),
    (dict(scheme="eager"), "scheme must be one of"),
    (dict(micro_batches=2), "micro_batches must be 1 outside the pipelined scheme"),
    (dict(super_page=40), "super_page must be a multiple of page 16"),
    (dict(scheme="pipelined", micro_batches=4), "micro_batches (4) must not exceed batch (1)"),
])
def test_bad_input_names_the_value(kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)):
        ds.evaluate("gpu", workload(**kw), system())


def test_bad_system_and_placement():
    with pytest.raises(ValueError, match="cards must be >= 1, got 0"):
        ds.evaluate("fpga", workload(), system(cards=0))
    with pytest.raises(ValueError, match="placement must be dense, gpu or fpga, got 'cpu'"):
        ds.evaluate("cpu", workload(), system())
    with pytest.raises(ValueError, match="context must be >= 1, got 0"):
        ds.main(["--context", "0"])
    with pytest.raises(ValueError, match="--gpu must be one of"):
        ds.main(["--gpu", "a100"])


def test_cli_accepts_dashes_and_prints_modeled(capsys):
    assert ds.main(["--context=32768", "--micro-batches=2", "--scheme=pipelined",
                    "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "MODELED" in out and "fpga" in out


# --- sweep JSON and plots ---------------------------------------------------------------------

def test_sweep_rows_follow_the_schema():
    d = ds.sweep(ds.h200(), (32768, 1048576), (1, 8))
    assert d["schema"] == ds.SCHEMA and d["kind"] == "modeled"
    for r in d["rows"]:
        for k in ("placement", "scheme", "context", "batch", "step_ms", "ms_per_token",
                  "tokens_per_s", "steps_ms", "memory_processing_share", "bytes",
                  "byte_floor_ms", "speedup_over_dense", "energy_j_per_token",
                  "energy_source", "fits"):
            assert k in r, k
        assert set(r["steps_ms"]) == set(ds.STEPS)
        assert sum(r["steps_ms"].values()) == pytest.approx(r["step_ms"], rel=1e-9)
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["step_ms"])
        assert r["step_ms"] >= r["byte_floor_ms"] * (1 - 1e-9) or r["placement"] == "fpga"
    dense = [r for r in d["rows"] if r["placement"] == "dense"]
    assert all(r["speedup_over_dense"] == 1.0 for r in dense)


def test_plots_from_json(tmp_path):
    import matplotlib  # noqa: F401  (installed by .ci/python.sh; never skipped)
    d = ds.sweep(ds.h200(), (32768, 131072), (1, 8))
    d["maps"] = ds.design_maps(ds.h200(), 1)[:1]
    src = tmp_path / "model.json"
    src.write_text(json.dumps(d))
    made = plots.make_plots(str(src), str(tmp_path / "out"))
    names = sorted(p.name for p in made)
    assert names == sorted(["model_steps.png", "model_speedup.png", "model_energy.png",
                            f"model_map_{d['maps'][0]['name']}.png"])
    for p in made:
        assert p.stat().st_size > 10000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bench = plots.make_plots(str(ROOT / "integration/bench/results/cpu_bench_default.json"),
                             str(tmp_path / "out"))
    assert {p.name for p in bench} == {"cpu_bench_default_steps.png",
                                       "cpu_bench_default_speedup.png"}


def test_plots_reject_unknown_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"results": []}))
    with pytest.raises(ValueError, match="neither mempipe.throughput/1"):
        plots.load(str(p))
    p.write_text(json.dumps({"schema": ds.SCHEMA, "kind": "guessed", "rows": []}))
    with pytest.raises(ValueError, match="kind must be measured or modeled, got 'guessed'"):
        plots.load(str(p))
