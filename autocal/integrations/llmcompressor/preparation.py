"""``prepare``: convert, keep LLM Compressor's linearization away, name checkpoint keys."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn

from ... import errors
from .blocks import calibration_blocks, expert_linears, gate_modules
from .checkpoint import install_checked_save
from .naming import install_checkpoint_names
from .wrappers import install_transparency_rules

__all__ = [
    "LinearizationConflict",
    "Preparation",
    "check_linearization",
    "llmcompressor_moe_targets",
    "prepare",
]


class LinearizationConflict(errors.AutocalError, RuntimeError):
    """LLM Compressor would linearize (replace) modules inside a block autocal converted."""

    def __init__(self, message: str) -> None:
        super().__init__(errors.LINEARIZATION_CONFLICT, message)


def llmcompressor_moe_targets(model: nn.Module) -> list[str]:
    """Modules ``llmcompressor.oneshot`` would linearize (replace) in ``model``, as 0.14.0.1 decides it:
    ``get_non_linearized_moes`` (packed containers of ``@use_experts_implementation`` classes, and
    classes registered with ``LinearExperts2D``). Empty when llmcompressor is not installed."""
    try:
        from llmcompressor.modeling.moe.linearize import get_non_linearized_moes
    except ImportError:
        return []
    return [name for name, _ in get_non_linearized_moes(model)]


def check_linearization(model: nn.Module) -> list[str]:
    """Raise ``LinearizationConflict`` if LLM Compressor would replace a module inside a converted block.

    Returns the modules LLM Compressor will linearize outside converted blocks (blocks
    autocal did not convert; ``oneshot`` linearizes and calibrates those itself).
    """
    blocks = [p for p, _ in calibration_blocks(model)]
    targets = llmcompressor_moe_targets(model)
    inside = [t for t in targets if any(t == b or t.startswith(b + ".") or not b for b in blocks)]
    if inside:
        raise LinearizationConflict(
            f"llmcompressor.oneshot would linearize {inside[:5]} inside blocks autocal converted; "
            "the converted block no longer computes the original's output if its experts are replaced. "
            "This means a converted block still holds a packed experts container: report it to autocal.")
    return targets


@dataclass
class Preparation:
    """What ``prepare`` did."""

    blocks: list[str]
    expert_linears: int
    gates: list[str]
    checkpoint_names: dict[str, dict[str, str]]
    linearized_by_llmcompressor: list[str]

    def __str__(self) -> str:
        shown = ", ".join(self.gates[:2]) + (", …" if len(self.gates) > 2 else "")
        lines = [f"autocal: {len(self.blocks)} MoE block(s) converted, {self.expert_linears} expert Linears",
                 f"  gates kept out of quantization: {len(self.gates)} ({shown})"]
        for leaf, mapping in self.checkpoint_names.items():
            lines.append(f"  checkpoint names under '{leaf}': " + ", ".join(f"{a}→{b}" for a, b in mapping.items()))
        if self.linearized_by_llmcompressor:
            lines.append(f"  left to LLM Compressor's linearization: {self.linearized_by_llmcompressor}")
        return "\n".join(lines)


def prepare(model: nn.Module, *, example_inputs: dict | None = None, forward: Any = None, verify: bool = True,
            checkpoint_naming: bool = True, calibration_chunk_size: int | None = None,
            strict: bool = False, group_experts: bool = True) -> Preparation:
    """Convert ``model`` for ``oneshot``: autocal calibration modules, no LLM Compressor linearization inside them,
    expert keys saved under the original checkpoint's names, and ``model.save_pretrained`` checked before it
    writes (``install_checked_save``).

    Calibration modules are left with ``calibrate_all_experts=True``, so a plain
    ``llmcompressor.oneshot`` call calibrates every expert too; ``oneshot`` below
    turns it off when it ends. ``calibration_chunk_size`` bounds calibration's
    activation memory (``autocal.set_calibration_chunk_size``); ``group_experts=False`` calls each expert module
    on its own (``autocal.convert``). MoE blocks autocal cannot convert are left
    to LLM Compressor's own linearization (``strict=False``), with a warning naming them; ``strict=True``
    raises instead. The calibration forward then calls the expert Linears past compressed-tensors' wrappers
    while these change nothing (``wrappers``): the same hooks run on the same tensors, with less overhead.
    """
    from ... import api

    api.convert(model, calibrate_all_experts=True, verify=verify, example_inputs=example_inputs, forward=forward,
                calibration_chunk_size=calibration_chunk_size, strict=strict, group_experts=group_experts)
    left = api.unconverted(model)
    if left:
        warnings.warn(f"autocal: LLM Compressor's own MoE linearization handles the {len(left)} block(s) autocal "
                      f"left unconverted: {', '.join(u.path or '<model>' for u in left)}", stacklevel=2)
    linearized = check_linearization(model)
    names = install_checkpoint_names(model) if checkpoint_naming else {}
    install_checked_save(model)
    install_transparency_rules()
    return Preparation([p for p, _ in calibration_blocks(model)], len(expert_linears(model)), gate_modules(model),
                       names, linearized)
