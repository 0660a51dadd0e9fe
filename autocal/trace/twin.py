"""A runnable CPU twin of a block that lives on the meta device.

Detection needs one concrete run, but a block built on the meta device (a
full-size config analysed without its weights) has no data. The twin is a copy
of the block with the same classes, attributes and parameter shapes, on the
CPU, with random values. Expert weights stored one entry per expert are made
by expanding a single random entry, so a 256-expert layer costs the memory of
one expert. Detection runs on the twin; synthesis then uses the meta block
itself, so the converted model stays on the meta device.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["on_meta", "cpu_twin"]


def on_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _random_like(tensor: torch.Tensor, expert_count: int | None, generator: torch.Generator) -> torch.Tensor:
    shape = tuple(tensor.shape)
    if not tensor.is_floating_point():
        return torch.zeros(shape, dtype=tensor.dtype)
    if expert_count is not None and tensor.dim() >= 3 and shape[0] == expert_count:
        one = torch.randn((1, *shape[1:]), generator=generator) / max(shape[-1], 1) ** 0.5
        return one.to(tensor.dtype).expand(shape)
    fan_in = shape[-1] if tensor.dim() > 1 else 1
    return (torch.randn(shape, generator=generator) / fan_in ** 0.5).to(tensor.dtype)


def _expert_count(block: nn.Module) -> int | None:
    """The leading size shared by the block's stacked (3-D or more) parameters, if any."""
    leading = [p.shape[0] for p in block.parameters() if p.dim() >= 3]
    return max(set(leading), key=leading.count) if leading else None


def cpu_twin(block: nn.Module, *, seed: int = 0) -> nn.Module:
    """A CPU copy of a meta-device ``block`` with random values (stacked expert weights expanded)."""
    twin = copy.deepcopy(block)
    generator = torch.Generator().manual_seed(seed)
    experts = _expert_count(block)
    for module in twin.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_meta:
                module._parameters[name] = nn.Parameter(_random_like(param, experts, generator),
                                                        requires_grad=param.requires_grad)
        for name, buffer in list(module._buffers.items()):
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = _random_like(buffer, experts, generator)
    return twin
