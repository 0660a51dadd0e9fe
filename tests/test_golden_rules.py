"""A golden plan text per rule: what the rule's pattern (autocal/testing/patterns.py) is rewritten as, and why.

Each file of fixtures/rules/ holds, for the first pattern of the catalogue that
must match the rule, the plan's type and ``describe()``, and the verdict of every
rule ``explain`` lists for it. Line numbers are elided (``:<line>``), so that
adding a rule or a line of code changes no golden text, and paths are relative to
the checkout. No figure of the CPU's rounding is in them (nothing is verified).
Regenerate with: AUTOCAL_ACCEPT=1 python -m pytest tests/test_golden_rules.py
"""

import re
from pathlib import Path

import pytest

import autocal
from autocal.rules import OVERRIDE, RULES, decide
from autocal.testing.golden import compare_golden
from autocal.testing.patterns import PATTERNS, registered_pass_through

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "rules"
REGENERATE = "python -m pytest tests/test_golden_rules.py"
ROOT = Path(autocal.__file__).resolve().parents[1]
LINE = re.compile(r"(\.py):\d+")
SITE = re.compile(r"/\S*/site-packages/")


def portable(text: str) -> str:
    """``text`` with line numbers elided and paths relative to the checkout (or to site-packages)."""
    return LINE.sub(r"\1:<line>", SITE.sub("<site-packages>/", text.replace(f"{ROOT}/", "")))


def _pattern_of(rule: str) -> str:
    return next(name for name, p in PATTERNS.items() if p.rule == rule and not p.detected_on_example)


def plan_text(pattern: str) -> str:
    """The pattern's plan and describe(), and every verdict explain lists for it, line numbers elided."""
    block = PATTERNS[pattern].make()
    plan = decide(block).plan
    entry = autocal.explain(block, verify=False).blocks[0]
    lines = [f"pattern: {pattern} ({type(block).__name__})", f"plan: {type(plan).__name__}",
             f"describe: {plan.describe()}", f"explain: rule {entry.rule}"]
    for verdict in entry.rules:
        where = f" (at {verdict['source']})" if verdict["source"] else ""
        lines.append(f"  {verdict['rule']} ({verdict['rule_source']}): {'MATCH' if verdict['matched'] else 'no'}: "
                     f"{verdict['reason']}{where}")
    return portable("\n".join(lines))


@pytest.mark.parametrize("rule", [r.name for r in RULES])
def test_golden_plan_text(rule):
    compare_golden(GOLDEN / f"{rule}.txt", plan_text(_pattern_of(rule)), REGENERATE)


def test_golden_plan_text_of_an_override():
    with registered_pass_through(type(PATTERNS["concat"].make()).__name__):
        text = plan_text("concat")
    compare_golden(GOLDEN / f"{OVERRIDE.name}.txt", text, REGENERATE)


def test_golden_texts_hold_no_line_number_and_no_absolute_path():
    """A line number of transformers or of autocal shifts with their versions; a path names one checkout."""
    texts = {path.name: path.read_text() for path in GOLDEN.glob("*.txt")}
    assert sorted(texts) == sorted(f"{r.name}.txt" for r in (OVERRIDE, *RULES))
    assert not [name for name, text in texts.items() if re.search(r"\.py:\d|(^|[ (])/", text, re.M)]
