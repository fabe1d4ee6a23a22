import re, glob, sys
def g(sec, pat):
    m = re.search(pat + r".*?([0-9.]+) ms.*?([0-9]+)% \(([0-9]+)-([0-9]+)\)", sec)
    return "%s ms %s%%" % (m.group(1), m.group(2)) if m else "-"
for f in sorted(glob.glob(sys.argv[1] + "/smol_*.log")):
    t = open(f).read()
    cpu, wall = t.split("wall clock; then", 1)
    rc = re.search(r"reads: median ([0-9.]+) GB/s", cpu).group(1)
    rw = re.search(r"reads: median ([0-9.]+) GB/s", wall).group(1)
    print("%-20s CPU: read %6s sparse %-15s dense %-15s | wall: read %6s sparse %-15s dense %-15s" % (
        f.split("/")[-1][5:-4], rc, g(cpu, r"sparse attention \(selected"), g(cpu, r"dense attention \(all"),
        rw, g(wall, r"sparse attention, wall"), g(wall, r"dense attention, wall")))
