"""Several runs of ``calibration_forward.py`` (a fresh process each): per row, the median and range of each ratio.

    python benchmarks/runs_summary.py run1.json run2.json run3.json [--json summary.json]

On a lent GPU machine the host CPU's speed differs from one process to the next (the same
host-bound row has measured 1.2× and 1.6× the floor in successive processes of one machine),
so a single run is one sample of it. Each ratio below is taken within a run (both methods of
a row always share a process), then summarised across runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

RATIOS = (("speedup_vs_incumbent_paired", "incumbent/autocal (per round)"), ("autocal_over_floor", "autocal/floor"))


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (shape, tokens, mode) found in every run: median, min and max of each ratio."""
    keyed = [{(r["shape"], r["tokens"], r["mode"]): r for r in run["rows"]} for run in runs]
    keys = [k for k in keyed[0] if all(k in rows for rows in keyed)]
    summary = []
    for key in keys:
        row = {"shape": key[0], "tokens": key[1], "mode": key[2], "runs": len(runs)}
        for field, _ in RATIOS:
            values = [rows[key][field] for rows in keyed]
            row[field] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
        summary.append(row)
    return summary


def markdown_table(summary: list[dict]) -> str:
    header = ["shape", "tokens", "mode"] + [f"{title}: median (range)" for _, title in RATIOS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary:
        cells = [f"{row[f]['median']:.2f}× ({row[f]['min']:.2f}–{row[f]['max']:.2f})" for f, _ in RATIOS]
        lines.append(f"| {row['shape']} | {row['tokens']} | {row['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="JSON files written by calibration_forward.py --json")
    parser.add_argument("--json", type=Path, help="write the summary here")
    args = parser.parse_args(argv)
    summary = summarize([json.loads(path.read_text()) for path in args.runs])
    print(f"{len(args.runs)} runs\n")
    print(markdown_table(summary))
    if args.json:
        args.json.write_text(json.dumps({"runs": [str(p) for p in args.runs], "rows": summary}, indent=1))
    return summary


if __name__ == "__main__":
    main()
