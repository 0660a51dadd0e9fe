"""The cut-out expert template, replayed through the synthesized dispatch on the container's recorded inputs.

Detection has recorded both the experts' inputs and their output, so where the
template does not reproduce that output (the experts do more than was cut out)
it is known here, whether or not the conversion is verified afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import fx, nn

from .. import errors
from ..numerics import compare_outputs
from .graph_utils import value
from .linears import CutLinear
from .storage import resolve
from .tail import EXPERT_ATTR

if TYPE_CHECKING:
    from .experts import ExpertsRecording

__all__ = ["check_template"]


def check_template(rec: ExpertsRecording, graph: fx.Graph, linears: dict[str, CutLinear], num_experts: int) -> None:
    """Raise if the template, dispatched as the synthesized container dispatches it, does not give the container's
    recorded output on the recorded inputs (tokens routed only to packed experts; within rounding).

    The dispatch: each expert on its routed rows, weighted by the route's weight when the template takes it,
    summed per token; for a container run on every token (no indices or weights: its input is ``[E, rows, H]``,
    the routing already applied to it), each expert on its own block of rows.
    """
    output = value(next(n for n in rec.graph.nodes if n.op == "output").args[0])
    if not isinstance(output, torch.Tensor):
        return
    if rec.index is None and rec.weights is None:
        _check_dense(rec, graph, linears, num_experts, output)
    if rec.index is None or rec.weights is None:
        return
    hidden, index, weights = (value(n) for n in (rec.hidden, rec.index, rec.weights))
    hidden = hidden.reshape(-1, hidden.shape[-1])
    index, weights = index.reshape(-1, index.shape[-1]), weights.reshape(-1, weights.shape[-1])
    if output.numel() % hidden.shape[0] or index.shape[0] != hidden.shape[0]:
        return
    expected = output.reshape(hidden.shape[0], -1)
    total = torch.zeros_like(expected)
    for expert in range(num_experts):
        slot, token = torch.where(index.T == expert)
        if token.numel():
            out = _run_template(graph, linears, rec.container, expert, hidden[token], weights[token, slot, None])
            total.index_add_(0, token, out.reshape(token.numel(), -1).to(total.dtype))
    packed_only = ((index >= 0) & (index < num_experts)).all(-1)
    diff, _, close = compare_outputs(expected[packed_only], total[packed_only])
    if not close:
        raise errors.AutocalError(
            errors.UNSUPPORTED_EXPERT, f"the expert computation found does not reproduce the experts' recorded "
            f"output (differs by up to {diff:.3g}): the experts do more than autocal cut out")


def _check_dense(rec: ExpertsRecording, graph: fx.Graph, linears: dict[str, CutLinear], num_experts: int,
                 output: torch.Tensor) -> None:
    """``check_template`` for a container that runs every expert on its block of ``[E, rows, H]`` input rows."""
    hidden = value(rec.hidden)
    if hidden.numel() % (num_experts * hidden.shape[-1]) or output.numel() % hidden.numel() * hidden.shape[-1]:
        return
    rows = hidden.reshape(num_experts, -1, hidden.shape[-1])
    expected = output.reshape(num_experts, rows.shape[1], -1)
    ones = rows.new_ones(rows.shape[1], 1)
    for expert in range(num_experts):
        try:
            out = _run_template(graph, linears, rec.container, expert, rows[expert], ones)
            diff, _, close = compare_outputs(expected[expert], out.reshape(expected[expert].shape))
        except RuntimeError as error:  # ops on every expert's rows at once, cut out as one expert's
            raise errors.AutocalError(
                errors.UNSUPPORTED_EXPERT, f"the expert computation found does not run on one expert's rows "
                f"({error}): the experts do more than autocal cut out") from error
        if not close:
            raise errors.AutocalError(
                errors.UNSUPPORTED_EXPERT, f"the expert computation found does not reproduce expert {expert}'s "
                f"recorded output (differs by up to {diff:.3g}): the experts do more than autocal cut out")


def _run_template(graph: fx.Graph, linears: dict[str, CutLinear], container: nn.Module, expert: int,
                  x: torch.Tensor, routing_weight: torch.Tensor) -> torch.Tensor:
    """One expert's template on rows ``x``, its Linears computed from the packed weights."""
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = x if node.target == "x" else routing_weight
        elif node.op == "get_attr":
            env[node] = expert if node.target == EXPERT_ATTR else resolve(container, node.target.split(".", 1)[1])
        elif node.op == "call_module":
            lin = linears[node.target]
            bias = lin.bias(container, expert) if lin.bias is not None else None
            env[node] = torch.nn.functional.linear(env[node.args[0]], lin.weight(container, expert), bias)
        elif node.op == "output":
            return env[node.args[0]]
        else:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), env.__getitem__)
            env[node] = node.target(*args, **kwargs) if node.op == "call_function" else \
                getattr(args[0], node.target)(*args[1:], **kwargs)
    raise AssertionError("a template graph ends with its output")
