"""The vLLM backend's step timers (mempipe.vllm.profile, MEMPIPE_VLLM_PROFILE=1): the flag is
checked, steps are the intervals between builds, phases are added to the current step's kind,
and report() returns and resets them. (vllm_cpu_profile.py reads them from vLLM's workers.)"""

import pytest

pytest.importorskip("vllm")
from mempipe.vllm import profile  # noqa: E402


def test_flag_is_checked(monkeypatch):
    monkeypatch.setenv("MEMPIPE_VLLM_PROFILE", "yes")
    with pytest.raises(ValueError, match="MEMPIPE_VLLM_PROFILE must be 0 or 1, got 'yes'"):
        profile.enabled_by_env()
    monkeypatch.setenv("MEMPIPE_VLLM_PROFILE", "1")
    assert profile.enabled_by_env()
    monkeypatch.delenv("MEMPIPE_VLLM_PROFILE")
    assert not profile.enabled_by_env()


def test_steps_and_phases(monkeypatch):
    clock = iter([10.0, 10.5, 10.75, 11.0, 12.0, 12.25, 14.0])
    monkeypatch.setattr(profile.time, "perf_counter", lambda: next(clock))
    p = profile.StepProfile()
    p.begin_step("mixed")                            # 10.0
    work = p.wrap("forward", lambda x: x + 1)
    assert work(1) == 2                              # 10.5 .. 10.75: 0.25 s of mixed forward
    p.begin_step("decode")                           # 11.0 closes the mixed step (1 s)
    assert work(2) == 3                              # 12.0 .. 12.25
    p.begin_step("decode")                           # 14.0 closes a decode step (3 s)
    rep = p.report()
    assert rep["mixed"] == {"builds": [0.0, 1], "forward": [0.25, 1], "step": [1.0, 1]}
    assert rep["decode"] == {"builds": [0.0, 2], "forward": [0.25, 1], "step": [3.0, 1]}
    assert p.report() == {}  # reset
    # A wrong answer is caught: the second forward counted under "mixed" would fail the above.
    assert rep["mixed"]["forward"] != [0.5, 2]
