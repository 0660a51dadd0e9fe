"""A dispatch op recognised while a forward runs: the operands of the contraction of the tokens with a mask.

Detection finds it in a block's recording and checks it there
(``detect/masked.py``); the calibration forward (``synthesize/container.py``)
recognises it again in every batch. Both run it, so it lives below both
(gathered expert weights are followed alike in ``trace/gathers.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .record import flat_args

__all__ = ["MaskDispatch"]


@dataclass(frozen=True)
class MaskDispatch:
    """Where the dispatch contraction is, and which of its mask's dimensions are tokens and experts (the others
    are the experts' capacity slots).

    ``out_features`` is set where detection saw each expert given its slots as its input rows, in the mask's order
    (a token's row or zeros), and return one row of that width per input row: calibration can then give an
    expert only the slots its mask fills.
    """

    function: Callable
    ordinal: int
    token_dim: int
    expert_dim: int
    num_experts: int
    out_features: int | None = None

    def slots(self, mask: torch.Tensor, expert: int) -> torch.Tensor:
        """``[tokens, slots]`` bools: which token ``expert``'s slice of the mask puts in each of its slots."""
        part = mask.movedim((self.token_dim, self.expert_dim), (0, 1))[:, expert]
        return part.reshape(part.shape[0], -1) != 0

    def unrouted(self, mask: torch.Tensor, expert: int) -> torch.Tensor:
        """The tokens (a bool per row) ``expert``'s slice of the mask leaves out."""
        return ~self.slots(mask, expert).any(-1)

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
