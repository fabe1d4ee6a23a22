"""A transformers model outside vLLM computing with torch.ops.mempipe (mempipe.hf): the tiny
random-weight Llama generates the same greedy tokens as transformers' SDPA attention when the
budget covers the context, and its sparse path runs with a small budget."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import mempipe.hf  # noqa: E402


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(7)
    cfg = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, initializer_range=0.08, pad_token_id=0)
    mempipe.hf.register()
    mempipe.hf.register()  # idempotent
    return LlamaForCausalLM(cfg).eval()


def _generate(model, impl, ids):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        # min_new_tokens: the random model may emit EOS; the test wants every step.
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                              min_new_tokens=12, do_sample=False)


def test_full_budget_matches_sdpa(model, gen, monkeypatch):
    monkeypatch.setenv("MEMPIPE_CONFIG", "budget=1024,dense_layers=1")
    ids = torch.randint(3, 500, (2, 150), generator=gen)
    assert torch.equal(_generate(model, "mempipe", ids), _generate(model, "sdpa", ids))


def test_small_budget_runs_sparse_path(model, gen, monkeypatch):
    monkeypatch.setenv("MEMPIPE_CONFIG", "budget=32,dense_layers=0")
    calls = []
    original = torch.ops.mempipe.sparse_decode
    monkeypatch.setattr(torch.ops.mempipe, "sparse_decode",
                        lambda *a: calls.append(a[5].clone()) or original(*a), raising=False)
    ids = torch.randint(3, 500, (1, 100), generator=gen)
    out = _generate(model, "mempipe", ids)
    assert out.shape == (1, 112)
    assert calls and all(int(c.max()) == 2 for c in calls)  # 32 tokens = 2 pages a head


def test_padding_masks_are_rejected(model):
    model.set_attn_implementation("mempipe")
    ids = torch.randint(3, 500, (2, 20))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad(), pytest.raises(NotImplementedError, match="without padding"):
        model(ids, attention_mask=mask)
