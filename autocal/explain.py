"""``explain(model_or_block)``: a report of what autocal detected, never an exception per block."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import errors
from .api import Converter, analysis_key, capture_calls
from .detect.detector import find_moe_blocks, unrecognized_experts
from .registry import MoECalibrationModule, registered_override
from .trace.twin import on_meta

__all__ = ["explain", "Report", "BlockReport"]


@dataclass
class BlockReport:
    """One distinct MoE block class."""

    block_class: str
    paths: list[str]
    path: str = "synthesized"
    structure: dict[str, Any] | None = None
    code: str | None = None
    verification: dict[str, Any] | None = None
    failure: dict[str, Any] | None = None
    on_meta: bool = False

    @property
    def ok(self) -> bool:
        return self.failure is None

    def __getattr__(self, name: str) -> Any:
        """Shortcuts: ``num_experts``, ``top_k``, ``scoring`` and the other detected facts."""
        structure = self.__dict__.get("structure") or {}
        for section in (structure, structure.get("router", {}), structure.get("experts", {})):
            if name in section:
                return section[name]
        raise AttributeError(name)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class Report:
    """Every distinct MoE block class in a model, with what was detected."""

    blocks: list[BlockReport] = field(default_factory=list)

    def successful(self) -> bool:
        return bool(self.blocks) and all(b.ok for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": [b.to_dict() for b in self.blocks]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def __str__(self) -> str:
        if not self.blocks:
            return "No MoE block found."
        return "\n\n".join(_format_block(b) for b in self.blocks)


def short_path(location: str | None) -> str | None:
    """``file:line`` shown from the installed package down (``transformers/models/...``), not the full path."""
    if not location:
        return location
    marker = "site-packages" + os.sep
    return location.rsplit(marker, 1)[-1] if marker in location else os.path.relpath(location)


def _format_block(block: BlockReport) -> str:
    lines = [f"{block.block_class}  ×{len(block.paths)}  ({block.paths[0]}{', …' if len(block.paths) > 1 else ''})"]
    if block.failure:
        lines.append(f"  FAILED [{block.failure['kind']}] {block.failure['explanation']}")
        if block.failure.get("source"):
            lines.append(f"  stopped at {short_path(block.failure['source'])}")
        lines.append(f"  next: {errors.override_hint(block.block_class)}")
        return "\n".join(lines)
    lines.append(f"  path: {block.path}")
    if block.structure:
        router, experts = block.structure["router"], block.structure["experts"]
        order = f"{router['selection']} → {router['scoring']}" if router.get("scored_after_selection") else (
            f"{router['scoring']} → {router['selection']}")
        lines.append(
            f"  router: {router['module_path']}  {order}  top_k={router['top_k']} of "
            f"{router['num_choices']}  renormalized={router['renormalized']}  "
            f"correction_bias={router['correction_bias']}  grouped={router['grouped']}  scaling={router['scaling']}"
        )
        lines.append(f"  experts: {experts['module_path']}  {experts['num_experts']} × {experts['storage']}  "
                     f"layout={experts['layout']}")
        lines.append(f"  one expert: {experts['computation']}")
        lines.append(f"  routing weights: {experts['weights_applied']}")
        lines.append(f"  shared: {', '.join(block.structure['shared_modules']) or 'none'}   "
                     f"returns: {block.structure['returns']}")
        for fact, where in {**router["sources"], **experts["sources"]}.items():
            lines.append(f"    {fact:<12} {short_path(where)}")
    if not block.verification:
        lines.append("  verified: not run (meta device: no data)" if block.on_meta else "  verified: not run")
    else:
        v = block.verification
        lines.append(f"  verified: max |diff| off={v['max_abs_diff_off']:.3g} on={v['max_abs_diff_on']:.3g}  "
                     f"bitwise(off)={v['bitwise_off']}  experts covered {v['experts_covered']}/{v['num_experts']}")
    return "\n".join(lines)


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
    converter = Converter(verify=verify)
    by_class: dict[tuple, BlockReport] = {}
    blocks = list(find_moe_blocks(model_or_block))
    calls, twin = capture_calls(model_or_block, [p for p, _ in blocks], example_inputs, forward)
    for path, block in blocks:
        if isinstance(block, MoECalibrationModule):
            continue
        cls = analysis_key(block)
        if cls in by_class:
            by_class[cls].paths.append(path or "<root>")
            continue
        report = BlockReport(type(block).__name__, [path or "<root>"], on_meta=on_meta(block))
        by_class[cls] = report
        try:
            module = converter.build(block, None, calls.get(path), twin.get_submodule(path) if twin else None)
        except errors.AutocalError as error:
            report.failure = {"kind": error.kind, "explanation": error.explanation, "source": error.source,
                              "hints": error.hints}
            continue
        analysis = converter.classes[cls]
        report.path = "registered override" if registered_override(type(block).__name__) else "synthesized"
        if analysis.structure is not None:
            report.structure = analysis.structure.to_dict()
            report.code = getattr(module, "code", None)
        if analysis.verification is not None:
            report.verification = analysis.verification.to_dict()
    for path, what in unrecognized_experts(model_or_block, [p for p, _ in blocks]):
        owner = model_or_block.get_submodule(path.rpartition(".")[0]) if "." in path else model_or_block
        by_class[(path,)] = BlockReport(type(owner).__name__, [path.rpartition(".")[0] or "<root>"], failure={
            "kind": errors.UNSUPPORTED_DISPATCH, "source": None, "hints": [errors.override_hint(type(owner).__name__)],
            "explanation": f"{what} ({path}), but no block that routes tokens to it was recognised"})
    return Report(list(by_class.values()))
