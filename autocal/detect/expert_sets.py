"""Several expert sets in one block: each list of experts with a router of its own, over the tokens that reach it.

Multimodal code keeps one list of experts, and one router, per modality: the
rows of each modality are picked by an input (``token_type_ids``, an
``is_image`` mask, a position split), then routed by that set's own top-k. Which
set a token reaches is no routing decision: no score chooses it, and whatever the
scores, a token never reaches another set's experts. The calibration target is
therefore: **every expert sees every token that reaches its set's routing
decision** (the text experts every text token, the image experts every image
token). Running the image experts on text tokens as well would feed their
calibration statistics inputs they never get.

The recorded-block rule (``detect/container.py``) learns one recipe per list:
the rows its experts' inputs are gathered from (the tokens that reach the set)
and how each expert's rows are picked from them. Two checks keep that target
from hiding a coverage loss:

1. no routing decision picks a set's rows (no top-k, sort, or max/argmax along a
   dimension among the ops they come from): a set chosen by scores (the outer
   choice of a two-level gate) would leave its experts without the tokens routed
   to the other sets;
2. together the sets take every token of the example inputs, so no token is
   left to no expert (with one set, that is every token: the usual target).

With calibration on, the module checks again, on every batch, that the sets'
rows number at least the tokens (``synthesize/container.py``), and
``tokens_due`` gives ``autocal.verify`` each expert's own count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..trace.replay import TokenRecipe
from .graph_utils import Ancestry, source_of, target_name, value
from .plans import NoMatch
from .structure import ExpertsInfo, RouterInfo

__all__ = ["ExpertSet", "RecordedSet", "check_sets", "routing_decision", "takes_every_row"]

_DECISIONS = ("topk", "sort", "argsort", "msort", "kthvalue", "argmax", "argmin", "max", "min")


@dataclass(frozen=True)
class ExpertSet:
    """One more list of experts of a block (beyond the plan's first): its path, and how its rows are picked."""

    path: str
    recipe: TokenRecipe


@dataclass(frozen=True)
class RecordedSet:
    """What detection learnt about one list of experts: its recipe, its router, its experts."""

    path: str
    recipe: TokenRecipe
    router: RouterInfo
    experts: ExpertsInfo


def routing_decision(graph: fx.Graph, node: fx.Node) -> fx.Node | None:
    """A choice among float scores on the way to ``node`` (a top-k, a sort, a max or argmax along a dimension)."""
    for candidate in [*Ancestry(graph).of(node), node]:
        name = target_name(candidate)
        if name not in _DECISIONS or not candidate.args:
            continue
        scores = value(candidate.args[0]) if isinstance(candidate.args[0], fx.Node) else None
        along = len(candidate.args) > 1 or "dim" in candidate.kwargs or name not in ("max", "min", "argmax", "argmin")
        if isinstance(scores, torch.Tensor) and scores.is_floating_point() and along:
            return candidate
    return None


def takes_every_row(rows: torch.Tensor, pools: list[torch.Tensor]) -> bool:
    """Is every row of ``rows`` (bit for bit) a row of one of ``pools``?"""
    pool = torch.cat([p.reshape(-1, rows.shape[-1]) for p in pools]).to(rows.dtype)
    _, inverse = torch.unique(torch.cat([pool, rows.reshape(-1, rows.shape[-1])]), dim=0, return_inverse=True)
    return bool(torch.isin(inverse[pool.shape[0]:], inverse[:pool.shape[0]]).all())


def check_sets(graph: fx.Graph, bound: dict[str, Any], sets: list[RecordedSet]) -> NoMatch | None:
    """None where each set's rows are picked by no routing decision and the sets together take every token."""
    for found in sets:
        decision = routing_decision(graph, found.recipe.source)
        if decision is not None:
            return NoMatch(f"the rows of expert set `{found.path}` are picked by a routing decision "
                           f"({target_name(decision)}): its experts would not see the tokens routed elsewhere",
                           source_of(decision))
    pools = [found.recipe.rows(bound) for found in sets]
    width = pools[0].shape[-1]
    hidden = next((v for v in bound.values() if isinstance(v, torch.Tensor) and v.is_floating_point()
                   and v.dim() >= 2 and v.shape[-1] == width), None)
    if hidden is None or not takes_every_row(hidden, pools):
        return NoMatch(f"the expert sets {', '.join(f'`{s.path}`' for s in sets)} together do not take every token "
                       "of the example inputs: a token left to no set would go uncalibrated")
    return None
