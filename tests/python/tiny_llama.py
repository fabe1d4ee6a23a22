"""A tiny Llama checkpoint made on the spot (random weights, fixed seed) for offline tests.

No model can be downloaded where the tests run, and no package ships a small trained Llama in
Hugging Face format, so the vLLM generation test builds one with transformers: 4 layers, head
size 64 (one of mempipe's head sizes), GQA 4:2 (4 query heads share 2 KV heads). Weights are
random but deterministic; they are drawn wider than the usual init so next-token logits are
well separated and greedy decoding is stable against float rounding between backends.
A word-level tokenizer ("<s>", "</s>", "w3" ... "w511") makes text prompts and text output.
"""

from __future__ import annotations

import json
import pathlib


def write_tiny_llama(path: pathlib.Path, seed: int = 1234, vocab: int = 512) -> pathlib.Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      head_dim=64, max_position_embeddings=4096, initializer_range=0.08,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                      torch_dtype="float32")
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    # vLLM reads generation_config.json when present; keep sampling out of the picture.
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1,
                                                              "eos_token_id": 2}))
    write_word_tokenizer(path, vocab)
    return path


def write_word_tokenizer(path: pathlib.Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2}
    words.update({f"w{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
