"""A dispatch op recognised while a forward runs: the operands of the contraction of the tokens with a mask.

Detection finds it in a block's recording and checks it there
(``detect/masked.py``, ``detect/dispatched.py``); the calibration forward
(``synthesize/container.py``, ``synthesize/gathered.py``) recognises it again in
every batch. Both run it, so it lives below both (gathered expert weights are
followed alike in ``trace/gathers.py``).

``MaskDispatch`` serves a list of experts, each called on its slice;
``SlotDispatch`` one experts module called on the whole dispatched tensor, one
of whose dimensions indexes the experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils._pytree import tree_map

from .record import flat_args

__all__ = ["MaskDispatch", "SlotDispatch", "every_token", "slot_outputs"]


@dataclass(frozen=True)
class MaskDispatch:
    """Where the dispatch contraction is, and which of its mask's dimensions are tokens and experts (the others
    are the experts' capacity slots).

    ``batch_dims``: the mask's dimensions matching the tokens' leading ones, where the tokens come in batches
    (t5x's groups: ``einsum("gsec,gsh->egch", mask, tokens)``, capacity per group). The token rows are then the
    tokens flattened, and an expert's slots are its capacity slots of every batch, a token only ever in its own
    batch's.

    ``out_features`` is set where detection saw each expert given its slots as its input rows, in the mask's order
    (a token's row or zeros), and return one row of that width per input row: calibration can then give an
    expert only the slots its mask fills.

    ``flat``: the experts' dimension also holds their slots, experts first (fairseq's ``mm`` of the mask viewed
    ``[E * C, S]`` with the tokens); it is unflattened to ``[E, C]`` before the slices are read.
    """

    function: Callable
    ordinal: int
    token_dim: int
    expert_dim: int
    num_experts: int
    out_features: int | None = None
    batch_dims: tuple[int, ...] = ()
    flat: bool = False

    def _part(self, mask: torch.Tensor, expert: int) -> torch.Tensor:
        """``[batches, tokens, slots]`` bools: ``expert``'s slice of the mask, the tokens of each batch by the
        capacity slots of that batch."""
        batch_dims, token_dim = self.batch_dims, self.token_dim
        if self.flat:
            mask = mask.unflatten(self.expert_dim, (self.num_experts, -1))
            batch_dims, token_dim = (tuple(d + (d > self.expert_dim) for d in batch_dims),
                                     token_dim + (token_dim > self.expert_dim))
        dims = (*batch_dims, token_dim, self.expert_dim)
        part = mask.movedim(dims, tuple(range(len(dims)))).select(len(dims) - 1, expert)
        batches = math.prod(mask.shape[d] for d in batch_dims)
        return part.reshape(batches, mask.shape[token_dim], math.prod(part.shape[len(dims) - 1:])) != 0

    def fits(self, experts_size: int) -> bool:
        """Is ``experts_size`` what this dispatch's mask has along the experts' dimension?"""
        return experts_size == self.num_experts or (self.flat and experts_size > 0
                                                    and experts_size % self.num_experts == 0)

    def unrouted(self, mask: torch.Tensor, expert: int) -> torch.Tensor:
        """The token rows (a bool per row) ``expert``'s slice of the mask leaves out."""
        return ~self._part(mask, expert).any(-1).reshape(-1)

    def filled(self, mask: torch.Tensor, expert: int) -> torch.Tensor:
        """Which of ``expert``'s slots (batch by batch, each batch's in the mask's order) the mask fills."""
        return self._part(mask, expert).any(1).reshape(-1)

    def slot_tokens(self, mask: torch.Tensor, expert: int) -> torch.Tensor | None:
        """Per slot of ``expert`` (as :meth:`filled` orders them), the number of the token row it holds, -1 for an
        empty slot; None where a slot holds more than one token."""
        part = self._part(mask, expert)
        if (part.sum(1) > 1).any():
            return None
        batch = torch.arange(part.shape[0], device=part.device)[:, None] * part.shape[1]
        return torch.where(part.any(1), part.int().argmax(1) + batch, -1).reshape(-1)

    def operands(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mask, token rows)`` if a call's operands fit this dispatch (tokens in batches flattened to rows)."""
        tensors = [a for a in flat_args(args) if isinstance(a, torch.Tensor)]
        if len(tensors) != 2:
            return None
        dims = (*self.batch_dims, self.token_dim)
        for mask, tokens in (tensors, tensors[::-1]):
            if tokens.dim() == len(dims) + 1 and mask.dim() > max(*dims, self.expert_dim) and (
                    tuple(mask.shape[d] for d in dims) == tokens.shape[:-1]
                    and self.fits(mask.shape[self.expert_dim])):
                return mask, tokens.reshape(-1, tokens.shape[-1])
        return None


@dataclass(frozen=True)
class SlotDispatch:
    """Tokens placed in the experts' capacity slots by a 0/1 contraction, and the module that runs the experts on
    the dispatched tensor (``dispatched = einsum("bnd,bnec->becd", x, mask)``; ``experts(dispatched)``).

    ``function``/``ordinal``: the contraction, the ordinal-th call of ``function``
    in the block's forward; ``tokens``: which of its two tensor operands holds the
    token rows (the other is the mask). ``experts``: the path of the module called
    with the dispatched tensor's rows, in order; ``expert_axis``: the dimension of
    its input that indexes the experts.
    """

    function: Callable
    ordinal: int
    tokens: int
    experts: str
    expert_axis: int
    num_experts: int

    def operands(self, args: tuple) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(mask, tokens)`` of a call of the contraction, or None where it has not two tensor operands."""
        tensors = [a for a in flat_args(args) if isinstance(a, torch.Tensor)]
        return (tensors[1 - self.tokens], tensors[self.tokens]) if len(tensors) == 2 else None

    def slot_tokens(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """For each row of the dispatched tensor, 1 + the number of the token it holds (the tokens' rows
        flattened), 0 for an empty slot: the contraction itself, on each token's number in place of its row."""
        mask, tokens = self.operands(args)
        numbers = torch.arange(1, tokens[..., 0].numel() + 1, dtype=torch.float64, device=tokens.device)
        swap = {id(mask): mask.to(torch.float64), id(tokens): numbers.reshape(*tokens.shape[:-1], 1)}
        numbered = self.function(*tree_map(lambda a: swap.get(id(a), a), args), **kwargs)
        return numbered[..., 0].round().long()

    def every_token(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The experts' input with every token in every expert's slots (:func:`every_token`)."""
        return every_token(rows, like, self.expert_axis, self.num_experts)

    def slot_outputs(self, every: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The experts' outputs per slot from their outputs on :meth:`every_token` (:func:`slot_outputs`)."""
        return slot_outputs(every, slots, self.expert_axis, self.num_experts)


def every_token(rows: torch.Tensor, like: torch.Tensor, expert_axis: int, num_experts: int) -> torch.Tensor:
    """The experts' input with every token in every expert's slots (capacity: all tokens), in ``like``'s layout:
    the experts along ``expert_axis``, the tokens along the last other dimension, size 1 elsewhere."""
    shape = [1] * like.dim()
    shape[max(d for d in range(like.dim() - 1) if d != expert_axis)], shape[-1] = rows.shape
    placed = rows.reshape(shape)
    shape[expert_axis] = num_experts
    return placed.expand(shape).contiguous()


def slot_outputs(every: torch.Tensor, slots: torch.Tensor, expert_axis: int, num_experts: int) -> torch.Tensor:
    """The experts' outputs per slot (``slots``: 1 + the token each holds, 0 for an empty one, in the input's
    layout) from their outputs on :func:`every_token`: each filled slot its token's output, an empty one zeros."""
    by_expert = every.movedim(expert_axis, 0).reshape(num_experts, -1, every.shape[-1])
    shape = [1] * slots.dim()
    shape[expert_axis] = num_experts
    experts = torch.arange(num_experts, device=slots.device).reshape(shape).expand(slots.shape)
    outputs = by_expert[experts, (slots - 1).clamp(min=0)]
    return torch.where((slots > 0)[..., None], outputs, 0)
