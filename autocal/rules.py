"""The rule table: which rewrite applies to a block, and why the others do not.

Each rule is one line of ``RULES``: the plan it returns (its type is the
rewrite level), what its candidate test looks for, the candidate test (is this
module this rule's kind of block?), ``match(facts)`` (a typed plan, or
``NoMatch`` with the reason), and the builder in ``synthesize/`` that turns the
plan into a calibration module. A rule knows the ``file:line`` of its line.

``decide`` tries a registered override first, then every rule in order, and
keeps every verdict; the first plan wins. ``find_moe_blocks`` yields the
modules some rule's candidate test accepts; ``convert`` and ``explain`` build
from the plan, and ``explain`` shows every verdict. With
``AUTOCAL_DEBUG_RULES=1`` (or a block class name) each verdict is printed to
stderr as it is reached.

Adding a way to rewrite is one detect file (its ``match``), one synthesize file
(its builder), a plan type in ``detect/plans.py`` and one line here.
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from . import errors
from .detect.block import detect_block_level
from .detect.container import detect_module_container, detect_recorded_block
from .detect.facts import Facts
from .detect.gated import detect_gated
from .detect.gathered import detect_gathered
from .detect.detector import unrecognized_experts
from .detect.last_resort import detect_last_resort, last_resort_candidate
from .detect.masked import detect_mask_dispatch
from .detect.packed import detect_packed_dense, detect_packed_experts
from .detect.parallel import several_sets
from .detect.plans import (BlockRewritePlan, ContainerPlan, DenseExpertsPlan, GatedPlan, GatheredPlan,
                           LastResortPlan, MaskDispatchPlan, NoMatch, OverridePlan, PackedExpertsPlan, Plan,
                           RecordedBlockPlan, SortedBanksPlan)
from .detect.sorted import detect_banks
from .registry import MoECalibrationModule, registered_override
from .synthesize.block import build_block_rewrite
from .synthesize.container import build_container_calibration, build_mask_dispatch, build_recorded_block
from .synthesize.dense import build_dense_rewrite
from .synthesize.gathered import build_gathered_calibration
from .synthesize.last_resort import build_last_resort
from .synthesize.module import build_calibration_module
from .synthesize.sorted import build_sorted_calibration
from .trace.inputs import BlockCall
from .trace.twin import cpu_twin, on_meta

__all__ = ["Rule", "RULES", "OVERRIDE", "Verdict", "Decision", "decide", "detect", "enclosed", "find_moe_blocks",
           "innermost_first"]

Builder = Callable[[Plan, nn.Module], type[MoECalibrationModule]]


def _table_line() -> str:
    """``autocal/rules.py:N``: the line of the table that made the rule."""
    frame = sys._getframe(2)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"{os.path.relpath(frame.f_code.co_filename, root)}:{frame.f_lineno}"


@dataclass(frozen=True)
class Rule:
    """One way to rewrite a block (see the module docstring)."""

    plan: type[Plan]
    looks_for: str
    candidate: Callable[[Facts], bool]
    match: Callable[[Facts], Plan | NoMatch]
    build: Builder
    source: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.plan.level


def rule(plan: type[Plan], looks_for: str, candidate: Callable[[Facts], bool],
         match: Callable[[Facts], Plan | NoMatch], build: Builder) -> Rule:
    return Rule(plan, looks_for, candidate, match, build, _table_line())


def _routed_list(facts: Facts) -> bool:
    """A list of experts beside a router, that the block itself calls (no loop of the list's own)."""
    return bool(facts.lists) and not facts.unrouted and not facts.own_loop


def _one_set(match: Callable[[Facts], Plan | NoMatch]) -> Callable[[Facts], Plan | NoMatch]:
    """``match``, for a block with one list of experts: several, each with its router, are several expert sets,
    which the recorded-block rule reads (the others would take the first list for the experts, the rest for shared
    modules, and leave those experts short of tokens without a word)."""
    def one_set(facts: Facts) -> Plan | NoMatch:
        if len(facts.lists) > 1:
            return NoMatch(several_sets(facts.lists), shallow=True)
        return match(facts)
    return one_set


def _override(facts: Facts) -> OverridePlan | NoMatch:
    found = registered_override(facts.block_class)
    return OverridePlan(None, found) if found is not None else NoMatch("no module is registered for this class")


OVERRIDE = rule(OverridePlan, "a module registered for the block's class", lambda f: True, _override,
                lambda plan, block: plan.module)

# In order; the first plan wins. Rules that read one recording sit together (it is made once): the container's
# loop (container, gated), the block with its experts as leaves (gated, recorded-block, mask-dispatch).
RULES: tuple[Rule, ...] = (
    rule(PackedExpertsPlan, "a child storing the experts packed", lambda f: f.packed is not None,
         detect_packed_experts, build_calibration_module),
    rule(DenseExpertsPlan, "a child storing the experts packed", lambda f: f.packed is not None,
         detect_packed_dense, build_dense_rewrite),
    rule(SortedBanksPlan, "children holding one [E, a, b] weight bank each", lambda f: bool(f.banks),
         detect_banks, build_sorted_calibration),
    rule(ContainerPlan, "a list of experts with a dispatch loop of its own", lambda f: f.own_loop,
         detect_module_container, build_container_calibration),
    rule(BlockRewritePlan, "a list of experts beside a router, called by the block", _routed_list,
         _one_set(detect_block_level), build_block_rewrite),
    rule(GatedPlan, "a list of identical experts made of Linears", lambda f: bool(f.lists),
         detect_gated, build_container_calibration),
    rule(RecordedBlockPlan, "a list of experts beside a router, called by the block", _routed_list,
         detect_recorded_block, build_recorded_block),
    rule(MaskDispatchPlan, "a list of experts beside a router, called by the block", _routed_list,
         _one_set(detect_mask_dispatch), build_mask_dispatch),
    rule(GatheredPlan, "[E, a, b] expert weights (packed, or the block's own) or embedding tables",
         lambda f: bool(f.packed or f.own_weights or f.tables or f.listed), detect_gathered,
         build_gathered_calibration),
    # Last: only a routing choice it can force and experts it can observe, whatever the dispatch (slower). Several
    # lists are one expert set where the recording shows them indexed together (``detect/parallel.py``), else refused.
    rule(LastResortPlan, "a list of experts made of Linears, beside a weight reading their input",
         last_resort_candidate, detect_last_resort, build_last_resort),
)


@dataclass(frozen=True)
class Verdict:
    """One rule's verdict on one block: its plan, or why not (``result`` None: not tried, a rule before matched)."""

    rule: Rule
    result: Plan | NoMatch | None

    @property
    def matched(self) -> bool:
        return isinstance(self.result, Plan)

    @property
    def reason(self) -> str:
        if self.result is None:
            return "not tried: a rule before it matched"
        if self.matched:
            return self.result.describe()
        if not self.result.candidate:
            return f"not a candidate: it looks for {self.rule.looks_for}"
        return str(self.result)

    def to_dict(self) -> dict:
        where = self.result.source if isinstance(self.result, NoMatch) else None
        return {"rule": self.rule.name, "rule_source": self.rule.source, "matched": self.matched,
                "reason": self.reason, "source": where}

    def __str__(self) -> str:
        where = self.result.source if isinstance(self.result, NoMatch) and self.result.source else None
        verdict = "MATCH" if self.matched else "no"
        return f"{self.rule.name} ({self.rule.source}): {verdict}: {self.reason}" + (f" (at {where})" if where else "")


@dataclass
class Decision:
    """Every rule's verdict on one block, and the plan that won (None: no rule matched)."""

    block_class: str
    verdicts: list[Verdict]

    @property
    def plan(self) -> Plan | None:
        return next((v.result for v in self.verdicts if v.matched), None)

    @property
    def rule(self) -> Rule | None:
        return next((v.rule for v in self.verdicts if v.matched), None)

    @property
    def not_moe(self) -> bool:
        """No rule matched, and one showed the block is no MoE at all (skipped, not an error)."""
        return self.plan is None and any(isinstance(v.result, NoMatch) and v.result.not_moe for v in self.verdicts)

    def error(self, block: nn.Module | None = None) -> errors.AutocalError:
        """Why no rule matched: the most telling verdict first, then every other rule's reason. Where no rule's
        candidate test accepted ``block`` but it holds signs of experts (``unrecognized_experts``), what they are."""
        tried = [v for v in self.verdicts if isinstance(v.result, NoMatch) and v.result.candidate
                 and v.rule is not OVERRIDE]
        signs = unrecognized_experts(block, []) if block is not None and not tried else []
        if signs:
            return errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"{signs[0][2]} ({signs[0][1] or '<block>'}), "
                                       "but no rule reads such experts", block_class=self.block_class,
                                       hints=[errors.override_hint(self.block_class)])
        if not tried:
            return errors.AutocalError(errors.NO_MOE_BLOCK, "no child stores experts (packed, or a list of "
                                       "identical MLPs)", block_class=self.block_class)
        deep = [v for v in tried if not v.result.shallow]  # the last resort, where it got that far, says most
        lead = next((v for v in deep if v.rule is RULES[-1]), deep[0] if deep else tried[0])
        others = "; ".join(f"{v.rule.name}: {v.reason}" for v in tried if v is not lead)
        explanation = f"{lead.reason}" + (f" (rule {lead.rule.name}; also tried {others})" if others else "")
        error = errors.AutocalError(lead.result.kind, explanation, block_class=self.block_class,
                                    source=lead.result.source, hints=list(lead.result.hints))
        error.__cause__ = lead.result.cause
        return error


def _debugging(block_class: str) -> bool:
    wanted = os.environ.get("AUTOCAL_DEBUG_RULES", "")
    return wanted in ("1", "all") or block_class in wanted.split(",")


def _verdict(rule_: Rule, facts: Facts) -> Verdict:
    """``rule_``'s verdict; a deep pass that raises an ``AutocalError`` is a ``NoMatch`` with its reason."""
    if not rule_.candidate(facts):
        return Verdict(rule_, NoMatch(rule_.looks_for, candidate=False, shallow=True))
    try:
        return Verdict(rule_, rule_.match(facts))
    except errors.AutocalError as error:
        return Verdict(rule_, NoMatch.of(error))
    except Exception as error:  # symbolic tracing, or a pass reading a forward it does not follow: no raw error
        return Verdict(rule_, NoMatch(f"{rule_.name} could not follow the forward: {type(error).__name__}: "
                                      f"{str(error).split('. ')[0].splitlines()[0] if str(error) else ''}",
                                      user_line(error), errors.TRACE_FAILED, shallow=True, cause=error))


def user_line(error: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``error``'s traceback outside autocal and torch (the block's code)."""
    found = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        name = frame.f_code.co_filename
        if not any(f"{os.sep}{package}{os.sep}" in name for package in ("autocal", "torch")):
            found = f"{name}:{line}"
    return found


def decide(block: nn.Module, call: BlockCall | None = None, *, num_tokens: int | None = None) -> Decision:
    """Every rule's verdict on ``block``, in table order, up to the first that matches.

    Raises ``AutocalError`` (``hooked-module``) only when the block cannot be run
    at all: its forward was replaced by an offload or dispatch hook.
    """
    decision = Decision(type(block).__name__, [])
    debug = _debugging(decision.block_class)
    facts = None
    for rule_ in (OVERRIDE, *RULES):
        if decision.plan is not None:
            decision.verdicts.append(Verdict(rule_, None))
            continue
        if facts is None and rule_ is not OVERRIDE:
            facts = _facts(block, call, num_tokens)
        decision.verdicts.append(_verdict(rule_, facts or Facts(block)))
        if debug:
            print(f"autocal rules: {decision.block_class}: {decision.verdicts[-1]}", file=sys.stderr)
    return decision


def _compiled(module: nn.Module) -> bool:
    """Is ``module`` a ``torch.compile`` wrapper? (None can exist before torch's compiler is imported.)"""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(module, eval_frame.OptimizedModule)


def _facts(block: nn.Module, call: BlockCall | None, num_tokens: int | None) -> Facts:
    compiled = [name or "<block>" for name, m in block.named_modules() if _compiled(m)]
    if compiled:
        raise errors.AutocalError(
            errors.HOOKED_MODULE, f"{', '.join(compiled[:3])} are torch.compile wrappers (OptimizedModule): the "
            "modules they wrap run as compiled code, out of the sight of autocal's recording and of calibration "
            "hooks", block_class=type(block).__name__,
            hints=["convert the model before compiling its parts (autocal.convert, then torch.compile); "
                   "compiling the whole model after converting it works"])
    scripted = [name or "<block>" for name, m in block.named_modules() if isinstance(m, torch.jit.ScriptModule)]
    if scripted:
        raise errors.AutocalError(
            errors.HOOKED_MODULE, f"{', '.join(scripted[:3])} are TorchScript modules (torch.jit.script): they run "
            "as TorchScript, out of the sight of autocal's recording and of calibration hooks on their Linears",
            block_class=type(block).__name__,
            hints=["keep the experts as Python modules (script helper functions, not the modules), or convert "
                   "the model before scripting it"])
    hooked = [name or "<block>" for name, m in block.named_modules() if "forward" in m.__dict__]
    if hooked:
        raise errors.AutocalError(
            errors.HOOKED_MODULE,
            f"{', '.join(hooked[:3])} run a replaced forward (an offload or dispatch hook, as accelerate adds)",
            block_class=type(block).__name__,
            hints=["convert the model before dispatching or offloading it (load it on the CPU or the meta "
                   "device, autocal.convert, then dispatch)"],
        )
    if on_meta(block):  # no data to run on: detect on a CPU twin, synthesize on the block itself
        return Facts(cpu_twin(block), None, num_tokens or 16)
    return Facts(block, call, num_tokens)


def detect(block: nn.Module, call: BlockCall | None = None, *, num_tokens: int | None = None) -> Plan:
    """The plan of the first rule that matches ``block``; ``AutocalError`` naming every rule's reason if none does.

    Example:
        >>> from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block
        >>> type(detect(make_toy_block(ToyMoEConfig()))).__name__
        'PackedExpertsPlan'
    """
    decision = decide(block, call, num_tokens=num_tokens)
    if decision.plan is None:
        if decision.not_moe:
            raise errors.NotAnMoE(decision.block_class)
        raise decision.error(block)
    return decision.plan


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def find_moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, block)`` for every module some rule's candidate test accepts (a block reached twice: twice).

    Candidates only: the rules' ``match`` confirms that the forward routes tokens to them. Containers
    (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict``) are never blocks: their forward, if any, only
    calls their entries in turn. Overrides come first: a module whose class has a registered calibration
    module is a block wherever it appears, whatever the candidate tests say, and no module above or inside
    it is one.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    overridden = [p for p, m in modules.items() if registered_override(type(m).__name__) is not None]
    overridden = [p for p in overridden if not any(enclosed(p, o) for o in overridden if o != p)]
    for path, module in modules.items():
        if path in overridden:
            yield path, module
            continue
        if isinstance(module, _CONTAINERS) or any(enclosed(path, o) or enclosed(o, path) for o in overridden):
            continue
        parent = modules.get(path.rpartition(".")[0], model) if path else None
        facts = Facts(module, parent=parent, walked=True)
        if any(r.candidate(facts) for r in RULES):
            yield path, module


def innermost_first(blocks: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``blocks`` with each after the candidates inside it: ``convert`` and ``explain`` try a block only where none
    inside it converted (a second block over the same experts), and report a failure inside a block tried after
    it as that block's. Experts holding weight banks are so a block of their own where they can be, and the layer
    around them (holding the router) only where they cannot (``Facts.banks``)."""
    return sorted(blocks, key=lambda item: -(item[0].count(".") + 1 if item[0] else 0))


def enclosed(path: str, outer: str) -> bool:
    """Is ``path`` strictly inside the module at ``outer`` (``""``: the model)?"""
    return path != outer and (not outer or path.startswith(f"{outer}."))
