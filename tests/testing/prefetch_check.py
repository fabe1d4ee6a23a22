#!/usr/bin/env python3
"""Checks that the compiler kept a kernel family's software prefetches.

GCC 12 at -O2 deleted every call to a prefetch-only helper of the relevancy scan (IPA
pure-const finds a function that only prefetches free of side effects), prefetches and all, and
nothing failed: the results are the same without them, only slower. This disassembles an object
file of a library and requires, for each named family (a function template's name, such as
Avx512ScoreHeads; a function template, not a class whose other methods do not prefetch), that
every out-of-line function of that family holds at least one prefetch
instruction (its clones counted together), and that the object holds at least one prefetch.
A family the compiler inlined everywhere is listed and not checked.

  prefetch_check.py --objdump objdump --source relevancy.cc \
      --family Avx512ScoreHeads --family Avx2ScoreBatch OBJECT...

Exit status 0 when every check holds, 1 with a line per function that lost them, 2 on bad
arguments or a missing object.
"""
import argparse
import collections
import os
import re
import subprocess
import sys

FUNCTION = re.compile(r"^[0-9a-f]+ <(.*)>:$")
PREFETCH = re.compile(r"\bprefetch(t0|t1|t2|nta|w)?\b")
CLONE = re.compile(r" \[clone [^\]]*\]$")


def family_of(name, families):
    """The family of `name` (a demangled symbol: a return type, the namespaces, then the function
    template's name and its arguments), or None. Only the function's own name counts, not a
    name inside its template arguments."""
    name = re.sub(r"^[\w:]+ (?=[\w:(])", "", name)  # a leading return type such as `void `
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"^(\w+::)*", "", name)
    for family in families:
        if name.startswith(family + "<"):
            return family
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objdump", default="objdump")
    parser.add_argument("--source", required=True,
                        help="the source file whose object is checked, e.g. relevancy.cc")
    parser.add_argument("--family", action="append", required=True)
    parser.add_argument("objects", nargs="+",
                        help="object files; the one named <source>.o (or .obj) is checked")
    args = parser.parse_args()
    wanted = [o for o in args.objects
              if os.path.basename(o) in (args.source + ".o", args.source + ".obj")]
    if len(wanted) != 1:
        print(f"prefetch_check: expected one object of {args.source} among "
              f"{len(args.objects)}, found {len(wanted)}", file=sys.stderr)
        return 2
    obj = wanted[0]
    try:
        text = subprocess.run([args.objdump, "-d", "-C", "--no-show-raw-insn", obj], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"prefetch_check: {args.objdump} -d {obj}: {e}", file=sys.stderr)
        return 2
    per_function = collections.Counter()  # base name (clones merged) -> prefetches
    total = 0
    name = None
    for line in text.splitlines():
        m = FUNCTION.match(line)
        if m:
            name = CLONE.sub("", m.group(1))
            per_function[name] += 0
            continue
        if name is not None and PREFETCH.search(line):
            per_function[name] += 1
            total += 1
    failures = []
    for family in args.family:
        members = {f: n for f, n in per_function.items() if family_of(f, [family])}
        if not members:
            print(f"{family}: inlined everywhere in {args.source}, not checked")
            continue
        lost = [f for f, n in members.items() if n == 0]
        print(f"{family}: {len(members)} functions, {sum(members.values())} prefetches, "
              f"{len(lost)} without any")
        failures += [f"{family}: no prefetch left in {f}" for f in sorted(lost)]
    if total == 0:
        failures.append(f"{args.source}: no prefetch instruction in the whole object")
    for f in failures:
        print(f"prefetch_check: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
