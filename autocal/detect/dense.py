"""Detection for packed experts run densely on every token, with routing applied to their inputs.

Llama 4 is the example: the block repeats the tokens once per expert, scales
each copy by that expert's routing score (zero where not routed), and calls a
packed container that runs every expert with one batched matmul. The block's
symbolic graph shows the scaling as ``mul(tokens, scale)`` right before the
container call; the rewrite hands both factors to the calibration container,
so that in calibration mode an expert can see the *unscaled* tokens it was not
routed (the original gives it zeros).
"""

from __future__ import annotations

import torch
from torch import fx, nn

from .. import errors
from ..trace.inputs import BlockCall
from ..trace.record import record
from ..trace.symbolic import annotate, trace_block
from .block import other_children
from .experts import ExpertsRecording, analyze_experts
from .graph_utils import returns_of, source_of, target_name, tensor_inputs, value
from .router import _SELECTION_OPS, analyze_router
from .plans import DenseExpertsPlan
from .structure import BlockRewrite, ExpertsInfo, MoEStructure

__all__ = ["detect_dense"]

_SAME_VALUES = {"detach", "contiguous", "clone"}


def _scaled_input(graph: fx.Graph, call: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """``(tokens, scale)`` when the container input is ``tokens * scale`` (or a detached copy of it).

    ``scale`` is the factor computed by a submodule (the router) or a selection
    op; ``tokens`` is the one computed from the block inputs alone.
    """
    product = call.args[0] if call.args else None
    while isinstance(product, fx.Node) and target_name(product) in _SAME_VALUES and product.args:
        product = product.args[0]  # routed_in.detach(): the same values
    if not (isinstance(product, fx.Node) and target_name(product) in ("mul", "__mul__", "__rmul__")):
        return None
    routed = [
        n for n in product.all_input_nodes
        if any(a.op == "call_module" or target_name(a) in _SELECTION_OPS for a in _data_ancestors(n))
    ]
    others = [n for n in product.all_input_nodes if n not in routed]
    return (others[0], routed[0]) if len(routed) == 1 and len(others) == 1 else None


def _data_ancestors(node: fx.Node) -> list[fx.Node]:
    """``node`` and the nodes its tensor data comes from (not those that only gave it a size)."""
    seen, stack = [], [node]
    while stack:
        current = stack.pop()
        if current not in seen:
            seen.append(current)
            stack.extend(tensor_inputs(current))
    return seen


def detect_dense(block: nn.Module, name: str, container: nn.Module, call: BlockCall,
                 recorded_call: fx.Node, packed: dict[str, nn.Parameter], num_experts: int) -> DenseExpertsPlan:
    """Block-level detection for a packed container called with one (routing-scaled) tensor.

    ``recorded_call`` is the container call in the block's concrete recording,
    where the router's own ops are visible (in the symbolic graph the router is a leaf).
    """
    graph = trace_block(block)
    output = annotate(block, graph, call.args, call.kwargs)
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == name]
    if len(calls) != 1:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"`{name}` is called {len(calls)} times, expected once",
                                  block_class=type(block).__name__)
    container_call = calls[0]
    scaled = _scaled_input(graph, container_call)
    if scaled is None:
        raise errors.AutocalError(
            errors.UNSUPPORTED_DISPATCH,
            "the experts get one input that is not (tokens × routing scale)",
            block_class=type(block).__name__, source=source_of(container_call),
            hints=[errors.override_hint(type(block).__name__)],
        )
    tokens, scale = scaled
    with torch.no_grad():
        rec = record(container, (value(container_call.args[0]),))
    template, layout, sources = analyze_experts(ExpertsRecording(rec.graph, container, next(iter(rec.inputs.values()))), packed,
                                                num_experts)
    recorded = _scaled_input(recorded_call.graph, recorded_call)
    router = analyze_router(recorded_call.graph, recorded[1], recorded[1]) if recorded else analyze_router(graph, scale, scale)
    container_call.kwargs = {**container_call.kwargs, "unscaled": tokens, "scale": scale}
    for node in graph.nodes:
        node.meta.pop("value", None)
    experts = ExpertsInfo(
        module_path=name,
        num_experts=num_experts,
        storage="packed (batched: every expert on every token)",
        layout=layout,
        computation=template.computation,
        weights_applied="on the expert inputs (tokens × score)",
        call_roles={},
        output_features=template.linears[-1].out_features,
        accumulate_dtype=None,
        output_dtype=None,
        sources={"scale": source_of(scale), **sources},
    )
    structure = MoEStructure(
        block_class=type(block).__name__,
        router=router,
        experts=experts,
        shared_modules=other_children(block, name, router.module_path),
        returns=returns_of(output),
        template=template,
    )
    return DenseExpertsPlan(structure, BlockRewrite(graph, []))
