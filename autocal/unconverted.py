"""Blocks ``convert(model, strict=False)`` leaves unconverted: named, listed, never skipped silently.

``convert`` refuses (``strict``, the default) a model with a module that routes
tokens among experts and that no rule converts. With ``strict=False`` it leaves
such modules as they are, warns, and keeps them on the model, where
``unconverted(model)`` reads them (the LLM Compressor integration hands them to
LLM Compressor's own linearization).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from . import errors

__all__ = ["UNCONVERTED", "Unconverted", "unconverted", "unrecognized", "within"]

UNCONVERTED = "_autocal_unconverted"  # where convert leaves the blocks it skipped (strict=False)


@dataclass(frozen=True)
class Unconverted:
    """A module that routes among experts and that ``convert(strict=False)`` left as it is, and why."""

    path: str
    block_class: str
    sign: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'} ({self.block_class}): {self.sign}"


def unconverted(model: nn.Module) -> list[Unconverted]:
    """The MoE blocks the last ``convert(model, strict=False)`` left unconverted (empty: none, or not converted)."""
    return list(model.__dict__.get(UNCONVERTED, []))


def unrecognized(model: nn.Module, found: list[tuple[str, str, str]], strict: bool) -> list[Unconverted]:
    """The owners of experts no recognised block holds, one per owner; ``AutocalError`` naming all if ``strict``."""
    skipped: dict[str, Unconverted] = {}
    for block_path, path, what in found:
        skipped.setdefault(block_path, Unconverted(block_path, type(model.get_submodule(block_path)).__name__,
                                                   f"{what} ({path})"))
    if strict and skipped:
        first = next(iter(skipped.values()))
        raise errors.AutocalError(
            errors.UNSUPPORTED_DISPATCH,
            f"{len(skipped)} module(s) route tokens among experts but no rule converts them; nothing was "
            f"converted: " + "; ".join(str(s) for s in skipped.values()),
            block_class=first.block_class, module_path=first.path,
            hints=[*(errors.override_hint(c) for c in dict.fromkeys(s.block_class for s in skipped.values())),
                   "or autocal.convert(model, strict=False): they are left unconverted and listed by "
                   "autocal.unconverted(model) (LLM Compressor's own linearization handles them)"])
    return list(skipped.values())


def within(path: str, block: str) -> bool:
    return block == "" or path == block or path.startswith(block + ".")
