"""Tabulate mutmut's results per module (or per function) from the ``mutants/**/*.py.meta`` files it writes.

    python tools/mutation_report.py                      # one row per module
    python tools/mutation_report.py --functions          # one row per function
    python tools/mutation_report.py --survivors          # also list the surviving mutants
    python tools/mutation_report.py --only 'difflab.training.loop.x_learning_rate*' ...

Run it from the repository root after ``mutmut run`` (docs/testing.md). Mutants never run are left out.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout",
          255: "timeout", 5: "no tests", 33: "no tests", 34: "skipped", 37: "killed"}  # 37: caught by type check


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="mutants")
    ap.add_argument("--functions", action="store_true")
    ap.add_argument("--survivors", action="store_true")
    ap.add_argument("--only", nargs="*", default=[], help="glob patterns of mutant names to include")
    args = ap.parse_args()
    rows: dict[str, Counter] = defaultdict(Counter)
    survivors = []
    for meta in sorted(Path(args.root).rglob("*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if code is None or (args.only and not any(fnmatch.fnmatch(name, p) for p in args.only)):
                continue
            # names look like pkg.mod.x_func__mutmut_3 or pkg.mod.xǁClassǁmethod__mutmut_3
            module, func = re.split(r"\.x_|\.xǁ", name, maxsplit=1)
            func = func.rsplit("__mutmut_", 1)[0].replace("ǁ", ".")
            key = f"{module}.{func}" if args.functions else module
            status = STATUS.get(code, "suspicious")
            rows[key][status] += 1
            if status == "survived":
                survivors.append(name)
    print(f"{'module':60s} {'mutants':>7s} {'killed':>6s} {'survived':>8s} {'timeout':>7s} {'other':>5s} {'score':>6s}")
    for key, c in sorted(rows.items()):
        total = sum(c.values())
        other = total - c["killed"] - c["survived"] - c["timeout"]
        score = 100 * (c["killed"] + c["timeout"]) / max(total, 1)
        print(f"{key:60s} {total:7d} {c['killed']:6d} {c['survived']:8d} {c['timeout']:7d} {other:5d} {score:5.1f}%")
    if args.survivors:
        print("\n".join(["", "survivors:"] + survivors))


if __name__ == "__main__":
    main()
