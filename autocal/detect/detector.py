"""Find MoE blocks and run the detection passes on one of them.

A block is found by what it holds and what its forward does: a child whose
parameters are stored one entry per expert (a *packed experts container*), and
a selection op (``topk``, ``argmax``, ``sort``) whose indices reach that
container's call. Nothing here reads class names or config attributes.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import torch
from torch import fx, nn

from .. import errors
from ..integrations.transformers import declared_routers, eager_experts
from ..trace.inputs import BlockCall, capture_block_inputs
from ..trace.record import Recording, record
from ..trace.twin import cpu_twin, on_meta
from .block import Untraceable, detect_block_level, expert_lists, has_own_forward, unrouted_lists
from .container import detect_module_container, detect_recorded_block
from .dense import detect_dense
from .gathered import NoRoutedGathers, detect_gathered, expert_tables, own_expert_weights
from .masked import detect_mask_dispatch
from .experts import ExpertsRecording, analyze_experts, count_experts, packed_parameters, router_rows
from .graph_utils import Ancestry, bound_inputs, returns_of, value
from .router import analyze_router
from .sorted import banks_of_a_child, detect_sorted, weight_banks
from .structure import ExpertsInfo, MoEStructure

__all__ = ["find_moe_blocks", "experts_container", "detect", "unrecognized_experts"]


def experts_container(block: nn.Module) -> tuple[str, nn.Module] | None:
    """The block's child that stores expert weights packed, if any.

    A child with a router-shaped weight of its own, in a module holding nothing
    beside it, is a block (``own_expert_weights``) that the module only wraps.
    """
    for name, child in block.named_children():
        inside = {id(t) for t in (*child.parameters(), *child.buffers())}
        wraps = not any(id(t) not in inside for t in (*block.parameters(), *block.buffers()))
        if packed_parameters(child, router_rows(block, child)) and not (wraps and own_expert_weights(child)):
            return name, child
    return None


def find_moe_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(path, block)`` for every module holding experts: packed, or a list of identical MLPs.

    Candidates only: ``detect`` confirms that the forward routes tokens to them.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, module in modules.items():  # a block reached twice is listed twice
        parent = modules.get(path.rpartition(".")[0], model) if path else None
        if experts_container(module) is not None or expert_lists(module) or unrouted_lists(module) or (
                _routed_banks(module, parent)) or (own_expert_weights(module) and not _container_of(parent, module)) or (
                expert_tables(module)):
            yield path, module


def _container_of(parent: nn.Module | None, module: nn.Module) -> bool:
    found = experts_container(parent) if parent is not None else None
    return found is not None and found[1] is module


def _routed_banks(block: nn.Module, parent: nn.Module | None) -> bool:
    """Weight banks (``detect/sorted.py``) with a router of as many rows beside them, in the block or its parent."""
    banks = weight_banks(block)
    if not banks:
        return False
    inside = {id(p) for p in banks.values()}
    rows = {p.shape[0] for p in block.parameters() if p.dim() == 2 and id(p) not in inside}
    rows |= router_rows(parent, block) if parent is not None else set()
    return next(iter(banks.values())).shape[0] in rows


def unrecognized_experts(model: nn.Module, blocks: list[str]) -> list[tuple[str, str, str]]:
    """``(block path, module path, what)`` for experts outside every recognised block.

    Two signs of experts, so that none is skipped silently: a parameter of 3 or
    more dimensions whose leading size is the row count of a router-shaped
    weight beside it, and a module the model itself declares as producing
    router logits (transformers' output recorders).
    """
    found = []
    modules = dict(model.named_modules(remove_duplicate=False))
    for path, module in modules.items():
        if type(module).__module__.startswith("torch.nn.") or any(_within(path, b) for b in blocks):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() < 3 or param.shape[0] < 2:
                continue
            owner = next((a for a in _ancestors(path, 2) if _scored_by_router(modules.get(a, model), module, param)),
                         None)  # the router may sit one level further up (experts split into fc1/fc2 containers)
            if owner is not None:
                found.append((owner, path, f"`{name}` {tuple(param.shape)} stores weights per expert"))
                break
    flagged = [b for b, _, _ in found]
    for path in declared_routers(model):
        module = modules[path]
        block = path if any(any(True for _ in c.parameters()) for c in module.children()) else path.rpartition(".")[0]
        if not any(_within(path, b) or _within(b, path) for b in blocks + flagged):  # a block inside counts
            found.append((block, path, f"`{type(module).__name__}` produces router logits (the model declares it)"))
            flagged.append(block)
    return found


def _ancestors(path: str, levels: int) -> list[str]:
    """The paths of the ``levels`` modules above ``path``, nearest first (``""``: the model)."""
    found = []
    while path and len(found) < levels:
        path = path.rpartition(".")[0]
        found.append(path)
    return found


def _scored_by_router(owner: nn.Module, module: nn.Module, param: torch.Tensor) -> bool:
    """Is there, beside ``module``, a router-shaped weight ``[E, H]`` for these ``[E, …, H, …]`` weights?"""
    inside = {id(p) for p in module.parameters()}
    return any(
        w.dim() == 2 and w.shape[0] == param.shape[0] and w.shape[1] in param.shape[1:]
        for w in owner.parameters() if id(w) not in inside
    )


def _within(path: str, block: str) -> bool:
    return block == "" or path == block or path.startswith(block + ".")


def _container_call(rec: Recording, name: str) -> fx.Node | None:
    calls = [n for n in rec.graph.nodes if n.op == "call_module" and n.target == name]
    return calls[0] if calls else None


def _roles(bound: dict[str, Any], call: fx.Node) -> dict[str, str]:
    """Which of the container's forward parameters holds hidden states, indices and weights."""
    tensors = {k: v for k, v in bound.items() if isinstance(v, torch.Tensor)}
    index = [k for k, v in tensors.items() if not v.is_floating_point()]
    floats = [k for k, v in tensors.items() if v.is_floating_point()]
    if len(index) != 1 or len(floats) != 2:
        raise errors.AutocalError(
            errors.UNSUPPORTED_DISPATCH,
            "the experts are not called with (hidden states, expert indices, routing weights)",
            source=call.meta.get("source"),
        )
    index_shape = tensors[index[0]].shape
    weights = [k for k in floats if tensors[k].shape == index_shape]
    hidden = [k for k in floats if k not in weights]
    if len(weights) != 1 or len(hidden) != 1:
        raise errors.AutocalError(
            errors.UNSUPPORTED_DISPATCH,
            "no routing-weight input matches the shape of the expert indices",
            source=call.meta.get("source"),
        )
    return {"hidden": hidden[0], "index": index[0], "weights": weights[0]}


def _record_container(container: nn.Module, bound: dict[str, Any], roles: dict[str, str]) -> ExpertsRecording:
    with torch.no_grad():
        rec = record(container, (), bound)
    return ExpertsRecording(rec.graph, container, *(rec.inputs[roles[r]] for r in ("hidden", "index", "weights")))


def detect(block: nn.Module, call: BlockCall | None = None, *, num_tokens: int | None = None) -> MoEStructure:
    """Run every detection pass on ``block``; raises ``AutocalError`` when it cannot.

    Args:
        block: an MoE block (a module with a packed experts container child).
        call: example inputs; synthesized from the block's parameters if None.
        num_tokens: tokens in synthesized inputs (default: enough to reach most experts).
    """
    hooked = [name or "<block>" for name, m in block.named_modules() if "forward" in m.__dict__]
    if hooked:
        raise errors.AutocalError(
            errors.HOOKED_MODULE,
            f"{', '.join(hooked[:3])} run a replaced forward (an offload or dispatch hook, as accelerate adds)",
            block_class=type(block).__name__,
            hints=["convert the model before dispatching or offloading it (load it on the CPU or the meta "
                   "device, autocal.convert, then dispatch)"],
        )
    if on_meta(block):  # no data to run on: detect on a CPU twin, synthesize on the block itself
        return detect(cpu_twin(block), None, num_tokens=num_tokens or 16)
    found = experts_container(block)
    if found is not None:
        return _detect_packed(block, *found, call, num_tokens)
    banks = weight_banks(block)
    if banks:
        return _detect_banks(block, banks, call, num_tokens)
    lists = expert_lists(block) or unrouted_lists(block)
    if lists:
        name, entries = next(iter(lists.items()))
        container = block.get_submodule(name)
        if has_own_forward(container):
            unrouted = not expert_lists(block)
            try:
                call = call or capture_block_inputs(block, container, num_tokens=num_tokens or max(16, 4 * len(entries)))
            except errors.AutocalError as error:  # identical layers with no router beside them prove no MoE
                if unrouted and error.kind == errors.TRACE_FAILED:
                    raise errors.NotAnMoE(type(block).__name__) from error
                raise
            return detect_module_container(block, name, container, entries, call, unrouted=unrouted)
        call = call or capture_block_inputs(block, container, num_tokens=num_tokens or max(16, 4 * len(entries)))
        try:
            return detect_block_level(block, lists, call, num_tokens)
        except errors.AutocalError as symbolic:  # fx could not trace it, or its graph is not a row dispatch
            try:
                return detect_recorded_block(block, name, entries, call)
            except errors.AutocalError as error:
                try:
                    return detect_mask_dispatch(block, name, entries, call)
                except errors.AutocalError:
                    pass  # not a mask dispatch either: the row-dispatch error says more
                if isinstance(symbolic, Untraceable):
                    error.explanation = f"{error.explanation} (recorded, since {symbolic.explanation})"
                raise error.with_context(block_class=type(block).__name__)
    banks = banks_of_a_child(block)  # a block that uses its experts through a child's other methods
    if banks:
        return _detect_banks(block, banks, call, num_tokens)
    if own_expert_weights(block):
        return detect_gathered(block, call or capture_block_inputs(block, block, num_tokens=num_tokens or 32))
    if expert_tables(block):
        return _detect_tables(block, call, num_tokens)
    raise errors.AutocalError(errors.NO_MOE_BLOCK, "no child stores experts (packed, or a list of identical MLPs)",
                              block_class=type(block).__name__)


def _detect_banks(block: nn.Module, banks: dict[str, nn.Parameter], call: BlockCall | None,
                  num_tokens: int | None) -> MoEStructure:
    first = block.get_submodule(next(iter(banks)))
    return detect_sorted(block, banks, call or capture_block_inputs(block, first, num_tokens=num_tokens or 16))


def _detect_packed(block: nn.Module, name: str, container: nn.Module, call: BlockCall | None,
                   num_tokens: int | None) -> MoEStructure:
    """Experts-level detection: the block calls a packed container with indices and weights."""
    rows = router_rows(block, container)
    packed = packed_parameters(container, rows)
    num_experts = count_experts(packed, rows)
    with eager_experts(block):
        call = call or capture_block_inputs(block, container, num_tokens=num_tokens or max(16, 4 * num_experts))
        with torch.no_grad():
            block_rec = record(block, call.args, call.kwargs, leaves=[container])
        container_call = _container_call(block_rec, name)
        if container_call is None:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"the forward never calls `{name}`",
                                      block_class=type(block).__name__)
        if sum(isinstance(value(a), torch.Tensor) for a in (*container_call.args, *container_call.kwargs.values())) == 1:
            return detect_dense(block, name, container, call, container_call, packed, num_experts)
        bound = bound_inputs(container, container_call)
        try:
            roles = _roles(bound, container_call)
        except errors.AutocalError as not_weighted:  # perhaps (hidden, indices): weights gathered per token
            return _gathered_or(not_weighted, block, call)
        index_node = _arg_node(container, container_call, roles["index"])
        weights_node = _arg_node(container, container_call, roles["weights"])
        router = analyze_router(block_rec.graph, index_node, weights_node)
        if router.num_choices < 2:  # indices from a lookup (hash routing), not a top-k over scores
            router.num_choices = num_experts
        experts_rec = _record_container(container, bound, roles)
    template, layout, sources = analyze_experts(experts_rec, packed, num_experts)
    if router.num_choices > num_experts:  # run by the original container (see CalibrationExperts._weightless)
        layout["choices_without_weights"] = router.num_choices - num_experts
    hidden_dtype = value(experts_rec.hidden).dtype
    experts = ExpertsInfo(
        module_path=name,
        num_experts=num_experts,
        storage="packed",
        layout=layout,
        computation=template.computation,
        weights_applied="inside experts (on the expert output)" if template.uses_routing_weight else "outside experts",
        call_roles=roles,
        output_features=value(container_call).shape[-1],
        accumulate_dtype=_relative_dtype(template.output_dtype, hidden_dtype),
        output_dtype=_relative_dtype(value(container_call).dtype, hidden_dtype),
        sources={k: v for k, v in sources.items() if v},
    )
    shared = _shared_modules(block_rec, container_call)
    return MoEStructure(
        block_class=type(block).__name__,
        level="experts",
        router=router,
        experts=experts,
        shared_modules=shared,
        returns=returns_of(block_rec.output),
        template=template,
    )


def _detect_tables(block: nn.Module, call: BlockCall | None, num_tokens: int | None) -> MoEStructure:
    """Embedding tables as experts; a block whose routing does not gather them is not an MoE."""
    try:
        call = call or capture_block_inputs(block, block, num_tokens=num_tokens or 32)
        return detect_gathered(block, call)
    except errors.AutocalError as error:
        if error.kind == errors.TRACE_FAILED or isinstance(error, NoRoutedGathers):
            raise errors.NotAnMoE(type(block).__name__) from error
        raise


def _gathered_or(error: errors.AutocalError, block: nn.Module, call: BlockCall) -> MoEStructure:
    """Detection for gathered expert weights; ``error`` if the block gathers none."""
    try:
        return detect_gathered(block, call)
    except NoRoutedGathers as gathered:
        raise (gathered if gathered.gathered else error) from None


def _relative_dtype(dtype: torch.dtype, hidden: torch.dtype) -> str | None:
    """None when ``dtype`` follows the hidden states' dtype, else its name."""
    return None if dtype == hidden else str(dtype).removeprefix("torch.")


def _arg_node(container: nn.Module, call: fx.Node, param: str) -> fx.Node:
    names = list(inspect.signature(container.forward).parameters)
    if param in call.kwargs:
        return call.kwargs[param]
    return call.args[names.index(param)]


def _shared_modules(rec: Recording, container_call: fx.Node) -> list[str]:
    """Top-level children that run on every token, apart from the routing and the experts."""
    ancestry = Ancestry(rec.graph)
    routing = {_top(n) for n in ancestry.of(container_call)} | {container_call.target}
    paths = []
    for node in rec.graph.nodes:
        top = _top(node)
        if top and top not in routing and top not in paths:
            paths.append(top)
    return paths


def _top(node: fx.Node) -> str:
    path = node.target if node.op == "call_module" else node.meta.get("module_path") or ""
    return path.split(".")[0]
