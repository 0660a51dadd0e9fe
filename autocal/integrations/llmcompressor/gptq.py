"""GPTQ with one Hessian per group of expert Linears that receive the same input (``autocal.shared_input_groups``).

In calibration mode every gate and up projection of a block's experts is called on the very same tensor,
so their GPTQ Hessians ``2 XᵀX / n`` are one and the same. ``SharedHessianGPTQModifier`` is LLM Compressor's
``GPTQModifier`` with that Hessian accumulated once per group and handed to every Linear of the group
before compression; everything else (observers, dampening, the block-wise updates, the written weights and
scales) is LLM Compressor's own, so the result is what ``GPTQModifier`` gives through autocal, bitwise.

Sharing is checked, not assumed: within a group, the first Linear called on a tensor accumulates it and the
others only confirm that they were called on that same tensor (the same object, still referenced, so its
memory cannot have been reused). A group whose members saw different inputs raises ``SharingError`` at
compression instead of writing wrong weights. Sharing is off in distributed runs, where LLM Compressor
reduces each module's Hessian across ranks.
"""

from __future__ import annotations

from typing import Any

import torch
from compressed_tensors.offload.dist_utils import is_distributed
from llmcompressor.core import State
from llmcompressor.modifiers.gptq import GPTQModifier
from pydantic import PrivateAttr
from torch import nn

from ... import errors
from ...sharing import shared_input_groups

__all__ = ["SharedHessianGPTQModifier", "SharingError"]


class SharingError(errors.AutocalError, RuntimeError):
    """Linears grouped as sharing an input did not receive the same tensor: their Hessians differ."""

    def __init__(self, message: str) -> None:
        super().__init__(errors.CALIBRATION_COVERAGE, message)


class _Group:
    """One group of Linears: the tensor it last accumulated, how many it accumulated, and which of those each
    member was called on (all of them, in order, when the members share their input)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.reset()

    def reset(self) -> None:
        self.last: torch.Tensor | None = None  # held, so that no other tensor can take its memory meanwhile
        self.accumulated = 0
        self.seen: dict[nn.Module, list[int]] = {member: [] for member in self.members}

    def is_new(self, inp: torch.Tensor) -> bool:
        last = self.last
        return last is None or not (inp is last or (inp.data_ptr() == last.data_ptr() and inp.shape == last.shape
                                                     and inp.stride() == last.stride()))

    def uneven(self) -> list[nn.Module]:
        """Members not called once on every accumulated input, in order."""
        return [member for member, seen in self.seen.items() if seen != list(range(self.accumulated))]


class SharedHessianGPTQModifier(GPTQModifier):
    """``GPTQModifier`` accumulating one Hessian per group of expert Linears that share an input.

    Use it in place of ``GPTQModifier`` on a model ``prepare`` converted; the arguments are
    ``GPTQModifier``'s. Linears in no group (the down projections, attention) keep their own Hessian.
    """

    _groups: dict[nn.Module, _Group] = PrivateAttr(default_factory=dict)

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        self._groups = {}
        if not is_distributed():
            for paths in shared_input_groups(state.model):
                members = [state.model.get_submodule(path) for path in paths]
                members = [m for m in members if m in self._module_names]  # targeted, not ignored
                group = _Group(members)
                self._groups.update({member: group for member in members if len(members) > 1})
        return initialized

    def calibrate_module(self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        group = self._groups.get(module)
        if group is None:
            return super().calibrate_module(module, args, _output)
        inp = args[0]
        if group.is_new(inp):
            super().calibrate_module(group.members[0], args, _output)  # accumulated under its first member
            group.last, group.accumulated = inp, group.accumulated + 1
        group.seen[module].append(group.accumulated - 1)

    def compress_modules(self) -> None:
        """Hand each group's Hessian to every member (``prepare_batch`` divides it into a new tensor, leaving the
        shared one as it is), then compress as ``GPTQModifier`` does."""
        for group in {id(g): g for g in self._groups.values()}.values():
            first = group.members[0]
            if first not in self._hessians:
                continue
            uneven = [self._module_names[m] for m in group.uneven()]
            if uneven:
                raise SharingError(
                    f"expert Linears grouped as sharing one input received {group.accumulated} distinct inputs, and "
                    f"{uneven[:4]} were not called once on each: their inputs differ, and so would their Hessians. "
                    f"Use GPTQModifier (is calibration_chunk_size set?).")
            for member in group.members[1:]:
                self._hessians[member] = self._hessians[first]
                self._num_samples[member] = self._num_samples[first]
            group.reset()
        super().compress_modules()
