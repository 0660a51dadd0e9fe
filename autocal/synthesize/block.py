"""Block-level rewrite: the block's own graph, plus a run of each expert on the tokens it was not routed.

The new forward is the block's symbolic graph (so it generalises to any number
of tokens) with one call inserted after each expert call::

    experts_0 = getattr(self.experts, "0")(reshape)
    run_unrouted = autocal_synthesize_ops_run_unrouted(experts_0_module, view, getitem_7, calibrate_all_experts)

With calibration off the inserted calls do nothing and the block computes
exactly what it did; with calibration on each expert also sees the rest of the
tokens, and those outputs are discarded. The experts are the original modules,
so nothing is unpacked and ``restore()`` gives the original block back.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from ..detect.plans import BlockRewritePlan
from ..detect.structure import ExpertCall
from .module import AdoptedMoE
from .ops import run_unrouted

__all__ = ["BlockRewriteMoE", "build_block_rewrite"]


class BlockRewriteMoE(AdoptedMoE):
    """Block-level rewrite: the block's forward is the generated graph; the experts are the original modules."""

    is_permanent = False


def _insert_unrouted(graph: fx.Graph, calls: list[ExpertCall]) -> None:
    for call in calls:
        with graph.inserting_before(call.node.next):
            expert = graph.get_attr(call.node.target)
            enabled = graph.get_attr("calibrate_all_experts")
            others = call.node.args[1:] if call.node.args else ()  # what the expert is handed beside its rows
            named = dict(call.node.kwargs) if call.node.args else {}
            graph.call_function(run_unrouted, (expert, call.source, call.tokens, enabled, *others), named)


def _codegen_root(block: nn.Module, graph: fx.Graph) -> dict[str, Any]:
    """What the graph's ``get_attr`` / ``call_module`` targets refer to (fx needs them to generate code)."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            item: Any = block
            for part in node.target.split("."):
                item = getattr(item, part, False)
            root[node.target] = item
    return root


def build_block_rewrite(plan: BlockRewritePlan, block: nn.Module) -> type[BlockRewriteMoE]:
    """The calibration class for one block class, its forward generated from the rewritten graph."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(plan.rewrite.graph, env))
    _insert_unrouted(graph, [ExpertCall(env[c.node], c.expert, env[c.source], env[c.tokens])
                             for c in plan.rewrite.calls])
    graph.lint()
    block_cls = type(block)
    generated = fx.GraphModule(_codegen_root(block, graph), graph, class_name=f"Calibration{block_cls.__name__}")
    return type(
        f"Calibration{block_cls.__name__}",
        (BlockRewriteMoE, block_cls),
        {"forward": type(generated).forward, "plan": plan, "structure": plan.structure,
         "generated_code": generated.code, "__module__": __name__},
    )
