"""``autocal.coverage(model)``: tokens each expert saw since conversion (or since ``reset``).

Every calibration module counts the rows each of its experts receives: the
experts containers autocal synthesizes count in their own dispatch (no hook, so
the calibration forward keeps its grouped path), other modules through a forward
pre-hook on the expert module. The Linears inside stay hook-free. An expert that
saw no token would get no calibration data: it is flagged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .registry import MoECalibrationModule

__all__ = ["Coverage", "coverage", "count_tokens", "add_tokens"]

_COUNTER = "_autocal_tokens_seen"


def add_tokens(expert: nn.Module, rows: int) -> None:
    """Count ``rows`` more tokens for ``expert`` (for dispatch code that counts itself)."""
    expert.__dict__[_COUNTER] = expert.__dict__.get(_COUNTER, 0) + rows


def count_tokens(expert: nn.Module, *, hook: bool = True) -> None:
    """Start counting the rows ``expert`` receives (idempotent).

    With ``hook=False`` the caller's dispatch counts (``add_tokens``): a module
    with no hook keeps PyTorch's fast call path.
    """
    if _COUNTER in expert.__dict__:
        return
    expert.__dict__[_COUNTER] = 0
    if not hook:
        return

    def hook(module, args, kwargs):  # the rows: the first tensor, also where given by keyword
        rows = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if rows is not None and rows.dim():
            module.__dict__[_COUNTER] += int(rows.numel() // rows.shape[-1])

    expert.register_forward_pre_hook(hook, with_kwargs=True)


@dataclass
class Coverage:
    """Tokens seen per expert, by calibration-module path."""

    tokens: dict[str, list[int]] = field(default_factory=dict)

    def unseen(self) -> dict[str, list[int]]:
        """Experts (by index) that saw no token, by block path."""
        return {path: [i for i, n in enumerate(counts) if n == 0] for path, counts in self.tokens.items()
                if 0 in counts}

    def __str__(self) -> str:
        lines = []
        for path, counts in self.tokens.items():
            flag = "" if min(counts, default=0) else "   <-- experts with no token: " + str(
                [i for i, n in enumerate(counts) if n == 0])
            lines.append(f"{path}: min {min(counts, default=0)}, max {max(counts, default=0)} tokens per expert{flag}")
        return "\n".join(lines) or "no calibration module in this model"

    def reset(self, model: nn.Module) -> None:
        for module in _experts(model):
            module.__dict__[_COUNTER] = 0


def _experts(model: nn.Module):
    for module in model.modules():
        if isinstance(module, MoECalibrationModule) and hasattr(module, "expert_modules"):
            yield from module.expert_modules()


def coverage(model: nn.Module) -> Coverage:
    """Tokens each expert of each converted block has seen.

    Example:
        >>> from autocal.testing.toy_moe import ToyMoEConfig, example_hidden_states, make_toy_block
        >>> model = torch.nn.Sequential(make_toy_block(ToyMoEConfig(num_experts=4)))
        >>> _ = autocal.convert(model); _ = model(example_hidden_states(ToyMoEConfig(), seq=5))
        >>> autocal.coverage(model).tokens  # doctest: +SKIP
        {'0': [5, 5, 5, 5]}
    """
    result = Coverage()
    for path, module in model.named_modules():
        if isinstance(module, MoECalibrationModule) and hasattr(module, "expert_modules"):
            result.tokens[path or "<root>"] = [e.__dict__.get(_COUNTER, 0) for e in module.expert_modules()]
    return result
