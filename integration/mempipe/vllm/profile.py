"""Per-step timers of the vLLM backend, on when MEMPIPE_VLLM_PROFILE=1 (off by default).

Where a decode step's time goes inside a vLLM worker, without an outside profiler: the builder
marks each step's start (`begin_step`, from MempipeMetadataBuilder.build), so the time from one
build to the next is that step's wall time (model, sampler, the worker's share of scheduling);
forward() and each `_mempipe` kernel call (append, score_and_select, sparse_decode,
score_select_decode (both, as one host call), dense_decode, prefill) add their wall time to the
current step's kind:

    decode   every request has one new token
    mixed    prefill or chunked-prefill tokens in the step (with or without decode tokens)

`report(reset=True)` returns {kind: {phase: [seconds, calls]}} (phase "step" is the step time
between builds, "builds" counts the steps begun)
and is what integration/bench/vllm_cpu_profile.py fetches from each worker through vLLM's
collective_rpc. With the variable unset nothing is wrapped and nothing is timed.
"""

from __future__ import annotations

import collections
import functools
import os
import time

_KERNELS = ("write_kv", "append_kv_and_digests", "score_and_select", "sparse_decode",
            "score_select_decode", "dense_decode", "prefill_attention")


def enabled_by_env() -> bool:
    raw = os.environ.get("MEMPIPE_VLLM_PROFILE", "0")
    if raw not in ("0", "1"):
        raise ValueError(f"MEMPIPE_VLLM_PROFILE must be 0 or 1, got {raw!r}")
    return raw == "1"


class StepProfile:
    def __init__(self) -> None:
        self.enabled = False
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[tuple[str, str], float] = collections.defaultdict(float)
        self.calls: dict[tuple[str, str], int] = collections.defaultdict(int)
        self.kind = "none"
        self.step_start: float | None = None

    def enable(self) -> None:
        """Wraps the kernels of the `_mempipe` module once (every caller sees the wrappers)."""
        if self.enabled:
            return
        from mempipe import _mempipe
        for name in _KERNELS:
            fn = getattr(_mempipe, name, None)
            if fn is not None:
                setattr(_mempipe, name, self.wrap(name, fn))
        self.enabled = True

    def begin_step(self, kind: str) -> None:
        now = time.perf_counter()
        if self.step_start is not None:
            self.add("step", now - self.step_start)
        self.kind, self.step_start = kind, now
        self.calls[(kind, "builds")] += 1
        self.seconds[(kind, "builds")] += 0.0

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[(self.kind, phase)] += seconds
        self.calls[(self.kind, phase)] += 1

    def wrap(self, phase: str, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - t0)
        return timed

    def report(self, reset: bool = True) -> dict:
        out: dict[str, dict[str, list]] = {}
        for (kind, phase), s in self.seconds.items():
            out.setdefault(kind, {})[phase] = [s, self.calls[(kind, phase)]]
        if reset:
            self.reset()
        return out


PROFILE = StepProfile()


def report(worker=None, reset: bool = True) -> dict:
    """This process's timers (a collective_rpc target: `worker` is vLLM's worker object)."""
    return PROFILE.report(reset)


def install(worker=None, cpu_attn: bool = False) -> bool:
    """Turns the timers on in this process (a collective_rpc target). With cpu_attn=True also
    times vLLM's own CPU_ATTN backend the same way (its build() marks the steps; forward() and
    its cache write, do_kv_cache_update, count as "forward"), for side-by-side breakdowns."""
    PROFILE.enable()
    if cpu_attn:
        from vllm.v1.attention.backends import cpu_attn as m
        impl, builder = m.CPUAttentionBackendImpl, m.CPUAttentionMetadataBuilder
        if not getattr(impl.forward, "_mempipe_timed", False):
            impl.forward = PROFILE.wrap("forward", impl.forward)
            impl.forward._mempipe_timed = True
            impl.do_kv_cache_update = PROFILE.wrap("forward", impl.do_kv_cache_update)
            build = builder.build

            def timed_build(self, common_prefix_len, common_attn_metadata, *args, **kwargs):
                PROFILE.begin_step("decode" if common_attn_metadata.max_query_len == 1
                                   else "mixed")
                return build(self, common_prefix_len, common_attn_metadata, *args, **kwargs)
            builder.build = timed_build
    PROFILE.reset()
    return True
