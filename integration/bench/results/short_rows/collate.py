"""One line per profile.sh run: the attention backend's time per decode step (`forward`, all 30
layers, cache writes included) and the whole step, both measured in vLLM's worker, then the
ratio of each mempipe layout's forward to CPU_ATTN's of the same round.
    python integration/bench/results/short_rows/collate.py DIR"""
import glob
import json
import os
import sys

rows = {}
for path in sorted(glob.glob(os.path.join(sys.argv[1], "prof_*.json"))):
    parts = os.path.basename(path)[:-5].split("_")  # prof, dtype, length, arm..., round
    dtype, length, rnd, arm = parts[1], parts[2], parts[-1], "_".join(parts[3:-1])
    d = json.load(open(path))["decode_ms_per_step"]
    rows[(dtype, int(length), rnd, arm)] = d
print(f"{'dtype':5} {'tokens':>6} {'round':>5} {'backend':9} {'forward ms':>10} {'step ms':>8} "
      f"{'forward / CPU_ATTN':>18}")
for (dtype, length, rnd, arm), d in sorted(rows.items()):
    base = rows.get((dtype, length, rnd, "CPU_ATTN"))
    ratio = f"{d['forward'] / base['forward']:.2f}x" if base else "-"
    print(f"{dtype:5} {length:6} {rnd:>5} {arm:9} {d['forward']:10.2f} {d['step']:8.2f} {ratio:>18}")
