"""Symbolic fx tracing of a block's own glue code, with every child module kept as a leaf.

When the dispatch loop lives in the block forward (a ``ModuleList`` of experts
indexed in a Python loop over ``range(num_experts)``), fx unrolls the loop and
the graph generalises to any number of tokens, so it can become the block's new
forward. Keeping children (router, each expert, shared experts) as leaves keeps
their module identity, hooks and parameter names.

``annotate`` then runs the graph once on example inputs and stores each node's
value in ``node.meta["value"]``, so detection passes read concrete values as
they do on a recording.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

__all__ = ["ChildLeafTracer", "trace_block", "annotate"]


class ChildLeafTracer(fx.Tracer):
    """Keeps the block's children, and the entries of its container children, as leaves."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.record_stack_traces = True
        self.leaves: set[int] = set()
        for child in block.children():
            entries = child.children() if isinstance(child, (nn.ModuleList, nn.ModuleDict)) else [child]
            self.leaves.update(id(entry) for entry in entries)

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.leaves or super().is_leaf_module(module, qualified_name)


def trace_block(block: nn.Module) -> fx.Graph:
    """The block's forward as an fx graph over its children (raises what fx raises)."""
    return ChildLeafTracer(block).trace(block)


class _Annotator(fx.Interpreter):
    def run_node(self, node: fx.Node) -> Any:
        result = super().run_node(node)
        node.meta["value"] = result
        return result


def annotate(block: nn.Module, graph: fx.Graph, args: tuple, kwargs: dict | None = None) -> Any:
    """Run ``graph`` on the inputs, storing every node's value; returns the output."""
    module = fx.GraphModule(block, graph)
    names = [n.target for n in graph.nodes if n.op == "placeholder"]
    bound = list(args) + [kwargs[name] for name in names[len(args):] if kwargs and name in kwargs]
    with torch.no_grad():
        return _Annotator(module).run(*bound)
