"""Greedy generation with vLLM from the tiny local Llama; prints one JSON line.

    python vllm_generate.py MODEL_DIR BACKEND BLOCK_SIZE [--inproc] [--check-selection]

BACKEND is an --attention-backend value or "default". BLOCK_SIZE is vLLM's --block-size, or
"default" for the platform's own choice (128 on the CPU). With --inproc the engine runs in this
process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the attention implementations can be listed, with
the engine's block size and the block sizes of mempipe's cache views.

--check-selection (needs --inproc and the CUSTOM backend) wraps mempipe's selection and sparse
decode with selection_check.SelectionCheck and generates three times with the same engine: with
mempipe's own selection, a position-only one and mempipe's minus the planted page; the JSON
carries each run's check summary under "checks" (tokens and text are the first run's). Prefix
caching is off then, so no run reuses another's cached (planted) pages."""

import json
import sys

PROMPT_LENS = [5, 70, 200, 333]


def make_llm(model, backend, block_size, **engine_args):
    """The engine both scripts use (vllm_tp_generate.py too): float32, eager, 1024-token
    contexts, 4 sequences, a 64 MiB KV cache, seed 0; BACKEND "default" leaves vLLM's own
    attention backend, BLOCK_SIZE None vLLM's own block size. engine_args are added to (or
    override) those."""
    from vllm import LLM
    kwargs = {} if backend == "default" else {"attention_backend": backend}
    if block_size is not None:
        kwargs["block_size"] = block_size
    kwargs.update(engine_args)
    return LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=64 << 20, seed=0,
               **kwargs)


def make_prompts():
    """Text prompts of PROMPT_LENS words through the model's word-level tokenizer
    (tiny_llama.py)."""
    return [" ".join(f"w{(i * 37 + j * 11) % 500 + 3}" for j in range(n))
            for i, n in enumerate(PROMPT_LENS)]


def sampling_params():
    """Greedy, 24 new tokens each, EOS ignored."""
    from vllm import SamplingParams
    return SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def generate(llm, prompts, params):
    """One greedy generation: {"tokens": [ids per prompt], "text": [text per prompt]}."""
    outs = llm.generate(prompts, params, use_tqdm=False)
    return {"tokens": [list(o.outputs[0].token_ids) for o in outs],
            "text": [o.outputs[0].text for o in outs]}


def main():
    model, backend = sys.argv[1], sys.argv[2]
    block_size = None if sys.argv[3] == "default" else int(sys.argv[3])
    kwargs = {}
    check = None
    if "--check-selection" in sys.argv:
        if "--inproc" not in sys.argv:
            raise SystemExit("--check-selection needs --inproc (the checks run in this process)")
        from selection_check import SelectionCheck
        check = SelectionCheck().install()
        kwargs["enable_prefix_caching"] = False
    llm = make_llm(model, backend, block_size, gpu_memory_utilization=0.3, **kwargs)
    prompts, params = make_prompts(), sampling_params()
    result = generate(llm, prompts, params)
    if check is not None:
        result["checks"] = {"mempipe": check.summary()}
        for mode in ("position", "drop"):
            check.reset(mode)
            llm.generate(prompts, params, use_tqdm=False)
            result["checks"][mode] = check.summary()
            print(f"[check-selection] {mode}: {result['checks'][mode]}", flush=True)
    if "--inproc" in sys.argv:
        ctx = llm.llm_engine.vllm_config.compilation_config.static_forward_context
        result["impls"] = sorted({type(m.impl).__name__ for m in ctx.values()
                                  if hasattr(m, "impl")})
        result["block_size"] = llm.llm_engine.vllm_config.cache_config.block_size
        # The pages mempipe's layers read: the block size of their cache views.
        result["page_sizes"] = sorted({int(m.impl._kv_view.shape[2]) for m in ctx.values()
                                       if getattr(getattr(m, "impl", None), "_kv_view", None)
                                       is not None})
        # The digests mempipe's layers kept (Tensor: native; Int8Digests: digest_dtype=int8).
        result["digests"] = sorted({type(m.impl._layer._digests).__name__
                                    for m in ctx.values()
                                    if getattr(getattr(m, "impl", None), "_layer", None)
                                    is not None and m.impl._layer._digests is not None})

    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
