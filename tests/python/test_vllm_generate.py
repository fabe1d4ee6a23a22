"""Text generation (text prompts in, text out) through vLLM's CPU build with `attention_backend="CUSTOM"` (the engine
argument behind --attention-backend): with a budget that covers every context, mempipe's
greedy tokens equal those of vLLM's default CPU backend (CPU_ATTN); with a small budget the
sparse path runs. Each engine runs in its own process; the model is the tiny random-weight
Llama of tiny_llama.py (nothing can be downloaded here)."""

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
BLOCK = 32  # CPU_ATTN needs a multiple of 32; mempipe takes 16, 32 or 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(write_tiny_llama(tmp_path_factory.mktemp("tiny-llama")))


def generate(model_dir, backend, mempipe_config=None, inproc=False):
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    env.pop("MEMPIPE_CONFIG", None)
    if mempipe_config:
        env["MEMPIPE_CONFIG"] = mempipe_config
    if inproc:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    cmd = [sys.executable, str(HERE / "vllm_generate.py"), model_dir, backend, str(BLOCK)]
    if inproc:
        cmd.append("--inproc")
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
    result, log = generate(model_dir, "CUSTOM", f"page_size={BLOCK},budget=1024,dense_layers=2")
    assert "mempipe attention backend" in log
    assert result["tokens"] == default_tokens["tokens"]
    assert result["text"] == default_tokens["text"]
    print("generated:", result["text"][1][:80])


def test_custom_small_budget_runs_sparse_path(model_dir, default_tokens):
    result, log = generate(model_dir, "CUSTOM", f"page_size={BLOCK},budget=64,dense_layers=1",
                           inproc=True)
    assert result["impls"] == ["MempipeAttentionImpl"]
    # The short prompt fits the 2-page budget throughout (5 + 24 tokens): identical.
    assert result["tokens"][0] == default_tokens["tokens"][0]
    assert all(len(t) == 24 for t in result["tokens"])
    print("small-budget tokens differing from dense:",
          sum(a != b for r, d in zip(result["tokens"], default_tokens["tokens"])
              for a, b in zip(r, d)))
