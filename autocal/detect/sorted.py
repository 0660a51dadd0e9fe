"""Sorted dispatch: tokens grouped by expert and run through *weight banks* (grouped GEMM).

Some blocks sort the routed rows by expert and call one module per projection
that holds every expert's weight ``[E, a, b]`` and takes the rows with each
expert's row count (``bank(rows, counts)``: Aria, Megablocks-style code). The
experts are then slices of several banks with ops of the block between them.

The block is recorded with the banks as leaves, and three things are taken
from the recording, each checked against it:

1. ``row_gather`` on the first bank's input: the token rows, replayed from the
   block inputs at run time (each expert's own rows are its segment of what the
   first bank was given; the rest of the token rows is what it was not);
2. how each bank applies ``W[e]`` (checked numerically);
3. the ops between consecutive banks, replayed on any rows (checked row-wise).

With calibration on, each expert's chain (bank slices and the ops between them)
then runs on the tokens it was not routed.

Where the ops between banks mix rows (attention experts: a query projection per
expert, attention, an output projection per expert), step 3 cannot hold; the
block is then re-run with the routing choice forced (``detect/reroute.py``).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch import fx, nn

from .. import errors
from ..trace.inputs import BlockCall, call_arguments, keyword_arguments
from ..trace.record import record
from ..trace.replay import SortedDispatch
from .block import _routing_weight, other_children, row_gather
from .graph_utils import returns_of, source_of, value
from .reroute import check_forced_routing, choice_call
from .router import analyze_router, routing_choice
from .plans import NoMatch, SortedBanksPlan
from .structure import ExpertsInfo, MoEStructure

if TYPE_CHECKING:  # facts.py reads this module's candidate tests
    from .facts import Facts

__all__ = ["weight_banks", "banks_of_a_child", "detect_banks", "detect_sorted"]


def weight_banks(block: nn.Module) -> dict[str, nn.Parameter]:
    """Children holding one ``[E, a, b]`` weight each (a, b >= 2) and called with two required inputs.

    Candidates only (the router beside them is checked by the caller): the
    recording then shows whether the second input is a row count per expert.
    """
    banks = {}
    for name, child in block.named_children():
        params = list(child.parameters())
        if type(child).__module__.startswith("torch.nn.") or len(params) != 1 or params[0].dim() != 3:
            continue
        if min(params[0].shape[1:]) >= 2 and _required_inputs(child) >= 2:
            banks[name] = params[0]
    sizes = {p.shape[0] for p in banks.values()}
    if not banks or len(sizes) != 1 or min(sizes) < 2:
        return {}
    return banks


def banks_of_a_child(block: nn.Module) -> dict[str, nn.Parameter]:
    """Weight banks one level further down, named from ``block`` (``experts.input_linear``).

    For experts the block uses through methods of a child other than its
    forward (``self.experts.map(x)`` … ``self.experts.reduce(y)``).
    """
    for name, child in block.named_children():
        banks = weight_banks(child)
        if banks:
            return {f"{name}.{bank}": weight for bank, weight in banks.items()}
    return {}


def _required_inputs(module: nn.Module) -> int:
    parameters = inspect.signature(module.forward).parameters.values()
    return sum(p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
               for p in parameters)


def _orientation(bank: nn.Module, weight: torch.Tensor, counts: Any) -> str:
    """How the bank applies ``W[e]``: ``F.linear`` (``[out, in]``) or a matmul (``[in, out]``); checked numerically."""
    for orientation, features in (("linear", weight.shape[2]), ("matmul", weight.shape[1])):
        x = torch.randn(3, features, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            try:
                out = bank(x, _only_expert(counts, 1, 3))
            except (RuntimeError, IndexError, ValueError):
                continue
            expected = torch.nn.functional.linear(x, weight[1]) if orientation == "linear" else x @ weight[1]
        if out.shape == expected.shape and torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
            return orientation
    raise errors.AutocalError(errors.UNSUPPORTED_EXPERT, "a weight bank is neither rows @ W[e].T nor rows @ W[e]")


def _counts(call: fx.Node) -> Any:
    """The recorded second input of a bank call (the row count per expert, if it is one)."""
    if len(call.args) < 2:
        return None
    return value(call.args[1]) if isinstance(call.args[1], fx.Node) else call.args[1]


def _only_expert(counts: Any, expert: int, rows: int) -> Any:
    """Counts like the recorded ones (list or tensor) giving all ``rows`` to ``expert``."""
    if isinstance(counts, torch.Tensor):
        only = torch.zeros_like(counts)
        only[expert] = rows
        return only
    return type(counts)(rows if e == expert else 0 for e in range(len(counts)))


def detect_banks(facts: Facts) -> SortedBanksPlan | NoMatch:
    """``sorted``: rows sorted by expert through the block's weight banks (or a child's)."""
    first = facts.block.get_submodule(next(iter(facts.banks)))
    return detect_sorted(facts.block, facts.banks, facts.inputs(first, 16))


def detect_sorted(block: nn.Module, banks: dict[str, nn.Parameter], call: BlockCall) -> SortedBanksPlan:
    """Detection for sorted dispatch through weight banks (see the module docstring)."""
    cls = type(block).__name__
    bound = keyword_arguments(inspect.signature(block.forward), call.args, call.kwargs)
    modules = [block.get_submodule(name) for name in banks]
    with torch.no_grad():
        rec = record(block, *call_arguments(inspect.signature(block.forward), bound), leaves=modules)
    calls = [n for n in rec.graph.nodes if n.op == "call_module" and n.target in banks]
    if sorted(c.target for c in calls) != sorted(banks):
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "each weight bank must be called once", block_class=cls)
    num_experts = next(iter(banks.values())).shape[0]
    for node in calls:
        counts = _counts(node)
        listed = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        if not isinstance(listed, (list, tuple)) or len(listed) != num_experts or sum(listed) != len(value(node.args[0])):
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"`{node.target}` is not called with (rows, a row "
                                      "count per expert)", block_class=cls, source=source_of(node))
    orientation = {n: _orientation(block.get_submodule(n), banks[n], _counts(calls[0])) for n in banks}
    try:
        source, tokens = row_gather(calls[0])
        dispatch = SortedDispatch(rec.graph, calls, source, orientation)
        _check_rowwise(dispatch, bound, cls)
        index, weights = routing_choice(rec.graph, tokens)
    except errors.AutocalError as not_rowwise:
        index, weights = routing_choice(rec.graph, calls[0])
        found_choice = choice_call(rec.graph, index)
        if found_choice is None:
            raise not_rowwise.with_context(block_class=cls)
        choice, chosen = found_choice
        check_forced_routing(block, choice, (), bound, rec.output, value(chosen), lambda: _counts_of(modules[0]), index)
        dispatch = SortedDispatch(rec.graph, calls, None, orientation, choice)
    weight = _routing_weight(calls[-1])
    router = analyze_router(rec.graph, index, weight if weight is not None else weights)
    router.num_choices = max(router.num_choices, num_experts)
    experts = ExpertsInfo(
        module_path=_common_parent(dispatch.banks),
        num_experts=num_experts,
        storage="weight banks",
        layout={"banks": {n: list(banks[n].shape) for n in dispatch.banks}, "applied as": dispatch.orientation,
                **({"unrouted tokens": "the block re-run with the top-k forced to each group of k experts"}
                   if dispatch.choice else {})},
        computation=" → ".join(dispatch.banks),
        weights_applied="after the last bank" if weight is not None else "after the experts' rows are put back",
        call_roles={},
        output_features=value(calls[-1]).shape[-1],
        accumulate_dtype=None,
        output_dtype=None,
        sources={n.target: source_of(n) for n in calls if source_of(n)},
    )
    structure = MoEStructure(
        block_class=cls,
        router=router,
        experts=experts,
        shared_modules=other_children(block, router.module_path, *banks),
        returns=returns_of(rec.output),
    )
    return SortedBanksPlan(structure, dispatch)


def _common_parent(paths: list[str]) -> str:
    """The deepest module holding every one of ``paths`` (``""``: the block)."""
    parts = [p.split(".")[:-1] for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


@contextmanager
def _counts_of(bank: nn.Module) -> Iterator[list]:
    """Within, the row count per expert of each call of ``bank``."""
    counts: list = []
    handle = bank.register_forward_pre_hook(
        lambda module, inputs: counts.append(inputs[1].tolist() if isinstance(inputs[1], torch.Tensor)
                                             else list(inputs[1])))
    try:
        yield counts
    finally:
        handle.remove()


def _check_rowwise(dispatch: SortedDispatch, bound: dict[str, Any], cls: str) -> None:
    """Replaying the ops between banks on half the rows must give those rows of the recorded values."""
    for step in range(1, len(dispatch.calls)):
        previous, recorded = value(dispatch.calls[step - 1]), value(dispatch.calls[step].args[0])
        half = max(1, previous.shape[0] // 2)
        try:
            replayed = dispatch.between(step, previous[:half], bound, {})
        except (RuntimeError, IndexError, errors.AutocalError):
            replayed = None
        if replayed is None or replayed.shape[0] != half or not torch.equal(replayed, recorded[:half]):
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"the ops between `{dispatch.banks[step - 1]}` and "
                                      f"`{dispatch.banks[step]}` are not row by row", block_class=cls,
                                      source=source_of(dispatch.calls[step]))

