"""Run the model zoo and write its results; regenerate docs/supported-models.md.

    python scripts/zoo_report.py            # run every architecture of the installed transformers
    python scripts/zoo_report.py mixtral    # or some of them
    python scripts/zoo_report.py --docs     # only regenerate the page from the saved results

Each architecture is converted as a user would: ``autocal.convert(model)`` with no
example inputs (the zoo's inputs only serve to compare outputs); add
``--given-inputs`` to pass them to autocal instead (printed only, not saved).

Results go to docs/zoo/transformers-<version>.json (one file per transformers
version); the page is generated from every such file.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "docs" / "zoo"
PAGE = ROOT / "docs" / "supported-models.md"


def run(names: list[str], given_inputs: bool = False) -> None:
    import transformers

    from autocal.testing import zoo
    from autocal.testing.zoo_runner import run_architecture

    names = names or zoo.moe_architectures()
    rows = []
    print(f"{'architecture':<26}{'result':<7}{'blocks':>7}  {'seconds':>7}  detail")
    for name in names:
        result = run_architecture(name, given_inputs=given_inputs)
        rows.append(result.to_dict())
        detail = result.unbuildable or result.failure or (
            f"coverage {result.experts_covered}, on-diff {result.max_diff_on:.2g}")
        print(f"{name:<26}{_status(result.to_dict()):<7}{result.converted:>7}  {result.seconds:>7.2f}  {detail}",
              flush=True)
    counts = {status: sum(_status(r) == status for r in rows) for status in ("pass", "FAIL", "cannot run")}
    print(", ".join(f"{n} {status}" for status, n in counts.items()))
    if given_inputs:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"transformers-{transformers.__version__}.json"
    previous = {r["architecture"]: r for r in json.loads(path.read_text())} if path.exists() and len(names) < 5 else {}
    previous.update({r["architecture"]: r for r in rows})
    path.write_text(json.dumps(sorted(previous.values(), key=lambda r: r["architecture"]), indent=1) + "\n")


def _status(row: dict) -> str:
    return "pass" if row["passed"] else "cannot run" if row.get("unbuildable") else "FAIL"


def _cell(row: dict | None) -> str:
    if row is None:
        return "—"
    status = _status(row)
    return status if status == "pass" else f"{status}: {row.get('unbuildable') or row['failure']}"


def render() -> str:
    results = {p.stem.removeprefix("transformers-"): {r["architecture"]: r for r in json.loads(p.read_text())}
               for p in sorted(RESULTS.glob("transformers-*.json"))}
    versions = sorted(results, key=lambda v: tuple(int(x) for x in v.split(".")[:3]))
    names = sorted({n for rows in results.values() for n in rows})
    lines = [
        "# Supported models",
        "",
        "<!-- auto-generated — regenerate with: python scripts/zoo_report.py (per transformers version), "
        "then python scripts/zoo_report.py --docs -->",
        "",
        "Every MoE architecture in transformers, built tiny from `fixtures/models/<type>.json` with random weights,",
        "converted with `autocal.convert(model)` alone (no example inputs: autocal makes its own from the config and",
        "the forward's signature) and checked: whole-model logits bitwise equal with calibration off, within rounding",
        "with calibration on, every expert seeing every token, `restore()` giving the parameters back, and the same",
        "model built on the meta device (structure only) converting the same blocks.",
        "",
        "Tested transformers versions (CI runs the zoo on each):",
        "",
    ]
    for version in versions:
        rows = results[version]
        passed = sum(r["passed"] for r in rows.values())
        unbuildable = [n for n, r in rows.items() if r.get("unbuildable")]
        listed = f" ({', '.join(unbuildable)}: the original model itself fails to run, see its row)" if unbuildable else ""
        lines.append(f"- transformers {version}: **{passed} of {len(rows) - len(unbuildable)}** architectures pass"
                     f"{listed}.")
    lines += RELEASE_DAY
    lines += ["", "| architecture | block | level | routing | experts | one expert | shared | "
              + " | ".join(f"transformers {v}" for v in versions) + " |",
              "|---|---|---|---|---|---|---|" + "---|" * len(versions)]
    for name in names:
        latest = next(results[v][name] for v in reversed(versions) if name in results[v])
        described = [b for b in latest["blocks"] if "level" in b]
        columns = [_columns(facts) for facts in described] or [("—",) * 6]
        block, level, routing, experts, expert, shared = ("<br>".join(c[i] for c in columns) for i in range(6))
        cells = " | ".join(_cell(results[v].get(name)).replace("|", "\\|") for v in versions)
        lines.append(f"| {name} | {block} | {level} | {routing} | {experts} | {expert} | {shared} | {cells} |")
    return "\n".join(lines) + "\n"


RELEASE_DAY = [
    "",
    "## A new transformers release",
    "",
    "autocal has no upper bound on transformers. On the day a release comes out, install it and run",
    "",
    "<!-- skip -->",
    "```bash",
    "python scripts/release_day.py",
    "```",
    "",
    "It lists the MoE model types that are new, or whose MoE code (experts, routers, MoE blocks) changed, since",
    "the last supported release recorded in `fixtures/moe_types.json`, builds each tiny from its fixture and runs",
    "the zoo on it (a new type without a fixture gets a draft config to review). Model types are counted from",
    "transformers' auto mappings as well as its modeling folders, so a config-only type that reuses another",
    "architecture's classes (5.25's sarvam_moe builds a GLM-4-MoE) is listed too. Once every row passes, add the",
    "release to `scripts/test.sh`, run `python scripts/zoo_report.py` in its environment, and record it with",
    "`python scripts/release_day.py --update`.",
]


def _columns(facts: dict) -> tuple[str, ...]:
    """One block's cells: class, level, routing, experts, one expert, shared."""
    steps = [facts["selection"], facts["scoring"]] if facts.get("scored_after_selection") else [
        facts["scoring"], facts["selection"]]
    routing = " → ".join(str(s) for s in steps if s) + f" k={facts['top_k']}"
    experts = f"{facts['num_experts']} × {facts['storage']}" + (f", {facts['gate_up']}" if facts["gate_up"] else "")
    expert = f"`{facts['computation']}`".replace("|", "\\|")
    return (f"`{facts['class']}` ×{facts['count']}", facts["level"], routing, experts, expert,
            ", ".join(facts["shared"]) or "—")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--docs" not in args:
        run([a for a in args if not a.startswith("--")], given_inputs="--given-inputs" in args)
    PAGE.write_text(render())
    print(f"wrote {PAGE.relative_to(ROOT)}")
