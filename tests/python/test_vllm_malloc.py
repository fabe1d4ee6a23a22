"""The benchmarks' --malloc (integration/bench/vllm_malloc.py): which allocator the vllm-cpu
engines are started on. tcmalloc goes first in LD_PRELOAD and keeps what was there; a preload
that already names tcmalloc is left alone; a missing library or a bad choice is an error that
says what to do; the library is found in ldconfig's list."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "integration" / "bench"))
import vllm_malloc  # noqa: E402

LIB = "/opt/tc/libtcmalloc_minimal.so.4"


def test_tcmalloc_goes_first_and_keeps_the_preload():
    env, line = vllm_malloc.malloc_env("tcmalloc", {"LD_PRELOAD": "/x/libgomp.so.1", "A": "1"},
                                       finder=lambda: LIB)
    assert env == {"LD_PRELOAD": f"{LIB}:/x/libgomp.so.1", "A": "1"}
    assert LIB in line
    env, _ = vllm_malloc.malloc_env("tcmalloc", {"A": "1"}, finder=lambda: LIB)
    assert env == {"LD_PRELOAD": LIB, "A": "1"}  # no stray ':' for an empty preload


def test_a_preload_with_tcmalloc_and_default_are_left_alone():
    base = {"LD_PRELOAD": "/y/libtcmalloc.so.4"}
    called = []
    env, line = vllm_malloc.malloc_env("tcmalloc", base, finder=lambda: called.append(1) or LIB)
    assert env == base and not called and "already" in line
    env, line = vllm_malloc.malloc_env("default", {"B": "2"}, finder=lambda: LIB)
    assert env == {"B": "2"} and "vLLM" in line


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="apt-get install libtcmalloc-minimal4.*--malloc default"):
        vllm_malloc.malloc_env("tcmalloc", {}, finder=lambda: None)
    with pytest.raises(ValueError, match="--malloc must be one of tcmalloc, default, got 'jemalloc'"):
        vllm_malloc.malloc_env("jemalloc", {})


def test_found_in_ldconfig(monkeypatch, tmp_path):
    lib = tmp_path / "libtcmalloc_minimal.so.4"
    lib.write_bytes(b"")
    listing = ("\tlibtcmalloc_minimal_debug.so.4 (libc6,x86-64) => /nowhere/debug.so.4\n"
               f"\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => {lib}\n")
    monkeypatch.setattr(vllm_malloc.glob, "glob", lambda pattern: [])  # no copy in vLLM's wheel
    monkeypatch.setattr(vllm_malloc, "_DIRS", ())
    monkeypatch.setattr(vllm_malloc.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, stdout=listing))
    assert vllm_malloc.find_tcmalloc() == str(lib)  # not the debug build listed first
    lib.unlink()  # listed, but not there
    assert vllm_malloc.find_tcmalloc() is None
