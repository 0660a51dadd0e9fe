"""Gathered expert weights: the routing indices pick each token's expert weights.

Code written for batched decoding (gpt-fast, torchao) stores each projection
of all experts as one ``[E, a, b]`` parameter and, per token, gathers the
weights of its chosen experts and contracts them with the token's features in
one op, slot by slot::

    w1 = self.w1[expert_indices]                 # [T, k, out, in]
    h = torch.einsum("ti,taoi->tao", x, w1)       # [T, k, out]

The pass finds, in the block's recording, each parameter of ``E`` entries
indexed by a tensor computed from the routing choice, however the gather is
spelt (``trace/gathers.py``), and the op that contracts the gathered weights
with features. It checks on the recorded values that the op gives, for every
token and slot, ``features @ W[e].T`` (or ``features @ W[e]``, plus a bias
gathered alike), the features being the other operand, per slot or the same
for all of a token's slots. The weights may sit on the block, in a packed
container, or in children holding one projection of every expert each
(``proj(x, expert_id)``). A block whose one-token forward takes another branch
(a decode path gathering ``W[indices[0]]`` beside a loop over ``W[e]``) is
recorded on one token too, and that branch's contractions are kept as well.

Tables of one vector per expert (``nn.Embedding`` rows ``[E, d]``, experts of a
single neuron, as in product-key layers) are recognised the same way, in two
contractions: a *row* (``x · W[e]``, one number per slot: ``Linear(d, 1)``) and a
*slot sum* (``Σ_slots y · W[e]``, ``Linear(1, d)`` per slot, summed over the slots).

Calibration (``synthesize/gathered.py``) then computes those ops with one
``nn.Linear`` per expert and runs the block again with the routing forced to
every group of ``k`` experts (``detect/reroute.py``).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import torch
from torch import fx, nn

from .. import errors
from ..trace.inputs import BlockCall, call_arguments, keyword_arguments, one_token
from ..trace.record import record
from ..trace.gathers import (SWAPPED, flat_gathers_as_gathers, gathered_index, per_slot,
                             slot_inputs, splits_as_views, swapped_view)
from .graph_utils import Ancestry, flat_args, is_int_tensor, source_of, value, viewed_from
from ..trace.forcing import ChoiceCall
from .contracted import detect_contracted
from .gathered_plan import GatheredDispatch, GatheredWeight, gathered_plan, stored_as, stored_parameter
from .reroute import check_forced_routing, choice_call
from .router import only_topk, routing_choice
from .plans import GatheredPlan, NoMatch
from .gathered_rows import every_row_everywhere, rows_per_expert
from .listed import listed_gathers
from .storage import expert_tables, listed_biases, listed_weights, side_by_side_weights, stored_shape

if TYPE_CHECKING:
    from .facts import Facts

__all__ = ["detect_gathered"]


def _orientation(out: torch.Tensor, features: torch.Tensor, gathered: torch.Tensor, slots: torch.Size,
                 bias: torch.Tensor | None) -> str | None:
    """How the recorded contraction applied each slot's weights (checked on the recorded values), or None."""
    vectors = gathered.dim() == len(slots) + 1
    for orientation in (("row", "slot-sum") if vectors else ("linear", "matmul")):
        inputs = slot_inputs(orientation, features, slots, gathered.shape[-1])
        if inputs is None:
            continue
        dtype = torch.promote_types(inputs.dtype, gathered.dtype)  # the weights may be cast up after the gather
        try:
            expected = per_slot(orientation, inputs.to(dtype), gathered.to(dtype))
            expected = expected if bias is None else expected + bias
        except RuntimeError:
            continue
        if expected.numel() == out.numel() and torch.allclose(expected.reshape(out.shape), out.to(expected.dtype),
                                                              rtol=1e-3, atol=1e-4):
            return orientation
    return None


def _gathers(graph: fx.Graph, params: dict[str, nn.Parameter],
             biases: bool = False) -> list[tuple[fx.Node, str, fx.Node | int]]:
    """``(gather node, parameter path, index)`` for each op that takes entries of one of ``params`` by experts.

    The index is a node (the experts of every token and slot) or an expert's
    number (a loop over the experts slicing ``w[e]``: ``[E, a, b]`` weights, or
    with ``biases`` their ``[E, a]`` biases; not one table row). The parameter
    may be gathered from a view of another shape (``weight1.view(E, H, -1)[e]``).
    Each gather is checked on the recorded values: the op gave ``W[index]``,
    whatever its spelling.
    """
    found = [gather for gather in listed_gathers(graph, params) if _applied(gather[0])]  # ``self.w[e]`` of lists
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        gathered = gathered_index(node.target, fx.node.map_arg(node.args, value))
        if gathered is None:
            continue
        source = stored_parameter(next((a for a in node.all_input_nodes if value(a) is gathered[0]), None), swapped=True)
        if source is None or source.target not in params:
            continue
        index = next((a for a in node.all_input_nodes if value(a) is gathered[1]), gathered[1])
        if isinstance(index, fx.Node) and not is_int_tensor(index):
            continue
        if not _takes_entries(value(node), *gathered) or not _applied(node):
            continue
        if isinstance(index, fx.Node):
            found.append((node, source.target, int(value(index)) if value(index).dim() == 0 else index))
        elif gathered[0].dim() == 3 or biases:
            found.append((node, source.target, index))
    return found


def _applied(node: fx.Node) -> bool:
    """Does what ``node`` gives reach an op of more than one tensor, or the output? An expert's piece only reshaped
    and left unused (``[w.squeeze(0) for w in W.view(E, I, H).chunk(E)][e]`` squeezes every expert's piece, one of
    them applied) is no gather of the experts' weights."""
    for user in node.users:
        tensors = [a for a in user.all_input_nodes if isinstance(value(a), torch.Tensor)]
        if user.op == "output" or len(tensors) > 1 or _applied(user):
            return True
    return False


def _takes_entries(out: object, weight: torch.Tensor, index: torch.Tensor | int) -> bool:
    """Is ``out`` ``weight[index]``? Its shape, and its first and last entries (not a second copy of all)."""
    if not isinstance(out, torch.Tensor) or isinstance(index, int):
        return isinstance(out, torch.Tensor) and torch.equal(out, weight[index])
    if tuple(out.shape) != (*index.shape, *weight.shape[1:]):
        return False
    entries, experts = out.reshape(-1, *weight.shape[1:]), index.reshape(-1)
    return all(torch.equal(entries[i], weight[experts[i]]) for i in {0, len(experts) - 1} if len(experts))


def _viewed(gather: fx.Node) -> tuple[tuple[int, ...] | None, bool]:
    """The shape ``gather`` takes experts' entries of its parameter in, where that is not the parameter's own, and
    whether it takes each expert's matrix transposed."""
    if gather.op == "get_attr":  # an entry of a list: the expert's own matrix
        return None, False
    weight = next(a for a in gather.all_input_nodes if stored_parameter(a, swapped=True) is not None)
    viewed, param = value(weight), stored_as(weight, swapped=True)[1]
    swapped = swapped_view(viewed, param)
    return (tuple(viewed.shape) if viewed.shape != param.shape and not swapped else None), swapped


def _viewed_weights(gather: fx.Node) -> fx.Node | None:
    """The gathered weights after the views between them and the op that contracts them (one tensor in, as many
    elements out: ``.T``, ``transpose``, ``contiguous``), or None where something else is done to them."""
    node = gather
    while len(node.users) == 1:
        user = next(iter(node.users))
        if len([a for a in user.all_input_nodes if isinstance(value(a), torch.Tensor)]) != 1:
            break
        if user.all_input_nodes != [node] or not isinstance(value(user), torch.Tensor) \
                or value(user).numel() != value(node).numel():
            return None
        node = user
    return node if len(node.users) == 1 else None


def _contraction(gather: fx.Node, index: fx.Node | int,
                 biases: dict[fx.Node, tuple[str, fx.Node | int]]) -> GatheredWeight | None:
    """How the gathered weights are contracted with features, checked on the recorded values (None: not so).

    The contraction is the first op taking the gathered weights (through views:
    one tensor in, as many elements out) and another tensor, the features; a
    third operand may be a bias gathered by the same index (``biases``).
    """
    node = _viewed_weights(gather)
    if node is None:
        return None
    op = next(iter(node.users))
    operands = [a for a in flat_args((*op.args, *op.kwargs.values()))
                if isinstance(a, fx.Node) and isinstance(value(a), torch.Tensor)]
    others = [a for a in operands if a is not node]
    bias = [viewed_from(a, biases) for a in others if viewed_from(a, biases) is not None]  # b[e], b[idx][:, None]
    bias = [b for b in bias if biases[b][1] == index]
    features = [a for a in others if viewed_from(a, bias) is None]
    if len(operands) != len(others) + 1 or len(features) != 1 or len(bias) > 1:
        return None
    bias_value = value(bias[0]) if bias else None
    if isinstance(index, int):
        orientation = _slice_orientation(value(op), value(features[0]), value(gather), bias_value)
    else:
        orientation = _orientation(value(op), value(features[0]), value(gather), value(index).shape, bias_value)
    if orientation is None:
        return None
    return GatheredWeight("", orientation, (op.target,), biases[bias[0]][0] if bias else None)


def _slice_orientation(out: torch.Tensor, features: torch.Tensor, weight: torch.Tensor,
                       bias: torch.Tensor | None) -> str | None:
    """``features @ W[e].T`` or ``features @ W[e]`` (plus a bias) for one expert's slice (on the recorded values),
    in the wider of their dtypes (``F.linear(x.float(), w[e].float())`` on bfloat16 weights)."""
    dtype = torch.promote_types(features.dtype, weight.dtype)
    features, weight, bias = features.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    for orientation, expected in (("linear", lambda: torch.nn.functional.linear(features, weight, bias)),
                                  ("matmul", lambda: features @ weight + (0 if bias is None else bias))):
        try:
            result = expected()
        except RuntimeError:
            continue
        if result.shape == out.shape and torch.allclose(result, out, rtol=1e-3, atol=1e-4):
            return orientation
    return None


def detect_gathered(facts: Facts) -> GatheredPlan | NoMatch:
    """``gathered``: expert weights of a packed container or of the block itself, or embedding tables.

    Tables are weaker evidence (no router beside them by shape): a block whose
    routing does not gather them is no MoE.
    """
    tables_only = not (facts.packed or facts.own_weights or facts.listed)
    try:
        call = facts.inputs(facts.packed[1], 32) if facts.packed else facts.inputs(facts.block, 32)
    except errors.AutocalError as error:
        if tables_only and error.kind == errors.TRACE_FAILED:
            return NoMatch(f"{error.explanation}; tables of one shape alone prove no MoE", not_moe=True)
        raise
    found = _detect(facts.block, call)
    if not found and tables_only:
        return NoMatch(lambda: f"{found}: the tables are not experts", found.source, not_moe=True)
    return found


def _detect(block: nn.Module, call: BlockCall) -> GatheredPlan | NoMatch:
    cls = type(block).__name__
    bound = keyword_arguments(inspect.signature(block.forward), call.args, call.kwargs)
    with torch.no_grad():
        rec = record(block, *call_arguments(inspect.signature(block.forward), bound))
    splits_as_views(rec.graph)
    flat_gathers_as_gathers(rec.graph)
    params = {n: p for n, p in block.named_parameters() if p.dim() == 3} | expert_tables(block) | \
        side_by_side_weights(block) | listed_weights(block)
    gathers = _gathers(rec.graph, params)
    if not gathers:
        return detect_contracted(block, rec.graph, rec.output, params, bound)
    found_choice, index, weights = _choice(rec.graph, gathers)
    if found_choice is None:
        return NoMatch("the gathered expert weights are not chosen by a top-k", source_of(gathers[0][0]))
    found = _gathered_weights(block, params, [rec.graph, *_branches(block, call)])
    num_experts = {(w.shape or stored_shape(block, w.param))[0] for w in found}
    if len(num_experts) != 1:
        raise errors.AutocalError(errors.UNSUPPORTED_EXPERT, "the gathered weights hold different numbers of "
                                  "experts", block_class=cls)
    num_experts = num_experts.pop()
    choice, chosen = found_choice
    if every_row_everywhere(block, call, found, num_experts):
        return gathered_plan(block, rec.graph, rec.output, (index, weights), GatheredDispatch(found, None),
                             "sliced per expert, every expert on every token", "none: every expert already runs on "
                             "every token", "by the block's own ops", {g[1]: source_of(g[0]) for g in gathers
                                                                      if source_of(g[0])})
    check_forced_routing(block, choice, (), bound, rec.output, value(chosen),
                         lambda: rows_per_expert(block, found, num_experts), index)
    return gathered_plan(block, rec.graph, rec.output, (index, weights), GatheredDispatch(found, choice),
                         "gathered by index", _forcing(choice), "by the block's own ops",
                         {g[1]: source_of(g[0]) for g in gathers if source_of(g[0])})


def _branches(block: nn.Module, call: BlockCall) -> list[fx.Graph]:
    """Recordings of the block on one token, where the inputs held more: a separate decode branch may gather
    the expert weights another way (``W[indices[0]]`` and an einsum beside a loop over ``W[e]``)."""
    hidden = call.args[0] if call.args else next(iter(call.kwargs.values()), None)
    args, kwargs = one_token(call.args, call.kwargs)
    if args is None or not isinstance(hidden, torch.Tensor) or hidden.numel() == hidden.shape[-1]:
        return []
    try:
        with torch.no_grad():
            graph = record(block, args, kwargs).graph
    except Exception:  # a block that cannot run on one token has no such branch
        return []
    splits_as_views(graph)
    flat_gathers_as_gathers(graph)
    return [graph]


def _gathered_weights(block: nn.Module, params: dict[str, nn.Parameter],
                      graphs: list[fx.Graph]) -> list[GatheredWeight]:
    """Each gathered parameter, how it is applied, and the ops that contract it in any of the recordings."""
    companions = {n: p for n, p in block.named_parameters() if p.dim() == 2 and n not in params}
    companions |= listed_biases(block)  # ``b[e]`` beside lists of weights
    by_param: dict[str, GatheredWeight] = {}
    for graph in graphs:
        biases = {node: (param, index) for node, param, index in _gathers(graph, companions, biases=True)}
        gathers = _gathers(graph, params)
        _check_all_gathered(block, graph, {p for _, p, _ in gathers}, by_param)
        for gather, param, gather_index in gathers:
            weight = _contraction(gather, gather_index, biases)
            known, (shape, swapped) = by_param.get(param), _viewed(gather)
            orientation = weight and (SWAPPED.get(weight.orientation, weight.orientation) if swapped
                                      else weight.orientation)
            if weight is None or known and (known.orientation, known.bias, known.shape) != (
                    orientation, weight.bias, shape):
                raise errors.AutocalError(
                    errors.UNSUPPORTED_EXPERT, f"the gathered `{param}` is not contracted slot by slot with features "
                    "(features @ W[e], or a vector's dot product), the same way wherever it is gathered",
                    block_class=type(block).__name__, source=source_of(gather))
            ops = (*known.contractions, *weight.contractions) if known else weight.contractions
            by_param[param] = GatheredWeight(param, orientation, tuple(dict.fromkeys(ops)), weight.bias, shape)
    return list(by_param.values())


def _check_all_gathered(block: nn.Module, graph: fx.Graph, gathered: set[str], known: dict) -> None:
    """Raise where ``graph`` (another branch of the forward) computes with expert weights the recordings before
    showed gathered per expert, without gathering them: calibration would not follow those computations."""
    for node in graph.nodes:
        users = [u for u in node.users if isinstance(value(u), torch.Tensor)]
        if node.op == "get_attr" and node.target in known and node.target not in gathered and users:
            raise errors.AutocalError(
                errors.UNSUPPORTED_DISPATCH, f"on one token the block computes with `{node.target}` without "
                "gathering it per expert (a separate branch of its forward): calibration would not see those "
                "tokens", block_class=type(block).__name__, source=source_of(users[0]),
                hints=[errors.override_hint(type(block).__name__)])


def _choice(graph: fx.Graph, gathers: list) -> tuple[tuple[ChoiceCall, fx.Node] | None, fx.Node, fx.Node]:
    """The routing choice to force, and the router's ``(index, weights)`` nodes for the report.

    Gathers by an index tensor are forced where that tensor is made; slices in a
    loop over the experts (``w[e]``) by the top-k behind the rows each expert gets.
    """
    indices = [i for _, _, i in gathers if isinstance(i, fx.Node)]
    if indices:
        index, weights = routing_choice(graph, indices[0])
        same = all(i is indices[0] for i in indices) and len(indices) == len(gathers)
        found = choice_call(graph, indices[0], unscored=True) if same else None
    else:
        contractions = [next(iter((_viewed_weights(g) or g).users)) for g, _, _ in gathers]  # past views
        index, weights = routing_choice(graph, max(contractions, key=list(graph.nodes).index))
        found = choice_call(graph, index)
        if found is None and only_topk(graph) is not None:  # rows picked by numbers read on the host
            index, weights = routing_choice(graph, only_topk(graph))
            found = choice_call(graph, index)
    return found, index, _router_weights(graph, index, weights, [g for g, _, _ in gathers])


def _router_weights(graph: fx.Graph, index: fx.Node, weights: fx.Node, gathers: list[fx.Node]) -> fx.Node:
    """The routing weights: ``weights``, or, where those already mix in the experts' outputs, the last tensor
    of the index's shape computed before any expert weight is used."""
    ancestry = Ancestry(graph)
    if not any(ancestry.is_ancestor(g, weights) for g in gathers):
        return weights
    shape = value(index).shape
    before = [n for n in graph.nodes if isinstance(value(n), torch.Tensor) and value(n).is_floating_point()
              and value(n).shape == shape and not any(ancestry.is_ancestor(g, n) for g in gathers)]
    return before[-1] if before else weights


def _forcing(choice: ChoiceCall) -> str:
    if choice.scored:
        return "the block re-run with the top-k forced to each group of k experts"
    return ("the block re-run with its expert indices forced to each group of k experts (routing weights stay "
            "those of the slots replaced)")
