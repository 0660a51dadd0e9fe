"""Forcing a routing choice while a forward runs: the call that chose experts returns the ones given instead.

Detection (``detect/reroute.py``) finds the call and checks that forcing it
decides which expert gets which token; the calibration forward
(``synthesize/forced.py``) then forces it to each group of experts in turn.
Both run it, so it lives below them.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["ChoiceCall", "fresh_inputs"]


@dataclass(frozen=True)
class ChoiceCall:
    """The call that makes the routing choice: the ``ordinal``-th call of ``function`` in the forward.

    ``scored``: a top-k, returning ``(values, indices)``; forced, it returns the
    forced experts' scores with them. Otherwise the call returns the expert
    indices themselves (picked through a product-key grid, say) and only they
    are replaced: weights computed from scores beside them stay those of the
    slots they replace.
    """

    function: Callable
    ordinal: int
    dim: int
    k: int
    scored: bool = True

    @contextmanager
    def forced(self, experts: torch.Tensor) -> Iterator[None]:
        """Within, that call returns ``experts`` and their scores.

        ``experts``: ``k`` expert numbers chosen for every token, or indices of the choice's own shape.
        """
        with _Forcing(self, experts):
            yield


class _Forcing(TorchFunctionMode):
    def __init__(self, choice: ChoiceCall, experts: torch.Tensor) -> None:
        super().__init__()
        self.choice, self.experts, self.seen = choice, experts, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is not self.choice.function or self.seen > self.choice.ordinal:
            return out
        self.seen += 1
        if self.seen <= self.choice.ordinal:
            return out
        indices = out[1] if self.choice.scored else out
        dim = self.choice.dim % indices.dim()
        forced = self.experts.to(indices.device)
        if forced.shape != indices.shape:
            shape = [1] * indices.dim()
            shape[dim] = self.choice.k
            forced = forced.view(shape).expand_as(indices).contiguous()
        return type(out)((args[0].gather(dim, forced), forced)) if self.choice.scored else forced


def fresh_inputs(inputs: Any) -> Any:
    """``inputs`` with every object that is not a tensor, number or string copied (a cache a forward updates)."""
    if isinstance(inputs, (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)):
        return inputs
    if isinstance(inputs, (tuple, list)) and type(inputs) in (tuple, list):
        return type(inputs)(fresh_inputs(i) for i in inputs)
    if type(inputs) is dict:
        return {k: fresh_inputs(v) for k, v in inputs.items()}
    return copy.deepcopy(inputs)
