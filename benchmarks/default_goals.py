"""Issue 25's goals for a default, read from one benchmark run's ``results.json``.

    python benchmarks/default_goals.py benchmarks/results/default/results.json [--default plugin-adaptive] [--k 3]

Every ratio is a median over repeats of same-round pairs (``bench/report.py``): the default over plain decoding
and over upstream (same K group), and over the best of plain and every fixed K, each fixed K's own ratio to plain
being its same-round median. Prints a markdown table and each goal as met or missed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

FIXED = "plugin-fixed"
GOALS = (  # (label, column, threshold, where: (batch, temperature) or None for everywhere)
    ("default ÷ plain >= 0.97 everywhere", "plain", 0.97, None),
    ("default ÷ best of plain and every fixed K >= 0.95 at b=1 and 32 greedy", "best", 0.95, {(1, 0.0), (32, 0.0)}),
    ("default ÷ upstream >= 1.3 at b=1 greedy", "upstream", 1.3, {(1, 0.0)}),
)


def goal_rows(results: dict, default: str, k: int) -> list[dict]:
    configs = results["configs"]
    rows = []
    for row in (r for r in configs if r["method"] == default and r["k"] == k):
        batch, temperature = row["batch"], row["temperature"]
        fixed = {r["k"]: r["ratio_vs_plain"]["median"] for r in configs
                 if r["method"] == FIXED and (r["batch"], r["temperature"]) == (batch, temperature)}
        best_k, best = max(fixed.items(), key=lambda kv: kv[1], default=(0, 1.0))
        if best < 1.0:
            best_k, best = 0, 1.0
        ratio = row["ratio_vs_plain"]["median"]
        upstream = row["ratio_vs_upstream"]["median"] if row["ratio_vs_upstream"] else None
        rows.append({"batch": batch, "temperature": temperature, "plain": ratio, "best": ratio / best,
                     "best_is": "plain" if best_k == 0 else f"K={best_k}", "upstream": upstream,
                     "fixed": fixed, "tokens_per_s": row["tokens_per_s"]["median"]})
    return sorted(rows, key=lambda r: (r["temperature"], r["batch"]))


def markdown(rows: list[dict]) -> str:
    lines = ["| T | b | default tok/s | ÷ plain | fixed K ÷ plain | best | ÷ best | ÷ upstream |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fixed = ", ".join(f"K={k}: {v:.2f}" for k, v in sorted(r["fixed"].items()))
        upstream = "-" if r["upstream"] is None else f"{r['upstream']:.2f}"
        lines.append(f"| {r['temperature']:g} | {r['batch']} | {r['tokens_per_s']:.0f} | {r['plain']:.2f} | "
                     f"{fixed} | {r['best_is']} | {r['best']:.2f} | {upstream} |")
    lines += ["", "| goal | measured | met |", "|---|---|---|"]
    for label, column, threshold, where in GOALS:
        cells = [(r, r[column]) for r in rows if (where is None or (r["batch"], r["temperature"]) in where)
                 and r[column] is not None]
        if not cells:
            lines.append(f"| {label} | not measured | - |")
            continue
        worst, value = min(cells, key=lambda c: c[1])
        lines.append(f"| {label} | lowest {value:.2f} (b={worst['batch']}, T={worst['temperature']:g}) | "
                     f"{'met' if value >= threshold else 'missed'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path)
    parser.add_argument("--default", default="plugin-adaptive", help="the method judged (default %(default)s)")
    parser.add_argument("--k", type=int, default=3, help="its K (default %(default)s)")
    args = parser.parse_args()
    print(markdown(goal_rows(json.loads(args.results.read_text()), args.default, args.k)), end="")


if __name__ == "__main__":
    main()
