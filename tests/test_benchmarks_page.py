"""docs/benchmarks.md and its appendix, docs/benchmarks-log.md, show what the benchmark runs measured.

The results of each run are kept in benchmarks/results/*.json (written by
benchmarks/calibration_forward.py --json); each of their rows must appear in a
table of the two pages with the same times, so the pages cannot drift from the runs.
Summaries of several runs (benchmarks/runs_summary.py --json) must appear with
the same medians and ranges.
"""

import json
import re
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGE = "\n".join((ROOT / "docs" / name).read_text() for name in ("benchmarks.md", "benchmarks-log.md"))
SAVED = sorted((ROOT / "benchmarks" / "results").glob("calibration_forward_*.json"))
RESULTS = [p for p in SAVED if not p.stem.endswith("_summary")]
SUMMARIES = [p for p in SAVED if p.stem.endswith("_summary")]

sys.path.insert(0, str(ROOT / "benchmarks"))
import runs_summary  # noqa: E402


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


@pytest.mark.parametrize("path", SUMMARIES, ids=[p.stem for p in SUMMARIES])
def test_every_summarized_row_is_on_the_page(path):
    summary = json.loads(path.read_text())
    lines = set(PAGE.splitlines())
    for line in runs_summary.markdown_table(summary["rows"]).splitlines()[2:]:
        assert line in lines, f"{path.name}: {line}"
    for run in summary["runs"]:  # each run summarised is kept, and so on the page (above)
        assert (ROOT / "benchmarks" / "results" / Path(run).name) in RESULTS, run


def _run(rows):
    return {"rows": [{"shape": s, "tokens": t, "mode": m, "speedup_vs_incumbent_paired": i, "autocal_over_floor": f}
                     for s, t, m, i, f in rows]}


def test_a_summary_takes_each_ratio_across_runs_and_keeps_rows_every_run_has():
    runs = [_run([("a", 512, "plain", 2.0, 1.3), ("b", 512, "plain", 9.0, 9.0)]),
            _run([("a", 512, "plain", 4.0, 1.1)]),
            _run([("a", 512, "plain", 3.0, 1.2), ("b", 512, "plain", 9.0, 9.0)])]
    (row,) = runs_summary.summarize(runs)
    assert (row["shape"], row["runs"]) == ("a", 3)
    assert row["speedup_vs_incumbent_paired"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    assert row["autocal_over_floor"] == {"median": 1.2, "min": 1.1, "max": 1.3}


def _slug(heading: str) -> str:
    """The anchor mkdocs (Python-Markdown's toc) gives a heading."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode()
    return re.sub(r"[-\s]+", "-", re.sub(r"[^\w\s-]", "", text).strip().lower())


def _anchors(text: str) -> set[str]:
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_the_page_opens_with_the_headline_figures_and_links_to_their_sections():
    """One screen for users: what was compared, where, the headline ratios; the run-by-run logs in the appendix."""
    main, log = ((ROOT / "docs" / name).read_text() for name in ("benchmarks.md", "benchmarks-log.md"))
    opening = "\n".join(main.splitlines()[:40])
    assert "**What was compared.**" in opening and "**On which machines.**" in opening
    headline = [line for line in opening.splitlines() if line.startswith("| ") and "×" in line]
    assert len(headline) >= 5, "a table of headline ratios"
    for line in headline:
        (page, anchor), = re.findall(r"\]\(([\w-]*\.md)?#([\w-]+)\)", line)
        assert anchor in _anchors(log if page else main), f"{anchor} is not a heading of {page or 'benchmarks.md'}"
    for page, anchor in re.findall(r"\]\((benchmarks-log\.md)?#([\w-]+)\)", main):
        assert anchor in _anchors(log if page else main), anchor
    assert not re.search(r"^#+ Session \d", main, re.M), "per-session logs belong in docs/benchmarks-log.md"
