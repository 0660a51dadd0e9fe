"""Forcing a routing choice while a forward runs: the call that chose experts returns the ones given instead.

Detection (``detect/reroute.py``, ``detect/last_resort.py``) finds the call and checks that forcing it
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

__all__ = ["ChoiceCall", "forcing", "fresh_inputs"]


@dataclass(frozen=True)
class ChoiceCall:
    """The call that makes the routing choice: the ``ordinal``-th call of ``function`` in the forward (None: every
    call of it, a block routing its tokens chunk by chunk in a loop).

    ``scored``: a top-k (or a ``max`` over a dimension), returning ``(values,
    indices)``; forced, it returns the forced experts' scores with them.
    Otherwise the call returns the expert indices themselves (an ``argmax``, or
    positions picked through a product-key grid) and only they are replaced:
    weights computed from scores beside them stay those of the slots they replace.
    ``reduced``: the call drops the dimension it chooses along (``max(dim)``,
    ``argmax(dim)`` without ``keepdim``: one choice per row, ``k`` is 1).
    ``cut``: the call sorts every choice (``sort(descending=True)``, ``argsort``) and the block keeps its first
    ``k``; forced, it returns the forced experts first, then the others in the order it gave them.
    """

    function: Callable
    ordinal: int | None
    dim: int
    k: int
    scored: bool = True
    reduced: bool = False
    cut: bool = False

    @contextmanager
    def forced(self, experts: torch.Tensor) -> Iterator[None]:
        """Within, that call returns ``experts`` and their scores.

        ``experts``: ``k`` expert numbers chosen for every token, or indices of the choice's own shape.
        """
        with forcing({self: experts}):
            yield


@contextmanager
def forcing(choices: dict[ChoiceCall, torch.Tensor], on_forced: Callable[[], Any] | None = None) -> Iterator[None]:
    """Within, each of these calls returns the experts given for it (``ChoiceCall.forced``, for several at once:
    a two-level gate chooses a group, then experts in it). ``on_forced`` is called when the first is forced."""
    with _Forcing(choices, on_forced):
        yield


class _Forcing(TorchFunctionMode):
    def __init__(self, choices: dict[ChoiceCall, torch.Tensor], on_forced: Callable[[], Any] | None) -> None:
        super().__init__()
        self.choices, self.seen, self.on_forced = choices, {}, on_forced
        self.wanted = {(c.function, c.ordinal): c for c in choices}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not any(f is func for f, _ in self.wanted):
            return out
        ordinal = self.seen[func] = self.seen.get(func, -1) + 1
        choice = self.wanted.get((func, ordinal), self.wanted.get((func, None)))
        if choice is None:
            return out
        if self.on_forced is not None:
            self.on_forced, on_forced = None, self.on_forced
            on_forced()
        return _forced_result(choice, self.choices[choice], args[0], out)


def _forced_result(choice: ChoiceCall, experts: torch.Tensor, scores: torch.Tensor, out: Any) -> Any:
    """What ``choice``'s call returns with ``experts`` chosen: its indices (and, scored, their scores)."""
    indices = out[1] if choice.scored else out
    forced = experts.to(indices.device)
    if choice.cut:
        forced = _sorted_first(indices, forced.expand(*indices.shape[:-1], choice.k))
    elif forced.shape != indices.shape:
        if choice.reduced:
            forced = forced.reshape(()).expand(indices.shape).contiguous()
        else:
            shape = [1] * indices.dim()
            shape[choice.dim % indices.dim()] = choice.k
            forced = forced.view(shape).expand_as(indices).contiguous()
    if not choice.scored:
        return forced
    dim = choice.dim % scores.dim()
    values = scores.gather(dim, forced.unsqueeze(dim) if choice.reduced else forced)
    return type(out)((values.squeeze(dim) if choice.reduced else values, forced))


def _sorted_first(order: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``order`` (every choice, per row) with ``first`` moved to its front, the others after in their order."""
    others = ~(order.unsqueeze(-1) == first.unsqueeze(-2)).any(-1)
    rest = order[others].view(*order.shape[:-1], -1)
    return torch.cat([first, rest], dim=-1)[..., :order.shape[-1]]


def fresh_inputs(inputs: Any) -> Any:
    """``inputs`` copied for one more run of a forward: tensors cloned (a forward may scale its input in place,
    ``x *= k``), and every other object that is not a number or string copied (a cache a forward updates)."""
    if isinstance(inputs, torch.Tensor):
        return inputs.clone()
    if isinstance(inputs, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return inputs
    if isinstance(inputs, (tuple, list)) and type(inputs) in (tuple, list):
        return type(inputs)(fresh_inputs(i) for i in inputs)
    if type(inputs) is dict:
        return {k: fresh_inputs(v) for k, v in inputs.items()}
    return copy.deepcopy(inputs)
