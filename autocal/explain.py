"""``explain(model_or_block)``: a report of what autocal detected, never an exception per block."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import errors
from .api import Converter, analysis_key
from .trace.calls import locate_blocks, unreached
from .detect.detector import unrecognized_experts
from .detect.router import router_of
from .registry import MoECalibrationModule
from .detect.plans import OverridePlan
from .rules import Decision, enclosed, find_moe_blocks, innermost_first
from .trace.record import record
from .trace.twin import on_meta

__all__ = ["explain", "Report", "BlockReport", "versions", "short_path"]


@dataclass
class BlockReport:
    """One distinct MoE block class."""

    block_class: str
    paths: list[str]
    how: str = "synthesized"  # or "registered override", "already converted"
    structure: dict[str, Any] | None = None
    code: str | None = None
    verification: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    on_meta: bool = False
    calibration_class: str | None = None
    rule: str | None = None  # the rule that matched (``autocal/rules.py``)
    rules: list[dict[str, Any]] = field(default_factory=list)  # every rule's verdict, in table order

    @property
    def ok(self) -> bool:
        return self.failure is None

    @property
    def converted(self) -> bool:
        """The block was an autocal calibration module already (``block_class`` is its original's class)."""
        return self.how == "already converted"

    def __getattr__(self, name: str) -> Any:
        """Shortcuts: ``num_experts``, ``top_k``, ``scoring`` and the other detected facts."""
        structure = self.__dict__.get("structure") or {}
        for section in (structure, structure.get("router", {}), structure.get("experts", {})):
            if name in section:
                return section[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        """The report as plain data; source locations relative to their package (``transformers/...:line``)."""
        return {k: _relative_sources(v) for k, v in self.__dict__.items()}


@dataclass
class Report:
    """Every distinct MoE block class in a model, with what was detected."""

    blocks: list[BlockReport] = field(default_factory=list)
    ruled_out: list[str] = field(default_factory=list)  # candidates the rules showed are no MoE, with the reason

    def successful(self) -> bool:
        return bool(self.blocks) and all(b.ok for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        data = {"versions": versions(), "blocks": [b.to_dict() for b in self.blocks]}
        return data | ({"ruled_out": self.ruled_out} if self.ruled_out else {})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        return self.render(table=False)

    def render(self, table: bool | None = None) -> str:
        """The report as text: a table when ``table`` (default: when stdout is a terminal), else plain lines."""
        if not self.blocks:
            return "\n".join(["No MoE block found.", *(["Ruled out:"] if self.ruled_out else []),
                              *(f"  {reason}" for reason in self.ruled_out)])
        if table is None:
            table = sys.stdout.isatty()
        return "\n\n".join(_format_table(b) if table else _format_plain(b) for b in self.blocks)


def versions() -> dict[str, str | None]:
    """The versions of autocal, torch and transformers (None: not installed) a report was made with."""
    from . import __version__

    try:
        import transformers
    except ImportError:
        transformers = None
    return {"autocal": __version__, "torch": torch.__version__,
            "transformers": getattr(transformers, "__version__", None)}


def _import_roots() -> list[str]:
    """Directories packages are imported from: ``sys.path``, and the parents of loaded top-level packages
    (editable installs import from a directory not on ``sys.path``), longest first."""
    roots = {os.path.abspath(p or os.curdir) for p in sys.path if isinstance(p, str)}
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if "." not in name and file and os.path.basename(file) == "__init__.py":
            roots.add(os.path.dirname(os.path.dirname(os.path.abspath(file))))
    return sorted(roots, key=len, reverse=True)


def short_path(location: str | None) -> str | None:
    """``file:line`` from its package down (``transformers/models/...:241``), not the machine's full path."""
    if not location or not os.path.isabs(location):
        return location
    root = next((r for r in _import_roots() if location.startswith(r.rstrip(os.sep) + os.sep)), None)
    return location[len(root.rstrip(os.sep)) + 1:] if root else location


def _relative_sources(value: Any) -> Any:
    """``value`` with every ``source``/``sources`` location in it made package-relative (``short_path``)."""
    if isinstance(value, dict):
        return {k: (short_path(v) if k == "source" and isinstance(v, str) else
                    {n: short_path(w) if isinstance(w, str) else w for n, w in v.items()}
                    if k == "sources" and isinstance(v, dict) else _relative_sources(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_relative_sources(v) for v in value]
    return value


def _title(block: BlockReport) -> str:
    return f"{block.block_class}  ×{len(block.paths)}  ({block.paths[0]}{', …' if len(block.paths) > 1 else ''})"


def _layout(layout: dict[str, Any]) -> str:
    parts = []
    for key, fact in layout.items():
        if isinstance(fact, dict):
            fact = ", ".join(f"{name} {list(shape) if isinstance(shape, (list, tuple)) else shape}"
                             for name, shape in fact.items())
        parts.append(f"{key}={fact}")
    return "  ".join(parts)


def _routing_steps(router: dict[str, Any]) -> list[str | None]:
    """Selection and scoring in the order the router applies them."""
    steps = [router["selection"], router["scoring"]]
    return steps if router.get("scored_after_selection") else steps[::-1]


def _k_words(router: dict[str, Any]) -> str:
    """k, or the range of k a top-p choice gave the recorded tokens."""
    if not router.get("dynamic_k"):
        return str(router["top_k"])
    fewest, most = router["dynamic_k"]
    return f"{fewest} to {most} (dynamic: the recorded tokens' range)"


def _rows(block: BlockReport) -> list[tuple[str, str, str | None]]:
    """``(fact, what was found, source file:line)`` for one block class, in reading order."""
    if block.failure:
        rows = [("FAILED", f"[{block.failure['kind']}] {block.failure['explanation']}", block.failure.get("source"))]
        rows += [(f"  rule {v['rule']}", v["reason"], v["source"]) for v in block.rules]
        router = (block.structure or {}).get("router")
        if router:  # what the recording still showed
            steps = [step for step in _routing_steps(router) if step]
            rows.append(("router", f"{' → '.join(steps)}"
                                   f"  top_k {_k_words(router)} of {router['num_choices']} choices",
                         router["sources"].get("top_k")))
        steps = errors.next_steps(block.failure["kind"], block.block_class, block.failure.get("hints"))
        return rows + [("next", step, None) for step in steps]
    how = f"{block.how} by autocal ({block.calibration_class})" if block.converted else block.how
    rows: list[tuple[str, str, str | None]] = [("path", how, None)]
    if block.rule:
        rows.append(("rule", block.rule, None))
    if block.structure:
        router, experts = block.structure["router"], block.structure["experts"]
        sources = {**router["sources"], **experts["sources"]}
        order = _routing_steps(router)
        rows += [
            ("router", router["module_path"] or "none (no router module)", sources.pop("logits", None)),
            ("scoring", " → ".join(str(o) for o in order), sources.pop("scoring", None)),
            ("top_k", f"{_k_words(router)} of {router['num_choices']}", sources.pop("top_k", None)),
            ("renormalized", str(router["renormalized"]), None),
            ("correction bias", str(router["correction_bias"]), None),
            ("groups", str(router["grouped"]), None),
            ("scaling", str(router["scaling"]), None),
            ("experts", f"{experts['module_path'] or '(the block itself)'}  {experts['num_experts']} × "
                        f"{experts['storage']}", None),
            ("layout", _layout(experts["layout"]), None),
            ("one expert", experts["computation"], sources.pop("down_proj", sources.pop("expert_call", None))),
            ("routing weights", experts["weights_applied"], sources.pop("contribution", sources.pop("gating", None))),
            *_more_sets(block.structure),
            ("shared", ", ".join(block.structure["shared_modules"]) or "none", None),
            ("returns", block.structure["returns"], None),
        ]
        rows += [(f"  {fact}", "", where) for fact, where in sources.items()]
    if block.verification:
        v = block.verification
        rows.append(("verified", f"max |diff| off={v['max_abs_diff_off']:.3g} on={v['max_abs_diff_on']:.3g}  "
                                 f"bitwise(off)={v['bitwise_off']}  experts covered "
                                 f"{v['experts_covered']}/{v['num_experts']}", None))
        if v.get("experts_implementation") not in (None, "eager"):
            impl = v["experts_implementation"]
            rows.append(("experts impl", f"{impl}  bitwise(off) against eager={v['bitwise_off_eager']}: autocal "
                                         f"computes each expert as the eager loop does, {impl} rounds otherwise", None))
    else:
        reason = "meta device: no data" if block.on_meta else "already converted" if block.converted else None
        rows.append(("verified", f"not run ({reason})" if reason else "not run", None))
    return rows


def _more_sets(structure: dict[str, Any]) -> list[tuple[str, str, str | None]]:
    """One row per expert set beyond the first (``detect/expert_sets.py``): its experts and its own router."""
    rows = []
    for number, (router, experts) in enumerate(structure.get("more_sets", []), start=2):
        steps = " → ".join(str(step) for step in _routing_steps(router) if step)
        rows.append((f"expert set {number}", f"{experts['module_path']}  {experts['num_experts']} × "
                     f"{experts['storage']}, router {router['module_path']} ({steps}, top_k {_k_words(router)} of "
                     f"{router['num_choices']})", router["sources"].get("top_k")))
    return rows


def _format_plain(block: BlockReport) -> str:
    lines = [_title(block)]
    for fact, found, where in _rows(block):
        where = f"  ({short_path(where)})" if where else ""
        lines.append(f"  {fact + ':':<16} {found}{where}".rstrip())  # a label of 16 or more still gets its space
    return "\n".join(lines)


def _format_table(block: BlockReport, width: int | None = None) -> str:
    """Box-drawn table, its middle column wrapped to fit ``width`` (default: the terminal's)."""
    header = ("fact", "detected", "source")
    rows = [(fact, found, os.path.basename(where or "")) for fact, found, where in _rows(block)]
    fact_w, source_w = (max(len(r[i]) for r in [*rows, header]) for i in (0, 2))
    width = width or shutil.get_terminal_size().columns
    found_w = max(24, min(max(len(r[1]) for r in [*rows, header]), width - fact_w - source_w - 10))
    widths = (fact_w, found_w, source_w)

    def lines(cells: tuple[str, str, str]) -> list[str]:
        wrapped = textwrap.wrap(cells[1], found_w, break_on_hyphens=False, break_long_words=False) or [""]
        return ["│ " + " │ ".join(c.ljust(w) for c, w in zip(
            (cells[0] if i == 0 else "", part, cells[2] if i == 0 else ""), widths)) + " │"
            for i, part in enumerate(wrapped)]

    def rule(left: str, middle: str, right: str) -> str:
        return left + middle.join("─" * (w + 2) for w in widths) + right

    body = [line for row in rows for line in lines(row)]
    return "\n".join([_title(block), rule("┌", "┬", "┐"), *lines(header), rule("├", "┼", "┤"), *body,
                      rule("└", "┴", "┘")])


def explain(model_or_block: nn.Module, *, verify: bool = True, example_inputs: dict | None = None,
            forward: Any = None) -> Report:
    """Report what autocal detects in a model or a block, without changing it.

    Args:
        model_or_block: a model, or one MoE block.
        verify: also check each block class's calibration module against the original.
        example_inputs: as for ``autocal.convert``: model inputs that show each block the
            inputs it really gets (needed for blocks that take more than hidden states).
        forward: as for ``autocal.convert``: what to call with ``example_inputs``.

    Example:
        >>> from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block
        >>> report = explain(make_toy_block(ToyMoEConfig(num_experts=4, top_k=2)))
        >>> report.blocks[0].num_experts, report.blocks[0].top_k
        (4, 2)
    """
    converter = Converter(verify=verify, compare_eager=True)
    by_class: dict[tuple, BlockReport] = {}
    ruled_out: list[str] = []
    converted = _converted(model_or_block)
    blocks = [(p, b) for p, b in find_moe_blocks(model_or_block)
              if not any(p == c or p.startswith(f"{c}.") or not c for c in converted)]
    unrecognized = unrecognized_experts(model_or_block, [p for p, _ in blocks] + list(converted))
    blocks, calls, twin = locate_blocks(model_or_block, blocks, example_inputs, forward,
                                        also=[b for b, _, _ in unrecognized])
    for path, module in converted.items():
        original = module.__dict__.get("_original")
        owner = type(original).__name__ if original is not None else f"{type(module).__name__} (original not kept)"
        by_class.setdefault((type(module), "converted"), BlockReport(
            owner, [], how="already converted", calibration_class=type(module).__name__)).paths.append(path or "<root>")
    worked, tried = [], []  # paths of candidates converted, and of all tried (innermost first: ``convert``)
    for path, block in innermost_first(blocks):
        if any(enclosed(w, path) for w in worked):
            continue
        tried.append(path)
        cls = analysis_key(block)
        if cls in by_class:
            by_class[cls].paths.append(path or "<root>")
            worked += [path] if by_class[cls].failure is None else []
            continue
        report = BlockReport(type(block).__name__, [path or "<root>"], on_meta=on_meta(block))
        by_class[cls] = report
        try:
            module = converter.build(block, None, calls.get(path), twin.get_submodule(path) if twin else None)
        except errors.NotAnMoE:
            del by_class[cls]
            ruled_out.append(f"{type(block).__name__} at `{path or '<root>'}`: {converter.not_moe_reason(block)}")
            continue
        except errors.AutocalError as error:
            error = unreached(error, example_inputs, calls, path)
            report.failure = {"kind": error.kind, "explanation": error.explanation, "source": error.source,
                              "hints": error.hints}
            continue
        finally:
            _verdicts(report, converter.decisions.get(cls))
        worked.append(path)
        analysis = converter.classes[cls]
        report.how = "registered override" if isinstance(analysis.plan, OverridePlan) else "synthesized"
        report.calibration_class = type(module).__name__
        if analysis.structure is not None:
            report.structure = analysis.structure.to_dict()
            report.code = getattr(module, "code", None)
        if analysis.verification is not None:
            report.verification = analysis.verification.to_dict()
    _drop_covered_failures(by_class, tried, [p for p, _ in blocks])
    for block_path, path, what in unrecognized:
        owner = type(model_or_block.get_submodule(block_path)).__name__
        entry = by_class.setdefault((owner, "unrecognized"), BlockReport(owner, [], failure={
            "kind": errors.UNSUPPORTED_DISPATCH, "source": None, "hints": [errors.override_hint(owner)],
            "explanation": f"{what} ({path}), but no block that routes tokens to it was recognised"}))
        if (block_path or "<root>") not in entry.paths:
            entry.paths.append(block_path or "<root>")
        if entry.structure is None and block_path in calls:
            entry.structure = _router_only(model_or_block.get_submodule(block_path), calls[block_path])
    return Report(list(by_class.values()), ruled_out)


def _drop_covered_failures(by_class: dict[tuple, BlockReport], tried: list[str], order: list[str]) -> None:
    """Failures at paths inside a candidate tried after them are that candidate's to report (as in ``convert``);
    the reports then in the order of their first blocks in the model."""
    for key, report in list(by_class.items()):
        if report.failure is not None:
            report.paths = [p for p in report.paths if not any(enclosed(_path(p), t) for t in tried)]
            if not report.paths:
                del by_class[key]
    position = {path or "<root>": i for i, path in enumerate(order)}
    reordered = sorted(by_class.items(), key=lambda item: position.get(item[1].paths[0], -1) if item[1].paths else -1)
    by_class.clear()
    by_class.update(reordered)


def _path(shown: str) -> str:
    return "" if shown == "<root>" else shown


def _converted(model: nn.Module) -> dict[str, MoECalibrationModule]:
    """autocal's calibration modules already in ``model`` (outermost only), by path."""
    found: dict[str, MoECalibrationModule] = {}
    for path, module in model.named_modules():
        if isinstance(module, MoECalibrationModule) and not any(
                path.startswith(f"{outer}.") or not outer for outer in found):
            found[path] = module
    return found


def _verdicts(report: BlockReport, decision: Decision | None) -> None:
    """The rule that matched and every rule's verdict (the rules tried before it, and why they did not match)."""
    if decision is None:
        return
    report.rules = [v.to_dict() for v in decision.verdicts if v.result is not None]
    report.rule = decision.rule.name if decision.rule is not None else None


def _router_only(block: nn.Module, call) -> dict[str, Any] | None:
    """What the recording of an unconverted block still shows: its router (k, choices, scoring)."""
    try:
        with torch.no_grad():
            router = router_of(record(block, call.args, call.kwargs).graph)
    except Exception:  # a report entry must not raise; the failure above already says what went wrong
        return None
    if router is None:
        return None
    return {"level": "not converted", "router": asdict(router),
            "experts": {"num_experts": router.num_choices, "storage": "not recognised"}}
