"""Forced routing: run a block's own forward with the top-k's choice replaced.

Where the ops between an expert's projections mix tokens (attention experts:
the query projection is an expert, the attention runs, then the output
projection is an expert), no replay of the expert alone can say what an
unrouted expert would have seen. Running the block's forward again with the
router's top-k made to choose that expert for every token can: the code that
mixes tokens runs as written, on the chosen expert's outputs.

The pass finds the top-k call behind the routing choice (which function, which
call of it during the forward, along which dimension), and checks on the
recorded inputs that replacing its result (a) with the recorded choice gives the
recorded output and (b) with a fixed set of experts sends every token to exactly
those experts.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import fx, nn
from torch.overrides import TorchFunctionMode

from .. import errors
from ..numerics import compare_outputs
from .graph_utils import is_int_tensor, source_of, target_name, value

__all__ = ["ChoiceCall", "choice_call", "check_forced_routing", "fresh_inputs"]


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


def choice_call(graph: fx.Graph, index: fx.Node, *, unscored: bool = False) -> tuple[ChoiceCall, fx.Node] | None:
    """The top-k call whose indices are ``index`` (up to views), and the node of those indices.

    None: ``index`` is not a top-k's output. With ``unscored``, such an
    ``index`` is forced where it is made: the op computing it, its last
    dimension the ``k`` slots.
    """
    source = index
    while target_name(source) in ("view", "reshape", "flatten", "contiguous") and isinstance(source.args[0], fx.Node):
        source = source.args[0]
    topk = source.args[0] if target_name(source) in ("getitem", "__getitem__") and source.args[1] == 1 else None
    if isinstance(topk, fx.Node) and target_name(topk) == "topk":
        dim = topk.kwargs.get("dim", topk.args[2] if len(topk.args) > 2 else -1)
        return ChoiceCall(topk.target, _ordinal(graph, topk), dim, value(source).shape[dim]), source
    if unscored and index.op == "call_function" and is_int_tensor(index) and value(index).dim() >= 1:
        return ChoiceCall(index.target, _ordinal(graph, index), -1, value(index).shape[-1], scored=False), index
    return None


def _ordinal(graph: fx.Graph, node: fx.Node) -> int:
    return [n for n in graph.nodes if n.op == "call_function" and n.target is node.target].index(node)


def fresh_inputs(inputs: Any) -> Any:
    """``inputs`` with every object that is not a tensor, number or string copied (a cache a forward updates)."""
    if isinstance(inputs, (torch.Tensor, int, float, bool, str, type(None), torch.dtype, torch.device)):
        return inputs
    if isinstance(inputs, (tuple, list)) and type(inputs) in (tuple, list):
        return type(inputs)(fresh_inputs(i) for i in inputs)
    if type(inputs) is dict:
        return {k: fresh_inputs(v) for k, v in inputs.items()}
    return copy.deepcopy(inputs)


def check_forced_routing(block: nn.Module, call: ChoiceCall, args: tuple, kwargs: dict, recorded_output: Any,
                         recorded_index: torch.Tensor, rows_per_expert: Callable[[], ContextManager[list]],
                         node: fx.Node) -> None:
    """Forcing the recorded choice gives the recorded output; forcing experts ``0..k-1`` sends all rows there.

    ``rows_per_expert()`` is a context in which the experts' first projection
    lists, per call, the rows it got for each expert.
    """
    where = {"block_class": type(block).__name__, "source": source_of(node)}
    with torch.no_grad():
        if not compare_outputs(recorded_output, _run_forced(block, call, args, kwargs, recorded_index))[2]:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "forcing the router's own choice changes the "
                                      "block's output", **where)  # within rounding: GPU atomics add in any order
        with rows_per_expert() as counts:
            _run_forced(block, call, args, kwargs, torch.arange(call.k))
    rows = recorded_index.numel() // call.k
    if not counts or any(c[:call.k] != [rows] * call.k or any(c[call.k:]) for c in counts) or len(counts) != 1:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "replacing the top-k's choice does not decide which "
                                  "expert gets which token", **where)


def _run_forced(block: nn.Module, call: ChoiceCall, args: tuple, kwargs: dict, experts: torch.Tensor) -> Any:
    with call.forced(experts):
        return block(*fresh_inputs(args), **fresh_inputs(kwargs))
