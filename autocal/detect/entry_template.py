"""Experts of a list that compute with weights of their own but hold no Linear: raw parameter matmuls, kernel-1 convs.

Calibration needs ``nn.Linear`` layers to observe. One expert is recorded on
the rows the block gave it, and cut into a template over Linears exactly as
packed experts are (``detect/experts.py``): each matmul with one of its weights
(``x @ W``, ``F.linear``, a kernel-1 ``conv1d``) becomes a Linear whose weight is
a view of that parameter. ``EntryWeights`` makes the list look like packed
storage to the template's weight recipes (``entries.w_in[e]`` is expert ``e``'s
``w_in``), so every expert gets its own Linears, views of its own parameters.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from ..trace.record import record
from .experts import ExpertsRecording, build_template, expert_region, weight_side
from .graph_utils import Ancestry
from .linears import describe, eliminate_dead_code, label_linears, route_projections, split_outputs, \
    tensor_methods_as_calls
from .structure import ExpertTemplate, LinearRecipe

__all__ = ["own_weights", "EntryWeights", "entry_template"]


def own_weights(module: nn.Module) -> bool:
    """Are all of ``module``'s parameters its own or a kernel-1 convolution's, one of them a weight (2-D or more)?"""
    convs = {id(p) for m in module.modules() if isinstance(m, nn.Conv1d) and m.kernel_size == (1,)
             for p in m.parameters(recurse=False)}
    owned = convs | {id(p) for p in module.parameters(recurse=False)}
    params = list(module.parameters())
    return any(p.dim() >= 2 for p in params) and all(id(p) in owned for p in params)


class EntryWeights:
    """A list's experts seen as one packed store: ``resolve(store, "fc1.weight")[e]`` is expert ``e``'s."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items

    def __getattr__(self, name: str) -> EntryWeights:
        return EntryWeights([getattr(item, name) for item in self._items])

    def __getitem__(self, expert: int) -> Any:
        return self._items[expert]


def entry_template(expert: nn.Module, rows: torch.Tensor) -> ExpertTemplate:
    """The template over Linears of one expert's forward, recorded on ``rows``.

    Raises ``AutocalError`` (``unsupported-expert``) where a weight is used by
    anything but a matmul, or the forward is not one function of its input rows.
    """
    with torch.no_grad():
        rec = record(expert, (rows,))
    graph = rec.graph
    names = {name for name, _ in expert.named_parameters()}  # biases too: each expert's own
    seeds = [n for n in graph.nodes if n.op == "get_attr" and n.target in names]
    hidden = next(n for n in graph.nodes if n.op == "placeholder")
    side = weight_side(graph, seeds)
    found = ExpertsRecording(graph, expert, hidden)
    rows_node, contribution, _, region = expert_region(found, side, Ancestry(graph), rows=hidden)
    template, linears = build_template(found, region, rows_node, contribution, None, side, seeds)
    split_outputs(template, linears)
    eliminate_dead_code(template)
    label_linears(template, linears)
    tensor_methods_as_calls(template)
    computation = describe(template)
    projections = route_projections(template, linears)
    template.lint()
    recipes = [LinearRecipe(name, lin.weight, lin.bias, lin.in_features, lin.out_features, lin.packed_param,
                            lin.note) for name, lin in linears.items()]
    return ExpertTemplate(graph=template, linears=recipes, uses_routing_weight=False,
                          output_dtype=_dtype(contribution), computation=computation, projections=projections)


def _dtype(node: fx.Node) -> Any:
    out = node.meta.get("value")
    return out.dtype if isinstance(out, torch.Tensor) else None
