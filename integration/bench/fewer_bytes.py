#!/usr/bin/env python3
"""Fewer bytes for the FPGA to scan: native vs int8 digests vs 16-in-64 super-pages vs sharded cards.

Drives mempipe-bench on one Llama-3-8B attention layer (32 query heads, 8 KV heads, head_dim 128,
bf16, page 16, budget 4096 tokens, 1 sink + 1 local page) per context and scheme, with the FPGA
steps on the emulated U55C (placement fpga), and reports per scheme:

  * digest bytes scanned per decoded token (the selection's own rows: every page for a flat
    selection; super-pages plus the kept super-pages' pages for 16-in-64; int8 rows are
    2 x head_dim + 4 bytes), counted on the last step, x 30 sparse layers;
  * the FPGA's time per token, MODELED (fpga/emulation/u55c_model.h): the digest update of the
    appended key plus the selection, of the one simulated layer, x 30 sparse layers (the first two
    of 32 decode densely, as Quest); energy likewise (modeled);
  * selection recall against the exact flat native-digest selection (middle pages; mempipe-bench's
    last-step audit, integration/bench/selection_audit.h) and the relative L2 error of the sparse
    attention output against dense attention, both MEASURED on the synthetic context: with planted
    heavy hitters (--heavy_hitters=8) and without (--heavy_hitters=0: keys are noise around
    per-channel means, "random keys").

Sharded rows (KV heads over N emulated cards) select exactly what one card selects (tested bit for
bit: tests/fpga/sharded_selector_test.cc), so only their time is run; their recall and error are
the native row's.

  python3 integration/bench/fewer_bytes.py --bench build/integration/bench/mempipe-bench \\
      --out integration/bench/results/fewer_bytes
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

SPARSE_LAYERS = 30  # Llama-3-8B: 32 layers, the first 2 dense

SCHEMES = [
    # name, extra flags, accuracy measured
    ("native", [], True),
    ("int8", ["--digest_dtype=int8"], True),
    ("16in64", ["--hierarchy=16in64"], True),
    ("16in64, expansion 8", ["--hierarchy=16in64", "--hierarchy_expansion=8"], True),
    ("int8+16in64", ["--digest_dtype=int8", "--hierarchy=16in64"], True),
    ("sharded x2", ["--fpga_cards=2"], False),
    ("sharded x4", ["--fpga_cards=4"], False),
    ("sharded x8", ["--fpga_cards=8"], False),
]


def run_bench(bench, context, flags, heavy, accuracy, threads):
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [bench, "--layers=1", "--dense_layers=0", f"--context={context}", "--steps=1",
           "--warmup=0", "--placements=fpga", "--bandwidth_mib=0", "--fpga_paced=false",
           f"--heavy_hitters={heavy}", f"--check_accuracy={'true' if accuracy else 'false'}",
           f"--threads={threads}", f"--json={path}"] + flags
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")
    with open(path) as f:
        out = json.load(f)
    os.unlink(path)
    p = out["placements"][0]
    return {
        "command": " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd)
                            if not c.startswith("--json=")),
        # The bench's CPU: brand, x86 family and model (CpuDescription), threads, kernel.
        "cpu": out["machine"]["cpu"],
        "attention_kernel": out["machine"].get("attention_kernel"),
        "wall_s": time.time() - t0,
        "selector": p["selector"],
        "digest_bytes_layer": p["digest_bytes_per_step"],
        "digest_rows_layer": p.get("digest_rows_per_step"),
        "flat_digest_rows_layer": p.get("flat_digest_rows_per_step"),
        "modeled_ms_layer": p["modeled"]["device_ms_per_step"],
        "modeled_mj_layer": p["modeled"]["energy_mj_per_step"],
        "recall_vs_flat": p.get("recall_vs_flat"),
        "rel_l2_error": p.get("rel_l2_error"),
        "int8_recall_vs_native_same_hierarchy": p.get("digest_recall_vs_native"),
    }


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", default="build/integration/bench/mempipe-bench",
                    help="the mempipe-bench binary")
    # 1M is 1048560 tokens: with the decoded token it fills exactly the HLS score kernel's
    # 65536 pages per sequence (fpga/hls/kernel_common.h).
    ap.add_argument("--contexts", default="32768,131072,524288,1048560",
                    help="comma-separated prompt lengths (tokens)")
    ap.add_argument("--random_keys_max_context", type=int, default=524288,
                    help="contexts above this skip the random-key (no heavy hitter) runs, which "
                         "take the host minutes each; the report says so")
    ap.add_argument("--threads", type=int, default=2, help="host threads for mempipe-bench")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows of an existing fewer_bytes.json and run only the rest")
    ap.add_argument("--out", default="integration/bench/results/fewer_bytes",
                    help="directory for fewer_bytes.json and fewer_bytes.md")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",") if c]
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "fewer_bytes.json")
    rows = []
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            rows = json.load(f)["rows"]
    have = {(r["context"], r["scheme"], r["keys"]) for r in rows}
    # Planted-key runs of every context first, then the random-key ones, so a long run that is
    # cut short still has every context's figures; results are written after every run.
    plan = []
    for keys, heavy in (("planted", 8), ("random", 0)):
        for context in contexts:
            for name, flags, accuracy in SCHEMES:
                if keys == "random" and (not accuracy or context > args.random_keys_max_context):
                    continue
                plan.append((context, name, flags, accuracy, keys, heavy))
    for i, (context, name, flags, accuracy, keys, heavy) in enumerate(plan):
        if (context, name, keys) in have:
            continue
        print(f"[fewer_bytes] {i + 1}/{len(plan)} context {context} {name} ({keys} keys)",
              file=sys.stderr, flush=True)
        r = run_bench(args.bench, context, flags, heavy, accuracy, args.threads)
        r.update(context=context, scheme=name, keys=keys)
        rows.append(r)
        print(f"[fewer_bytes]   {r['wall_s']:.0f} s; modeled {r['modeled_ms_layer']:.3f} "
              f"ms/layer, recall {fmt(r['recall_vs_flat'], '.4f')}", file=sys.stderr, flush=True)
        write_outputs(args, contexts, rows)
    write_outputs(args, contexts, rows)
    print(f"[fewer_bytes] wrote {args.out}/fewer_bytes.json and fewer_bytes.md", file=sys.stderr)


def write_outputs(args, contexts, rows):
    # As mempipe-bench described its CPU (rows kept by --resume from an older run lack it).
    cpus = sorted({r["cpu"] for r in rows if r.get("cpu")})
    cpu = "; ".join(cpus) if cpus else "unknown"
    machine = (f"{platform.node()}: {cpu} "
               "(shared build VM; host times are not the figures reported here)")
    doc = {
        "schema": "mempipe.fewer_bytes/1",
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python3", "integration/bench/fewer_bytes.py"] +
                            [a for a in sys.argv[1:] if a != "--resume"]),
        "machine": machine,
        "shape": "Llama-3-8B attention: 32 q heads, 8 KV heads, head_dim 128, bf16, page 16, "
                 "budget 4096, 1 sink + 1 local page, max aggregation; one layer simulated, "
                 f"per token = x {SPARSE_LAYERS} sparse layers",
        "modeled": "FPGA time and energy are modeled by the emulated U55C "
                   "(fpga/emulation/u55c_params.h), not measured",
        "rows": rows,
    }
    with open(os.path.join(args.out, "fewer_bytes.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")

    by = {(r["context"], r["scheme"], r["keys"]): r for r in rows}
    md = ["# Fewer bytes for the FPGA to scan", "",
          f"Command: `{doc['command']}` ({doc['date_utc']}), on {machine}.", "",
          f"Shape: {doc['shape']}. **FPGA time and energy per token are modeled** (emulated "
          "U55C, `fpga/emulation/u55c_params.h`), **recall and error are measured** on the "
          "synthetic context (one layer, one decode step after the prompt). Bytes are the "
          "digest rows the selection itself scores. 16in64 keeps expansion x ceil(254 / 4) "
          "super-pages for pass 2 (expansion 2 unless named).", "",
          "The relative error of this synthetic context is dominated by the sink and local pages "
          "every scheme keeps (its attention mass sits on the sink and the planted heavy "
          "hitters), so it barely separates the schemes; recall does.", ""]
    for context in contexts:
        native = by.get((context, "native", "planted"))
        md += [f"## {round(context / 1024)}K tokens ({context} prompt tokens)", "",
               "| scheme | digest MiB / token | vs native | FPGA ms / token (modeled) | "
               "FPGA mJ / token (modeled) | recall, planted | rel. err, planted | "
               "recall, random keys | rel. err, random keys |",
               "|---|---|---|---|---|---|---|---|---|"]
        for name, _, accuracy in SCHEMES:
            p = by.get((context, name, "planted"))
            if p is None:
                continue
            q = by.get((context, name, "random"))
            src = p if accuracy else native
            srq = q if accuracy else by.get((context, "native", "random"))
            mib = p["digest_bytes_layer"] * SPARSE_LAYERS / 2**20
            ratio = native["digest_bytes_layer"] / p["digest_bytes_layer"] if native else None
            rnote = "" if accuracy else " (= native)"
            md.append(
                f"| {name} | {mib:.1f} | {fmt(ratio, '.2f')}x fewer | "
                f"{p['modeled_ms_layer'] * SPARSE_LAYERS:.2f} | "
                f"{p['modeled_mj_layer'] * SPARSE_LAYERS:.1f} | "
                f"{fmt(src['recall_vs_flat'] if src else None, '.3f')}{rnote} | "
                f"{fmt(src['rel_l2_error'] if src else None, '.2e')}{rnote} | "
                f"{fmt(srq['recall_vs_flat'] if srq else None, '.3f')}{rnote if srq else ''} | "
                f"{fmt(srq['rel_l2_error'] if srq else None, '.2e')}{rnote if srq else ''} |")
        if not any(by.get((context, n, "random")) for n, _, _ in SCHEMES):
            md.append("")
            md.append("Random-key runs were not run at this context (each takes the shared host "
                      "minutes); planted keys only.")
        md.append("")
    with open(os.path.join(args.out, "fewer_bytes.md"), "w") as f:
        f.write("\n".join(md) + "\n")




if __name__ == "__main__":
    main()
