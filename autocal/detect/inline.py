"""The block's own expert weights contracted inline with rows it wrote token copies into.

Tutel's torch path, nanoMoE and code like them keep each projection of all
experts as an ``[E, a, b]`` parameter on the block, copy each token's row into
rows of its experts in a buffer by index ops, contract the buffer with the
weights in their own forward and read the outputs back by index::

    buf[top_i[:, j], rank[:, j]] = x                       # [E, C, H]
    out = torch.bmm(F.gelu(torch.bmm(buf, self.w1)), self.w2)
    y = y + out[top_i[:, j], rank[:, j]] * probs[:, j:j + 1]

``detect/contracted.py`` finds the whole weights' contractions and sees that
their features depend on the routing. This pass takes the first contraction's
rows as the experts' input (one slice per expert along the expert dimension)
and the last contraction's output as their output, and checks on the recorded
values that each row is an exact copy of one of the block's input rows or
zeros. Then it runs the block with every token in every expert's rows between
the two (``trace/rows.py``) and checks that the block's output stays the
original's within the tolerances verification holds calibration to: the ops
between compute each row on its own, and no shape there is fixed to the
buffer's.

The same holds for an experts module whose weights are contracted whole with
every token in every expert's batch, the rows of the tokens not routed to an
expert zeroed by a 0/1 mask inside it (``x[None] * mask[..., None]``, then
``bmm`` over ``[E, T, H]``): its rows are copies of tokens or zeros, and no
dispatched tensor marks them (``detect/contracted.py`` tries this after
``detect/dispatched.py``).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from ..numerics import compare_outputs
from ..trace.forcing import fresh_inputs
from ..trace.inputs import call_by_name
from ..trace.rows import RowDispatch, every_token_in_every_row, row_tokens, token_rows
from .graph_utils import Ancestry, flat_args, source_of, value
from .plans import NoMatch

__all__ = ["inline_rows"]


def _ordinal(graph: fx.Graph, node: fx.Node) -> tuple:
    """``(function, n)``: ``node`` is the n-th call of its function in the recorded forward."""
    return node.target, [n for n in graph.nodes if n.op == "call_function" and n.target is node.target].index(node)


def _operand(op: fx.Node, features: fx.Node) -> int:
    tensors = [a for a in flat_args((*op.args, *op.kwargs.values())) if isinstance(a, fx.Node)
               and isinstance(value(a), torch.Tensor)]
    return tensors.index(features)


def _keeps_output(block: nn.Module, dispatch: RowDispatch, inputs: dict, output: object) -> bool:
    """Does the block, run with every token in every expert's rows, give its recorded output (within tolerance)?"""
    inputs = fresh_inputs(inputs)
    try:
        with torch.no_grad(), every_token_in_every_row(dispatch, (), inputs):
            again = call_by_name(block, inputs)
    except Exception:  # a shape fixed to the buffer's between the contractions, or rows the mode cannot place
        return False
    return compare_outputs(output, again)[2]


def inline_rows(block: nn.Module, graph: fx.Graph, found: list[tuple], num_experts: int, inputs: dict,
                output: object) -> RowDispatch | NoMatch:
    """Where the block's own expert contractions start and end (module docstring); ``found``: ``(op, parameter,
    weight, features)`` of each contraction of whole expert weights; ``inputs``: the recorded call, by name."""
    ordered = sorted(found, key=lambda f: list(graph.nodes).index(f[0]))
    first, features, axis = ordered[0][0], ordered[0][3], ordered[0][2].expert_axis
    where, rows = source_of(first), value(features)
    if rows.dim() < 3 or rows.shape[axis] != num_experts:
        return NoMatch("the expert weights are contracted in the block's own forward with features that are not "
                       "rows of each expert's own", where)
    ancestry = Ancestry(graph)
    if any(f is not features and not ancestry.is_ancestor(features, op) for op, _, _, f in ordered[1:]):
        return NoMatch("the block's own expert weights are contracted with features other than the rows of the "
                       "first contraction and what is made of them", where)
    tokens = token_rows((), inputs, rows.shape[-1])
    if tokens is None or row_tokens(rows, tokens) is None:
        return NoMatch("the block contracts its own expert weights with rows that are not each a copy of one of its "
                       "input's rows or zeros (tokens scaled or mixed before the experts): calibration cannot give "
                       "each expert every token as the block would give it", where)
    dispatch = RowDispatch(_ordinal(graph, first), _ordinal(graph, ordered[-1][0]), _operand(first, features), axis,
                           num_experts)
    if not _keeps_output(block, dispatch, inputs, output):
        return NoMatch("the block contracts its own expert weights with copies of token rows, but given every token "
                       "in every expert's rows between its first and last contraction its output changes: the ops "
                       "between do not compute each row on its own", where)
    return dispatch
