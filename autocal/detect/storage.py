"""Packed experts storage, read from parameter shapes alone: which parameters hold the experts, and how many.

These are candidate tests: they say a module may hold experts, never that a
block routes tokens to them (the rules' ``match`` decides that).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["packed_parameters", "count_experts", "router_rows", "resolve", "own_expert_weights",
           "projection_weights", "projection_children", "expert_tables", "side_by_side", "side_by_side_weights",
           "parameter_list", "listed_weights", "listed_biases", "stored_shape"]


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


def own_expert_weights(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's own parameters of shape ``[E, a, b]`` (a, b >= 2) with a router-shaped weight beside: ``[E, H]``,
    or ``[H, E]`` as code multiplying by it (``x @ router``) stores it."""
    own = {n: p for n, p in block.named_parameters(recurse=False) if p.dim() == 3 and min(p.shape) >= 2}
    routers = [p.shape for p in block.parameters() if p.dim() == 2]
    routers += [r[::-1] for r in routers]
    return {n: p for n, p in own.items() if any(r[0] == p.shape[0] and r[1] in p.shape[1:] for r in routers)}


def projection_weights(block: nn.Module) -> dict[str, nn.Parameter]:
    """``[E, a, b]`` weights of children each holding one projection of every expert, with a router beside.

    Such a child holds one ``[E, a, b]`` weight (a, b >= 2) and at most its
    ``[E, a]`` or ``[E, b]`` bias, and the block applies it to one expert at a
    time (``proj(x, expert_id)``, or rows and per-expert counts); the block holds
    the router-shaped ``[E, H]`` weight outside those children. The children may
    sit one level down, in an experts module holding nothing but them (FastMoE's
    ``experts.htoh4`` and ``experts.h4toh``).
    """
    found = dict(projection_children(block))
    for name, child in block.named_children():
        inner = projection_children(child)
        if inner and _holds_only_these(child, inner):
            found |= {f"{name}.{path}": p for path, p in inner.items()}
    inside = {id(p) for path, weight in found.items()
              for p in block.get_submodule(path.rpartition(".")[0]).parameters()}
    routers = [p.shape for p in block.parameters() if p.dim() == 2 and id(p) not in inside]
    return {n: p for n, p in found.items() if any(r[0] == p.shape[0] and r[1] in p.shape[1:] for r in routers)}


def projection_children(module: nn.Module) -> dict[str, nn.Parameter]:
    """The ``[E, a, b]`` weight of each child of ``module`` that holds one projection of every expert: that weight
    (a, b >= 2) and at most its ``[E, a]`` or ``[E, b]`` bias, in a class of the model's own."""
    found = {}
    for name, child in module.named_children():
        params = dict(child.named_parameters())
        weights = [(n, p) for n, p in params.items() if p.dim() == 3 and min(p.shape[1:]) >= 2]
        if type(child).__module__.startswith("torch.nn.") or len(weights) != 1 or len(params) > 2:
            continue
        weight = weights[0][1]
        if all(p is weight or p.dim() == 2 and p.shape[0] == weight.shape[0] and p.shape[1] in weight.shape[1:]
               for p in params.values()):
            found[f"{name}.{weights[0][0]}"] = weight
    return found


def _holds_only_these(module: nn.Module, projections: dict[str, nn.Parameter]) -> bool:
    """Are all of ``module``'s parameters those of its children holding ``projections``?"""
    inside = {id(p) for path in projections for p in module.get_submodule(path.rpartition(".")[0]).parameters()}
    return all(id(p) in inside for p in module.parameters())


def expert_tables(block: nn.Module) -> dict[str, nn.Parameter]:
    """Two or more embedding tables of one shape ``[E, d]`` among the block's children: one vector per expert.

    Weaker evidence than ``own_expert_weights`` (no router beside them by
    shape): detection decides, and a block whose tables the routing does not
    gather is not an MoE.
    """
    tables = {f"{n}.weight": m.weight for n, m in block.named_children() if isinstance(m, nn.Embedding)}
    shapes = [p.shape for p in tables.values()]
    return {n: p for n, p in tables.items() if shapes.count(p.shape) >= 2 and p.shape[0] >= 2}


def side_by_side(shape: torch.Size, experts: int, hidden: int) -> bool:
    """Is ``shape`` ``[hidden, experts * m]`` or ``[experts * m, hidden]`` with m >= 2?"""
    return any(shape[i] == hidden and shape[1 - i] % experts == 0 and shape[1 - i] // experts >= 2 for i in (0, 1))


def side_by_side_weights(block: nn.Module) -> dict[str, nn.Parameter]:
    """Weights of a submodule holding every expert's weights side by side, with a router beside it in the block.

    The submodule (a child, or one level further down: ``experts.mlp.w1``) holds nothing but two or more raw 2-D
    weights of its own, each
    ``[H, E * m]`` or ``[E * m, H]`` (m >= 2), and the block an ``[E, H]``
    weight outside the child holding it, which holds nothing else (a router beside them there makes that child
    the block):
    grouped-MLP storage, which the forward views per expert
    (``weight1.view(E, H, -1)[e]``).
    """
    for name, child in block.named_modules():
        params = dict(child.named_parameters(recurse=False))
        if (not name or name.count(".") > 1 or type(child).__module__.startswith("torch.nn.") or len(params) < 2
                or len(params) != len(list(child.parameters())) or any(p.dim() != 2 for p in params.values())):
            continue
        inside = {id(p) for p in block.get_submodule(name.split(".")[0]).parameters()}  # the child holding them
        if len(inside) != len(params):  # that child holds more (its own router: it is the block)
            continue
        routers = {tuple(w.shape) for w in block.parameters() if w.dim() == 2 and id(w) not in inside}
        if any(all(side_by_side(p.shape, e, h) for p in params.values()) for e, h in routers if e >= 2):
            return {f"{name}.{n}": p for n, p in params.items()}
    return _own_side_by_side(block)


def _own_side_by_side(block: nn.Module) -> dict[str, nn.Parameter]:
    """The block's own raw weights holding every expert side by side (two or more), scored by a router among its
    children (remote code that keeps them on the block and views them per expert)."""
    own = {n: p for n, p in block.named_parameters(recurse=False) if p.dim() == 2}
    inside = {id(p) for p in own.values()}
    routers = {tuple(w.shape) for w in block.parameters() if w.dim() == 2 and id(w) not in inside}
    for experts, hidden in routers:
        found = {n: p for n, p in own.items() if experts >= 2 and side_by_side(p.shape, experts, hidden)}
        if len(found) >= 2:
            return found
    return {}


def parameter_list(module: nn.Module) -> list[nn.Parameter] | None:
    """The entries of a list of parameters of one shape (``nn.ParameterList``): a module with no children holding
    nothing but two or more parameters named ``0`` … ``n - 1``; None for any other module."""
    params = dict(module.named_parameters(recurse=False))
    if next(module.children(), None) is not None or len(params) < 2 or set(params) != {str(i) for i in range(len(
            params))}:
        return None
    entries = [params[str(i)] for i in range(len(params))]
    return entries if len({tuple(p.shape) for p in entries}) == 1 else None


def listed_weights(block: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Lists of one 2-D weight per expert (``self.w_in[e]``), by path, with a router beside them in the block.

    The lists are children of the block, or sit in a child holding nothing but such lists (an experts module a level
    or two down); each holds E matrices of one shape, E the same for all, and the block holds, outside the lists, a
    router-shaped ``[E, H]`` weight (or ``[H, E]``, as code multiplying by it stores it), H a side of the matrices.
    Entry ``e`` of a list is then what slice ``e`` of packed ``[E, a, b]`` storage is (``detect/listed.py``).
    """
    found = {path: entries for path, entries in _parameter_lists(block).items() if entries[0].dim() == 2}
    if len({len(entries) for entries in found.values()}) != 1:
        return {}
    inside = {id(p) for entries in found.values() for p in entries}
    shapes = [tuple(w.shape) for w in block.parameters() if w.dim() == 2 and id(w) not in inside]
    experts, sides = len(next(iter(found.values()))), {s for e in found.values() for s in e[0].shape}
    return found if any(s[i] == experts and s[1 - i] in sides for s in shapes for i in (0, 1)) else {}


def listed_biases(block: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Lists of one 1-D bias per expert beside ``listed_weights`` (``F.linear(x, self.w[e], self.b[e])``)."""
    weights = listed_weights(block)
    experts = {len(entries) for entries in weights.values()}
    return {path: entries for path, entries in _parameter_lists(block).items()
            if entries[0].dim() == 1 and len(entries) in experts}


def _parameter_lists(block: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Lists of parameters (``parameter_list``) among the block's children, or in a child holding nothing but
    such lists, by path."""
    found: dict[str, list[nn.Parameter]] = {}
    for name, child in block.named_children():
        entries = parameter_list(child)
        if entries is not None:
            found[name] = entries
            continue
        inner = {path: parameter_list(m) for path, m in child.named_modules() if path}
        inner = {path: entries for path, entries in inner.items() if entries is not None}
        if inner and {id(p) for e in inner.values() for p in e} == {id(p) for p in child.parameters()}:
            found |= {f"{name}.{path}": entries for path, entries in inner.items()}
    return found


def stored_shape(block: nn.Module, path: str) -> torch.Size:
    """The shape of the expert weight at ``path``: the parameter's, or ``[E, a, b]`` for a list of E ``[a, b]``
    weights (``parameter_list``)."""
    found = resolve(block, path)
    entries = parameter_list(found) if isinstance(found, nn.Module) else None
    return torch.Size((len(entries), *entries[0].shape)) if entries else found.shape


def resolve(module: nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


