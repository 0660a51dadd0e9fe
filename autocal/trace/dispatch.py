"""Dispatch ops recognised while a forward runs: a mask contraction's operands, gathered expert weights followed
to the op that contracts them.

Detection finds these ops in a block's recording and checks them there
(``detect/masked.py``, ``detect/gathered.py``); the calibration forward
(``synthesize/container.py``, ``synthesize/gathered.py``) recognises them again
in every batch. Both run them, so they live below both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from .record import flat_args

__all__ = ["MaskDispatch", "gathered_index", "slot_features", "slot_inputs", "GatherTracker"]


@dataclass(frozen=True)
class MaskDispatch:
    """Where the dispatch contraction is, and which of its mask's dimensions are tokens and experts."""

    function: Callable
    ordinal: int
    token_dim: int
    expert_dim: int
    num_experts: int

    def unrouted(self, mask: torch.Tensor, expert: int) -> torch.Tensor:
        """The tokens (a bool per row) ``expert``'s slice of the mask leaves out."""
        part = mask.movedim((self.token_dim, self.expert_dim), (0, 1))[:, expert]
        return ~(part.reshape(part.shape[0], -1) != 0).any(-1)

    def operands(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mask, tokens)`` if a call's operands fit this dispatch."""
        tensors = [a for a in flat_args(args) if isinstance(a, torch.Tensor)]
        if len(tensors) != 2:
            return None
        for mask, tokens in (tensors, tensors[::-1]):
            if tokens.dim() == 2 and mask.dim() > max(self.token_dim, self.expert_dim) and (
                    mask.shape[self.token_dim] == tokens.shape[0] and mask.shape[self.expert_dim] == self.num_experts):
                return mask, tokens
        return None


def gathered_index(func: Callable, args: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(weight, index)`` when ``func(*args)`` gathers entries of a weight along its first dimension."""
    name = getattr(func, "__name__", "")
    if name == "embedding" and len(args) >= 2 and isinstance(args[0], torch.Tensor):
        return args[1], args[0]
    if name in ("__getitem__", "getitem") and len(args) == 2 and isinstance(args[1], torch.Tensor):
        return (args[0], args[1]) if not (args[1].is_floating_point() or args[1].dtype == torch.bool) else None
    if name in ("__getitem__", "getitem") and len(args) == 2 and isinstance(args[1], int) and not isinstance(
            args[1], bool):
        return args[0], args[1]  # one expert's slice, in a loop over the experts
    if name == "index_select" and len(args) == 3 and args[1] == 0:
        return args[0], args[2]
    return None


def slot_features(features: torch.Tensor, slots: torch.Size) -> torch.Tensor | None:
    """``features`` as ``[*slots, in]``: one row per slot, or a token's row repeated over its slots.

    Size-1 dimensions a batched matmul needs (``x[:, None] @ W[index]``) are dropped.
    """
    leading = tuple(features.shape[:-1])
    if tuple(d for d in leading if d != 1) == tuple(slots) != leading:
        return features.reshape(*slots, features.shape[-1])
    if leading == tuple(slots):
        return features
    if leading == tuple(slots[:len(leading)]):
        view = features.reshape(*leading, *[1] * (len(slots) - len(leading)), features.shape[-1])
        return view.expand(*slots, features.shape[-1])
    return None


def slot_inputs(orientation: str, features: torch.Tensor, slots: torch.Size, width: int) -> torch.Tensor | None:
    """Each slot's input to its expert's Linear, ``[*slots, in]``, from the contraction's other operand."""
    if orientation in ("linear", "matmul"):
        return slot_features(features, slots)
    if orientation == "row":  # the features of each slot or of each token, in any layout of that size
        for leading in (tuple(slots), tuple(slots[:-1])):
            if features.numel() == math.prod(leading) * width:
                return slot_features(features.reshape(*leading, width), slots)
    if orientation == "slot-sum" and features.numel() == math.prod(slots):
        return features.reshape(*slots, 1)
    return None


class GatherTracker(TorchFunctionMode):
    """Follows expert weights gathered from known parameters, through views, to the op that contracts them.

    ``contract(key, index, features, func, args, kwargs)`` is called there (``key``
    as given for the parameter, ``index`` the expert indices or number); what it
    returns replaces the op's result, None keeps the op.
    """

    def __init__(self, params: dict[int, object], contract: Callable) -> None:
        super().__init__()
        self.params, self.contract = params, contract
        self.marks: dict[int, tuple] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        found = gathered_index(func, args)
        if found is not None and id(found[0]) in self.params:
            out = func(*args, **kwargs)
            index = found[1]
            index = int(index) if isinstance(index, torch.Tensor) and index.dim() == 0 else index  # one expert
            self.marks[id(out)] = (out, self.params[id(found[0])], index)
            return out
        tensors = [a for a in flat_args(args) if isinstance(a, torch.Tensor)]
        marked = [a for a in tensors if id(a) in self.marks]
        if len(marked) == 1 and len(tensors) == 1:  # a view of the gathered weights
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.numel() == marked[0].numel():
                self.marks[id(out)] = (out, *self.marks[id(marked[0])][1:])
            return out
        if len(marked) == 1 and len(tensors) == 2:
            _, key, index = self.marks.pop(id(marked[0]))
            features = tensors[1] if tensors[0] is marked[0] else tensors[0]
            result = self.contract(key, index, features, func, args, kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)
