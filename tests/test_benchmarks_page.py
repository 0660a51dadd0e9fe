"""docs/benchmarks.md shows what the benchmark runs measured: every row of the saved results.

The results of each run are kept in benchmarks/results/*.json (written by
benchmarks/calibration_forward.py --json); each of their rows must appear in a
table of the page with the same times, so the page cannot drift from the runs.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = (ROOT / "docs" / "benchmarks.md").read_text()
RESULTS = sorted((ROOT / "benchmarks" / "results").glob("calibration_forward_*.json"))


def _table_rows():
    for line in PAGE.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            yield [cell.strip() for cell in line.strip("|").split("|")]


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_every_measured_row_is_on_the_page(path):
    run = json.loads(path.read_text())
    scale = run.get("scale", 1)
    rows = list(_table_rows())
    for row in run["rows"]:
        label = row["shape"] if "/" in row["shape"] or scale in (None, 1) else f"{row['shape']}/{scale}"
        times = [f"{row[k]:.2f}" for k in ("incumbent_ms", "autocal_ms", "floor_ms")]
        matching = [r for r in rows if r[0].split(" ")[0] in (label, row["shape"]) and r[1] == str(row["tokens"])
                    and r[2] == row["mode"]]
        assert any(r[3:6] == times for r in matching), f"{path.name}: {label} {row['tokens']} {row['mode']} {times}"


def test_results_exist_for_cpu_and_gpu():
    assert {p.stem for p in RESULTS} >= {"calibration_forward_cpu", "calibration_forward_cuda"}
