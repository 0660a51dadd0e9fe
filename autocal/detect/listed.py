"""Expert weights kept one per expert in lists (``nn.ParameterList``), read as packed ``[E, a, b]`` storage.

Research code (LLaMA-MoE's experts, for one) keeps each projection as a list of
one weight per expert and applies entry ``e`` itself: ``F.linear(x,
self.w1[e])``, ``x @ self.w_in[e]``. Entry ``e`` of such a list is what slice
``e`` of a packed weight is, so the gathered rule (``detect/gathered.py``) reads
it as it reads ``w[e]`` in a loop over packed experts: in a recording an entry
is a ``get_attr`` node (``w_in.3``), and each use of one is a gather of expert
3's entry of ``w_in``, checked on the recorded values like any other. At run
time the tracker (``trace/gathers.GatherTracker``, its ``entries``) marks each
use of the entry object the same way, so calibration computes that contraction
by expert 3's Linear (``synthesize/gathered.ListedViews``). Lists of one bias
per expert beside them (``F.linear(x, self.w[e], self.b[e])``) are that
Linear's bias, as ``b[e]`` of a packed ``[E, out]`` bias is.
"""

from __future__ import annotations

from torch import fx, nn

from ..trace.gathers import BIAS
from .storage import parameter_list, resolve

__all__ = ["listed_gathers", "tracked"]


def listed_gathers(graph: fx.Graph, params: dict[str, object]) -> list[tuple[fx.Node, str, int]]:
    """``(node, list path, expert)`` for each entry of the lists among ``params`` that the recording reads (one
    node per entry, whatever its uses: one used twice is no single contraction, and the rule says so)."""
    names = {f"{path}.{e}": (path, e) for path, entries in params.items() if isinstance(entries, list)
             for e in range(len(entries))}
    return [(node, *names[node.target]) for node in graph.nodes if node.op == "get_attr" and node.target in names]


def tracked(block: nn.Module, path: str, key: object, bias: str | None = None) -> tuple[dict, dict]:
    """What a ``GatherTracker`` follows for the expert weight at ``path`` in ``block`` (and its bias): ``(params,
    entries)``, the parameter by identity to ``key`` (its bias to ``BIAS``), or each entry of a list by identity to
    ``(key, expert)``."""
    params: dict[int, object] = {}
    entries: dict[int, tuple[object, int]] = {}
    for where, name in ((path, key), (bias, BIAS)):
        if where is None:
            continue
        found = resolve(block, where)
        listed = parameter_list(found) if isinstance(found, nn.Module) else None
        if listed is None:
            params[id(found)] = name
        else:
            entries |= {id(entry): (name, expert) for expert, entry in enumerate(listed)}
    return params, entries
