"""Calling an expert Linear as ``nn.Module.__call__`` does, without forward wrappers known to change nothing.

In calibration mode a block's expert Linears are called 3E times per forward (every expert on every
token). Each call goes through ``nn.Module.__call__`` and whatever wrappers libraries put on the
instance's ``forward``: under LLM Compressor, compressed-tensors' offloading wrapper (it moves the
arguments to the device the weights are brought to) around its quantization wrapper (it fake-quantizes
the input and weight, unless quantization is disabled, as it is in LLM Compressor's calibration passes).
On a GPU the wrappers cost several times the matmul's own launch (profile in ``docs/benchmarks.md``,
issue 21), and the Linears are far too many to pay that.

``call_linear`` runs the Linear's hooks exactly as ``nn.Module.__call__`` runs them (forward pre-hooks,
which may replace the input; then the forward; then forward hooks, which see the output and may
replace it) around ``F.linear(x, weight, bias)``, where the Linear's forward is ``nn.Linear.forward``
behind wrappers that each registered *transparency rule* vouches for, for this Linear and input, at
this moment. Hooks see what they would see, and the output is what the forward computes, bitwise: the
same ``F.linear`` on the same tensors. autocal's core knows no wrapper; an integration registers rules
for the library whose wrappers it knows (``autocal/integrations/llmcompressor/wrappers.py``). Anything
else (an unknown wrapper, a subclass's forward, a global or backward hook, a weight on another device)
and the Linear is called as a module.

Called one by one, a block's 3E Linears still run 3E rounds of hooks, and under LLM Compressor most of
them do nothing: with ``SharedHessianGPTQModifier`` the 2E gate and up projections share one Hessian, which
the first accumulates while the others only confirm they saw the same tensor. A calibration method can
register a *group hook* (``register_group_hook``) that stands for its hooks on many Linears: where every
hook of a projection's Linears across a group of experts is stood for, ``synthesize/grouped.py`` calls
each group hook once with all of them and their inputs (``linear_calls_for``), then computes each Linear's
``F.linear``: small bias-free Linears as one batched matmul on their stacked weights (``grouped.STACK_BYTES``).
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals
from torch.utils.hooks import RemovableHandle

__all__ = ["GroupCall", "GroupHook", "TransparencyRule", "call_linear", "linear_calls_for", "register_group_hook",
           "register_transparency_rule"]

# (linear, wrapper function, input) -> does calling the wrapper give what the function it wraps gives?
TransparencyRule = Callable[[nn.Module, Callable, torch.Tensor], bool]

# (Linears, their inputs) -> None: stands for hooks of each of those Linears (``register_group_hook``)
GroupHook = Callable[[Sequence[nn.Module], Sequence[torch.Tensor]], None]

_STOOD_FOR = "_autocal_stood_for"  # in a Linear's __dict__: {id of a hook on it: the group hook standing for it}
_RULES: OrderedDict[int, TransparencyRule] = OrderedDict()  # weakly referenced by handles
_CALLED_AS_MODULES: ContextVar[bool] = ContextVar("autocal_called_as_modules", default=False)
_WRAPPERS_DEEP = 8
_LINEAR_FORWARD = nn.Linear.forward
_PLAIN_CLASSES: dict[type, bool] = {}  # does the class compute ``nn.Linear.forward`` when called?  # wrappers of wrappers followed at most


@contextmanager
def called_as_modules() -> Iterator[None]:
    """Call every Linear as a module within this block, whatever the rules say (to compare, or rule them out)."""
    token = _CALLED_AS_MODULES.set(True)
    try:
        yield
    finally:
        _CALLED_AS_MODULES.reset(token)


def register_transparency_rule(rule: TransparencyRule) -> RemovableHandle:
    """Let ``call_linear`` skip the forward wrappers ``rule`` vouches for; ``handle.remove()`` withdraws it.

    ``rule(linear, wrapper, x)`` is asked for each function on the chain from the instance's ``forward``
    down to ``nn.Linear.forward`` (followed through ``__wrapped__``, as ``functools.wraps`` sets it), on
    every call: it must say True only if calling that wrapper on ``x`` now returns what the wrapped
    function returns, with no other effect.
    """
    handle = RemovableHandle(_RULES)
    _RULES[handle.id] = rule
    return handle


def register_group_hook(hook: GroupHook, stands_for: Iterable[tuple[nn.Module, RemovableHandle]]) -> RemovableHandle:
    """Let ``hook`` stand for the forward (pre-)hooks ``stands_for`` names, each on its module.

    Where every hook on each of a projection's Linears is stood for, ``linear_calls_for`` calls each group
    hook once, with the Linears it stands for and their inputs, instead of each Linear's hooks: the Linears
    of one expert projection, across a group of experts, in one call. A group hook must do what the hooks it
    stands for would have done with those inputs (their outputs are not passed: stand only for hooks that
    read inputs alone, or ignore the output and return None).
    """
    entries = [(module, handle.id) for module, handle in stands_for]
    for module, number in entries:
        module.__dict__.setdefault(_STOOD_FOR, {})[number] = hook
    handle = RemovableHandle(OrderedDict())  # removed, it takes the group hook off every module

    def remove() -> None:
        for module, number in entries:
            module.__dict__.get(_STOOD_FOR, {}).pop(number, None)

    handle.remove = remove
    return handle


@dataclass
class GroupCall:
    """How to compute Linears without calling them (``linear_calls_for``): the weight each computes with, and
    the group hooks to call, each with the positions of the Linears it stands for."""

    weights: list[torch.Tensor]
    hooks: list[tuple[GroupHook, list[int]]]

    def run_hooks(self, linears: Sequence[nn.Linear], inputs: Sequence[torch.Tensor]) -> None:
        for hook, positions in self.hooks:
            hook([linears[p] for p in positions], [inputs[p] for p in positions])


def linear_calls_for(linears: Sequence[nn.Linear], x: torch.Tensor) -> GroupCall | None:
    """A ``GroupCall`` for Linears about to run on inputs on ``x``'s device, if each can be computed without
    calling it and every hook on each is stood for by a group hook; else None (call each: ``call_linear``)."""
    if not _may_skip_wrappers():
        return None
    weights = [_plain_weight(linear, x) for linear in linears]
    if any(weight is None for weight in weights):
        return None
    hooks = _group_hooks(linears)
    return None if hooks is None else GroupCall(weights, hooks)


def _group_hooks(linears: Sequence[nn.Linear]) -> list[tuple[GroupHook, list[int]]] | None:
    """The group hooks standing for every hook on ``linears``, each with the positions of the Linears it stands
    for; None where some hook is stood for by none."""
    hooks: dict[GroupHook, list[int]] = {}
    for position, linear in enumerate(linears):
        stood = linear.__dict__.get(_STOOD_FOR, {})
        for number in (*linear._forward_pre_hooks, *linear._forward_hooks):
            hook = stood.get(number)
            if hook is None:
                return None
            positions = hooks.setdefault(hook, [])
            if not positions or positions[-1] != position:
                positions.append(position)
    return list(hooks.items())


def call_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``, the wrappers a rule vouches for skipped (see the module docstring)."""
    weight = _plain_weight(linear, x) if _may_skip_wrappers() else None
    if weight is None:
        return linear(x)
    hooks = _group_hooks((linear,))
    if hooks is not None:
        GroupCall([weight], hooks).run_hooks((linear,), (x,))
        return F.linear(x, weight, linear.bias)
    args = (x,)
    for number, hook in linear._forward_pre_hooks.items():
        if number in linear._forward_pre_hooks_with_kwargs:
            replaced = hook(linear, args, {})
            if replaced is not None:
                args, kwargs = replaced
                if kwargs:
                    return linear.forward(*args, **kwargs)  # hooks ran; only the forward is left to call
        else:
            replaced = hook(linear, args)
            if replaced is not None:
                args = replaced if isinstance(replaced, tuple) else (replaced,)
    inp = args[0] if len(args) == 1 else None
    if isinstance(inp, torch.Tensor) and inp.device == weight.device:
        output = F.linear(inp, weight, linear.bias)
    else:  # a pre-hook replaced the input with something else: the forward itself takes it
        output = linear.forward(*args)
    for number, hook in linear._forward_hooks.items():
        replaced = hook(linear, args, {}, output) if number in linear._forward_hooks_with_kwargs \
            else hook(linear, args, output)
        if replaced is not None:
            output = replaced
    return output


def _may_skip_wrappers() -> bool:
    """May any Linear be computed without calling it now: a rule registered, not turned off, no global hook?"""
    return bool(_RULES) and not _CALLED_AS_MODULES.get() and not (
        module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks
        or module_globals._global_backward_hooks or module_globals._global_backward_pre_hooks)


def _plain_weight(linear: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The weight to compute ``linear``'s forward with, if it can be computed without calling it (given
    ``_may_skip_wrappers``); else None."""
    plain = _PLAIN_CLASSES.get(type(linear))
    if plain is None:
        plain = _PLAIN_CLASSES[type(linear)] = (type(linear).forward is nn.Linear.forward
                                                and type(linear).__call__ is nn.Module.__call__)
    if not plain or linear._backward_hooks or linear._backward_pre_hooks:
        return None
    forward = linear.__dict__.get("forward")
    if forward is not None and not _transparent(linear, forward, x):
        return None
    weight = linear._parameters.get("weight")  # as ``nn.Module.__getattr__`` finds it, without its cost
    return weight if weight is not None and weight.device == x.device else None


def _transparent(linear: nn.Module, forward: Callable, x: torch.Tensor) -> bool:
    """Is ``forward``, set on the instance, ``nn.Linear.forward`` behind wrappers a rule vouches for?"""
    if getattr(forward, "__self__", linear) is not linear:  # a method of another object
        return False
    function = getattr(forward, "__func__", forward)
    for _ in range(_WRAPPERS_DEEP):
        if function is _LINEAR_FORWARD:
            return True
        for rule in _RULES.values():
            if rule(linear, function, x):
                break
        else:
            return False
        function = getattr(function, "__wrapped__", None)
        function = getattr(function, "__func__", function)
    return False
