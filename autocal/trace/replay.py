"""Replaying parts of a recorded graph on new inputs: how a block picks each expert's rows, and the ops between
weight banks.

Detection takes these from a block's recording and checks them against it
(``detect/container.py``, ``detect/sorted.py``); the calibration forward
(``synthesize/container.py``, ``synthesize/sorted.py``) replays them on every
batch. Both run them, so they live below both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import fx

from .. import errors
from .forcing import ChoiceCall
from .record import value

__all__ = ["Replay", "TokenRecipe", "SortedDispatch", "regrouped"]


class Replay:
    """Evaluates nodes of a recorded graph again, on new inputs of the recorded module.

    ``given`` maps nodes to values used instead of computing them; ``substitute``
    maps nodes to ``(argument position, value)``, replacing one argument of that
    op. Nodes that depend on neither are kept in ``shared``, so calls on the
    same inputs (one per expert, say) compute them once.
    """

    def __init__(self, graph: fx.Graph) -> None:
        self.graph = graph
        self._varying: dict[frozenset, set[fx.Node]] = {}

    def __call__(self, node: Any, bound: dict[str, Any], shared: dict, given: dict[fx.Node, Any] | None = None,
                 substitute: dict[fx.Node, tuple[int, Any]] | None = None) -> Any:
        given, substitute = given or {}, substitute or {}
        varying = self._descendants(frozenset(given) | frozenset(substitute))
        memo = dict(given)
        resized = self._resized(bound)

        def evaluate(n: fx.Node):
            cache = memo if n in varying else shared
            if n in cache:
                return cache[n]
            if n.op == "placeholder":
                result = bound[n.target]
            elif n.op == "get_attr":
                result = value(n)
            elif n.op == "call_module":
                raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"`{n.target}` is called on the way")
            else:
                args = list(fx.node.map_arg(n.args, evaluate))
                if n in substitute:
                    position, replacement = substitute[n]
                    args[position] = replacement
                if _made_from_numbers(n):
                    args = _made_for(args, value(n), resized)
                result = _call(n, args, fx.node.map_arg(n.kwargs, evaluate))
            cache[n] = result
            return result

        return evaluate(node) if isinstance(node, fx.Node) else fx.node.map_arg(node, evaluate)

    def _resized(self, bound: dict[str, Any]) -> dict[int, int]:
        """Each size of the recorded inputs (a dimension, or the product of leading ones) that the new inputs
        change, to its new value. A size two of them share but change differently is the token count's (all but
        the last dimension: blocks flatten their tokens) where that is one of them, else left out; so are sizes
        of 1."""
        found: dict[int, set[int]] = {}
        tokens: dict[int, set[int]] = {}
        for node in self.graph.nodes:
            recorded, new = (value(node), bound.get(node.target)) if node.op == "placeholder" else (None, None)
            if isinstance(recorded, torch.Tensor) and isinstance(new, torch.Tensor) and recorded.dim() == new.dim():
                for old_size, new_size in zip(_sizes(recorded.shape), _sizes(new.shape)):
                    found.setdefault(old_size, set()).add(new_size)
                if recorded.dim() > 1:
                    tokens.setdefault(math.prod(recorded.shape[:-1]), set()).add(math.prod(new.shape[:-1]))
        for old, news in found.items():
            if len(news) > 1 and len(tokens.get(old, ())) == 1:
                found[old] = set(tokens[old])
        return {old: news.pop() for old, news in found.items() if len(news) == 1 and old > 1 and old not in news}

    def _descendants(self, roots: frozenset) -> set[fx.Node]:
        if roots not in self._varying:
            found = set(roots)
            for node in self.graph.nodes:
                if any(a in found for a in node.all_input_nodes):
                    found.add(node)
            self._varying[roots] = found
        return self._varying[roots]


_VIEWS = {"view", "reshape"}


def _sizes(shape: torch.Size) -> list[int]:
    """A shape's dimensions, then the products of its leading ones."""
    return [*shape, *(math.prod(shape[:i]) for i in range(2, len(shape)))]


def _made_from_numbers(n: fx.Node) -> bool:
    """Is ``n`` a tensor made from numbers (``torch.ones(t.shape[0])``, ``torch.arange(n)``), or from numbers and
    the dtype and device of a tensor (``t.new_ones(t.shape[0])``)?"""
    numbers_alone = not n.all_input_nodes
    like = getattr(n.target, "__name__", "").startswith("new_") and len(n.all_input_nodes) == 1
    return (numbers_alone or like) and isinstance(value(n), torch.Tensor)


def _made_for(args: list, recorded: torch.Tensor, resized: dict[int, int]) -> list:
    """The arguments of a tensor made from numbers (``torch.ones(t.shape[0])``: the recording holds the number,
    not where it came from) for the new inputs: where they spell the recorded tensor's shape (its sizes one by
    one, as ``ones(n, 1)``, or as one tuple, as ``full((n,), v)``), each size that is one of the recorded inputs'
    becomes that size of the new inputs. Numbers that do not spell the shape (a fill value, data) stay."""
    shape = list(recorded.shape)
    numbers = [a for a in args if not isinstance(a, torch.Tensor)]  # past the tensor of ``t.new_ones(n)``
    if numbers == shape and all(isinstance(a, int) and not isinstance(a, bool) for a in numbers):
        return [a if isinstance(a, torch.Tensor) else resized.get(a, a) for a in args]
    return [(list if isinstance(a, list) else tuple)(resized.get(i, i) for i in a)
            if isinstance(a, (tuple, list)) and list(a) == shape else a for a in args]


def _call(n: fx.Node, args: list, kwargs: dict) -> Any:
    """``n``'s op on new arguments. A view or reshape merges the dimensions the recorded one merged, whatever
    sizes the recording baked in (``x.view(s * b, h)`` with ``s, b, h = x.shape``); any error is an
    ``AutocalError`` naming the op's source line."""
    if getattr(n.target, "__name__", None) in _VIEWS and not kwargs and isinstance(args[0], torch.Tensor):
        sizes = regrouped(tuple(value(n.args[0]).shape), tuple(value(n).shape), tuple(args[0].shape))
        args = [args[0], sizes] if sizes is not None else args
    try:
        return n.target(*args, **kwargs)
    except Exception as error:
        made = _made_before(n)
        baked = "the recording baked in a number that the inputs decide" if made is None else (
            f"it uses a tensor made from numbers (`{getattr(made.target, '__name__', made.target)}` at "
            f"{made.meta.get('source')}) whose size the recording holds and autocal could not tie to the inputs' "
            "sizes: make it from the inputs (torch.ones_like(x[..., 0]) for torch.ones(x.shape[0]))")
        raise errors.AutocalError(
            errors.UNSUPPORTED_DISPATCH, f"the block's dispatch, recorded on other inputs, does not run again on "
            f"these: `{getattr(n.target, '__name__', n.target)}` fails ({type(error).__name__}: {error}); {baked}",
            source=n.meta.get("source")) from error


def _made_before(n: fx.Node) -> fx.Node | None:
    """The last tensor made from numbers among the nodes ``n`` is computed from."""
    seen, stack, found = set(), [n], []
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        found += [node] if _made_from_numbers(node) else []
        stack.extend(node.all_input_nodes)
    order = {node: i for i, node in enumerate(n.graph.nodes)}
    return max(found, key=order.get, default=None)


def regrouped(before: tuple[int, ...], after: tuple[int, ...], new: tuple[int, ...]) -> tuple[int, ...] | None:
    """The sizes viewing a tensor of shape ``new`` as the recorded view turned ``before`` into ``after``: each
    run of dimensions merged into one is merged again, kept ones kept; None where that is not defined (a
    dimension the view split changed size, another rank, an empty dimension)."""
    if len(new) != len(before) or 0 in before or 0 in after:
        return None
    sizes: list[int] = []
    i = j = 0
    while i < len(before) and j < len(after):
        merged, split, ii, jj = before[i], after[j], i + 1, j + 1
        while merged != split:
            if merged < split and ii < len(before):
                merged, ii = merged * before[ii], ii + 1
            elif split < merged and jj < len(after):
                split, jj = split * after[jj], jj + 1
            else:
                return None
        while ii < len(before) and before[ii] == 1 and (jj == len(after) or after[jj] != 1):
            ii += 1  # a size-1 dimension beside a merge is merged too (which is ambiguous from the sizes alone)
        if jj - j == 1:
            sizes.append(math.prod(new[i:ii]))
        elif new[i:ii] == before[i:ii]:
            sizes.extend(after[j:jj])
        else:
            return None
        i, j = ii, jj
    if any(size != 1 for size in (*before[i:], *new[i:])):
        return None
    return (*sizes, *after[j:])


class TokenRecipe:
    """Replays, for any expert, how the original picks that expert's token rows from the recorded inputs.

    ``selectors`` are the ops whose argument is the expert's number (an index,
    an ``== e``); replaying with another number there gives that expert's rows.
    ``source`` (optional) is the node the rows are gathered from. Pass one
    ``shared`` dict for the calls on the same inputs: what does not depend on
    the expert (the router, say) is then computed once.
    """

    def __init__(self, graph: fx.Graph, tokens: fx.Node | None, selectors: dict[fx.Node, int | tuple[int, int]],
                 source: fx.Node | None = None) -> None:
        self.replay = Replay(graph)
        self.tokens = tokens
        self.source = source
        self.selectors = selectors  # node -> position of the expert index in its args

    def __call__(self, bound: dict[str, Any], expert: int, shared: dict[fx.Node, Any] | None = None) -> torch.Tensor:
        """Expert ``expert``'s row indices (a boolean row mask is turned into indices)."""
        substitute = {}
        for node, position in self.selectors.items():
            if isinstance(position, tuple):  # entry ``i`` of a tuple index
                position, i = position
                recorded = node.args[position]
                substitute[node] = (position, (*recorded[:i], _like(_recorded(recorded[i]), expert),
                                               *recorded[i + 1:]))
            else:
                substitute[node] = (position, _like(_recorded(node.args[position]), expert))
        rows = self.replay(self.tokens, bound, {} if shared is None else shared, substitute=substitute)
        return rows.reshape(-1).nonzero().squeeze(-1) if rows.dtype == torch.bool else rows

    def rows(self, bound: dict[str, Any], shared: dict[fx.Node, Any] | None = None) -> torch.Tensor:
        """The 2-D token rows the experts' inputs are gathered from."""
        source = self.replay(self.source, bound, {} if shared is None else shared)
        return source.reshape(-1, source.shape[-1])


def _recorded(argument: Any) -> Any:
    return value(argument) if isinstance(argument, fx.Node) else argument


def _like(index: Any, expert: int) -> Any:
    """``expert`` in the form the recorded loop used for its index (int, 0-d or 1-element tensor)."""
    if isinstance(index, torch.Tensor):
        return torch.full_like(index, expert)
    return expert


class SortedDispatch:
    """What calibration replays: the token rows and the ops between banks."""

    def __init__(self, graph: fx.Graph, calls: list[fx.Node], source: fx.Node | None,
                 orientation: dict[str, str], choice: ChoiceCall | None = None) -> None:
        self.replay = Replay(graph)
        self.calls, self.source = calls, source
        self.orientation = orientation  # bank -> "linear" (rows @ W[e].T) or "matmul" (rows @ W[e])
        self.choice = choice  # set when the ops between banks mix rows: calibration forces the routing instead

    @property
    def banks(self) -> list[str]:
        """The banks' names, in the order the block calls them."""
        return [call.target for call in self.calls]

    def rows(self, bound: dict[str, Any], shared: dict) -> torch.Tensor:
        """The token rows the first bank's input is gathered from, for these block inputs."""
        return self.replay(self.source, bound, shared)

    def between(self, step: int, rows: torch.Tensor, bound: dict[str, Any], shared: dict) -> torch.Tensor:
        """The ops from bank ``step - 1``'s output to bank ``step``'s input, on ``rows``."""
        return self.replay(self.calls[step].args[0], bound, shared, given={self.calls[step - 1]: rows})
