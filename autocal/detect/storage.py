"""Packed experts storage, read from parameter shapes alone: which parameters hold the experts, and how many.

These are candidate tests: they say a module may hold experts, never that a
block routes tokens to them (the rules' ``match`` decides that).
"""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn

__all__ = ["packed_parameters", "count_experts", "router_rows", "resolve"]


def _raw_parameters(container: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of ``container`` not owned by a torch layer (``nn.Linear``, ``nn.Embedding``, …).

    Packed experts store their weights as bare parameters of a model's own module.
    """
    layered = {id(p) for m in container.modules() if type(m).__module__.startswith("torch.nn.")
               for p in m.parameters(recurse=False)}
    return {name: p for name, p in container.named_parameters() if id(p) not in layered}


def packed_parameters(container: nn.Module, router_rows: Iterable[int] = ()) -> dict[str, nn.Parameter]:
    """Parameters that store the experts, by qualified name; empty if ``container`` holds no experts.

    Two layouts are recognised by shape alone:

    - *stacked*: at least two parameters of the container itself, of 3 or more
      dimensions, share a leading size E >= 2 (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``);
      their 2-D companions with the same leading size (biases) belong too. A lone
      3-D weight is a convolution, not experts. Leading sizes may differ when the
      largest is the router's choice count: choices past the smallest size have no
      weights of their own (LongCat's identity "zero experts"), see ``count_experts``.
    - *flat*: the container holds nothing but two or more raw 2-D parameters
      (possibly one module down) of one shape ``[E * m, H]`` (m >= 2),
      where E is the row count of a router weight beside the container
      (``router_rows``), e.g. DBRX's ``w1``/``v1``/``w2``.
    """
    own = dict(container.named_parameters(recurse=False))
    stacked = [p for p in own.values() if p.dim() >= 3]
    leading = {p.shape[0] for p in stacked}
    if len(stacked) >= 2 and min(leading, default=0) >= 2 and (len(leading) == 1 or max(leading) in router_rows):
        sizes = {name: p.shape[0] for name, p in own.items() if p.dim() >= 2}
        return {name: own[name] for name, size in sizes.items() if size in leading}
    raw = _raw_parameters(container)
    if len(raw) != len(list(container.parameters())):  # flat experts hold nothing but their weights
        return {}
    for rows in sorted(set(router_rows), reverse=True):
        shapes: dict[tuple, list[str]] = {}
        for name, p in raw.items():
            if rows >= 2 and p.dim() == 2 and p.shape[0] % rows == 0 and p.shape[0] // rows >= 2:
                shapes.setdefault(tuple(p.shape), []).append(name)
        group = max(shapes.values(), key=len, default=[])
        if len(group) >= 2 and len(group) == len(raw):
            return {name: raw[name] for name in group}
    return {}


def count_experts(packed: dict[str, nn.Parameter], router_rows: Iterable[int] = ()) -> int:
    """E: the shared leading size of stacked parameters, or the router rows that divide flat ones."""
    stacked = [p for p in packed.values() if p.dim() >= 3]
    if stacked:  # entries past the smallest size (a weight some choices lack) are not experts' weights
        return min(p.shape[0] for p in stacked)
    first = next(iter(packed.values()))
    return max(r for r in router_rows if r >= 2 and first.shape[0] % r == 0)


def router_rows(block: nn.Module, container: nn.Module) -> set[int]:
    """Row counts of 2-D weights beside ``container`` in ``block``: candidates for the number of experts."""
    inside = {id(p) for p in container.parameters()}
    return {p.shape[0] for p in block.parameters() if p.dim() == 2 and id(p) not in inside}


def resolve(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


