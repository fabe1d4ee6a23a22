"""Greedy generation with vLLM's CPU build under tensor parallelism; prints one JSON line.

    python vllm_tp_generate.py MODEL_DIR BACKEND BLOCK_SIZE TP

BACKEND is an --attention-backend value or "default"; TP is tensor_parallel_size (vLLM starts
one worker process per rank). With BACKEND=CUSTOM each rank reports, through collective_rpc
(`rank_report`), what its mempipe layers saw: the configuration, the KV and query heads of its
share, the layer count per path (sparse, dense, prefill calls), a checksum of each layer's page
digests (sum and the number of written pages) and the last sparse decode step's selection (pages
and counts of the plan's buffers, per sequence and KV head of the rank). The JSON carries the
tokens, the text and the per-rank reports under "ranks". The engine, prompts and sampling are
those of vllm_generate.py (make_llm, make_prompts, sampling_params, generate).
"""

import json
import os
import sys

from vllm_generate import generate, make_llm, make_prompts, sampling_params


def rank_report(worker) -> dict:
    """One worker's mempipe state (a collective_rpc target: runs in the rank's process)."""
    import torch
    from vllm.distributed import get_tensor_model_parallel_rank

    from mempipe.vllm.backend import MempipeAttentionImpl
    ctx = worker.model_runner.vllm_config.compilation_config.static_forward_context
    layers, plan, config = {}, None, None
    for name, module in sorted(ctx.items()):
        impl = getattr(module, "impl", None)
        if not isinstance(impl, MempipeAttentionImpl) or impl._layer is None:
            continue
        paged = impl._layer
        entry = {"heads": impl.num_heads, "kv_heads": impl.num_kv_heads,
                 "sparse": paged.sparse, "calls": dict(paged.calls)}
        if paged._digests is not None:  # native: a tensor; int8: its exact rows
            d = paged._digests
            d = (d if isinstance(d, torch.Tensor) else d.exact).double()
            written = torch.isfinite(d).all(dim=(1, 2, 3))
            entry["digest_pages"] = int(written.sum())
            entry["digest_sum"] = float(d[written].sum())
        layers[name] = entry
        plan = paged.plan or plan
        config = str(impl.config)
    report = {"rank": get_tensor_model_parallel_rank(), "layers": layers, "config": config}
    views = getattr(plan, "_views", {}) if plan is not None else {}
    # The plan's views of the last decode batch: pages [S, KVH, max_selected], counts [S, KVH].
    for key, (_, view) in views.items():
        if isinstance(key, tuple) and len(key) == 6 and view[0] is not None:
            pages, counts = view[0], view[1]
            report["last_selection"] = {
                "counts": counts.tolist(),
                "pages": [[row[:c].tolist() for row, c in zip(seq, cs)]
                          for seq, cs in zip(pages, counts.tolist())]}
    return report


def main():
    model, backend, block_size, tp = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # rank_report goes to the workers
    llm = make_llm(model, backend, block_size, tensor_parallel_size=tp)
    result = generate(llm, make_prompts(), sampling_params())
    if backend == "CUSTOM":
        result["ranks"] = llm.collective_rpc(rank_report)
        for r in result["ranks"]:
            print(f"[rank {r['rank']}] config {r['config']}", flush=True)
            for name, e in r["layers"].items():
                print(f"[rank {r['rank']}] {name}: {e['heads']} query / {e['kv_heads']} KV heads,"
                      f" {'sparse' if e['sparse'] else 'dense'}, calls {e['calls']}, digests "
                      f"{e.get('digest_pages', 0)} pages sum {e.get('digest_sum', 0.0):.6e}",
                      flush=True)
            print(f"[rank {r['rank']}] last selection {r.get('last_selection')}", flush=True)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
