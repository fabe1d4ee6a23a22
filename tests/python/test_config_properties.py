"""Property-based fuzzing (hypothesis) of MEMPIPE_CONFIG (issue 14); the module's entry points
are in test_module_properties.py. Each property holds for every generated input: the call either succeeds
with a result that satisfies the documented contract, or raises ValueError (the module's
InvalidArgument) naming the bad value; nothing else (no crash, no other exception type).

The number of examples is bounded for CI (MEMPIPE_HYPOTHESIS_EXAMPLES, default 150 per
property); hypothesis prints the falsifying example and its seed on failure."""

import os
import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mempipe import config

EXAMPLES = int(os.environ.get("MEMPIPE_HYPOTHESIS_EXAMPLES", "150"))
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
INT32_MIN, INT32_MAX = -2**31, 2**31 - 1

# ---- MEMPIPE_CONFIG -----------------------------------------------------------------------------

KEYS = [f.name for f in config.dataclasses.fields(config.MempipeConfig)]
_DEFAULTS = config.MempipeConfig()
BOOL_KEYS = [k for k in KEYS if type(getattr(_DEFAULTS, k)) is bool]
FLOAT_KEYS = [k for k in KEYS if type(getattr(_DEFAULTS, k)) is float]
INT_KEYS = [k for k in KEYS if type(getattr(_DEFAULTS, k)) is int]
_text = st.text(alphabet=string.printable + "é\u00a0", max_size=12)
_value = st.one_of(_text, st.integers().map(str), st.floats().map(str), st.booleans().map(str))
_item = st.tuples(st.sampled_from(KEYS + ["pages", ""]), _value).map(lambda kv: f"{kv[0]}={kv[1]}")
_config_text = st.one_of(st.lists(_item, max_size=6).map(",".join), _text)


def _check_typed(cfg):
    for key in KEYS:
        value = getattr(cfg, key)
        if key in INT_KEYS:
            assert type(value) is int and INT32_MIN <= value <= INT32_MAX, (key, value)
        elif key in BOOL_KEYS:
            assert type(value) is bool, (key, value)
        elif key in FLOAT_KEYS:
            assert type(value) is float and value == value and abs(value) != float("inf"), \
                (key, value)
        else:
            assert isinstance(value, str), (key, value)


@SETTINGS
@given(_config_text)
def test_any_config_text_parses_strictly_or_is_refused(text):
    try:
        cfg = config.load(environ={config.ENV_VAR: text})
    except ValueError as e:
        assert str(e).startswith(config.ENV_VAR), e
        return
    _check_typed(cfg)
    reasons = cfg.validate()  # never raises; every reason is a string
    assert all(isinstance(r, str) and r for r in reasons)
    # A key given twice is always refused, so every key of an accepted text is unique.
    keys = [item.split("=", 1)[0].strip() for item in text.split(",") if item.strip()]
    assert len(keys) == len(set(keys))


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS + ["pages"]),
                       st.one_of(st.integers(), st.floats(), st.booleans(), st.none(), _text),
                       max_size=5))
def test_any_additional_config_is_typed_or_refused(extra):
    try:
        cfg = config.load(extra, environ={})
    except ValueError:
        return
    _check_typed(cfg)
    for key, value in extra.items():  # accepted values were taken as given, not coerced
        if key in INT_KEYS:
            assert type(value) is int or (isinstance(value, str) and int(value) == getattr(cfg, key))
        elif key in BOOL_KEYS:
            assert type(value) is bool or value.strip() in ("true", "false")
        elif key in FLOAT_KEYS:
            assert type(value) in (int, float, str) and type(value) is not bool


@SETTINGS
@given(st.fixed_dictionaries({
    "placement": st.sampled_from(config.PLACEMENTS), "budget": st.integers(1, INT32_MAX),
    "page_size": st.sampled_from(config.PAGE_SIZES), "dense_layers": st.integers(0, 99),
    "sinks": st.integers(0, 9), "locals": st.integers(1, 9),
    "aggregation": st.sampled_from(config.AGGREGATIONS), "reuse": st.integers(1, 9),
    "mode": st.sampled_from(config.MODES), "micro_batches": st.integers(1, 9),
    "reuse_async": st.booleans(), "lookahead": st.booleans(),
    "fpga_backend": st.sampled_from(config.FPGA_BACKENDS), "fpga_paced": st.booleans(),
    "fpga_fallback": st.sampled_from(config.FPGA_FALLBACKS),
    "deadline_ms": st.floats(1e-3, 1e6)}))
def test_config_text_round_trips(values):
    text = ",".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                    for k, v in values.items())
    assert config.load(environ={config.ENV_VAR: text}) == config.MempipeConfig(**values)
