"""How many experts a token gets, where the selection's own k does not say it.

``router.py`` reads k from the selection behind the experts' indices (a top-k's
k, a max's one choice). Two spellings choose more per token than that: experts
choosing their tokens (a top-k over ``[experts, tokens]`` scores: k is the
experts a token gets on average) and a selection made in each group of experts
(``scores.view(T, G, -1).max(-1)``, a mixture of grouped experts: k choices in
each of G groups, out of all the experts). Both are read from the recorded
shapes against the block's token count. And a top-k spelled as a descending
sort cut to its first k entries (``cut_sort``), which forcing replaces too.
"""

from __future__ import annotations

import torch
from torch import fx

from .graph_utils import target_name, value

__all__ = ["EXPERT_CHOICE", "cut_sort", "expert_choice", "per_group"]

EXPERT_CHOICE = "expert choice"  # the words starting a router's selection where experts choose their tokens


def block_tokens(graph: fx.Graph) -> int | None:
    """The tokens of the recorded call: rows of its first floating-point input."""
    hidden = next((value(n) for n in graph.nodes if n.op == "placeholder" and isinstance(value(n), torch.Tensor)
                   and value(n).is_floating_point() and value(n).dim()), None)
    return None if hidden is None else hidden.numel() // hidden.shape[-1]


def expert_choice(graph: fx.Graph, selection: fx.Node, index: fx.Node) -> tuple[int, int, str] | None:
    """``(k, experts, words)`` where the experts choose their tokens (a top-k over ``[experts, tokens]`` scores):
    k is then the experts a token gets on average, each expert taking ``capacity`` of the tokens."""
    tokens = block_tokens(graph)
    picked = value(selection)  # the top-k's own indices: ``index`` may be one expert's row of them (``tok[e]``)
    scores, chosen = value(selection.args[0]), picked[1] if isinstance(picked, tuple) else value(index)
    if tokens is None or target_name(selection) != "topk" or scores.dim() != 2 or chosen.dim() != 2:
        return None
    experts, capacity = scores.shape[0], chosen.shape[-1]
    if scores.shape[-1] != tokens or experts == tokens:
        return None
    return max(1, round(experts * capacity / tokens)), experts, f"{EXPERT_CHOICE} ({capacity} of {tokens} tokens each)"


def per_group(graph: fx.Graph, selection: fx.Node, read: tuple[int, int, str]) -> tuple[int, int, str]:
    """``read`` (k, choices, words) per token: a selection over scores of more rows than the block has tokens,
    ``G`` rows per token (the scores viewed ``[T, G, E / G]``), chooses ``k`` in each of the G groups, of G times
    the choices of one."""
    scores, tokens = value(selection.args[0]), block_tokens(graph)
    rows = scores.numel() // scores.shape[-1] if isinstance(scores, torch.Tensor) and scores.dim() else 0
    if not tokens or rows <= tokens or rows % tokens:
        return read
    groups = rows // tokens
    k, choices, words = read
    return k * groups, choices * groups, f"{words} in each of {groups} groups of experts"


def cut_sort(node: fx.Node) -> tuple[fx.Node, int] | None:
    """``(sort, k)`` where ``node`` is the first ``k`` entries along the last dimension of a descending sort's (or
    argsort's) indices: ``order[:, :k]``, ``order[..., :k]``."""
    if target_name(node) not in ("getitem", "__getitem__") or not isinstance(node.args[0], fx.Node):
        return None
    index = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
    cut, full = index[-1], value(node.args[0])
    if not (isinstance(full, torch.Tensor) and isinstance(cut, slice) and cut.start in (None, 0)
            and cut.step in (None, 1) and isinstance(cut.stop, int)
            and all(i is Ellipsis or i == slice(None) for i in index[:-1])
            and (Ellipsis in index or len(index) == full.dim())):
        return None
    sort = node.args[0]
    if target_name(sort) in ("getitem", "__getitem__") and sort.args[1] == 1:
        sort = sort.args[0]
    if target_name(sort) not in ("sort", "argsort") or not _descending(sort):
        return None
    dim = sort.kwargs.get("dim", sort.args[1] if len(sort.args) > 1 else -1)
    return (sort, cut.stop) if isinstance(dim, int) and dim % full.dim() == full.dim() - 1 else None


def _descending(sort: fx.Node) -> bool:
    return bool(sort.kwargs.get("descending", sort.args[2] if len(sort.args) > 2 else False))
