"""MEMPIPE_CONFIG's hierarchy key (two-level selection, retriever/hierarchical.h)."""

import pytest

from mempipe import config


def test_hierarchy_defaults_to_flat():
    cfg = config.MempipeConfig()
    assert cfg.hierarchy == "none" and cfg.pages_per_super_page == 1
    assert cfg.validate() == []


def test_hierarchy_parses_and_is_refused_until_wired():
    cfg = config.load(environ={"MEMPIPE_CONFIG": "placement=fpga,hierarchy=16in64"})
    assert cfg.hierarchy == "16in64" and cfg.pages_per_super_page == 4
    reasons = [r for r in cfg.validate() if "hierarchy" in r]
    assert len(reasons) == 1 and "not wired into the Python placements" in reasons[0], reasons
    cfg = config.load(environ={"MEMPIPE_CONFIG": "placement=fpga,page_size=32,hierarchy=32in256"})
    assert cfg.pages_per_super_page == 8


@pytest.mark.parametrize("text,reason", [
    ("placement=fpga,hierarchy=16in64,page_size=32", "has 16-token pages but page_size is 32"),
    ("placement=fpga,hierarchy=16in48", "a super-page must be 2, 4 or 8 pages of 16"),
    ("placement=fpga,hierarchy=16in16", "a super-page must be 2, 4 or 8 pages of 16"),
    ("placement=fpga,hierarchy=lserve", "got 'lserve'"),
    ("placement=cpu,hierarchy=16in64", "placement 'cpu' selects flat"),
    ("placement=fpga,hierarchy=16in64", "placement 'fpga' selects flat"),
])
def test_hierarchy_reasons_name_the_bad_value(text, reason):
    reasons = config.load(environ={"MEMPIPE_CONFIG": text}).validate()
    assert any(reason in r for r in reasons), reasons


def test_hierarchy_must_be_a_string():
    with pytest.raises(ValueError, match="hierarchy must be a string"):
        config.load({"hierarchy": 4})
