"""Which page scorer keeps what SmolLM2 attends to? An offline analysis on captured tensors.

    build/python-venv/bin/python integration/quality/scorers.py capture --out build/scorers
    build/python-venv/bin/python integration/quality/scorers.py analyze --out build/scorers \
        --json integration/quality/results/scorers/analysis.json

`capture` prefills prompts densely (SDPA) and keeps, per layer, the post-RoPE keys of every
KV head and the queries of the last --queries positions (the last one is the query of the
answer's first decode step), plus where the answer's tokens sit: one passkey and one needle
prompt per --lengths entry (seeded; printed), and one window of prose (the perplexity text).
Written to OUT/*.pt (build/, not committed).

`analyze` scores every page of every sparse layer (dense_layers 2) with each scorer, selects
as mempipe does (the first and the newest page always, then the top pages by the score
aggregated over the GQA group with max), and reports per scorer and budget:
    recall     mean over (query position, sparse layer, KV head) of the true attention mass
               (mean over the group's query heads, softmax over the whole context) that falls
               on the selected pages; p05 its 5th percentile
    needle     on the (layer, KV head) pairs whose group puts >= --needle-mass of some query
               head's attention on the answer's pages (last query, task prompts): the share
               whose answer page is selected, and the median rank of that page
Scorers (every one is a transform of the query before Quest's bound
sum_c max(q'_c kmax_c, q'_c kmin_c), so digests, kernels and bytes are unchanged):
    minmax            the current bound (q' = q)
    rope<c>           q' = q with the rotate-half channel pairs (i, i + d/2) whose rotation per
                      page, page_size * base^(-2i/d), exceeds c radians set to zero
    topq<r>           q' keeps the r largest |q_c| of each query head (SparQ's channel choice)
    rope<c>+topq<r>   both
and two references that are not equal-bytes scorers: `exactmax` (each page's largest true
logit, the best any page-max scorer can do) and `oracle` (pages by true attention mass).
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

DENSE_LAYERS = 2
CAPTURE_ATTN = "scorers_capture"


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def capture(args) -> None:
    import smollm
    import tasks
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    torch.set_num_threads(args.threads)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    # transformers only (no mempipe needed): SDPA attention behind a hook that keeps q and k.
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    path = smollm.gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    AttentionInterface.register(CAPTURE_ATTN, sdpa_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_ATTN, sdpa_mask)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=torch.float32,
                                                 attn_implementation=CAPTURE_ATTN).eval()
    cfg = model.config
    rope = getattr(cfg, "rope_parameters", None) or {}
    base = float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    print(f"[capture] model loaded in {time.time() - t0:.0f} s; rope base {base}; seed "
          f"{args.seed}", flush=True)
    grabbed = {}

    def hook(module, query, key, value, attention_mask, **kw):
        n = args.queries
        grabbed[module.layer_idx] = (query[0, :, -n:].transpose(0, 1).float().clone(),
                                     key[0].float().clone())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kw)

    AttentionInterface.register(CAPTURE_ATTN, hook)
    prompts = []
    for length in args.lengths:
        for c in tasks.passkey_cases(tok, [length], [args.depth], 1, args.seed):
            prompts.append((f"passkey_L{length}", c.prompt_ids, c.answer))
        for c in tasks.needle_cases(tok, [length], [args.depth], 1, args.seed):
            if c.task == "needle_number":
                prompts.append((f"needle_L{length}", c.prompt_ids, c.answer))
    text = tok(tasks.natural_text(), add_special_tokens=False)["input_ids"]
    prompts.append((f"prose_L{args.prose}", text[:args.prose], ""))
    for name, ids, answer in prompts:
        if args.only and name not in args.only.split(","):
            continue
        t1 = time.time()
        grabbed.clear()
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), use_cache=False, logits_to_keep=1)
        answer_pos = []
        if answer:
            a = tok(" " + answer, add_special_tokens=False)["input_ids"]
            answer_pos = [i for i in range(len(ids) - len(a)) if ids[i:i + len(a)] == a]
            answer_pos = [p + j for p in answer_pos for j in range(len(a))]
        layers = sorted(grabbed)
        torch.save({"name": name, "answer": answer, "answer_pos": answer_pos, "length": len(ids),
                    "rope_base": base, "seed": args.seed,
                    "q": torch.stack([grabbed[i][0] for i in layers]),   # [L, P, H, D]
                    "k": torch.stack([grabbed[i][1] for i in layers])},  # [L, KVH, T, D]
                   out / f"{name}.pt")
        print(f"[capture] {name}: {len(ids)} tokens, answer at {answer_pos[:4]}, "
              f"{time.time() - t1:.0f} s", flush=True)


def rope_mask(head_dim: int, base: float, page: int, cutoff: float) -> torch.Tensor:
    """1 for the channels whose pair rotates at most `cutoff` radians over one page."""
    half = head_dim // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / head_dim)
    keep = (page * theta <= cutoff).float()
    return torch.cat([keep, keep])


def transform(q: torch.Tensor, name: str, base: float, page: int) -> torch.Tensor:
    """q [..., D] -> q' for scorer `name`."""
    for part in name.split("+"):
        if part == "minmax":
            continue
        if part.startswith("rope"):
            q = q * rope_mask(q.shape[-1], base, page, float(part[4:]) * math.pi)
        elif part.startswith("topq"):
            r = int(part[4:])
            idx = q.abs().topk(r, dim=-1).indices
            q = torch.zeros_like(q).scatter(-1, idx, q.gather(-1, idx))
        else:
            raise ValueError(f"unknown scorer part {part!r} in {name!r}")
    return q


def page_view(k: torch.Tensor, page: int):
    """k [KVH, T, D] -> (kmax, kmin) [KVH, P, D] over each page's valid tokens."""
    kvh, t, d = k.shape
    n = -(-t // page)
    pad = n * page - t
    hi = torch.cat([k, k.new_full((kvh, pad, d), -math.inf)], 1).view(kvh, n, page, d)
    lo = torch.cat([k, k.new_full((kvh, pad, d), math.inf)], 1).view(kvh, n, page, d)
    return hi.amax(2), lo.amin(2)


def _per_head(head_score, pmass, needle, ans_pages, ks, acc, needle_mass) -> None:
    """Per-query-head selection (Quest): each query head keeps the first and newest page and
    its own top k - 2; the bytes read are the union over the group (per KV head)."""
    kvh, group, n_pages = head_score.shape
    order = head_score[:, :, 1:n_pages - 1].argsort(-1, descending=True) + 1
    for k in ks:
        chosen = torch.zeros(kvh, group, n_pages, dtype=torch.bool)
        chosen[:, :, 0] = True
        chosen[:, :, n_pages - 1] = True
        if k > 2:
            chosen.scatter_(2, order[:, :, :k - 2], True)
        acc[k]["recall"] += (pmass * chosen).sum(-1).mean(1).tolist()
        acc[k]["union"] += chosen.any(1).sum(-1).tolist()
        if needle is not None:
            for h in range(kvh):
                if needle[h] >= needle_mass:
                    top = int(pmass[h][:, ans_pages].sum(-1).argmax())  # the head that reads it
                    acc[k]["needle_hit"].append(bool(chosen[h, top, ans_pages].any()))


def analyze(args) -> None:
    files = sorted(pathlib.Path(args.out).glob(args.files))
    if not files:
        raise SystemExit(f"no captures in {args.out}: run `capture` first")
    cutoffs = [float(c) for c in args.cutoffs.split(",") if c]
    scorers = (["minmax"] + [f"rope{c:g}" for c in cutoffs]
               + [f"topq{r}" for r in _ints(args.topq)]
               + [f"rope{c:g}+topq{r}" for c in cutoffs[:2] for r in _ints(args.topq)[:2]]
               + ["exactmax", "oracle"])
    budgets = _ints(args.budgets)
    page = args.page
    rows = {s: {b: {"recall": [], "needle_hit": [], "needle_rank": []} for b in budgets}
            for s in scorers}
    per_prompt = {}
    per_head_pages = _ints(args.per_head_pages)
    per_head = {k: {"recall": [], "union": [], "needle_hit": []} for k in per_head_pages}
    for f in files:
        cap = torch.load(f)
        q_all, k_all, base = cap["q"].float(), cap["k"].float(), cap["rope_base"]
        n_layers, n_pos, heads, d = q_all.shape
        kvh, t = k_all.shape[1], k_all.shape[2]
        group = heads // kvh
        ans_pages = sorted({p // page for p in cap["answer_pos"]})
        print(f"[analyze] {cap['name']}: {t} tokens, {n_pos} queries, answer pages "
              f"{ans_pages}", flush=True)
        per_prompt[cap["name"]] = {"tokens": t, "answer_pages": ans_pages, "scorers": {}}
        for layer in range(DENSE_LAYERS, n_layers):
            for j in range(n_pos):
                ctx = t - n_pos + j + 1  # causal: query j sees tokens [0, ctx)
                k = k_all[layer, :, :ctx]
                q = q_all[layer, j].view(kvh, group, d)
                kmax, kmin = page_view(k, page)
                n_pages = kmax.shape[1]
                logits = torch.einsum("hgd,htd->hgt", q, k) / math.sqrt(d)
                probs = logits.softmax(-1)
                pad = n_pages * page - ctx
                pmass = torch.nn.functional.pad(probs, (0, pad)).view(kvh, group, n_pages,
                                                                      page).sum(-1)
                last = j == n_pos - 1
                needle = None
                if last and ans_pages:
                    needle = pmass[:, :, ans_pages].sum(-1).amax(1)  # [kvh]
                for s in scorers:
                    if s == "oracle":
                        score = pmass.mean(1)
                    elif s == "exactmax":
                        lg = torch.nn.functional.pad(logits, (0, pad), value=-math.inf)
                        score = lg.view(kvh, group, n_pages, page).amax(-1).amax(1)
                    else:
                        qs = transform(q, s, base, page)
                        head_score = torch.maximum(torch.einsum("hgd,hpd->hgp", qs, kmax),
                                                   torch.einsum("hgd,hpd->hgp", qs, kmin))
                        score = head_score.amax(1)
                        if s == "minmax" and per_head_pages:
                            _per_head(head_score, pmass, needle, ans_pages, per_head_pages,
                                      per_head, args.needle_mass)
                    mid = score[:, 1:n_pages - 1]
                    order = mid.argsort(-1, descending=True) + 1  # page ids, best first
                    for b in budgets:
                        k_pages = b // page
                        chosen = torch.zeros(kvh, n_pages, dtype=torch.bool)
                        chosen[:, 0] = True
                        chosen[:, n_pages - 1] = True
                        if k_pages > 2:
                            chosen.scatter_(1, order[:, :k_pages - 2], True)
                        rec = (pmass * chosen[:, None, :]).sum(-1).mean(1)  # [kvh]
                        rows[s][b]["recall"] += rec.tolist()
                        if needle is not None:
                            for h in range(kvh):
                                if needle[h] < args.needle_mass:
                                    continue
                                hit = bool(chosen[h, ans_pages].any())
                                rank = min(int((order[h] == p).nonzero()[0]) if 0 < p < n_pages - 1
                                           else 0 for p in ans_pages)
                                rows[s][b]["needle_hit"].append(hit)
                                rows[s][b]["needle_rank"].append(rank)
                                if b == budgets[0]:
                                    per_prompt[cap["name"]]["scorers"].setdefault(s, []).append(
                                        [layer, h, round(float(needle[h]), 3), rank])
    table = []
    for s in scorers:
        for b in budgets:
            r = torch.tensor(rows[s][b]["recall"])
            hits, ranks = rows[s][b]["needle_hit"], sorted(rows[s][b]["needle_rank"])
            table.append({"scorer": s, "budget": b, "recall_mean": round(float(r.mean()), 4),
                          "recall_p05": round(float(r.quantile(0.05)), 4),
                          "pairs": len(r),
                          "needle_pairs": len(hits),
                          "needle_hit": round(sum(hits) / len(hits), 3) if hits else None,
                          "needle_rank_median": ranks[len(ranks) // 2] if ranks else None})
    print(f"{'scorer':<18}" + "".join(f"| B={b}: recall p05 needle med.rank " for b in budgets))
    for s in scorers:
        line = f"{s:<18}"
        for row in (x for x in table if x["scorer"] == s):
            line += (f"| {row['recall_mean']:.3f} {row['recall_p05']:.3f} "
                     f"{row['needle_hit'] if row['needle_hit'] is not None else '-'} "
                     f"{row['needle_rank_median']} ")
        print(line)
    ph_table = []
    for k in per_head_pages:
        r = torch.tensor(per_head[k]["recall"])
        u = torch.tensor(per_head[k]["union"], dtype=torch.float64)
        hits = per_head[k]["needle_hit"]
        ph_table.append({"pages_per_query_head": k, "union_pages_mean": round(float(u.mean()), 2),
                         "union_budget_tokens": round(float(u.mean()) * page, 1),
                         "recall_mean": round(float(r.mean()), 4),
                         "recall_p05": round(float(r.quantile(0.05)), 4),
                         "needle_hit": round(sum(hits) / len(hits), 3) if hits else None})
    if ph_table:
        print("per-query-head selection (minmax): pages per query head, union pages per KV head "
              "(the bytes), recall, p05, needle")
        for row in ph_table:
            print(f"  k={row['pages_per_query_head']:>3} union {row['union_pages_mean']:6.2f} "
                  f"recall {row['recall_mean']:.3f} p05 {row['recall_p05']:.3f} "
                  f"needle {row['needle_hit']}")
    if args.json:
        path = pathlib.Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "command": " ".join(sys.argv), "machine": platform.processor() or platform.machine(),
            "page_size": page, "dense_layers": DENSE_LAYERS, "needle_mass": args.needle_mass,
            "prompts": {k: {kk: vv for kk, vv in v.items() if kk != "scorers"}
                        for k, v in per_prompt.items()},
            "table": table,
            "per_query_head": ph_table,
            "needle_pairs_at_first_budget": {k: v["scorers"] for k, v in per_prompt.items()},
        }, indent=1))
        print(f"[analyze] wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("capture", help="prefill prompts and save keys/queries")
    c.add_argument("--out", default="build/scorers", help="folder for the .pt captures")
    c.add_argument("--lengths", type=_ints, default=[8000, 2048],
                   help="prompt lengths (one passkey + one number needle each); "
                        "default: 8000,2048")
    c.add_argument("--depth", type=float, default=0.5, help="needle depth; default: 0.5")
    c.add_argument("--prose", type=int, default=8000,
                   help="tokens of the prose window; default: 8000")
    c.add_argument("--queries", type=int, default=8,
                   help="query positions kept per prompt (the last ones); default: 8")
    c.add_argument("--seed", type=int, default=478392, help="case seed; default: 478392")
    c.add_argument("--only", default="", help="comma-separated prompt names to capture")
    c.add_argument("--threads", type=int, default=1, help="torch threads; default: 1")
    a = sub.add_parser("analyze", help="score the captures")
    a.add_argument("--out", default="build/scorers", help="folder of the .pt captures")
    a.add_argument("--files", default="*.pt", help="captures to read (glob); default: *.pt")
    a.add_argument("--page", type=int, default=16, help="page size; default: 16")
    a.add_argument("--budgets", default="256,512,1024", help="default: 256,512,1024")
    a.add_argument("--cutoffs", default="1,0.5,2,4,0.25",
                   help="rope<c> cutoffs in units of pi radians per page; default: 1,0.5,2,4,0.25")
    a.add_argument("--topq", default="32,16,8", help="topq<r> channel counts; default: 32,16,8")
    a.add_argument("--per-head-pages", default="6,8,10,12,14,16,20,24,28,32,40,48,56,64",
                   help="pages per query head of the per-query-head baseline (minmax); the "
                        "table gives the union's pages per KV head, to match GQA-aware "
                        "selection's bytes; default: 6,8,...,64")
    a.add_argument("--needle-mass", type=float, default=0.1,
                   help="attention mass on the answer pages that makes a pair a needle pair; "
                        "default: 0.1")
    a.add_argument("--json", default="", help="write the table here")
    args = p.parse_args(argv)
    (capture if args.cmd == "capture" else analyze)(args)


if __name__ == "__main__":
    main()
