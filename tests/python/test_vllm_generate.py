"""Text generation (text prompts in, text out) through vLLM's CPU build with `attention_backend="CUSTOM"` (the engine
argument behind --attention-backend): with a budget that covers every context, mempipe's
greedy tokens equal those of vLLM's default CPU backend (CPU_ATTN); with a budget of 4 pages
(about a third of the longest context) the sparse path must choose pages, and every sparse
step is checked inside the engine (selection_check.py): a planted relevant page is chosen, the
selection equals the float64 reference's and the output equals the float64 attention over the
reference's pages. The same engine then runs a position-only selection and mempipe's selection
minus the planted page, and both must fail those checks. Each engine runs in its own process;
the model is the tiny random-weight Llama of tiny_llama.py (nothing can be downloaded here)."""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

from tiny_llama import write_tiny_llama
from vllm_support import require_vllm

require_vllm()

HERE = pathlib.Path(__file__).parent
BLOCK = 32  # CPU_ATTN needs a multiple of 32; mempipe takes 16, 32 or 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def generate(model_dir, backend, mempipe_config=None, inproc=False, check_selection=False,
             extra_env=None, block=BLOCK):
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", **(extra_env or {}))
    env.pop("MEMPIPE_CONFIG", None)
    if mempipe_config:
        env["MEMPIPE_CONFIG"] = mempipe_config
    if inproc:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cmd = [sys.executable, str(HERE / "vllm_generate.py"), model_dir, backend, str(block)]
    if inproc:
        cmd.append("--inproc")
    if check_selection:
        cmd.append("--check-selection")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):]), log


@pytest.fixture(scope="module")
def default_tokens(model_dir):
    result, _ = generate(model_dir, "default", inproc=True)
    assert result["impls"] == ["CPUAttentionBackendImpl"]
    return result


def test_custom_full_budget_matches_default_backend(model_dir, default_tokens):
    # Multiprocess engine (vLLM's default): the plugin must load in the engine-core process.
    # MEMPIPE_KV_HUGE_PAGES=collapse (default) with MEMPIPE_KV_COLLAPSE_SHARE=1: each page
    # collapsed before its blocks' first write, so a run this short collapses some.
    result, log = generate(model_dir, "CUSTOM", f"page_size={BLOCK},budget=1024,dense_layers=2",
                           extra_env={"MEMPIPE_KV_COLLAPSE_SHARE": "1"})
    assert "mempipe attention backend" in log
    # The worker moved the KV cache into huge pages, or said why not; the tokens are the same
    # either way.
    assert re.search(r"mempipe: KV cache [\d.]+ GiB: \d+ MiB of it collapsed|mempipe: KV cache "
                     r"\([\d.]+ GiB\) left in the pages it has", log), log[-4000:]
    assert result["tokens"] == default_tokens["tokens"]
    assert result["text"] == default_tokens["text"]
    print("generated:", result["text"][1][:80])


def test_custom_int8_digests_full_budget_matches_default_backend(model_dir, default_tokens):
    # digest_dtype=int8 (mempipe.digests): every layer keeps int8 codes + per-page scales, the
    # sparse layers score them, and at a budget covering every context the greedy tokens equal
    # vLLM's own backend's (which the native digests give too: the test above). The budget
    # covers every context, so the sparse layers are kept on their sparse path (by default
    # they would decode densely: MEMPIPE_VLLM_COVERED_DENSE, test_vllm_overhead.py).
    result, _ = generate(model_dir, "CUSTOM",
                         f"page_size={BLOCK},budget=1024,dense_layers=1,digest_dtype=int8",
                         inproc=True, extra_env={"MEMPIPE_VLLM_COVERED_DENSE": "0"})
    assert result["impls"] == ["MempipeAttentionImpl"]
    assert result["digests"] == ["Int8Digests"], result["digests"]
    assert result["tokens"] == default_tokens["tokens"]


@pytest.mark.parametrize("layout", ["head_kt", "page_kt"])
def test_custom_transposed_key_pages_full_budget_matches_default_backend(model_dir,
                                                                         default_tokens, layout):
    # kv_layout head_kt / page_kt: every layer's host cache with its K pages transposed (the
    # AVX-512 kernel scores tokens in lanes). Appends, digests, the prefill (its gather reads
    # the pages back: attention.logical_keys) and both decode paths read them; the sparse layers
    # are kept on their sparse path at this covering budget (MEMPIPE_VLLM_COVERED_DENSE=0), and
    # the greedy tokens equal vLLM's own backend's.
    result, _ = generate(model_dir, "CUSTOM",
                         f"page_size={BLOCK},budget=1024,dense_layers=1,kv_layout={layout}",
                         inproc=True, extra_env={"MEMPIPE_VLLM_COVERED_DENSE": "0"})
    assert result["impls"] == ["MempipeAttentionImpl"]
    assert result["tokens"] == default_tokens["tokens"]


def test_custom_small_budget_chooses_correct_pages(model_dir, default_tokens):

    from selection_check import assert_all_caught, assert_all_correct
    # Budget 128 tokens = 4 pages of 32 (1 sink + 1 local + 2 chosen): the 224- and 357-token
    # sequences have 7 and 12 pages, so scoring and top-k choose 2 of their 5 or 10 middle ones.
    result, log = generate(model_dir, "CUSTOM", f"page_size={BLOCK},budget=128,dense_layers=1",
                           inproc=True, check_selection=True)
    assert result["impls"] == ["MempipeAttentionImpl"]
    checks = result["checks"]
    print("selection checks:", json.dumps(checks))
    assert_all_correct(checks["mempipe"])
    # The checks bite: a position-only selection and mempipe's minus the planted page fail them.
    assert_all_caught(checks["position"])
    assert_all_caught(checks["drop"])
    # The short prompt fits the budget throughout (5 + 24 tokens): identical to dense.
    assert result["tokens"][0] == default_tokens["tokens"][0]
    assert all(len(t) == 24 for t in result["tokens"])


# ---- vLLM's own block size (128 on the CPU): split into mempipe's pages by vLLM -------------

@pytest.fixture(scope="module")
def default_block_tokens(model_dir):
    """CPU_ATTN at the block size vLLM's CPU platform picks when none is given."""
    result, _ = generate(model_dir, "default", inproc=True, block="default")
    assert result["impls"] == ["CPUAttentionBackendImpl"]
    assert result["block_size"] == 128, result["block_size"]
    return result


def test_custom_at_vllms_default_block_size_matches_default_backend(model_dir,
                                                                    default_block_tokens):
    # No --block-size: vLLM's CPU platform picks 128. The plugin declares its page size as the
    # kernel block size, so vLLM splits each 128-token block into 4 pages of 32 (block tables,
    # slot mappings and the cache view address pages) and mempipe runs on them. A budget
    # covering every context, the sparse layers on their sparse path: the tokens equal
    # CPU_ATTN's at its own 128-token blocks.
    result, log = generate(model_dir, "CUSTOM", "page_size=32,budget=1024,dense_layers=1",
                           inproc=True, block="default",
                           extra_env={"MEMPIPE_VLLM_COVERED_DENSE": "0"})
    assert result["impls"] == ["MempipeAttentionImpl"]
    assert result["block_size"] == 128 and result["page_sizes"] == [32], result
    assert result["tokens"] == default_block_tokens["tokens"]


def test_custom_at_vllms_default_block_size_multiprocess(model_dir, default_block_tokens):
    # vLLM's default engine (the worker in its own process, where the plugin's page size must
    # reach vLLM's choice of kernel block size) with page_size 16: 8 pages per block.
    result, log = generate(model_dir, "CUSTOM", "page_size=16,budget=1024,dense_layers=2",
                           block="default")
    assert "mempipe attention backend" in log
    assert result["tokens"] == default_block_tokens["tokens"]


def test_custom_small_budget_chooses_correct_pages_in_split_blocks(model_dir):
    from selection_check import assert_all_caught, assert_all_correct
    # vLLM blocks of 64 tokens split into pages of 16; budget 64 tokens = 4 pages (1 sink +
    # 1 local + 2 chosen): selection and output checked against the float64 reference over
    # the pages of the split blocks, and the known-wrong selections caught.
    result, log = generate(model_dir, "CUSTOM", "page_size=16,budget=64,dense_layers=1",
                           inproc=True, check_selection=True, block=64)
    assert result["block_size"] == 64 and result["page_sizes"] == [16], result
    checks = result["checks"]
    print("selection checks:", json.dumps(checks))
    assert_all_correct(checks["mempipe"])
    assert_all_caught(checks["position"])
    assert_all_caught(checks["drop"])
