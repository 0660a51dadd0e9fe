"""Passes over the recorded block forward: how the router picks experts.

Each pass answers one question from the graph between the router's logits and
the two tensors handed to the experts (indices and weights). The answers feed
``explain``; synthesis does not need them, because the router keeps running as
the original code.
"""

from __future__ import annotations

import torch
from torch import fx

from .choices import EXPERT_CHOICE, cut_sort, expert_choice, per_group
from .graph_utils import Ancestry, is_int_tensor, source_of, target_name, value, viewed_chain
from .structure import RouterInfo

__all__ = ["EXPERT_CHOICE", "LOOKUP", "analyze_router", "routing_choice", "router_of", "only_topk", "selects_among"]

LOOKUP = "lookup"  # a router's selection where no top-k, argmax or sort is behind the experts' indices

_SELECTION_OPS = {"topk", "argmax", "argsort", "sort", "max", "kthvalue"}
_COMPARISONS = {"ge", "gt", "le", "lt", "__ge__", "__gt__", "__le__", "__lt__"}
_DIVISIONS = {"div", "div_", "truediv", "itruediv", "__truediv__", "__itruediv__"}
_MATMUL_OPS = {"linear", "matmul", "__matmul__", "mm", "addmm"}
# Plumbing between scores and weights: not a scoring function in itself.
_PLUMBING = {
    "topk", "gather", "getitem", "__getitem__", "to", "float", "type_as", "view", "reshape", "sum", "div",
    "__truediv__", "truediv", "itruediv", "mul", "__mul__", "__rmul__", "add", "__add__", "__radd__", "scatter", "scatter_",
    "masked_fill", "unsqueeze", "squeeze", "expand", "contiguous", "clamp", "clamp_min", "div_", "mul_",
    "sub", "__sub__", "where", "ones_like", "zeros_like", "new_zeros", "flatten", "permute", "transpose",
    "full_like", "full", "new_full", "fill_", "masked_fill_", "index_select", "repeat", "expand_as",
    "unbind", "split", "chunk", "stack", "cat", "kthvalue", "logical_not", "__invert__", "bitwise_not",
} | _COMPARISONS


def _selection_nodes(index: fx.Node, ancestry: Ancestry) -> list[fx.Node]:
    """The selections behind ``index`` that choose along the last dimension of what they select from (the
    experts, or the tokens of an expert-choice router's transposed scores); one along another dimension picks
    the tokens an expert keeps within its capacity, after the choice (DeepSpeed's top-1 gating). Only selections
    among scores: sorting the chosen experts' ids (``argsort(flat_ids)``, rows grouped by expert) is the dispatch."""
    return [n for n in [*ancestry.of(index), index] if target_name(n) in _SELECTION_OPS and _along_last(n)
            and not (n.args and isinstance(n.args[0], fx.Node) and is_int_tensor(n.args[0]))]


def _along_last(selection: fx.Node) -> bool:
    scores = value(selection.args[0]) if selection.args and isinstance(selection.args[0], fx.Node) else None
    if not isinstance(scores, torch.Tensor) or scores.dim() < 2:
        return True
    names = ("input", "k", "dim") if target_name(selection) in ("topk", "kthvalue") else ("input", "dim")
    dim = selection.kwargs.get("dim", selection.args[names.index("dim")] if len(selection.args) > names.index("dim")
                               else -1)
    return not isinstance(dim, int) or dim % scores.dim() == scores.dim() - 1


def _indices(selection: fx.Node) -> fx.Node | None:
    """The node holding a top-k's, max's or argmax's indices (None: only its values are read)."""
    if target_name(selection) == "argmax":
        return selection
    return next((user for user in selection.users
                 if target_name(user) in ("getitem", "__getitem__") and user.args[1] == 1), None)


def _k_of(node: fx.Node) -> int:
    if target_name(node) == "topk":
        return int(node.kwargs.get("k", node.args[1] if len(node.args) > 1 else 1))
    if target_name(node) in ("sort", "argsort"):  # a full sort, then the first k of the last dimension kept
        return _leading_slice(node) or 1
    if target_name(node) == "kthvalue":
        return _kept_by_threshold(node) or 1
    return 1


def _kept_by_threshold(kthvalue: fx.Node) -> int | None:
    """The k of scores compared with their own k-th value (``scores >= scores.kthvalue(E - k + 1).values``):
    the most choices one row keeps, read from the recorded comparison, whichever way it compares."""
    thresholds = [kthvalue] + [u for u in kthvalue.users if target_name(u) in ("getitem", "__getitem__", "getattr")]
    scores = value(kthvalue.args[0])
    for threshold in thresholds:
        for user in threshold.users:
            kept = value(user)
            if (target_name(user) in _COMPARISONS and isinstance(kept, torch.Tensor)
                    and kept.dtype == torch.bool and kept.shape == scores.shape and kept.numel()):
                return int(kept.reshape(-1, kept.shape[-1]).sum(-1).max())
    return None


def _chained_k(selections: list[fx.Node], index: fx.Node, ancestry: Ancestry) -> int | None:
    """k of selections made one after another over the same scores: an argmax, then an argmax of the rest
    (sparsemixer, GShard top-2) chooses 2. Counted when two or more selections over one number of choices each
    feed their indices into ``index``; selections over other sizes (groups, then experts) are not added."""
    chained = [s for s in selections if _indices_feed(s, index, ancestry)]
    sizes = {value(s.args[0]).shape[-1] for s in chained}
    if len(chained) < 2 or len(sizes) != 1:
        return None
    return sum(_k_of(s) for s in chained)


def _indices_feed(selection: fx.Node, index: fx.Node, ancestry: Ancestry) -> bool:
    """Does ``selection`` choose among float scores, its indices reaching ``index``?"""
    scores = value(selection.args[0]) if selection.args and isinstance(selection.args[0], fx.Node) else None
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        return False
    if target_name(selection) in ("argmax", "argsort"):
        outputs = [selection]
    else:
        outputs = [u for u in selection.users if (target_name(u) in ("getitem", "__getitem__") and u.args[1] == 1)
                   or (target_name(u) == "getattr" and u.args[1] == "indices")]
    return any(o is index or ancestry.is_ancestor(o, index) for o in outputs)


def _leading_slice(sort: fx.Node) -> int | None:
    """The ``k`` of ``indices[..., :k]`` taken from a sort's indices, if the sort's indices are sliced so."""
    indices = [sort] if target_name(sort) == "argsort" else [
        u for u in sort.users if target_name(u) in ("getitem", "__getitem__") and u.args[1] == 1]
    for node in indices:
        for user in node.users:
            if target_name(user) not in ("getitem", "__getitem__"):
                continue
            index = user.args[1] if isinstance(user.args[1], tuple) else (user.args[1],)
            last = index[-1] if index and index[-1] is not Ellipsis else None
            if isinstance(last, slice) and last.start in (None, 0) and isinstance(last.stop, int) and last.step is None:
                return last.stop
    return None


def _slots(index: fx.Node, choices: int, scored_shape: tuple | None = None) -> int | None:
    """k as the experts receive it (two top-1 passes make k=2).

    The last size of a ``[tokens, k]`` index tensor, or, for a 0/1 dispatch mask
    over the ``choices`` experts, the most experts one token is sent to.
    """
    v = value(index)
    if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.is_floating_point():
        return None
    if scored_shape is not None and tuple(v.shape) == tuple(scored_shape[:-1]):  # one choice per row (max, argmax)
        return None
    if v.shape[-1] == choices and v.numel() and int(v.min()) >= 0 and int(v.max()) <= 1:
        return int(v.reshape(-1, choices).sum(-1).max())
    return int(v.shape[-1])


def _logits(selection: fx.Node, ancestry: Ancestry) -> fx.Node | None:
    """The router's matmul behind ``selection`` (an einsum counts where it reads a weight itself:
    ``einsum("bnd,de->bne", x, self.w_gating)``); or the input it starts from, when the logits come in as one."""
    candidates = [n for n in ancestry.of(selection) + [selection] if target_name(n) in _MATMUL_OPS
                  or n.op == "call_module" or _weight_einsum(n)]
    if candidates:
        return candidates[-1]
    inputs = [n for n in ancestry.of(selection) if n.op == "placeholder" and isinstance(value(n), torch.Tensor)
              and value(n).is_floating_point()]
    return inputs[-1] if len(inputs) == 1 else None


def _weight_einsum(node: fx.Node) -> bool:
    return target_name(node) == "einsum" and any(a.op == "get_attr" for a in node.all_input_nodes)


def analyze_router(graph: fx.Graph, index: fx.Node, weights: fx.Node) -> RouterInfo:
    """Router facts from the nodes that produce the experts' ``index`` and ``weights`` inputs."""
    ancestry = Ancestry(graph)
    selections = _selection_nodes(index, ancestry)
    if not selections:  # indices from a lookup (hash routing): the weights still come from scores
        logits = _logits(weights, ancestry)
        path = ancestry.between(logits, weights) if logits is not None else []
        scoring = next((target_name(n) for n in path if target_name(n) not in _PLUMBING and n is not logits), None)
        return RouterInfo(_router_path(weights, logits), scoring, value(index).shape[-1], 0,
                          _renormalized(path, ancestry), None, False, _scaling(path), selection=LOOKUP)
    final = selections[-1]
    logits = _logits(final, ancestry)
    scored = final.args[0]
    path = ancestry.between(logits, weights) if logits is not None else []
    after_selection = [n for n in path if ancestry.is_ancestor(final, n)]
    scoring = _scoring([n for n in path if target_name(n) not in _PLUMBING and n is not logits])
    sources = {"top_k": source_of(final)}
    if logits is not None:
        sources["logits"] = source_of(logits)
    if scoring is not None:
        sources["scoring"] = source_of(scoring)
    top_k, choices, selection = expert_choice(graph, final, index) or per_group(graph, final, (
        _chained_k(selections, index, ancestry) or _slots(index, value(scored).shape[-1], value(scored).shape)
        or _k_of(final), value(scored).shape[-1], target_name(final)))
    top_p = _top_p(selections, (index, weights), ancestry)
    if top_p is not None:
        (fewest, top_k), selection = top_p
    return RouterInfo(
        module_path=_router_path(final, logits),
        scoring=target_name(scoring) if scoring is not None else None,
        top_k=top_k,
        num_choices=choices,
        renormalized=_renormalized(after_selection, ancestry),
        correction_bias=_correction_bias(graph, scored, weights, ancestry),
        grouped=_group_limited(selections),
        scaling=_scaling(after_selection),
        selection=selection,
        scored_after_selection=scoring is not None and ancestry.is_ancestor(final, scoring),
        sources={k: v for k, v in sources.items() if v},
        dynamic_k=(fewest, top_k) if top_p is not None else None,
    )


_SCORE_FUNCTIONS = ("softmax", "sigmoid", "log_softmax", "exp")


def _scoring(nodes: list[fx.Node]) -> fx.Node | None:
    """The op that turns the logits into scores: the first softmax, sigmoid, ... among the ops between them and
    the weights, else the first op (a soft cap or a normalisation of the logits, ``tanh``, ``std``, comes before
    the softmax, and is not what scores them)."""
    return next((n for n in nodes if target_name(n) in _SCORE_FUNCTIONS), nodes[0] if nodes else None)


def _group_limited(selections: list[fx.Node]) -> bool:
    """Is the routing group-limited: an earlier selection over fewer choices than the last one's (the best groups
    of experts, then the best experts within them)? A selection repeated over the same choices (GShard's second
    choice among the experts left) and scores kept ``[batch, seq, E]`` are no groups."""
    last = value(selections[-1].args[0]).shape[-1]
    return any(value(s.args[0]).shape[-1] != last for s in selections[:-1])


def _top_p(selections: list[fx.Node], routing: tuple[fx.Node, fx.Node],
           ancestry: Ancestry) -> tuple[tuple[int, int], str] | None:
    """``((fewest, most) experts per token, words)`` for a top-p choice: scores sorted, summed cumulatively
    (``cumsum``) and compared with a number p, each token keeping its best experts until they reach p, so k varies
    by token. The counts are read from the recorded routing weights over the experts after that comparison
    (non-zero entries per row), whichever way the code compares or masks; None where the routing is no such choice.
    """
    sorts = [s for s in selections if target_name(s) in ("sort", "argsort")]
    reached = [n for n in ancestry.nodes if any(n is end or ancestry.is_ancestor(n, end) for end in routing)]
    for cumsum in (n for n in reached if target_name(n) == "cumsum" and any(ancestry.is_ancestor(s, n) for s in sorts)):
        scores = value(next(s for s in sorts if ancestry.is_ancestor(s, cumsum)).args[0])
        for compared in (n for n in reached if target_name(n) in _COMPARISONS and ancestry.is_ancestor(cumsum, n)):
            p = _threshold(compared)
            weights = [value(n) for n in reached if ancestry.is_ancestor(compared, n)
                       and isinstance(value(n), torch.Tensor) and value(n).is_floating_point()
                       and value(n).shape == scores.shape]
            if p is not None and weights and weights[-1].numel():
                kept = (weights[-1].reshape(-1, scores.shape[-1]) != 0).sum(-1)
                return (int(kept.min()), int(kept.max())), f"top-p (dynamic k, p={p:g})"
    return None


def _threshold(comparison: fx.Node) -> float | None:
    """The number a comparison compares with: a Python float, or a 0-d tensor (a buffer holding p)."""
    for arg in comparison.args:
        number = value(arg)
        if isinstance(number, float) or isinstance(number, torch.Tensor) and number.dim() == 0:
            return float(number)
    return None


def _router_path(selection: fx.Node, logits: fx.Node | None) -> str | None:
    """The module that selects experts where it computes the logits too (they are inside it), or else the one
    that computes the logits: a selection made inside the experts module (an engine's fused MoE layer given the
    router logits) does not make the experts the router."""
    scoring = None if logits is None else (
        logits.meta.get("module_path") or (logits.target if logits.op == "call_module" else _weight_owner(logits)))
    selecting = selection.meta.get("module_path")
    if selecting and (scoring is None or f"{scoring}.".startswith(f"{selecting}.")):
        return selecting
    return scoring or selecting


_CASTS = {"to", "float", "double", "half", "bfloat16", "type_as", "t", "transpose", "contiguous", "detach"}
_BIAS_VIEWS = _CASTS | {"unsqueeze", "view", "reshape", "expand", "getitem", "__getitem__"}


def _weight_owner(product: fx.Node) -> str | None:
    """The module whose weight the block's own product of the logits reads (``F.linear(x.double(),
    self.gate.weight.double())``: ``gate``), through casts and transposes; None for a weight of the block's own."""
    for operand in product.all_input_nodes:
        while operand.op != "get_attr" and target_name(operand) in _CASTS and operand.all_input_nodes:
            operand = operand.all_input_nodes[0]
        if operand.op == "get_attr" and "." in operand.target:
            return operand.target.rpartition(".")[0]
    return None


def _renormalized(nodes: list[fx.Node], ancestry: Ancestry) -> bool:
    """Are the selected weights divided by their sum (possibly plus an epsilon)?"""
    sums = [n for n in nodes if target_name(n) == "sum"]
    for n in nodes:
        if target_name(n) in _DIVISIONS and len(n.args) > 1 and isinstance(n.args[1], fx.Node):
            divisor = n.args[1]
            if any(s is divisor or ancestry.is_ancestor(s, divisor) for s in sums):
                return True
    return False


def _scaling(nodes: list[fx.Node]) -> float | None:
    for n in nodes:
        if target_name(n) in ("mul", "__mul__", "__rmul__", "mul_"):
            scalars = [a for a in n.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
            if scalars and scalars[0] != 1:
                return float(scalars[0])
    return None


def _stored(node: fx.Node) -> fx.Node | None:
    """The parameter or buffer ``node`` is, or is a view or cast of (``bias.unsqueeze(0)``, ``bias[None]``)."""
    base = viewed_chain(node, _BIAS_VIEWS)[-1]
    return base if base.op == "get_attr" else None


def _correction_bias(graph: fx.Graph, scored: fx.Node, weights: fx.Node, ancestry: Ancestry) -> str | None:
    """A per-expert parameter or buffer added to the scores used for selection, but not to the weights."""
    for n in ancestry.of(scored) + [scored]:
        if target_name(n) not in ("add", "__add__", "__radd__") or len(n.all_input_nodes) != 2:
            continue
        for added, scores in (n.all_input_nodes, reversed(n.all_input_nodes)):
            bias, vector = _stored(added), value(added)
            if bias is not None and isinstance(vector, torch.Tensor) and vector.squeeze().dim() == 1:
                # The weights must come from the unbiased scores (or what they are a view of), skipping the add.
                viewed = viewed_chain(scores, _BIAS_VIEWS)
                if any(u is not n and u not in viewed and (u is weights or ancestry.is_ancestor(u, weights))
                       for s in viewed for u in s.users):
                    return bias.target
    return None


def routing_choice(graph: fx.Graph, tokens: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The top-k (or max) indices behind ``tokens`` and the weights beside them.

    For dispatch code that turns the routing choice into something else first
    (a sorting index, a row mask), whose own ops are dispatch, not routing.

    The weights are the last float tensor of the indices' shape computed from the
    top-k values; without a top-k, the sorting index stands for both.
    """
    ancestry = Ancestry(graph)
    behind = set(ancestry.of(tokens))
    choices = [(n, _indices(n)) for n in ancestry.of(tokens)
               if target_name(n) in ("topk", "max", "argmax") and _along_last(n)]
    choices = [(n, index) for n, index in choices if index is not None]  # a max of values alone chooses nothing
    cuts = [(cut_sort(n), n) for n in ancestry.of(tokens)]
    choices += [(cut[0], n) for cut, n in cuts if cut is not None]  # ``order[:, :k]`` of a descending sort
    if not choices:
        return tokens, tokens
    choice, index = ([(n, index) for n, index in choices if index is tokens or index in behind] or choices)[-1]
    shape = value(index).shape
    weights = [n for n in graph.nodes if isinstance(value(n), torch.Tensor) and value(n).is_floating_point()
               and value(n).shape == shape and ancestry.is_ancestor(choice, n)]
    return index, (weights[-1] if weights else index)


def router_of(graph: fx.Graph) -> RouterInfo | None:
    """The router facts of a recorded block whose experts were not recognised: its last top-k (or max) whose
    indices are read."""
    indices = [_indices(n) for n in graph.nodes if target_name(n) in ("topk", "max", "argmax") and _along_last(n)]
    indices = [index for index in indices if index is not None and index.users]
    if not indices:
        return None
    index = indices[-1]
    _, weights = routing_choice(graph, index)
    return analyze_router(graph, index, weights)


def only_topk(graph: fx.Graph) -> fx.Node | None:
    """The indices of the block's one top-k, where its rows reach the experts through host-side numbers
    (``token_idx.tolist()``) that no graph edge follows; forcing it is then checked like any other choice."""
    calls = [n for n in graph.nodes if target_name(n) == "topk"]
    if len(calls) != 1:
        return None
    return next((u for u in calls[0].users if target_name(u) in ("getitem", "__getitem__") and u.args[1] == 1), None)


def selects_among(graph: fx.Graph, count: int) -> fx.Node | None:
    """A top-k, max, argmax or sort of float scores over a last dimension of ``count`` choices: a routing decision
    among ``count`` experts, whatever the dispatch after it does with it."""
    for node in graph.nodes:
        scores = value(node.args[0]) if target_name(node) in _SELECTION_OPS and node.args and isinstance(
            node.args[0], fx.Node) else None
        if isinstance(scores, torch.Tensor) and scores.is_floating_point() and scores.dim() and (
                scores.shape[-1] == count):
            return node
    return None
