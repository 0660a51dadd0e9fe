"""Gated experts: every expert already runs on the whole input, and a per-row factor gates its output.

ViTPose's per-dataset experts (a mask from an input index) and soft mixtures
(softmax weights over all experts) are such blocks. The experts then see every
token in the original forward: calibration needs no extra calls, and the module
only wraps the experts (for coverage and the report). ``k`` is the most experts
any row keeps.
"""

from __future__ import annotations

import torch
from torch import fx

from .. import errors
from .block import _routing_weight, module_experts_info, other_children
from .facts import Facts
from .graph_utils import Ancestry, is_int_tensor, returns_of, source_of, target_name, value
from .plans import GatedPlan, NoMatch
from .recorded import block_recording, loop_recording, whole_input
from .router import router_of, selects_among
from .structure import MoEStructure, RouterInfo

__all__ = ["detect_gated"]


def detect_gated(facts: Facts) -> GatedPlan | NoMatch:
    """``gated``: read from the list's own loop where it has one, else from the block."""
    found = loop_recording(facts) if facts.own_loop else block_recording(facts)
    if not found:
        return found
    calls, name = found.calls, facts.list_name
    if not calls:
        return NoMatch(f"`{name}`'s experts are never called", kind=errors.NO_MOE_BLOCK)
    if whole_input(calls[0]) is None:
        return NoMatch("the first expert is given rows, not the whole input", source_of(calls[0]), shallow=True)
    gated = [_gated_rows(c) for c in calls]
    whole = {whole_input(c) for c in calls}
    choice = None if facts.unrouted else selects_among(found.outer.graph, len(facts.entries))
    every = len(calls) == len(facts.entries) and len(whole) == 1
    if not every or (any(g is None for g in gated) and choice is None):
        if choice is not None:  # a router beside them, and the block routes among them: never a skip
            return NoMatch(f"`{name}`'s experts are not each called once on the whole input, though the block "
                           f"chooses among them by a {target_name(choice)}", source_of(choice))
        return NoMatch(lambda: f"`{name}`'s experts all run on the whole input, but no per-row factor gates them "
                               "all: not an MoE", source_of(calls[0]), not_moe=True)
    if any(g is None for g in gated):  # every expert on every token, the routing choice applied to their outputs
        router, applied = router_of(found.outer.graph), "on the expert outputs, after the routing choice"
        if router is None:
            return NoMatch(f"the block chooses among `{name}`'s experts by a {target_name(choice)} that is no "
                           "top-k, max or argmax of scores", source_of(choice))
    else:
        router, applied = _gating(found, facts, calls, gated), "on the expert output (a per-row factor)"
    experts = module_experts_info(name, facts.list_container, facts.entries, calls[0], applied,
                                  {"hidden": next(iter(whole)).target})
    return GatedPlan(MoEStructure(
        block_class=facts.block_class,
        router=router,
        experts=experts,
        shared_modules=other_children(facts.block, name, router.module_path),
        returns=returns_of(found.outer.output),
    ))


def _gating(found, facts: Facts, calls: list[fx.Node], gated: list[torch.Tensor]) -> RouterInfo:
    """The router facts of experts each gated per row by a factor on its output (a mask or weights)."""
    factors = [_routing_weight(c) for c in calls]
    graph = found.rec.graph
    index_inputs = [p.target for p in Ancestry(graph).of(factors[0]) if p.op == "placeholder" and is_int_tensor(p)]
    return RouterInfo(
        module_path=None,
        scoring="mask" if value(factors[0]).dtype == torch.bool else "weights",
        top_k=int(torch.stack(gated).sum(0).max()),
        num_choices=len(facts.entries),
        renormalized=False, correction_bias=None, grouped=False, scaling=None,
        sources={"gating": source_of(next(iter(calls[0].users)))},
        selection=f"input `{index_inputs[0]}`" if index_inputs else "per-row factor",
    )


def _gated_rows(call: fx.Node) -> torch.Tensor | None:
    """Per output row: does the factor the expert's output is multiplied by keep it (is non-zero)?"""
    factor = _routing_weight(call)
    if factor is None or not isinstance(value(factor), torch.Tensor):
        return None
    output = value(call)
    try:
        kept = torch.broadcast_to(value(factor), output.shape) != 0
    except RuntimeError:
        return None
    return kept.reshape(-1, output.shape[-1]).any(-1)
