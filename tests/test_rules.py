"""The rule table (autocal/rules.py) against the pattern catalogue (autocal/testing/patterns.py).

Each pattern matches the rule it declares (or fails as it states), and converts to a module whose output is the original's;
every rule has a pattern; a block no rule matches gets every rule's reason, in explain and in the error.
"""

import pytest
import torch
from torch import nn

import autocal
from autocal.api import Converter
from autocal.detect.plans import NoMatch, OverridePlan, Plan
from autocal.rules import OVERRIDE, RULES, decide, find_moe_blocks
from autocal.trace.inputs import BlockCall
from autocal.testing.patterns import NOT_AN_MOE, PATTERNS, NoRuleMatches, registered_pass_through
from autocal.testing.toy_moe import main_output
from autocal.verify import compare_outputs

RULE = {r.name: r for r in RULES}


MATCHING = sorted(name for name, p in PATTERNS.items() if p.rule)
FAILING = sorted(name for name, p in PATTERNS.items() if not p.rule)


def _call(pattern):
    """The example inputs as detection's block call, for a pattern whose detection needs them (else None)."""
    return BlockCall(pattern.example(), {}) if pattern.detected_on_example else None


@pytest.mark.parametrize("name", MATCHING)
def test_each_pattern_matches_its_rule(name):
    pattern = PATTERNS[name]
    block = pattern.make()
    decision = decide(block, _call(pattern))
    assert type(decision.plan) is RULE[pattern.rule].plan
    assert decision.rule is RULE[pattern.rule]
    tried = [v for v in decision.verdicts if v.result is not None]
    assert tried[-1].matched and not any(v.matched for v in tried[:-1]), "the first plan wins"
    assert all(isinstance(v.result, NoMatch) for v in tried[:-1])
    inputs = pattern.example()
    with torch.no_grad():
        expected = block(*inputs)
        module = Converter().build(block, call=_call(pattern))
        module.calibrate_all_experts = False
        off = module(*inputs)
        module.calibrate_all_experts = True
        on = module(*inputs)
    assert torch.equal(main_output(off), main_output(expected))
    assert compare_outputs(main_output(expected), main_output(on))[2]


@pytest.mark.parametrize("name", FAILING)
def test_each_failing_pattern_fails_as_it_states(name):
    """No rule matches, and the decision ends in the stated kind (or shows the candidate is no MoE); the block
    itself runs on its example (the failure is in reading it, not a broken block)."""
    pattern = PATTERNS[name]
    block = pattern.make()
    with torch.no_grad():
        block(*pattern.example())
    decision = decide(block, _call(pattern))
    assert decision.plan is None and all(isinstance(v.result, NoMatch) for v in decision.verdicts)
    assert decision.not_moe == (pattern.fails == NOT_AN_MOE)
    if pattern.fails != NOT_AN_MOE:
        assert decision.error().kind == pattern.fails


@pytest.mark.parametrize("name", MATCHING)
def test_each_pattern_is_found_as_a_block(name):
    """Once: the block, or the child holding its experts where the block uses them through other methods
    (``convert`` then moves up to the module whose forward the example inputs call)."""
    model = nn.Sequential(PATTERNS[name].make())
    found = [path for path, _ in find_moe_blocks(model)]
    assert found == ["0"] or (len(found) == 1 and found[0].startswith("0."))


def test_every_rule_has_a_pattern_and_every_pattern_a_rule():
    declared = {p.rule for p in PATTERNS.values() if p.rule}
    assert declared == set(RULE), f"rules without a pattern: {set(RULE) - declared}; unknown: {declared - set(RULE)}"
    assert all((p.rule is None) == (p.fails is not None) for p in PATTERNS.values()), "a rule, or a stated failure"
    assert {p.fails for p in PATTERNS.values() if p.fails} <= set(autocal.errors.KINDS) | {NOT_AN_MOE}


def test_a_rule_is_named_by_its_plan_type():
    assert len(RULE) == len(RULES), "one rule per plan type"
    assert all(issubclass(r.plan, Plan) and r.name == r.plan.level for r in (OVERRIDE, *RULES))
    assert all(r.source.startswith("autocal/rules.py:") for r in (OVERRIDE, *RULES))


def test_explain_lists_every_rules_reason_when_none_matches():
    report = autocal.explain(nn.Sequential(NoRuleMatches()))
    block = report.blocks[0]
    assert block.failure is not None and block.rule is None
    assert [v["rule"] for v in block.rules] == [r.name for r in (OVERRIDE, *RULES)], "every rule, in table order"
    assert all(v["reason"] and not v["matched"] for v in block.rules)
    assert all(v["rule_source"].startswith("autocal/rules.py:") for v in block.rules)
    decision = decide(NoRuleMatches())
    assert decision.plan is None and all(isinstance(v.result, NoMatch) for v in decision.verdicts)
    candidates = [v.rule.name for v in decision.verdicts if v.result.candidate and v.rule is not OVERRIDE]
    assert candidates == ["experts", "block-dense", "gathered"], "the rules for packed experts were tried"
    text = str(report)
    assert all(f"rule {v['rule']}:" in text for v in block.rules)
    with pytest.raises(autocal.AutocalError) as raised:
        autocal.convert(nn.Sequential(NoRuleMatches()))
    assert all(name in raised.value.explanation for name in candidates[1:]), "the error names the other rules too"


def test_explain_names_the_rule_that_matched():
    report = autocal.explain(PATTERNS["masked_loop"].make(), verify=False)
    block = report.blocks[0]
    assert block.rule == "recorded-block"
    assert [v["rule"] for v in block.rules][-1] == "recorded-block" and block.rules[-1]["matched"]
    assert "rule:            recorded-block" in str(report)


def test_a_registered_override_is_decided_first_and_no_rule_runs():
    block = PATTERNS["concat"].make()
    with registered_pass_through(type(block).__name__) as Override:
        decision = decide(block)
    assert isinstance(decision.plan, OverridePlan) and decision.plan.module is Override
    assert all(v.result is None for v in decision.verdicts[1:]), "no rule runs after an override"


def test_debug_switch_prints_every_verdict_for_one_class(monkeypatch, capsys):
    block = PATTERNS["soft_mixture"].make()
    monkeypatch.setenv("AUTOCAL_DEBUG_RULES", type(block).__name__)
    decision = decide(block)
    printed = [line for line in capsys.readouterr().err.splitlines() if line.startswith("autocal rules:")]
    assert len(printed) == sum(v.result is not None for v in decision.verdicts)
    assert "gated (autocal/rules.py:" in printed[-1] and "MATCH" in printed[-1]
    monkeypatch.setenv("AUTOCAL_DEBUG_RULES", "SomeOtherClass")
    decide(block)
    assert "autocal rules:" not in capsys.readouterr().err
