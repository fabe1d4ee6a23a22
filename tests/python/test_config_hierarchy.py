"""MEMPIPE_CONFIG's hierarchy key (two-level selection, retriever/hierarchical.h)."""

import pytest

from mempipe import config


def test_hierarchy_defaults_to_flat():
    cfg = config.MempipeConfig()
    assert cfg.hierarchy == "none" and cfg.pages_per_super_page == 1
    assert cfg.validate() == []


def test_hierarchy_parses_and_names_its_super_page():
    cfg = config.load(environ={"MEMPIPE_CONFIG": "placement=fpga,hierarchy=16in64"})
    assert cfg.hierarchy == "16in64" and cfg.pages_per_super_page == 4
    assert not any("hierarchy" in r for r in cfg.validate())
    cfg = config.load(environ={"MEMPIPE_CONFIG": "placement=fpga,page_size=32,hierarchy=32in256"})
    assert cfg.pages_per_super_page == 8
    assert not any("hierarchy" in r for r in cfg.validate())


@pytest.mark.parametrize("text,reason", [
    ("placement=fpga,hierarchy=16in64,page_size=32", "has 16-token pages but page_size is 32"),
    ("placement=fpga,hierarchy=16in48", "a super-page must be 2, 4 or 8 pages of 16"),
    ("placement=fpga,hierarchy=16in16", "a super-page must be 2, 4 or 8 pages of 16"),
    ("placement=fpga,hierarchy=lserve", "got 'lserve'"),
    ("placement=cpu,hierarchy=16in64", "placement 'cpu' selects flat"),
])
def test_hierarchy_reasons_name_the_bad_value(text, reason):
    reasons = config.load(environ={"MEMPIPE_CONFIG": text}).validate()
    assert any(reason in r for r in reasons), reasons


def test_hierarchy_must_be_a_string():
    with pytest.raises(ValueError, match="hierarchy must be a string"):
        config.load({"hierarchy": 4})
