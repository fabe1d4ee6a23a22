#!/usr/bin/env python3
"""Renders a gpu_suite.py JSON result as a markdown table.

  python3 results_table.py results/gpu_bench_h200.json > results/gpu_bench_h200.md
"""
import json
import sys


def main(path):
    d = json.load(open(path))
    bw = d["copy_bw_Bps"]
    print(f"# mempipe GPU benchmark: {d['device']}\n")
    print(f"- date (UTC): {d['date_utc']}; torch {d['torch']}, CUDA {d['cuda']}")
    print(f"- command: `{d['command']}`")
    s = d["shape"]
    print(f"- shape: {s['q_heads']} query heads, {s['kv_heads']} KV heads, head_dim "
          f"{s['head_dim']}, {s['dtype']}, page {s['page']}, budget {s['budget_tokens']} tokens")
    print(f"- device-to-device copy bandwidth, same run: {bw / 1e12:.2f} TB/s (read + write)")
    print(f"- timing: {d['timing']}; % = achieved bandwidth on the bytes the op must move / copy "
          "bandwidth; floor = those bytes at copy bandwidth\n")
    print("| context x batch | mempipe dense | torch SDPA dense | mempipe select (score+top-k) "
          "| score only | torch Quest select | mempipe sparse attn | sparse step | step floor "
          "| step / floor | SDPA / step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def cell(r, name):
        if name not in r:
            return "not measured"
        x = r[name]
        if not x:
            return "n/a (out of memory)"
        return f"{x['ms']:.3f} ms ({x['frac_copy_bw']:.0%})"

    for r in d["results"]:
        if "error" in r:
            print(f"| {r['context'] // 1024}K x {r['batch']} | FAILED: {r['error']} |")
            continue
        st = r["mempipe_sparse_step"]
        print(f"| {r['context'] // 1024}K x {r['batch']} | {cell(r, 'mempipe_dense')} | "
              f"{cell(r, 'torch_sdpa_dense')} | {cell(r, 'mempipe_select')} | "
              f"{cell(r, 'mempipe_score_only')} | {cell(r, 'torch_quest_select')} | "
              f"{cell(r, 'mempipe_sparse_attn')} | {st['ms']:.3f} ms | {st['floor_ms']:.3f} ms | "
              f"{r['sparse_step_over_floor']:.2f}x | {r['speedup_sparse_step_vs_sdpa']:.1f}x |")


if __name__ == "__main__":
    main(sys.argv[1])
