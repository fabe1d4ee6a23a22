"""Tabulates this folder's vllm_cpu_bench.py results: per round, each row's first prefill and
decode, mempipe (and variants) over CPU_ATTN, then the median ratio per configuration.

    python3 integration/bench/results/collapse_share/ratios.py integration/bench/results/collapse_share
"""
import json
import pathlib
import statistics
import sys


def main(folder: str) -> None:
    ratios: dict[tuple[str, str, int], list[tuple[float, float]]] = {}
    by_position: dict[bool, list[float]] = {True: [], False: []}  # CUSTOM before CPU_ATTN?
    print(f"{'file':18} {'row':10} {'run':9} {'prefill s':>9} {'ratio':>6} {'decode tok/s':>12} "
          f"{'ratio':>6}  order")
    for path in sorted(pathlib.Path(folder).glob("*.json")):
        data = json.loads(path.read_text())
        if "rows" not in data:
            continue
        for row in data["rows"]:
            runs = row["runs"]
            a = runs["CPU_ATTN"]
            key = f"{row['dtype']}:{row['length_requested']}"
            for name, r in runs.items():
                pf = r["prefill_s"] / a["prefill_s"]
                dec = r["decode_tokens_per_s"] / a["decode_tokens_per_s"]
                warm = r.get("warm_prefill_s") or []
                warm_ratio = (f"  warm {statistics.median(warm):.1f} s "
                              f"{statistics.median(warm) / statistics.median(a['warm_prefill_s']):.2f}"
                              if warm else "")
                print(f"{path.stem:18} {key:10} {name:9} {r['prefill_s']:9.1f} {pf:6.2f} "
                      f"{r['decode_tokens_per_s']:12.1f} {dec:6.2f}  {','.join(runs)}{warm_ratio}")
                if name != "CPU_ATTN":
                    order = list(runs)
                    if name == "CUSTOM":
                        by_position[order.index(name) < order.index("CPU_ATTN")].append(pf)
                    default = path.stem.startswith(("final", "warm"))  # run at 0.02
                    label = name if name != "CUSTOM" else ("CUSTOM 0.02" if default else
                                                           "CUSTOM 0.05")
                    ratios.setdefault((label, row["dtype"], row["length_requested"]),
                                      []).append((pf, dec))
    print("\nmedian over rounds (mempipe / CPU_ATTN): prefill, decode tok/s; n; every prefill ratio")
    for (label, dtype, length), rs in sorted(ratios.items()):
        pfs = [p for p, _ in rs]
        print(f"  {label:12} {dtype}:{length:<5} {statistics.median(pfs):.2f}x "
              f"{statistics.median(d for _, d in rs):.2f}x  n={len(rs)}  "
              f"{', '.join(f'{p:.2f}' for p in pfs)}")


    first, second = by_position[True], by_position[False]
    gm = (statistics.geometric_mean(first) * statistics.geometric_mean(second)) ** 0.5
    print(f"\nCUSTOM's prefill ratios (share 0.05 and 0.02) by position: its engine before CPU_ATTN's "
          f"{statistics.geometric_mean(first):.3f}x (n={len(first)}), after it "
          f"{statistics.geometric_mean(second):.3f}x (n={len(second)}); geometric means; "
          f"the two balanced: {gm:.3f}x")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".")
