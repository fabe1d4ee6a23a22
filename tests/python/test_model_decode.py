"""The whole-model decode runner (integration/bench/model_decode.py) in its CPU smoke mode: a
tiny random-weight model through every placement (fpga: the offload engine's CPU mode, every
scheme), its `mempipe.throughput/1` JSON validated (and known-wrong documents rejected), the
Markdown table and plots.py's PNGs made from it."""

import copy
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration" / "bench"))

import model_decode as md  # noqa: E402
import plots  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, request):
    import os
    seed = int(os.environ.get("MEMPIPE_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
    print(f"[seed] model_decode smoke: MEMPIPE_TEST_SEED={seed}")
    out = tmp_path_factory.mktemp("model_decode")
    path = out / "smoke.json"
    # The card's deadline is generous (5 s, against the default 100 ms): the test checks that
    # every request is answered, not the host's latency. One CI run on the 2-vCPU build VM had
    # one request miss the 100 ms deadline (fallbacks: timeout 1).
    rc = md.main(["--device", "cpu", "--json", str(path), "--md", str(out / "smoke.md"),
                  "--seed", str(seed % (1 << 31)), "--steps", "2", "--deadline_ms", "5000",
                  "--contexts", "128,256", "--placements", "dense-sdpa,dense-paged,gpu,fpga"])
    assert rc == 0
    return json.loads(path.read_text()), path, out


def test_smoke_rows_and_schema(smoke):
    doc, _, _ = smoke
    assert md.validate(doc) == []
    assert doc["schema"] == "mempipe.throughput/1" and doc["kind"] == "measured"
    measured = [r for r in doc["rows"] if r["step_ms"] is not None]
    # 2 contexts x 2 batches x (3 placements + 4 fpga schemes); no gap rows.
    assert len(measured) == 28 and len(doc["rows"]) == 28
    names = {(r["placement"], r.get("variant")) for r in measured}
    assert names == {("dense", "sdpa"), ("dense", "paged"), ("cpu", None), ("fpga", "sync"),
                     ("fpga", "pipelined4"), ("fpga", "reuse4"), ("fpga", "lookahead")}
    for r in measured:
        if r["placement"] != "fpga":
            continue
        cpu = next(c for c in measured if c["placement"] == "cpu"
                   and (c["context"], c["batch"]) == (r["context"], r["batch"]))
        f = r["fpga"]
        # The engine's CPU mode, the paced emulated card: every request answered in time.
        assert f["fallbacks"] and sum(f["fallbacks"].values()) == 0, f
        assert f["requests_per_step"] > 0 and f["card_modeled_ms_per_step"] > 0
        assert r["bytes"]["card_modeled"] > 0 and r["fpga_energy_j_per_token"] > 0
        assert f["hidden_share"] is None or 0 <= f["hidden_share"] <= 1
        if r["variant"] in ("sync", "pipelined4"):
            # Bit-identical selections to the cpu placement: the same attention output.
            assert r["rel_err"] == cpu["rel_err"], (r, cpu)
        if r["variant"] in ("reuse4", "lookahead"):
            kind = "reuse" if r["variant"] == "reuse4" else "lookahead"
            assert 0 <= f["recall"][kind] <= 1, f["recall"]
        if r["variant"] == "lookahead":  # the speculated query, timed apart (in `linear`)
            assert r["lookahead_query"] == "projected"
            assert f["speculate_ms_per_step_profiled"] > 0
            assert any("look-ahead query projected" in n for n in r["notes"])
        else:
            assert f["speculate_ms_per_step_profiled"] == 0
    for r in measured:
        if r.get("variant") == "paged":
            # Both dense paths attend to every token: same logits up to fp32 rounding over a
            # 2-layer model (sums of a few hundred terms): far below 1e-4.
            assert r["rel_err"] < 1e-4 and r["rel_err_logits"] < 1e-4, r
        if r["placement"] == "cpu":
            # The sparse placement keeps 64 of 256/512 tokens: a different answer, but a finite
            # one, and it reads fewer KV bytes than dense.
            assert 1e-3 < r["rel_err"] < 10
            assert r["memory_processing_share"] > 0
            assert r["steps_ms"]["relevancy"] > 0
            dense = next(d for d in measured if d.get("variant") == "paged"
                         and d["context"] == r["context"] and d["batch"] == r["batch"])
            assert r["bytes"]["kv"] < dense["bytes"]["kv"]


def test_validate_rejects_wrong_documents(smoke):
    doc, _, _ = smoke
    row = next(i for i, r in enumerate(doc["rows"]) if r["step_ms"] is not None)

    def broken(edit):
        d = copy.deepcopy(doc)
        edit(d)
        return md.validate(d)

    assert broken(lambda d: d.update(schema="mempipe.throughput/0"))
    assert broken(lambda d: d.update(kind="guessed"))
    assert broken(lambda d: d.pop("command"))
    assert broken(lambda d: d["rows"][row].update(tokens_per_s=d["rows"][row]["tokens_per_s"] * 2))
    assert broken(lambda d: d["rows"][row].update(ms_per_token=d["rows"][row]["step_ms"] * 1.5))
    assert broken(lambda d: d["rows"][row]["steps_ms"].update(apply=d["rows"][row]["step_ms"]))
    assert broken(lambda d: d["rows"][row]["steps_ms"].pop("linear"))
    assert broken(lambda d: d["rows"][row].update(memory_processing_share=0.99))
    assert broken(lambda d: d["rows"][row].update(step_ms=-1.0))
    assert broken(lambda d: d["rows"][row].pop("rel_err"))
    gap = dict(doc["rows"][row], step_ms=None, notes=[])
    assert broken(lambda d: d["rows"].append(gap))
    fpga = next(i for i, r in enumerate(doc["rows"]) if r["placement"] == "fpga")
    assert broken(lambda d: d["rows"][fpga].pop("fpga"))
    assert broken(lambda d: d["rows"][fpga]["fpga"].update(hidden_share=1.5))


def test_table_and_plots(smoke):
    doc, path, out = smoke
    table = (out / "smoke.md").read_text()
    fpga = [r for r in doc["rows"] if r["placement"] == "fpga"]
    # header + one line per row; the fpga table: header + one line per fpga row
    assert table.count("\n| ") == len(doc["rows"]) + 1 + len(fpga) + 1
    assert "fpga rows (emulated U55C" in table
    made = plots.make_plots(str(path), str(out / "plots"))
    assert {p.name for p in made} == {"smoke_steps.png", "smoke_speedup.png"}
    assert all(p.stat().st_size > 1000 for p in made)


def test_no_dense_placement_leaves_the_ratios_empty(tmp_path, capsys):
    """--placements without a dense placement: no speedup or error to compute; the run says so
    at the start, every row carries the note and null ratios, the document validates, and the
    table shows a dash. Known-wrong: a null speedup beside a dense row, or without the note."""
    path = tmp_path / "no_dense.json"
    assert md.main(["--device", "cpu", "--placements", "gpu", "--contexts", "128",
                    "--batches", "1", "--steps", "1", "--json", str(path),
                    "--md", str(tmp_path / "no_dense.md")]) == 0
    assert "note: --placements has no dense placement" in capsys.readouterr().out
    doc = json.loads(path.read_text())
    assert md.validate(doc) == []
    measured = [r for r in doc["rows"] if r["step_ms"] is not None]
    assert [r["placement"] for r in measured] == ["cpu"]
    for r in measured:
        assert r["speedup_over_dense"] is None and r["rel_err"] is None
        assert md.NO_DENSE_NOTE in r["notes"]
    line = next(x for x in (tmp_path / "no_dense.md").read_text().splitlines()
                if x.startswith("| 128 | 1 | cpu |"))
    assert line.split(" | ")[5] == "—", line

    i = doc["rows"].index(measured[0])
    with_dense = copy.deepcopy(doc)
    with_dense["rows"].append(dict(measured[0], placement="dense", variant="paged",
                                   speedup_over_dense=1.0, notes=[]))
    assert any("a dense placement ran" in b for b in md.validate(with_dense))
    with_dense["rows"][i]["speedup_over_dense"] = 2.0  # control: the ratio filled in
    assert md.validate(with_dense) == []
    no_note = copy.deepcopy(doc)
    no_note["rows"][i]["notes"].remove(md.NO_DENSE_NOTE)
    assert any("must carry the note" in b for b in md.validate(no_note))


def test_bad_flags_are_named():
    with pytest.raises(ValueError, match="1000"):
        md.main(["--device", "cpu", "--contexts", "1000"])
    with pytest.raises(ValueError, match="sparse-ish"):
        md.main(["--device", "cpu", "--placements", "sparse-ish"])
    with pytest.raises(ValueError, match="budget 40"):
        md.main(["--device", "cpu", "--budget", "40"])
    with pytest.raises(ValueError, match="reuse9"):
        md.main(["--device", "cpu", "--placements", "gpu,fpga", "--fpga_schemes", "reuse9"])
    with pytest.raises(ValueError, match="deadline_ms must be a positive number, got -1"):
        md.main(["--device", "cpu", "--deadline_ms", "-1"])


def test_speculated_query_is_the_next_layers_query(gen):
    """Runner.speculated_query(x, j) (look-ahead, lookahead_query=projected) is exactly the
    query layer j computes in step() when its input residual is x: the same RMSNorm, W_q rows
    and RoPE; another layer's weights or another position give another query."""
    import argparse

    import torch
    seed = int(torch.randint(0, 1 << 30, (1,), generator=gen))
    g = torch.Generator().manual_seed(seed)
    model = md.Model(md.MODELS["tiny"], torch.float32, torch.device("cpu"), g)
    s = model.s
    for lw in model.layers:  # norms with weight != 1, so a missing norm weight shows
        lw["n1"].uniform_(0.5, 1.5, generator=g)
    args = argparse.Namespace(page=16, budget=32, dense_layers=1, sinks=1, locals=1,
                              fpga_list=[])
    runner = md.Runner(model, 64, 2, args, g)
    x = torch.randn(2, s.hidden, generator=g)
    j = 1
    lw = model.layers[j]
    qkv = torch.nn.functional.linear(md.rms_norm(x, lw["n1"]), lw["qkv"])
    qk = md.apply_rope(qkv[:, :(s.q_heads + s.kv_heads) * s.head_dim]
                       .view(2, s.q_heads + s.kv_heads, s.head_dim), runner.cos, runner.sin)
    want = qk[:, :s.q_heads]
    got = runner.speculated_query(x, j)
    # The same float32 operations in the same order on the same values: equal up to the GEMV
    # over a column slice of the weight (a different BLAS blocking may reorder the sum over
    # 256 terms: at most 256 u |x||W| per element).
    mag = (md.rms_norm(x, lw["n1"]).abs()
           @ lw["qkv"][:s.q_heads * s.head_dim].abs().T).view_as(want)
    mag = mag + mag.roll(s.head_dim // 2, dims=-1)  # RoPE mixes the two halves
    bound = 2 * (256 + 3) * 2.0 ** -24 * mag
    assert ((got - want).abs() <= bound).all()
    # Known-wrong: layer 0's weights, or the query un-rotated.
    assert not ((runner.speculated_query(x, 0) - want).abs() <= bound).all()
    plain = qkv[:, :s.q_heads * s.head_dim].view_as(want)
    assert not ((plain - want).abs() <= bound).all()
    runner.plan.shutdown()
