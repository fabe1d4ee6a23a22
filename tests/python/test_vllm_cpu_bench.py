"""vllm_cpu_bench.py's bookkeeping (no engine is started): the first prefill's CPU seconds are
taken over this process and its children, and the ratios put mempipe's CPU time and user time
over CPU_ATTN's beside the wall-time ratio."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration" / "bench"))
pytest.importorskip("psutil")
import vllm_cpu_bench as bench  # noqa: E402


def _run(prefill_s, user_s, system_s):
    return {"prefill_s": prefill_s, "decode_tokens_per_s": 10.0, "step_bytes_modeled": 1.0,
            "tokens": [[1]], "warm_prefill_s": [],
            "prefill_usage": {"user_s": user_s, "system_s": system_s}}


def test_ratios_put_cpu_and_user_time_beside_wall_time():
    r = bench.ratios(_run(10.0, 8.0, 2.0), _run(12.0, 8.4, 4.6))
    assert r["prefill_ratio"] == pytest.approx(1.2)
    assert r["prefill_cpu_ratio"] == pytest.approx(13.0 / 10.0)
    assert r["prefill_user_ratio"] == pytest.approx(1.05)
    old = _run(10.0, 0, 0)
    del old["prefill_usage"]  # a run recorded before the usage existed: no CPU ratios
    assert "prefill_cpu_ratio" not in bench.ratios(old, _run(12.0, 8.4, 4.6))


def test_usage_counts_children_and_this_process():
    before = bench.usage_snapshot()
    # A child that spins until it has used 0.4 s of CPU time.
    child = subprocess.Popen([sys.executable, "-c",
                              "import time\nt=time.process_time()\n"
                              "while time.process_time()-t<0.4: pass\nimport sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        deadline = bench.time.perf_counter() + 10
        while bench.time.perf_counter() < deadline:
            mid = bench.usage_delta(before, bench.usage_snapshot())
            if mid["user_s"] + mid["system_s"] >= 0.25:
                break
            bench.time.sleep(0.05)  # this process stays idle: the time must be the child's
        assert mid["user_s"] + mid["system_s"] >= 0.25, mid  # the live child's time counts
        assert mid["system_s"] >= 0 and set(mid) >= {"user_s", "system_s", "steal_s"}
    finally:
        child.communicate(b"")


def test_variant_keys_set_the_engine_or_the_environment():
    name, engine, env = bench.parse_variant(
        "attn32:backend=CPU_ATTN:block_size=32:MEMPIPE_X=a=b")
    assert (name, engine, env) == ("attn32", {"backend": "CPU_ATTN", "block_size": 32},
                                   {"MEMPIPE_X": "a=b"})
    assert bench.parse_variant("pool:MEMPIPE_CPU_ATTN_POOL=mempipe") == (
        "pool", {}, {"MEMPIPE_CPU_ATTN_POOL": "mempipe"})
    for bad, why in [("x:backend=FLASH", "backend must be CPU_ATTN or CUSTOM, got 'FLASH'"),
                     ("x:block_size=0", "block_size must be a positive integer, got '0'"),
                     ("x:block_size=a", "block_size must be a positive integer, got 'a'"),
                     ("CUSTOM:A=1", "with a new NAME"), ("x", "with a new NAME"),
                     ("x:=1", "with a new NAME"), ("x:A", "with a new NAME")]:
        with pytest.raises(ValueError, match=why):
            bench.parse_variant(bad)
    with pytest.raises(ValueError, match="with a new NAME"):
        bench.parse_variant("x:A=1", taken={"x"})
