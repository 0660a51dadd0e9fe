"""Calibration by forced routing: the block's forward again, once per group of ``k`` experts.

Used where an unrouted expert's input cannot be replayed on its own (attention
experts, weights gathered inside batched ops; see ``detect/reroute.py``). The
real forward runs with every expert quiet; then, for each group of ``k``
experts, the forward runs with the top-k forced to that group for every token,
and only that group's experts are observed. Each expert thus sees every token
exactly once; no other module's hooks see the forced runs, whose outputs are
discarded.

``forced_runs`` is the general form: any list of runs, each forcing one or more
choice calls and observing a set of experts through a context the caller gives
(the rule of last resort observes expert modules by holding the others' hooks,
``synthesize/last_resort.py``); ``forced_forward`` is its one-top-k case over
``ExpertViews``.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, ContextManager, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules import module as module_globals

from ..coverage import add_tokens
from ..trace.forcing import ChoiceCall, forcing, fresh_inputs
from .unpack import linear_of

__all__ = ["ExpertViews", "observing", "forced_forward", "forced_runs", "hooks_held"]


class ExpertViews(nn.Module):
    """``[E, a, b]`` as ``E`` Linears (children ``"0"``, ``"1"``, …) whose weights view its entries.

    ``orientation``: ``"linear"`` (``W[e]`` is ``[out, in]``), ``"matmul"``
    (``[in, out]``); for tables ``[E, d]``, ``"row"`` (``Linear(d, 1)``) or
    ``"slot-sum"`` (``Linear(1, d)``). ``bias`` ``[E, out]``: each Linear's bias views its entry. ``weight``
    may also be a list of E matrices, one parameter per expert (``synthesize/gathered.ListedViews``).

    Rows are counted for ``autocal.coverage`` where the Linears are called
    (no counting hook: a hook would turn the plain, bitwise path off). Rows of
    another dtype than the weight (the block computes with a cast copy of it)
    are computed in their dtype.
    """

    counts_tokens = True

    def __init__(self, weight: torch.Tensor, orientation: str, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        grad = weight.requires_grad if isinstance(weight, torch.Tensor) else weight[0].requires_grad  # or a list
        for expert in range(len(weight)):
            view = {"linear": lambda w: w, "matmul": lambda w: w.T, "row": lambda w: w[None, :],
                    "slot-sum": lambda w: w[:, None]}[orientation](weight[expert])
            self.add_module(str(expert), linear_of(view, bias[expert] if bias is not None else None,
                                                   requires_grad=grad))
        self.__dict__["_addresses"] = [m.weight.data_ptr() for m in self.children()]

    def experts(self) -> list[nn.Linear]:
        return list(self.children())

    def plain(self) -> bool:
        """Plain Linears still viewing the weight: the original op computes the same, bitwise."""
        return all(type(m) is nn.Linear and "forward" not in m.__dict__ and m.weight.data_ptr() == address
                   for m, address in zip(self.children(), self._addresses))

    def hooked(self) -> bool:
        if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.children())

    def call(self, expert: int, rows: torch.Tensor) -> torch.Tensor:
        """Expert ``expert``'s Linear on ``rows``: through its hooks unless ``observed`` leaves it out."""
        linear = self._modules[str(expert)]
        observed = self.__dict__.get("observed")  # None: every call is seen, else only these experts'
        seen = observed is None or expert in observed
        if seen:
            add_tokens(linear, rows.shape[0])
        run = linear if seen else linear.forward
        return run(rows) if rows.dtype == linear.weight.dtype else _in_dtype_of(linear, run, rows)


def _in_dtype_of(linear: nn.Linear, run: Callable, rows: torch.Tensor) -> torch.Tensor:
    """``run`` (``linear``, or its forward without hooks) on ``rows`` of another dtype: the block casts its expert
    weights before using them (``w.bfloat16()``, ``w.to(x.dtype)``), and the Linear still views the stored weight.

    A plain Linear computes as the block does, with its weight and bias cast to the rows' dtype for the call
    (its hooks see the rows the block's op got, and the cast weight). One whose forward was replaced (a
    quantization framework's wrapper, an offloading hook) reads its weight its own way, which a swap for the call
    would miss: it gets the rows converted to its weight's dtype, and its output is converted back, so the block's
    output agrees within the rounding of the narrower dtype."""
    if type(linear) is not nn.Linear or "forward" in linear.__dict__:
        return run(rows.to(linear.weight.dtype)).to(rows.dtype)
    cast = {name: getattr(linear, name).to(rows.dtype) for name in ("weight", "bias")
            if getattr(linear, name) is not None}
    if run is linear:
        return functional_call(linear, cast, (rows,))
    return F.linear(rows, cast["weight"], cast.get("bias"))


@contextmanager
def observing(views: list[ExpertViews], experts: set[int]) -> Iterator[None]:
    """Within, only these experts' Linears are called through their hooks."""
    for view in views:
        view.__dict__["observed"] = experts
    try:
        yield
    finally:
        for view in views:
            view.__dict__.pop("observed", None)


def forced_forward(module: nn.Module, choice: ChoiceCall, views: list[ExpertViews], args: tuple, kwargs: dict,
                   run: Callable[[], ContextManager] | None = None) -> Any:
    """The block's output from its real forward, then every expert observed on every token (module docstring).

    ``run()``, if given, is a context entered around every forward (the real one and the forced ones).
    """
    num_experts = len(views[0].experts())
    runs = []
    for start in range(0, num_experts, choice.k):
        first = min(start, num_experts - choice.k)  # the last group ends at the last expert
        runs.append(({choice: torch.arange(first, first + choice.k)}, set(range(start, first + choice.k))))
    experts = {id(linear) for view in views for linear in view.experts()}
    return forced_runs(module, runs, lambda observed: observing(views, observed), experts, args, kwargs, run)


def forced_runs(module: nn.Module, runs: list[tuple[dict[ChoiceCall, torch.Tensor], set[int]]],
                observe: Callable[[set[int]], ContextManager], experts: set[int], args: tuple, kwargs: dict,
                run: Callable[[], ContextManager] | None = None) -> Any:
    """The real forward with every expert quiet (its output returned), then one forward per run.

    Each run forces its choice calls (``trace/forcing.forcing``) and observes
    its experts: ``observe(experts)`` is a context in which only those experts
    are seen (``observe(set())``: none). ``experts``: the ids of the modules
    ``observe`` governs; every other module of the block runs without its hooks
    in the forced runs once their choice is forced (from there on their inputs are
    the forced run's, whose outputs are discarded). Before it (a router, a norm, a
    hook casting the router's input) they run as in the real forward, hooks and all:
    their inputs are the same, and a hook may change values the experts are given.
    """
    run = run or _nothing
    given = fresh_inputs((args, kwargs))  # as given: the real forward may change its inputs in place
    with observe(set()), run():
        output = module._block_forward(*args, **kwargs)
    quiet = [m for m in module.modules() if m is not module and id(m) not in experts]
    with torch.no_grad():
        for choices, observed in runs:
            with observe(observed), ExitStack() as held:
                with forcing(choices, on_forced=lambda: held.enter_context(hooks_held(quiet))), run():
                    again_args, again_kwargs = fresh_inputs(given)
                    module._block_forward(*again_args, **again_kwargs)
    return output


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def hooks_held(modules: list[nn.Module]) -> Iterator[None]:
    """Within, these modules run without their forward hooks (forced runs are not theirs to observe)."""
    held = [(m, m._forward_pre_hooks, m._forward_hooks) for m in modules]
    for module, _, _ in held:
        module._forward_pre_hooks, module._forward_hooks = OrderedDict(), OrderedDict()
    try:
        yield
    finally:
        for module, pre, post in held:
            module._forward_pre_hooks, module._forward_hooks = pre, post

