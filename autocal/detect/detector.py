"""Experts outside every recognised block: reported, never skipped silently.

The rules (``autocal/rules.py``) decide which modules are blocks and how each
is rewritten. This module looks at what is left: weights stored per expert, or
a module the model declares as producing router logits, that no recognised
block holds. ``convert`` refuses such a model; ``explain`` lists them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..trace.hf import declared_routers
from ..trace.inputs import synthesize_inputs
from .entry_template import own_weights
from .linear_like import lookup_tables, made_of_linears
from .storage import side_by_side

__all__ = ["unrecognized_experts"]

ROUTING_TOKENS = 16  # rows the owner of attribute experts is run on: enough that a top-k leaves some expert out


def unrecognized_experts(model: nn.Module, blocks: list[str]) -> list[tuple[str, str, str]]:
    """``(block path, module path, what)`` for experts outside every recognised block.

    Signs of experts, so that none is skipped silently: a parameter of 3 or
    more dimensions whose leading size is the row count of a router-shaped
    weight beside it; a list of two or more modules of one class beside a
    router-shaped weight with one row per entry, or an integer table of entry numbers (``_routed_lists``), or a module of
    flat weights ``[H, E * m]`` / ``[E * m, H]`` beside an ``[E, H]`` one (``_flat_experts``); two or more
    expert-like modules held as attributes, not in a list, beside such a weight, each sent some of the rows
    (``_attribute_experts``); and a module
    the model itself declares as producing router logits (transformers' output
    recorders).
    """
    found = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, module in modules.items():
        if type(module).__module__.startswith("torch.nn.") or any(_within(path, b) for b in blocks):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() < 3 or param.shape[0] < 2:
                continue
            owner = next((a for a in _ancestors(path, 2, modules, model)
                          if _scored_by_router(modules.get(a, model), module, param)),
                         None)  # the router may sit one level further up (experts split into fc1/fc2 containers)
            if owner is not None:
                found.append((owner, path, f"`{name}` {tuple(param.shape)} stores weights per expert"))
                break
    found += _routed_lists(modules, blocks + [b for b, _, _ in found])
    found += _flat_experts(modules, blocks + [b for b, _, _ in found])
    found += _attribute_experts(modules, blocks + [b for b, _, _ in found])
    flagged = [b for b, _, _ in found]
    for path in declared_routers(model):
        module = modules[path]
        block = path if any(any(True for _ in c.parameters()) for c in module.children()) else path.rpartition(".")[0]
        if not any(_within(path, b) or _within(b, path) for b in blocks + flagged):  # a block inside counts
            found.append((block, path, f"`{type(module).__name__}` produces router logits (the model declares it)"))
            flagged.append(block)
    return found


_NORMED = "modules made of Linears and norms"


def _routed_lists(modules: dict[str, nn.Module], blocks: list[str]) -> list[tuple[str, str, str]]:
    """``(owner path, list path, what)`` for each ``nn.ModuleList`` of 2+ expert-like modules of one class, or
    ``nn.ParameterList`` of 2+ weight matrices of one shape (one per expert), whose parent or grandparent (the
    router may sit beside the list's holder) holds, outside the list, a 2-D weight with one row per entry: the
    owner is the nearest that does. Experts holding a norm count beside a weight that is no lookup table."""
    found = []
    for path, module in modules.items():
        if not isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.ParameterList)) or len(module) < 2 or any(
                _within(path, b) for b in blocks):
            continue
        kinds = _list_kinds(module)
        if kinds is None:
            continue
        below = path
        for owner_path in _ancestors(path, 2):
            owner = modules.get(owner_path)
            if owner is None or any(_within(owner_path, b) for b in blocks):
                break
            tables = lookup_tables(owner) if kinds == _NORMED else set()
            router = next(((name, len(module) // w.shape[0]) for name, w in _beside(owner, modules[below]).items()
                           if _per_row(len(module), w.shape[0]) and id(w) not in tables), None)
            if router is not None:
                per_row = "entry" if router[1] == 1 else (f"{router[1]} entries (several to a row: each expert's "
                                                          "projections side by side, or expert sets in one list)")
                found.append((owner_path, path, f"`{path}` holds {len(module)} {kinds} beside "
                                                f"`{_join(owner_path, router[0])}`, a router-shaped weight with one "
                                                f"row per {per_row}{_scripted(module)}"))
                break
            table = _routing_table(owner, len(module))
            if table is not None:
                found.append((owner_path, path, f"`{path}` holds {len(module)} {kinds} beside `{table}`, an integer "
                                                f"table of their numbers (experts looked up by token id)"))
                break
            below = owner_path
    return found


def _per_row(entries: int, rows: int) -> bool:
    """Does a weight of ``rows`` rows score ``entries`` modules, one each, or each expert's two or three
    projection modules (kept side by side in one list: ``experts_{i}_gate_proj``, ``experts_{i}_up_proj`` …)?"""
    return rows >= 2 and entries % rows == 0 and entries // rows in (1, 2, 3)


def _scripted(entries: nn.Module) -> str:
    """Why no rule reads ``entries``, where they are TorchScript modules (no Python forward to record or hook)."""
    if any(isinstance(m, torch.jit.ScriptModule) for m in entries.children()):
        return ("; they are TorchScript modules (torch.jit.script), which autocal's recording and calibration hooks "
                "cannot see into: keep the experts as Python modules")
    return ""


def _routing_table(owner: nn.Module, entries: int) -> str | None:
    """The name of an integer buffer of ``owner``'s own, longer than its ``entries``, whose values are entry numbers,
    two or more of them: a table from token ids to experts (hash routing), no router weight beside it."""
    for name, buffer in owner.named_buffers(recurse=False):
        if (buffer.is_floating_point() or buffer.is_complex() or buffer.dtype == torch.bool or buffer.is_meta
                or buffer.numel() <= entries):
            continue
        if int(buffer.min()) >= 0 and int(buffer.max()) < entries and buffer.unique().numel() >= 2:
            return name
    return None


def _list_kinds(entries: nn.Module) -> str | None:
    """What makes ``entries`` look like a list of experts (two of one kind), in words; None: nothing does
    (decoder layers: attention, norms)."""
    if isinstance(entries, nn.ParameterList):
        shapes = [tuple(p.shape) for p in entries if p.dim() >= 2]
        return "weight matrices" if max((shapes.count(s) for s in shapes), default=0) >= 2 else None
    for kinds, like in (("modules", _expert_like), (_NORMED, lambda m: made_of_linears(m, norms=True))):
        classes = [type(m) for m in entries.children() if any(True for _ in m.parameters()) and like(m)]
        if max((classes.count(c) for c in classes), default=0) >= 2:
            return kinds
    return None


def _expert_like(module: nn.Module) -> bool:
    """An expert as the list rules read one (made of Linears or Linear-like modules, or of its own weights), or
    any module made of weight matrices and their biases only (a Linear class of its own that no rule reads yet):
    no norm, so a list of decoder layers is none."""
    return made_of_linears(module) or own_weights(module) or _weight_matrices(module)


def _weight_matrices(module: nn.Module) -> bool:
    """Are all of ``module``'s parameters matrices (2-D or more), or 1-D biases beside one in the same module?"""
    found = False
    for sub in module.modules():
        params = list(sub.parameters(recurse=False))
        matrices = [p for p in params if p.dim() >= 2]
        found = found or bool(matrices)
        if any(p.dim() < 2 and not any(p.shape[0] in m.shape for m in matrices) for p in params):
            return False
    return found


def _flat_experts(modules: dict[str, nn.Module], blocks: list[str]) -> list[tuple[str, str, str]]:
    """``(owner path, module path, what)`` for a module holding two or more raw 2-D weights of its own, each
    ``[H, E * m]`` or ``[E * m, H]`` (m >= 2), beside a router-shaped ``[E, H]`` weight: in its parent (the
    module holds only those weights: grouped-MLP views), or in the module's own children (the block keeps every
    expert's weights side by side in one tensor and views them per expert)."""
    found = []
    for path, module in modules.items():
        params = [p for p in module.parameters(recurse=False) if p.dim() == 2]  # raw weights, not a shared MLP's
        if (not path or type(module).__module__.startswith("torch.nn.") or len(params) < 2
                or any(_within(path, b) for b in blocks)):
            continue
        has_children = any(True for child in module.children() for _ in child.parameters())
        owner_path = path if has_children else path.rpartition(".")[0]
        if has_children:
            routers = {tuple(w.shape) for c in module.children() if not isinstance(c, nn.ModuleList)
                       for w in c.parameters(recurse=False) if w.dim() == 2 and w.shape[0] >= 2}
        elif any(_within(owner_path, b) for b in blocks) or len(params) != len(list(module.parameters())):
            continue
        else:
            routers = {tuple(w.shape) for w in _beside(modules[owner_path], module).values() if w.shape[0] >= 2}
        if any(sum(side_by_side(p.shape, experts, hidden) for p in params) >= 2 for experts, hidden in routers):
            found.append((owner_path, path, f"`{path or '<model>'}` holds weights of every expert side by side "
                                            f"beside a router-shaped weight"))
    return found


def _attribute_experts(modules: dict[str, nn.Module], blocks: list[str]) -> list[tuple[str, str, str]]:
    """``(owner path, first expert path, what)`` for a module holding two or more children of one class and shape,
    made of Linears, as attributes of its own (``setattr(self, f"expert_{i}", ...)``: no list holds them), beside
    a 2-D weight or floating buffer, outside them, with one row per such child and a width of theirs (``[E, H]``),
    and that calls one of them on fewer rows than it was given (``_routes_rows_among``, recorded: the structure
    alone matches a layer's per-stream gates too). Bare Linears are no such experts (an attention's projections)."""
    found = []
    for path, module in modules.items():
        if type(module).__module__.startswith("torch.nn.") or any(_within(path, b) for b in blocks):
            continue
        groups: dict[tuple, list[str]] = {}
        for name, child in module.named_children():
            if not isinstance(child, (nn.Linear, nn.ModuleList, nn.ModuleDict)) and made_of_linears(child):
                groups.setdefault(_kind(child), []).append(name)
        for names in (g for g in groups.values() if len(g) >= 2):
            first = modules[_join(path, names[0])]
            sizes = {d for p in first.parameters() for d in p.shape}
            inside = {id(t) for n in names for t in (*modules[_join(path, n)].parameters(),
                                                     *modules[_join(path, n)].buffers())}
            beside = [t for t in (*module.parameters(), *module.buffers())
                      if t.dim() == 2 and t.is_floating_point() and id(t) not in inside]
            if any(t.shape[0] == len(names) and t.shape[1] in sizes for t in beside) and _routes_rows_among(
                    module, [modules[_join(path, n)] for n in names]):
                found.append((path, _join(path, names[0]), f"`{path or '<model>'}` holds {len(names)} expert-like "
                                                           f"modules as attributes ({', '.join(names[:3])}, …) beside "
                                                           f"a router-shaped weight with one row per module, and sends each "
                                                           f"only some of its rows"))
                break
    return found


def _routes_rows_among(owner: nn.Module, children: list[nn.Module]) -> bool:
    """Does ``owner``, run on hidden states made from its parameters, call one of ``children`` on fewer rows than it
    was given? Experts held as attributes see the rows routed to them; modules of one class that all see every row
    (a layer's message gates, one per stream, beside a weight with a row per gate) do not. False where no such
    input runs ``owner`` and calls them: nothing recorded, nothing said."""
    rows: list[int] = []

    def record(_module: nn.Module, args: tuple) -> None:
        first = next((a for a in args if isinstance(a, torch.Tensor) and a.dim()), None)
        if first is not None:
            rows.append(first.numel() // first.shape[-1])

    def accepts(args: tuple) -> bool:
        rows.clear()
        handles = [child.register_forward_pre_hook(record) for child in children]
        try:
            with torch.no_grad():
                owner(*args)
        except Exception:  # noqa: BLE001 - any failure means: this input does not run it
            return False
        finally:
            for handle in handles:
                handle.remove()
        return bool(rows)

    args = synthesize_inputs(owner, children[0], accepts, num_tokens=ROUTING_TOKENS)
    return args is not None and any(count < args[0].numel() // args[0].shape[-1] for count in rows)


def _kind(module: nn.Module) -> tuple:
    return type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _beside(owner: nn.Module, entries: nn.Module) -> dict[str, torch.Tensor]:
    """2-D weights of ``owner`` itself and of its children other than the one holding ``entries`` (one level:
    where routers sit), by their path in ``owner``."""
    weights = {name: p for name, p in owner.named_parameters(recurse=False) if p.dim() == 2}
    for child_name, child in owner.named_children():
        if child is not entries and not isinstance(child, (nn.ModuleList, nn.ParameterList)):
            weights |= {f"{child_name}.{name}": p for name, p in child.named_parameters(recurse=False) if p.dim() == 2}
    return weights


def _ancestors(path: str, levels: int, modules: dict[str, nn.Module] | None = None,
               model: nn.Module | None = None) -> list[str]:
    """The paths of the ``levels`` modules above ``path``, nearest first (``""``: the model). Given the model's
    ``modules``, a module holding nothing but the one below it (a wrapper) is passed over, not counted."""
    found = []
    while path and len(found) < levels:
        below, path = path, path.rpartition(".")[0]
        if modules is None or not _wraps(modules.get(path, model), modules[below]):
            found.append(path)
    return found


def _wraps(module: nn.Module, inner: nn.Module) -> bool:
    """Are all of ``module``'s parameters ``inner``'s?"""
    inside = {id(p) for p in inner.parameters()}
    return all(id(p) in inside for p in module.parameters())


def _scored_by_router(owner: nn.Module, module: nn.Module, param: torch.Tensor) -> bool:
    """Is there, beside ``module``, a router-shaped weight ``[E, H]`` for these ``[E, …, H, …]`` weights?"""
    inside = {id(p) for p in module.parameters()}
    return any(
        w.dim() == 2 and w.shape[0] == param.shape[0] and w.shape[1] in param.shape[1:]
        for w in owner.parameters() if id(w) not in inside
    )


def _within(path: str, block: str) -> bool:
    return block == "" or path == block or path.startswith(block + ".")
