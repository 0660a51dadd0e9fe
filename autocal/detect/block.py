"""Passes for blocks that dispatch tokens themselves (block-level rewrite).

Here the experts are modules of their own (a ``ModuleList`` or ``ModuleDict`` of
identical MLPs) and the block's forward gathers each expert's rows and calls it.
The passes read the block's symbolic graph, annotated with values:

1. ``expert_lists`` — lists that hold two or more structurally identical
   modules whose weights all live in Linear layers (``detect/linear_like.py``);
2. ``expert_calls`` — the graph's calls of those modules;
3. ``row_gather`` — for each call, the full token tensor its input rows were
   gathered from and the token index, so calibration can run the expert on the
   rest of the tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import fx, nn

from .. import errors
from ..trace.inputs import BlockCall
from ..trace.record import record
from ..trace.symbolic import annotate, trace_block
from .entry_template import entry_template, own_weights
from .linear_like import linear_modules, linear_views, lookup_tables, made_of_linears
from .linears import describe
from .graph_utils import is_int_tensor, returns_of, source_of, target_name, value
from .router import analyze_router
from .plans import BlockRewritePlan, NoMatch
from .structure import BlockRewrite, ExpertCall, ExpertsInfo, MoEStructure

if TYPE_CHECKING:  # facts.py reads this module's candidate tests
    from .facts import Facts

__all__ = ["expert_lists", "unrouted_lists", "expert_calls", "row_gather", "detect_block_level", "module_experts_info"]

_VIEW_OPS = {"reshape", "view", "squeeze", "unsqueeze", "flatten", "contiguous", "to"}
_INDEX_SPREAD = {"expand", "expand_as", "view", "reshape", "unsqueeze", "repeat"}  # a row index spread over features


def _signature(module: nn.Module) -> tuple:
    return type(module), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def _scores_experts(block: nn.Module, experts: nn.Module, counts: set[int], lookups: bool = True) -> bool:
    """Does a weight outside ``experts`` produce one score per expert (a router), for one of ``counts``? Without
    ``lookups``, embedding tables do not count."""
    inside = {id(p) for p in experts.parameters()} | (set() if lookups else lookup_tables(block))
    return any(len(counts & set(scores)) > 0 for p, scores in router_candidates(block) if id(p) not in inside)


def router_candidates(module: nn.Module) -> Iterator[tuple[torch.Tensor, tuple[int, ...]]]:
    """``(weight, possible expert counts)`` for each 2-D weight of ``module``: a Linear's scores its rows; a raw
    parameter may be used either way round (``x @ w_gate`` with ``w_gate [H, E]``, as research code writes). A
    weight ``[out, in, 1, ...]`` (a kernel-1 convolution, as code that keeps features first routes with) maps each
    position's features alone, a Linear's: it scores its ``out`` rows. A 2-D floating buffer ``[E, H]`` scores its
    rows too: fixed vectors, one per expert, that tokens are compared with (cluster centroids, the router of a
    model whose routing is not learned: ``torch.cdist(x, centroids)``)."""
    linear_weights = {id(m.weight) for m in module.modules() if isinstance(m, nn.Linear)}
    for p in module.parameters():
        if p.dim() == 2:
            yield p, (p.shape[0],) if id(p) in linear_weights else tuple(p.shape)
        elif p.dim() > 2 and set(p.shape[2:]) == {1}:
            yield p, (p.shape[0],)
    for b in module.buffers():
        if b.dim() == 2 and b.is_floating_point():
            yield b, (b.shape[0],)


def _expert_counts(container: nn.Module, entries: list[nn.Module]) -> set[int]:
    """How many experts a router over ``container`` may score: its identical entries, or with the children that
    hold no parameters (a zero or identity expert, which needs no calibration)."""
    empty = [m for m in container.children() if next(m.parameters(), None) is None]
    return {len(entries), len(entries) + len(empty)}


def identical_entries(container: nn.Module) -> list[nn.Module]:
    """The largest group of structurally identical children (a dropout beside the experts is not one)."""
    groups: dict[tuple, list[nn.Module]] = {}
    for child in container.children():
        groups.setdefault(_signature(child), []).append(child)
    return max(groups.values(), key=len) if groups else []


def routed_entries(block: nn.Module, container: nn.Module, holder: nn.Module) -> list[nn.Module]:
    """The experts of a list: its identical entries, or every entry made of Linears where a router beside
    ``holder`` scores that many (experts of different widths or depths: each is still one expert). None where
    entries of other kinds are made of Linears too, unscored (each expert's projections side by side in one list,
    ``experts_{i}_gate_proj`` …): the largest group of one kind would not be the experts."""
    entries = identical_entries(container)
    every = [m for m in container.children() if made_of_linears(m, norms=True)]
    if len(every) > len(entries):
        return every if _scores_experts(block, holder, _expert_counts(container, every)) else []
    return entries


def _lists_in(block: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(path, list, holder)``: the block's ``ModuleList`` / ``ModuleDict`` children, and those one level down in
    a child that holds nothing else (``self.experts.experts[i]``, or a module whose own forward runs its list).

    ``holder`` is the block's child the list is in (the list itself, or that child): a router must sit outside it.
    """
    for name, child in block.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)):
            yield name, child, child
            continue
        for inner, grandchild in child.named_children():
            if isinstance(grandchild, (nn.ModuleList, nn.ModuleDict)) and _holds_only(child, grandchild):
                yield f"{name}.{inner}", grandchild, child


def _holds_only(holder: nn.Module, member: nn.Module) -> bool:
    """Are all of ``holder``'s parameters and buffers ``member``'s?"""
    inside = {id(t) for t in (*member.parameters(), *member.buffers())}
    return all(id(t) in inside for t in (*holder.parameters(), *holder.buffers()))


def expert_lists(block: nn.Module) -> dict[str, list[nn.Module]]:
    """Lists (by path) holding at least two identical experts made of Linears, next to a router.

    The router is recognised by its shape alone: a weight with one output row per expert.
    """
    found = {}
    for path, container, holder in _lists_in(block):
        entries = identical_entries(container)
        if len(entries) >= 2 and _routed_experts(block, holder, entries, _expert_counts(container, entries)):
            found[path] = entries
    return found


def _routed_experts(block: nn.Module, holder: nn.Module, entries: list[nn.Module], counts: set[int]) -> bool:
    """Are ``entries`` experts made of Linears (or of their own weights) with a router beside them? Experts holding
    a norm need a router that is no lookup table: a list of encoder layers beside a table is no MoE."""
    if made_of_linears(entries[0]) or own_weights(entries[0]):
        return _scores_experts(block, holder, counts)
    return made_of_linears(entries[0], norms=True) and _scores_experts(block, holder, counts, lookups=False)


def unrouted_lists(block: nn.Module) -> dict[str, list[nn.Module]]:
    """Containers with a forward of their own over identical entries made of Linears, with no router beside them.

    Candidates only: such a container is an MoE when detection finds each entry
    run on the whole input and its output gated per row (experts chosen by an
    input index, or soft-weighted); otherwise it is left alone.
    """
    found = {}
    for name, child in block.named_children():
        if isinstance(child, (nn.ModuleList, nn.ModuleDict)) and has_own_forward(child):
            entries = identical_entries(child)
            if len(entries) >= 2 and made_of_linears(entries[0]) and not _scores_experts(
                    block, child, _expert_counts(child, entries)):
                found[name] = entries
    return found


def other_children(block: nn.Module, *taken: str | None) -> list[str]:
    """The block's children that hold none of ``taken`` (the router, the experts) and compute with weights of
    their own: its shared modules. An activation (``act_fn``) or a holder of statistics the block reads (no
    forward of its own: ``moe_statics``) is none."""
    tops = {path.split(".")[0] for path in taken if path}
    return [name for name, child in block.named_children() if name not in tops and _computes(child)]


def _computes(module: nn.Module) -> bool:
    return type(module).forward is not nn.Module.forward and any(True for _ in module.parameters())


def has_own_forward(container: nn.Module) -> bool:
    """Is this list of experts also called, with a dispatch loop of its own?"""
    return type(container).forward not in (nn.ModuleList.forward, nn.ModuleDict.forward, nn.Module.forward)


def expert_calls(graph: fx.Graph, lists: dict[str, list[nn.Module]]) -> list[fx.Node]:
    """Graph calls of the entries of ``lists``."""
    return [
        n for n in graph.nodes
        if n.op == "call_module" and n.target.rpartition(".")[0] in lists
    ]


def _index_position(index) -> tuple[int, fx.Node] | None:
    """The dimension a row index selects along, skipping ``None`` entries, and the index node."""
    entries = index if isinstance(index, tuple) else (index,)
    dim = 0
    for entry in entries:
        if isinstance(entry, fx.Node) and is_int_tensor(entry):
            return dim, entry
        if entry is not None:
            dim += 1
    return None


def row_gather(call: fx.Node, masks: bool = False) -> tuple[fx.Node, fx.Node]:
    """``(source, tokens)``: the expert's input is ``source[tokens]`` (up to views).

    ``tokens`` indexes the rows of a 2-D ``source``; with ``masks``, it may also be a
    boolean mask over all leading dimensions of ``source`` (``x[mask]`` on
    ``[batch, seq, hidden]``), which the callers flatten.
    """
    found = gathered_rows(call.args[0], masks)
    if found is not None:
        return found
    raise errors.AutocalError(
        errors.UNSUPPORTED_DISPATCH,
        "an expert's input is not a set of rows gathered from the token hidden states",
        source=source_of(call),
    )


def gathered_rows(rows: Any, masks: bool = False) -> tuple[fx.Node, fx.Node] | None:
    """``(source, tokens)`` if the tensor of node ``rows`` is ``source[tokens]`` (up to views), else None."""
    node = rows
    while isinstance(node, fx.Node) and target_name(node) in _VIEW_OPS:
        node = node.args[0]
    if isinstance(node, fx.Node) and target_name(node) in ("getitem", "__getitem__", "index_select", "gather"):
        source = node.args[0]
        found = _selected_rows(node)
        src = value(source) if isinstance(source, fx.Node) else None
        if found and found[0] == 0 and isinstance(src, torch.Tensor) and (src.dim() == 2 or masks and _mask_of(
                found[1], src)):
            tokens = found[1]
            if torch.equal(value(rows).reshape(-1, src.shape[-1]), src[value(tokens)]):
                return source, tokens
    return None


def _selected_rows(node: fx.Node) -> tuple[int, Any] | None:
    """``(dimension, index)`` an indexing node selects by; a ``gather`` along dimension 0 whose index repeats one
    row index along the features (``torch.gather(x, 0, idx[:, None].expand(-1, H))``) selects rows by that ``idx``."""
    name = target_name(node)
    if name == "index_select":
        return 0, node.args[2]
    if name != "gather":
        return _index_position(node.args[1])
    given = [*node.args[1:3], None, None]
    dim, index = node.kwargs.get("dim", given[0]), node.kwargs.get("index", given[1])
    while isinstance(index, fx.Node) and value(index).dim() > 1 and target_name(index) in _INDEX_SPREAD:
        index = index.args[0]
    if dim != 0 or not isinstance(index, fx.Node) or value(index).dim() != 1:
        return None
    return 0, index


def _mask_of(index: fx.Node, source: torch.Tensor) -> bool:
    """Is ``index`` a boolean mask over every dimension of ``source`` but the last?"""
    mask = value(index)
    return isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and tuple(mask.shape) == tuple(source.shape[:-1])


def _routing_weight(call: fx.Node) -> fx.Node | None:
    """The tensor an expert's output is multiplied by, if it is multiplied right away; a factor computed from
    parameters alone (a per-expert output scale, ``expert(x) * self.scale[e]``) is passed over."""
    node = call
    while True:
        product = next((u for u in node.users if target_name(u) in ("mul", "__mul__", "__rmul__")), None)
        others = [a for a in product.all_input_nodes if a is not node] if product is not None else []
        if not others:
            return None
        if _from_inputs(others[0]):
            return others[0]
        node = product


def _from_inputs(node: fx.Node) -> bool:
    """Is ``node`` computed from an input of the recording (not from parameters and constants alone)?"""
    frontier, seen = [node], set()
    while frontier:
        part = frontier.pop()
        if part.op == "placeholder":
            return True
        if part not in seen:
            seen.add(part)
            frontier += part.all_input_nodes
    return False


def _router_from_recording(block: nn.Module, call: BlockCall, entries: list[nn.Module]):
    """Router facts from a concrete recording (with the experts as leaves), where the router's own ops show."""
    with torch.no_grad():
        rec = record(block, call.args, call.kwargs, leaves=entries)
    paths = {id(m): p for p, m in block.named_modules()}
    expert_paths = {paths[id(e)] for e in entries}
    first = next((n for n in rec.graph.nodes if n.op == "call_module" and n.target in expert_paths), None)
    if first is None:
        return None
    try:
        _, tokens = row_gather(first)
    except errors.AutocalError:
        return None
    weight = _routing_weight(first)
    return analyze_router(rec.graph, tokens, weight if weight is not None else tokens)


def _expert_computation(expert: nn.Module, call: fx.Node) -> str:
    """One expert's forward in readable form, e.g. ``w2((silu(w1(x)) * w3(x)))``, run on the inputs of its
    recorded ``call`` (the rows, and whatever else the block hands it)."""
    linears = [expert.get_submodule(path) for path in linear_modules(expert) if path]
    args, kwargs = fx.node.map_arg((call.args, call.kwargs), value)
    with torch.no_grad():
        rec = record(expert, args, kwargs, leaves=linears)
    for node in rec.graph.nodes:
        if node.op == "placeholder":
            node.target = "x"
    return describe(rec.graph) if linears else type(expert).__name__


def module_experts_info(name: str, container: nn.Module, entries: list[nn.Module], call: fx.Node,
                        weights_applied: str, call_roles: dict[str, str] | None = None) -> ExpertsInfo:
    """Facts about experts that are modules of their own, from one recorded call of the first."""
    rows = value(call.args[0])
    template = None if made_of_linears(entries[0], norms=True) else entry_template(entries[0], rows)
    return ExpertsInfo(
        module_path=name,
        num_experts=len(entries),
        storage=type(container).__name__,
        layout={"expert_class": type(entries[0]).__name__,
                "linears": [r.name for r in template.linears] if template else linear_modules(entries[0])},
        computation=template.computation if template else _expert_computation(entries[0], call),
        weights_applied=weights_applied,
        call_roles=call_roles or {},
        output_features=_first_tensor(value(call)).shape[-1],
        accumulate_dtype=None,
        output_dtype=None,
        sources={"expert_call": source_of(call)} if source_of(call) else {},
        linear_views=[f"{name}.{path}" for path in linear_views(container, entries)],
        template=template,
    )


def _first_tensor(output: Any) -> torch.Tensor:
    """An expert's output, or the first of the tensors it returns (an expert returning (output, pre-activation))."""
    return next(o for o in output if isinstance(o, torch.Tensor)) if isinstance(output, (tuple, list)) else output


def detect_block_level(facts: Facts) -> BlockRewritePlan | NoMatch:
    """``block``: the block gathers each expert's rows and calls it, in code fx traces."""
    block, name, entries = facts.block, facts.list_name, facts.entries
    container = block.get_submodule(name)
    call = facts.inputs(container, max(16, 4 * len(entries)))
    try:
        graph = trace_block(block)
    except Exception as error:  # fx raises many kinds; each means the same thing here
        return NoMatch(f"the block dispatches to its experts in code fx cannot trace "
                       f"({type(error).__name__}: {str(error).splitlines()[0]})", shallow=True)
    output = annotate(block, graph, call.args, call.kwargs)
    calls = expert_calls(graph, {name: entries})
    if not calls:
        return NoMatch(f"the forward never calls the modules in `{name}`", kind=errors.NO_MOE_BLOCK)
    names = [n for n, _ in container.named_children()]
    gathered = []
    for node in calls:
        found = gathered_rows(node.args[0])
        if found is None:
            return NoMatch("an expert's input is not a set of rows gathered from the token hidden states",
                           source_of(node), shallow=True)
        gathered.append(ExpertCall(node, names.index(node.target.rpartition(".")[2]), *found))
    weight = _routing_weight(calls[0])
    router = _router_from_recording(block, call, entries) or analyze_router(
        graph, gathered[0].tokens, weight if weight is not None else gathered[0].tokens)
    if router.num_choices < 2:
        return NoMatch("no top-k over two or more experts selects the expert rows", source_of(calls[0]),
                       kind=errors.NO_MOE_BLOCK)
    experts = module_experts_info(name, container, entries, calls[0],
                                  "on the expert output, in the block" if weight is not None else "not found")
    for node in graph.nodes:  # the graph becomes the new forward: drop the example values
        node.meta.pop("value", None)
    structure = MoEStructure(
        block_class=type(block).__name__,
        router=router,
        experts=experts,
        shared_modules=other_children(block, *facts.lists, router.module_path),
        returns=returns_of(output),
    )
    return BlockRewritePlan(structure, BlockRewrite(graph, gathered))
