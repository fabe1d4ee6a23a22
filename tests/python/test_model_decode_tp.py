"""The tensor-parallel whole-model decode runner (integration/bench/model_decode_tp.py) on the CPU:
two gloo processes each holding half the heads and half the FFN of a tiny random-weight model
must produce the single-process run's outputs (same weights, same cache: both are generated per
matrix / per KV head, independent of the split), for every placement; a run with the
all-reduces dropped must be rejected by the same comparison."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration" / "bench"))

import model_decode as md  # noqa: E402
import model_decode_tp as tp  # noqa: E402
import plots  # noqa: E402

# Tolerance. The two runs differ only in summation order: the row-parallel O and down
# projections sum two partial dot products of length 128 / 256 (tiny model: 4 x 64 attention
# outputs, FFN 512) instead of one of 256 / 512, and the all-reduce adds them. fp32's unit
# roundoff is 2^-24 = 6e-8, so one reordered sum of n = 512 terms moves a result by at most
# n * u = 3e-5 of the sum of magnitudes (the classic worst-case bound); over the 2 layers that
# feed the logits, with RMSNorm rescaling in between, 1e-4 holds that bound with room. Measured
# runs sit at ~5e-7; a dropped all-reduce gives ~1 (the residual stream misses half of each
# projection).
TOL = 1e-4


def _run(tmp, name, *extra):
    dump = tmp / f"{name}.pt"
    argv = ["--device", "cpu", "--contexts", "256", "--batches", "1,2", "--seed",
            str(SEED), "--dump", str(dump), "--json", str(tmp / f"{name}.json"),
            "--md", str(tmp / f"{name}.md"), *extra]
    assert tp.main(argv) == 0
    return torch.load(dump), json.loads((tmp / f"{name}.json").read_text())


SEED = int(os.environ.get("MEMPIPE_TEST_SEED", int.from_bytes(os.urandom(4), "little"))) % (
    1 << 31)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    print(f"[seed] model_decode_tp: MEMPIPE_TEST_SEED={SEED}")
    tmp = tmp_path_factory.mktemp("model_decode_tp")
    single = _run(tmp, "tp1", "--tp", "1")
    split = _run(tmp, "tp2", "--tp", "2")
    broken = _run(tmp, "tp2_no_allreduce", "--tp", "2", "--fault", "no_allreduce")
    return single, split, broken, tmp


def _poison(outs):
    """The reference's buffers may not be read before they are written: a NaN anywhere in the
    compared outputs fails the comparison (NaN compares false)."""
    for per in outs.values():
        for a, lg in per.values():
            assert torch.isfinite(a).all() and torch.isfinite(lg).all()


def mismatches(ref, got, tol=TOL):
    """(config, placement, output, relative L2 error) for every output outside `tol`."""
    return [e for e in tp.rel_errors(ref, got) if not e[3] <= tol]  # NaN fails too


def test_tp2_equals_the_single_process_run(runs):
    (ref, _), (got, _), _, _ = runs
    _poison(ref)
    _poison(got)
    assert set(ref) == {(256, 1), (256, 2)}
    assert set(ref[(256, 1)]) == {"dense-sdpa", "dense-paged", "gpu"}
    # The full attention output is [B, 4 heads, 64]: rank 1's heads follow rank 0's.
    assert ref[(256, 2)]["gpu"][0].shape == (2, 4, 64)
    assert ref[(256, 2)]["gpu"][1].shape == (2, 1000)
    assert mismatches(ref, got) == []


def test_dropped_allreduce_is_rejected(runs):
    (ref, _), _, (broken, _), _ = runs
    bad = mismatches(ref, broken)
    # Every logits output of every placement and configuration is wrong, by a lot.
    wrong_logits = {(k, p) for k, p, what, _ in bad if what == "logits"}
    assert wrong_logits == {(k, p) for k in ref for p in ref[k]}
    assert min(e for *_, what, e in bad if what == "logits") > 100 * TOL


def test_comparison_rejects_a_one_ulp_scale_of_one_head(runs):
    """The check is sharp enough to see a wrong head, not only a wrong model."""
    (ref, _), (got, _), _, _ = runs
    import copy
    wrong = copy.deepcopy(got)
    a, lg = wrong[(256, 2)]["gpu"]
    a[:, 3] *= 1.01  # rank 1's second query head, 1% off
    assert [(k, p, w) for k, p, w, _ in mismatches(ref, wrong)] == [((256, 2), "gpu",
                                                                     "attention")]


def test_tp_json_table_and_plots(runs):
    _, (_, doc), _, tmp = runs
    assert md.validate(doc) == []
    assert doc["config"]["tp"] == 2 and doc["machine"]["tp"] == 2
    assert len(doc["machine"]["ranks"]) == 2
    measured = [r for r in doc["rows"] if r["step_ms"] is not None]
    assert len(measured) == 2 * 3
    for r in measured:
        assert r["tp"] == 2 and len(r["rank_step_ms"]) == 2
        assert max(r["rank_step_ms"]) == pytest.approx(r["step_ms"])
        # The collectives sit inside `linear`.
        assert 0 < r["comm_eager_ms"] < r["steps_ms"]["linear"]
        assert r["comm_graph_ms"] > 0
        if r.get("variant") == "paged":
            assert r["rel_err"] < TOL and r["rel_err_logits"] < TOL
    # Bytes are the whole model's (both ranks together), the floor over 2 devices' bandwidth.
    r = measured[0]
    whole = md.bytes_moved(md.MODELS["tiny"], r["context"], r["batch"], _Args(), "dense", 4)
    assert r["bytes"] == whole
    assert r["byte_floor_ms"] == pytest.approx(sum(whole.values()) / (2 * 4.8e12) * 1e3)
    table = (tmp / "tp2.md").read_text()
    assert "collectives alone" in table and table.count("\n| 256 |") == len(doc["rows"]) + 6
    made = plots.make_plots(str(tmp / "tp2.json"), str(tmp / "plots"))
    assert {p.name for p in made} == {"tp2_steps.png", "tp2_speedup.png"}
    # --combine: the one-process and the split run's batch-1 rows on one pair of axes.
    assert plots.main([str(tmp / "tp1.json"), str(tmp / "tp2.json"), "--out",
                       str(tmp / "plots"), "--combine", "both"]) == 0
    assert (tmp / "plots" / "both_context.png").stat().st_size > 1000
    one = json.loads((tmp / "tp2.json").read_text())
    one["rows"] = [r for r in one["rows"] if r["batch"] != 1]
    (tmp / "no_batch1.json").write_text(json.dumps(one))
    with pytest.raises(ValueError, match="no measured batch-1 rows"):
        plots.main([str(tmp / "no_batch1.json"), "--out", str(tmp / "plots"), "--combine", "x"])


class _Args:
    budget, page, dense_layers = 64, 16, 1


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="--tp 3.*q_heads = 4"):
        tp.main(["--device", "cpu", "--tp", "3"])
    with pytest.raises(ValueError, match="--tp 0"):
        tp.main(["--device", "cpu", "--tp", "0"])
    with pytest.raises(ValueError, match="'two'"):
        tp.main(["--device", "cpu", "--batches", "1,two"])
    with pytest.raises(ValueError, match="1000"):
        tp.main(["--device", "cpu", "--contexts", "1000"])
    with pytest.raises(ValueError, match="warp"):
        tp.main(["--device", "cpu", "--placements", "gpu,warp"])
