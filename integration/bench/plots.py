#!/usr/bin/env python3
"""Plots from benchmark JSON, one command: matplotlib PNGs of decode throughput results.

  python3 integration/bench/plots.py integration/bench/results/design_space_h200.json \
      --out integration/bench/results/plots

Inputs (any number; the format is detected per file):
  - `mempipe.throughput/1` JSON (DESIGN_SPACE.md, "JSON schema"): written by
    `design_space.py --json` (kind "modeled") and by the whole-model throughput runner
    (kind "measured"); may carry design-space `maps`.
  - `mempipe-bench --json` output (`config` + `placements`): one context and batch, measured on
    the host named in its `machine`.

Outputs, per input file `NAME.json`, into --out:
  NAME_steps.png     stacked time per token by step (append, prepare, relevancy, retrieval,
                     apply, linear) for each placement, one panel per batch, grouped by context
  NAME_speedup.png   speedup over dense vs context, one line per placement and batch
  NAME_energy.png    energy per token vs context (GPU + FPGA), one line per placement and batch
  NAME_map_<map>.png one heatmap per design-space map (fpga speedup over the gpu placement)
  STEM_context.png   with --combine STEM: every measured input's batch-1 rows on one pair of
                     axes (ms/token of the best dense and the sparse placement, and speedup, vs
                     context), one line per input, labelled with its machine, so one-GPU and
                     tensor-parallel runs (model_decode_tp.py) read as one curve to 1M tokens
Every title says "MODELED" or "measured on <machine>".
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

SCHEMA = "mempipe.throughput/1"
STEPS = ("append", "prepare", "relevancy", "retrieval", "apply", "linear")
STEP_COLORS = {"append": "#8c8c8c", "prepare": "#f2b134", "relevancy": "#d1495b",
               "retrieval": "#8e44ad", "apply": "#2e86ab", "linear": "#3b7d4f"}


def _bench_to_schema(d: dict, path: str) -> dict:
    """mempipe-bench --json (one configuration, CPU or emulated FPGA) -> the throughput schema."""
    c = d["config"]
    rows = []
    for p in d["placements"]:
        step = p["median_step_ms"]
        steps = {k: p.get(f"{k}_ms", 0.0) for k in STEPS if k != "linear"}
        steps["linear"] = 0.0
        rows.append({"placement": p["placement"], "scheme": "sync", "context": c["context"],
                     "batch": c["batch"], "step_ms": step, "ms_per_token": step,
                     "tokens_per_s": p["tokens_per_s"], "steps_ms": steps,
                     "memory_processing_share": p["memory_processing_share"],
                     "speedup_over_dense": p["speedup_over_dense"],
                     "energy_j_per_token": None,
                     "fpga_energy_j_per_token": (p["modeled"]["energy_mj_per_step"] / 1e3 /
                                                 c["batch"]) if "modeled" in p else None,
                     "energy_source": "modeled (FPGA card only)" if "modeled" in p else None,
                     "rel_err": p.get("rel_l2_error")})
    m = d.get("machine", {})
    return {"schema": SCHEMA, "kind": "measured",
            "machine": {"host": f"{m.get('hardware_threads', '?')}-thread host",
                        "timing": m.get("timing", "measured")},
            "command": f"mempipe-bench --json ({path})", "rows": rows, "maps": [],
            "note": "attention only (mempipe-bench has no linear layers); FPGA steps C-simulated"}


def load(path: str) -> dict:
    d = json.loads(Path(path).read_text())
    if d.get("schema") == SCHEMA:
        for k in ("kind", "rows"):
            if k not in d:
                raise ValueError(f"{path}: {SCHEMA} JSON lacks {k!r}")
        if d["kind"] not in ("measured", "modeled"):
            raise ValueError(f"{path}: kind must be measured or modeled, got {d['kind']!r}")
        d.setdefault("maps", [])
        return d
    if "config" in d and "placements" in d:
        return _bench_to_schema(d, path)
    raise ValueError(f"{path}: neither {SCHEMA} JSON nor mempipe-bench --json output "
                     f"(top-level keys {sorted(d)[:8]})")


def _label(d: dict) -> str:
    if d["kind"] == "modeled":
        return "MODELED"
    m = d.get("machine", {})
    return "measured on " + (m.get("gpu") or m.get("host") or "?")


def _series_name(r: dict) -> str:
    name = r["placement"]
    if r.get("variant"):
        name += f" ({r['variant']})"
    elif r["placement"] == "fpga" and r.get("scheme", "sync") != "sync":
        name += f" ({r['scheme']})"
    return name


def _ctx(L: int) -> str:
    return f"{L // 1048576}M" if L % 1048576 == 0 else f"{L // 1024}K"


def plot_steps(d: dict, out: Path, plt) -> Path:
    rows = d["rows"]
    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(max(10, 7 * len(batches)), 5.5),
                             squeeze=False)
    for ax, B in zip(axes[0], batches):
        rb = [r for r in rows if r["batch"] == B]
        contexts = sorted({r["context"] for r in rb})
        names = list(dict.fromkeys(_series_name(r) for r in rb))
        width = 0.8 / len(names)
        for j, name in enumerate(names):
            for i, L in enumerate(contexts):
                r = next((r for r in rb if r["context"] == L and _series_name(r) == name), None)
                if r is None:
                    continue
                bottom = 0.0
                for k in STEPS:
                    v = r["steps_ms"].get(k, 0.0) or 0.0
                    ax.bar(i + (j - (len(names) - 1) / 2) * width, v, width * 0.95, bottom=bottom,
                           color=STEP_COLORS[k], edgecolor="white", linewidth=0.3,
                           hatch="//" if r.get("fits") is False else None,
                           label=k if (i == 0 and j == 0) else None)
                    bottom += v
                ax.text(i + (j - (len(names) - 1) / 2) * width, bottom, f"{j + 1}",
                        ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(contexts)), [_ctx(L) for L in contexts])
        ax.set_xlabel("context (tokens per sequence)")
        ax.set_ylabel("ms per decode step (= per token of each sequence)")
        ax.set_title(f"batch {B}: bars " + ", ".join(f"{j + 1}={n}" for j, n in enumerate(names)),
                     fontsize=8)
        ax.legend(fontsize=8, loc="upper left")
    notes = []
    if d["kind"] == "modeled" and any(r["placement"] == "fpga" for r in rows):
        notes.append("fpga prepare/relevancy = time the GPU waits on the card")
    if any(r.get("fits") is False for r in rows):
        notes.append("hatched: weights + KV exceed GPU memory")
    if d["kind"] == "measured" and d.get("note"):
        notes.append(d["note"])
    fig.suptitle(f"Time per token by step ({_label(d)})" +
                 ("\n" + "; ".join(notes) if notes else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _lines(d: dict, out: Path, plt, key: str, ylabel: str, title: str, logy: bool) -> Path:
    series = defaultdict(list)
    for r in d["rows"]:
        v = r.get(key)
        if v is None:
            continue
        series[(_series_name(r), r["batch"])].append((r["context"], v))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for (name, B), pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                linestyle="-" if B == min(b for _, b in series) else "--",
                label=f"{name}, batch {B}")
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ctxs = sorted({r["context"] for r in d["rows"]})
    ax.set_xticks(ctxs, [_ctx(L) for L in ctxs])
    ax.set_xlabel("context (tokens per sequence)")
    ax.set_ylabel(ylabel)
    if key == "speedup_over_dense":
        ax.axhline(1.0, color="black", linewidth=0.8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{title} ({_label(d)})")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_map(m: dict, out: Path, plt) -> Path:
    import numpy as np
    from matplotlib.colors import LogNorm
    z = np.array(m["z"], dtype=float)
    fig, ax = plt.subplots(figsize=(8.5, 4.8))
    lim = max(2.0, float(np.nanmax(np.abs(np.log2(z)))))
    im = ax.imshow(z, origin="lower", aspect="auto", cmap="RdBu",
                   norm=LogNorm(vmin=2 ** -lim, vmax=2 ** lim))
    xs, ys = m["x"]["values"], m["y"]["values"]
    xl = [_ctx(x) if m["x"]["name"] == "context" else f"{x:g}" for x in xs]
    ax.set_xticks(range(len(xs)), xl)
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set_xlabel(m["x"]["name"])
    ax.set_ylabel(m["y"]["name"])
    for i in range(z.shape[0]):
        for j in range(z.shape[1]):
            ax.text(j, i, f"{z[i, j]:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if abs(math.log2(z[i, j])) < lim * 0.6 else "white")
    if z.min() < 1 < z.max():
        ax.contour(z, levels=[1.0], colors="black", linewidths=1.5)
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("fpga speedup over gpu placement\n(>1: offload pays; line = break-even)")
    ax.set_title(m["title"] + f" ({m.get('kind', 'modeled').upper()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_combined(docs: list, out: Path, plt, batch: int = 1) -> Path:
    """Batch-`batch` ms/token (best dense, sparse) and speedup vs context of several measured
    documents, one line per document (labelled with its machine)."""
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 5.2))
    ctxs = set()
    for path, d in docs:
        if d["kind"] != "measured":
            continue
        rows = [r for r in d["rows"] if r["batch"] == batch and r.get("step_ms")]
        label = d["machine"].get("gpu") or d["machine"].get("host") or Path(path).stem
        dense, sparse = {}, {}
        for r in rows:
            if r["placement"] == "dense":
                dense[r["context"]] = min(dense.get(r["context"], math.inf), r["step_ms"])
            elif r["placement"] != "fpga":
                sparse[r["context"]] = r["step_ms"]
        both = sorted(set(dense) & set(sparse))
        if not both:
            continue
        ctxs.update(both)
        line = a1.plot(both, [dense[L] for L in both], "--", marker="s",
                       label=f"best dense, {label}")[0]
        a1.plot(both, [sparse[L] for L in both], "-", marker="o", color=line.get_color(),
                label=f"sparse (gpu), {label}")
        a2.plot(both, [dense[L] / sparse[L] for L in both], "-", marker="o",
                color=line.get_color(), label=label)
        for L in both:
            a2.annotate(f"{dense[L] / sparse[L]:.2f}x", (L, dense[L] / sparse[L]),
                        textcoords="offset points", xytext=(0, 6), ha="center", fontsize=7)
    if not ctxs:
        raise ValueError(f"--combine: no measured batch-{batch} rows with both a dense and a "
                         f"sparse placement in the inputs")
    ticks = sorted(ctxs)
    for ax in (a1, a2):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [_ctx(L) for L in ticks])
        ax.set_xlabel("context (tokens per sequence)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    a1.set_ylabel("ms per decode step")
    a1.set_title(f"Time per token, batch {batch} (measured)", fontsize=10)
    a2.axhline(1.0, color="black", linewidth=0.8)
    a2.set_ylabel("speedup of sparse over best dense (x)")
    a2.set_title(f"Speedup vs context, batch {batch} (measured)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def make_plots(path: str, out_dir: str) -> list:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = load(path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem
    made = []
    if d["rows"]:
        made.append(plot_steps(d, out / f"{stem}_steps.png", plt))
        made.append(_lines(d, out / f"{stem}_speedup.png", plt, "speedup_over_dense",
                           "speedup over dense (x)", "Speedup vs context", False))
        if any(r.get("energy_j_per_token") for r in d["rows"]):
            made.append(_lines(d, out / f"{stem}_energy.png", plt, "energy_j_per_token",
                               "J per token (GPU + FPGA)", "Energy per token", True))
    for m in d["maps"]:
        made.append(plot_map(m, out / f"{stem}_map_{m['name']}.png", plt))
    return made


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="JSON files (throughput schema or mempipe-bench)")
    ap.add_argument("--out", default="plots", help="output directory (created if missing)")
    ap.add_argument("--combine", default=None, metavar="STEM",
                    help="also write STEM_context.png: every measured input's batch-1 rows on "
                         "one pair of axes (one line per input)")
    a = ap.parse_args(argv)
    for path in a.inputs:
        print(f"[plots] {path}", file=sys.stderr)
        for p in make_plots(path, a.out):
            print(f"  wrote {p}", file=sys.stderr)
    if a.combine:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        p = plot_combined([(path, load(path)) for path in a.inputs],
                          out / f"{a.combine}_context.png", plt)
        print(f"  wrote {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ValueError, FileNotFoundError, KeyError) as e:
        print(f"plots.py: error: {e}", file=sys.stderr)
        sys.exit(2)
