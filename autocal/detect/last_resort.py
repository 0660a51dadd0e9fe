"""The rule of last resort: a block whose routing choice autocal can find, whatever its dispatch.

The specialised rules each read one way of dispatching tokens to experts. This one needs none: only experts
it can observe (a list of modules made of Linears) and the calls that choose them (a ``topk``, a ``max`` or
``argmax`` over a dimension of float scores, from which the experts' inputs are computed), found by
*recording* the forward (``trace/record.py``), so code symbolic tracing cannot follow
(``b, n, d, e = *x.shape, e``) does not matter.
An expert may also be the ``e``-th entries of several parallel lists, one per projection (``w1[e]``, ``w3[e]``,
``w2[e]``), where the recording shows them indexed together (``detect/parallel.py``): its tokens are counted on
the entry given the token rows, and every entry of it must see every token when forced.

It then learns, by running the block on its example inputs, how forcing those
calls (``trace/forcing.py``) decides which experts run:

1. forcing every choice to what it chose gives the recorded output (the calls
   forced are the ones that routed);
2. every combination of groups of ``k`` choices per call (a two-level gate: a group, then ``k`` experts in it)
   is forced once; an expert *takes every token* under a combination when it is given one non-zero row per
   token (an expert run on every token with its input scaled by a zero score is not). Calls of one line in a
   loop (a block routing its tokens chunk by chunk) are first forced alike, as one choice, on however many
   chunks a batch has;
3. the combinations that first give an expert every token are kept, until every
   expert has had every token; an expert that never does (a capacity dropping
   tokens, experts chosen by an input as well as by scores) makes the rule fail,
   saying so;
4. each expert's rows in the real forward are among its rows under its forced
   run, bit for bit: forcing gives an expert what the router would have given it.

Calibration (``synthesize/last_resort.py``) runs the block's own forward for the output, then the block once
per kept combination with only the experts it covers observed: ``ceil(E / k)`` extra forwards per calibration
batch for one top-k, the product of the groups for chained choices.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .. import errors
from ..numerics import compare_outputs
from ..trace.forcing import ChoiceCall, forcing, fresh_inputs
from ..trace.inputs import call_by_name, keyword_arguments
from .block import (_expert_counts, _lists_in, _scores_experts, expert_lists, routed_entries,
                    module_experts_info, other_children)
from .facts import Facts
from .forced_cover import ForcedRun, check_rows, cover
from .graph_utils import Ancestry, read_on_host, returns_of, source_of, target_name, value
from .linear_like import linear_modules, linear_views, made_of_linears
from .parallel import parallel_candidates, parallel_lists, several_sets
from .plans import LastResortPlan, NoMatch
from .recorded import record_expert_calls
from .router import router_of
from .structure import MoEStructure, RouterInfo

__all__ = ["ForcedRun", "ForcedDispatch", "expert_list", "last_resort_candidate", "detect_last_resort"]

_CHOICE_OPS = ("topk", "max", "argmax")
_SKIP_HINT = ("or autocal.convert(model, strict=False): the block is left unconverted and listed by "
              "autocal.unconverted(model)")
_RANDOM_OPS = ("rand", "rand_like", "randn", "randn_like", "randint", "randint_like", "randperm", "multinomial",
               "bernoulli", "normal", "poisson", "uniform", "exponential", "geometric", "cauchy", "log_normal",
               "random", "gumbel_softmax")
_RANDOM_HINT = ("route by the scores alone at inference: noise and sampling only in training (if self.training), "
                "a top-k or argmax of the scores otherwise")


@dataclass(frozen=True)
class ForcedDispatch:
    """What calibration needs: the experts (names in the list), the input holding the tokens, the runs."""

    entries: tuple[str, ...]
    hidden: str
    runs: tuple[ForcedRun, ...]
    parallel: tuple[tuple[str, tuple[str, ...]], ...] = ()  # lists parallel to the experts': path, entry names


def expert_list(block: nn.Module) -> tuple[str, list[nn.Module]] | None:
    """``(path, experts)``: two or more modules made of Linears in a list (``routed_entries``), and beside it a gate
    that reads the features they read (a router of any shape: one score per expert, or per group of experts).
    Modules each holding experts beside a router of their own (decoder layers of norm-free Linears around an MoE
    block) are blocks, not experts: a model holding them beside another block is no block itself."""
    for path, container, holder in _lists_in(block):
        entries = routed_entries(block, container, holder)
        if len(entries) < 2 or not made_of_linears(entries[0], norms=True) or expert_lists(entries[0]):
            continue
        if not made_of_linears(entries[0]) and not _scores_experts(block, holder, _expert_counts(container, entries),
                                                                   lookups=False):
            continue  # experts with a norm need a router with one row per expert (see block.py): layers have none
        width = entries[0].get_submodule(linear_modules(entries[0])[0]).weight.shape[-1]
        if any(width in p.shape for p in _gates(block, holder)):
            return path, entries
    return None


def _gates(block: nn.Module, holder: nn.Module) -> list[nn.Parameter]:
    """Weights that could score experts: the block's own (any rank), and the 2-D weights of modules at most two
    levels down outside ``holder`` and outside lists (not the weights deep inside another block, a decoder layer's
    attention or its own MoE block)."""
    found = [p for p in block.parameters(recurse=False) if p.dim() >= 2]
    for name, child in block.named_children():
        if child is holder or isinstance(child, (nn.ModuleList, nn.ModuleDict, nn.Sequential)):
            continue
        found += [p for path, p in child.named_parameters() if p.dim() == 2 and path.count(".") <= 1]
    return found


def last_resort_candidate(facts: Facts) -> bool:
    return facts.memo("last-resort list", lambda: expert_list(facts.block)) is not None


def _found_by_others(facts: Facts) -> bool:
    """Is the block some other rule's candidate (then a verdict that it is no MoE would hide their reasons)?"""
    return bool(facts.packed or facts.banks or facts.lists or facts.own_weights or facts.tables)


def detect_last_resort(facts: Facts) -> LastResortPlan | NoMatch:
    """``last-resort``: the block's routing choice forced to each group of experts in turn (module docstring)."""
    found = facts.memo("last-resort list", lambda: expert_list(facts.block))
    if found is None:
        return NoMatch("no list of experts made of Linears with a gate beside it", candidate=False, shallow=True)
    name, entries = found
    block, weak = facts.block, not _found_by_others(facts)
    container = block.get_submodule(name)
    candidates = parallel_candidates(block, name, len(entries))
    if len(facts.lists) > 1 and any(other != name and other not in candidates for other in facts.lists):
        return NoMatch(several_sets(facts.lists), shallow=True)
    try:
        call = facts.inputs(container, max(16, 4 * len(entries)))
    except errors.AutocalError as error:
        if weak and error.kind == errors.TRACE_FAILED:
            return NoMatch(f"{error.explanation}, and no other rule takes the block", not_moe=True)
        raise
    bound = keyword_arguments(inspect.signature(block.forward), call.args, call.kwargs)
    rec, calls, parallel = facts.memo("last-resort recording", lambda: _record(block, bound, name, entries, candidates))
    unlinked = [other for other in facts.lists if other != name and other not in parallel]
    if len(facts.lists) > 1 and unlinked:
        return NoMatch(f"{several_sets(facts.lists)}; no call of an entry of `{unlinked[0]}` is tied to the call of "
                       f"the entry of its number in `{name}` alone", shallow=True)
    if not calls:
        return _never_called(facts, rec.graph, name, entries, weak)
    draws = _random_draws(rec.graph, calls)
    if draws:
        return NoMatch(f"the experts' tokens depend on random numbers the forward draws ({target_name(draws[0])}): "
                       "its routing is random at inference, and no calibration forward can reproduce it",
                       source_of(draws[0]), hints=(_RANDOM_HINT, errors.override_hint(facts.block_class)))
    found = _choice_calls(rec.graph, calls, routed=not weak)
    if not found:
        return NoMatch("no top-k, max or argmax of scores decides which experts run", source_of(calls[0]),
                       not_moe=weak)
    hidden = next((k for k, v in bound.items() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if hidden is None:
        return NoMatch("the block takes no floating-point input to count tokens in", kind=errors.BAD_INPUT)
    tokens = bound[hidden].numel() // bound[hidden].shape[-1]
    where = source_of(found[-1][0])
    try:
        _check_identity(block, bound, rec.output, found, where)
        parts = [[listed[e] for listed in parallel.values()] for e in range(len(entries))]
        runs, taken, k, lockstep = _cover_found(block, bound, entries, rec.graph, found, tokens, where, parts)
        check_rows(block, entries, calls, taken, where)
    except errors.AutocalError as error:
        error.hints = error.hints or [errors.override_hint(facts.block_class), _SKIP_HINT]
        raise
    structure = _structure(facts, name, entries, rec, calls, found, k, len(runs), lockstep)
    _add_parallel(facts.block, structure, parallel)
    return LastResortPlan(structure, ForcedDispatch(tuple(_names(container, entries)), hidden, tuple(runs), tuple(
        (path, tuple(_names(block.get_submodule(path), listed))) for path, listed in parallel.items())))


def _never_called(facts: Facts, graph: fx.Graph, name: str, entries: list[nn.Module], weak: bool) -> NoMatch:
    """Why the recording holds no call of an expert in ``name``: a list of lists (a list has no forward, its
    entries' entries are the experts), experts run through a method, or none run at all."""
    if isinstance(entries[0], (nn.ModuleList, nn.ModuleDict)):
        return NoMatch(f"`{name}` is a list of lists of experts (`{name}[i][j]`: each inner list a group, such as one "
                       "rank's local experts), and this rule reads one list of experts",
                       hints=(f"keep the experts in one list (`{name}` flattened, each group's experts in turn)",
                              errors.override_hint(facts.block_class), _SKIP_HINT))
    bypassed = _weights_used(graph, name)
    if bypassed is not None:  # ``expert.forward(x)``, ``expert.lora_forward(r, x)``: the expert is never called
        return NoMatch(f"the forward runs the modules in `{name}` through a method (`expert.forward(x)`, or one "
                       "of another name) instead of calling them: this rule finds each expert's rows at its call",
                       source_of(bypassed), hints=("call the experts as modules: `expert(x)`; an expert used "
                                                   "through another method can make it its forward",))
    return NoMatch(f"the forward never calls the modules in `{name}`", kind=errors.NO_MOE_BLOCK, not_moe=weak)


def _record(block: nn.Module, bound: dict, name: str, entries: list[nn.Module],
            candidates: dict[str, list[nn.Module]]) -> tuple[Any, list[fx.Node], dict[str, list[nn.Module]]]:
    """The block recorded with each expert, and each entry of a list that may be parallel to theirs, a leaf; the
    experts' calls; the lists the recording shows parallel (``detect/parallel.py``), by path."""
    more = [m for listed in candidates.values() for m in listed]
    rec, _, calls = record_expert_calls(block, bound, entries, block.get_submodule(name), more)
    paths = {id(m): p for p, m in block.named_modules()}
    numbered = {paths[id(m)]: (owner, e) for owner, listed in {name: entries, **candidates}.items()
                for e, m in enumerate(listed)}
    return rec, calls, {path: candidates[path] for path in parallel_lists(rec.graph, numbered, name)}


def _add_parallel(block: nn.Module, structure: MoEStructure, parallel: dict[str, list[nn.Module]]) -> None:
    """Note in ``structure`` the lists parallel to the experts': what ``explain`` shows, their Linear-like modules
    to be seen as ``nn.Linear``, and no shared modules among them."""
    if not parallel:
        return
    experts = structure.experts
    experts.parallel = list(parallel)
    experts.layout["parallel lists"] = (f"{', '.join(parallel)}: entry e of each is part of expert e, with "
                                        f"`{experts.module_path}`'s (the recording shows them indexed together)")
    for path, listed in parallel.items():
        experts.linear_views += [f"{path}.{view}" for view in linear_views(block.get_submodule(path), listed)]
    structure.shared_modules = [m for m in structure.shared_modules if m not in parallel]


def _cover_found(block: nn.Module, bound: dict, entries: list[nn.Module], graph: fx.Graph, found: list, tokens: int,
                 where: str | None,
                 parts: list[list[nn.Module]]) -> tuple[list[ForcedRun], dict[int, torch.Tensor], int, bool]:
    """``cover`` of the choices found: first forced alike where they are one choice made in a loop (``_lockstep``),
    else each on its own; and whether in lockstep (``parts``: each expert's entries of parallel lists)."""
    lockstep = _lockstep(graph, found)
    if lockstep is not None:
        try:
            return (*cover(block, bound, entries, [lockstep], [value(found[0][0].args[0]).shape[lockstep.dim]],
                           tokens, where, parts=parts), True)
        except errors.AutocalError:
            pass  # not alike: each call on its own
    sizes = [value(node.args[0]).shape[choice.dim] for node, choice, _ in found]
    return (*cover(block, bound, entries, [c for _, c, _ in found], sizes, tokens, where, _loop_words(found), parts),
            False)


def _loop_words(found: list) -> str:
    """Words on the choices made by one call in a loop (a block routing its tokens part by part), or none."""
    lines = [source_of(node) for node, _, _ in found if source_of(node)]
    line = max(lines, key=lines.count, default=None)
    if line is None or lines.count(line) < 2:
        return ""
    count = "all" if lines.count(line) == len(found) else lines.count(line)
    return (f" ({count} of them one `{target_name(found[0][0])}` called in a loop at {line}: the block "
            "routes its tokens part by part, and such calls are forced alike only where no other call of the same "
            "function runs in the forward and forcing them alike gives every expert every token)")


def _lockstep(graph: fx.Graph, found: list) -> ChoiceCall | None:
    """One choice standing for every call of the choices' function, where those are two or more calls from one line
    along one dimension, with one k, and no other call of that function runs: a loop routing the tokens part by part
    (chunk by chunk), whose parts, forced alike, each go to the same group of experts (checked by the forced runs)."""
    nodes, choices = [n for n, _, _ in found], [c for _, c, _ in found]
    first = dataclasses.replace(choices[0], ordinal=None)
    every = [n for n in graph.nodes if n.op == "call_function" and n.target is first.function]
    if len(found) < 2 or len(every) != len(found) or source_of(nodes[0]) is None:
        return None
    if any(source_of(n) != source_of(nodes[0]) for n in nodes) or any(
            dataclasses.replace(c, ordinal=None) != first for c in choices):
        return None
    return first


def _names(container: nn.Module, entries: list[nn.Module]) -> list[str]:
    names = {id(m): n for n, m in container.named_children()}
    return [names[id(e)] for e in entries]


def _weights_used(graph: fx.Graph, name: str) -> fx.Node | None:
    """The first op using a weight of a module in ``name`` (recorded where the module was not called as one)."""
    weights = [n for n in graph.nodes if n.op == "get_attr" and str(n.target).startswith(f"{name}.")]
    return next((u for n in weights for u in n.users), None)


def _random_draws(graph: fx.Graph, calls: list[fx.Node]) -> list[fx.Node]:
    """Calls drawing random numbers (``randn_like``, ``multinomial``, ``bernoulli``, ...) that some expert's input
    depends on."""
    ancestry = Ancestry(graph)
    return [n for n in graph.nodes if n.op == "call_function" and target_name(n).removesuffix("_") in _RANDOM_OPS
            and any(ancestry.is_ancestor(n, c) for c in calls)]


def _choice_calls(graph: fx.Graph, calls: list[fx.Node], routed: bool) -> list[tuple]:
    """The choices (``_choices``) whose indices reach an expert, else those read on the host (``experts[int(i)]``),
    else, in a block of routed experts, all (rows picked by host lists, ``x[None, top_x.tolist()]``, leave no edge
    to follow). The forced runs check that they decide which experts run."""
    ancestry, choices = Ancestry(graph), _choices(graph)
    found = [c for c in choices if any(ancestry.is_ancestor(c[2], call) for call in calls)]
    return found or [c for c in choices if read_on_host(c[2])] or (choices if routed else [])


def _choices(graph: fx.Graph) -> list[tuple[fx.Node, ChoiceCall, fx.Node]]:
    """``(node, choice, indices)`` of each top-k, max or argmax over float scores."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or target_name(node) not in _CHOICE_OPS:
            continue
        scores = value(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
        indices = node if target_name(node) == "argmax" else next(
            (u for u in node.users if target_name(u) in ("getitem", "__getitem__") and u.args[1] == 1), None)
        choice = None if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or indices is None \
            else _choice_call(graph, node, value(indices))
        if choice is not None:
            found.append((node, choice, indices))
    return found


def _choice_call(graph: fx.Graph, node: fx.Node, indices: torch.Tensor) -> ChoiceCall | None:
    """The forcing of one choice node: which call of its function, along which dimension, how many (None: the
    largest of all scores, no choice per row)."""
    name = target_name(node)
    arguments = dict(zip(("k", "dim") if name == "topk" else ("dim", "keepdim"), node.args[1:]))
    arguments.update(node.kwargs)
    dim = arguments.get("dim", -1 if name == "topk" else None)
    if dim is None or indices.dim() == 0:
        return None
    ordinal = [n for n in graph.nodes if n.op == "call_function" and n.target is node.target].index(node)
    if name == "topk":
        return ChoiceCall(node.target, ordinal, dim, indices.shape[dim])
    return ChoiceCall(node.target, ordinal, dim, 1, scored=name == "max", reduced=not arguments.get("keepdim", False))


def _check_identity(block: nn.Module, bound: dict, output: Any, found: list, where: str | None) -> None:
    """Forcing every choice call to what it chose gives the recorded output."""
    with torch.no_grad(), forcing({choice: value(indices) for _, choice, indices in found}):
        again = call_by_name(block, fresh_inputs(bound))
    if not compare_outputs(output, again)[2]:
        raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "forcing the routing choices to what they chose "
                                  "changes the block's output: they are not what routes it", source=where)


def _structure(facts: Facts, name: str, entries: list[nn.Module], rec, calls: list[fx.Node], found: list, k: int,
               runs: int, lockstep: bool) -> MoEStructure:
    """What ``explain`` reports: the router read from the recording (its last choice), the experts, the runs."""
    router = router_of(rec.graph) or RouterInfo(None, None, k, len(entries), False, None, False, None,
                                                selection=target_name(found[-1][0]))
    router.top_k, router.num_choices = k, len(entries)
    router.grouped = router.grouped or (len(found) > 1 and not lockstep)
    container = facts.block.get_submodule(name)
    experts = module_experts_info(name, container, entries, calls[0], "where the block's own code applies them")
    forced = (f"every {target_name(found[0][0])} (one per part of the tokens)" if lockstep
              else ", then ".join(target_name(node) for node, _, _ in found))
    experts.layout["unrouted tokens"] = f"the block runs {runs} more times, {forced} forced to each group of experts"
    experts.sources.update({f"forced choice {i + 1}": source_of(node) for i, (node, _, _) in enumerate(found)
                            if source_of(node) and not (lockstep and i)})
    return MoEStructure(block_class=facts.block_class, router=router, experts=experts,
                        shared_modules=other_children(facts.block, name, router.module_path),
                        returns=returns_of(rec.output))
