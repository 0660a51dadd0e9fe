"""Verify a calibration module against the original block before it is swapped in.

Both run on the same random input, calibration off and on. A mismatch beyond
the dtype's tolerance is an error, never a silent swap; so is an expert that
did not see every token with calibration on.
"""

from __future__ import annotations

import os
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from . import errors
from .coverage import _COUNTER
from .numerics import TOLERANCES, compare_outputs, kept_output
from .trace.forcing import fresh_inputs
from .trace.hf import eager_experts, experts_implementation
from .trace.inputs import BlockCall, one_token, synthesize_inputs

__all__ = ["Verification", "TOLERANCES", "verify", "Case", "verification_cases", "compare_outputs", "rows_seen",
           "counts_itself", "one_token", "hidden_tokens"]

_TORCH_DIR = os.path.dirname(torch.__file__)

@dataclass
class Verification:
    """What the check measured."""

    max_abs_diff_off: float
    max_abs_diff_on: float
    bitwise_off: bool
    calibration_on_equals_off: bool
    tokens: int
    experts_covered: int
    num_experts: int
    passed: bool
    experts_implementation: str | None = None  # transformers' experts implementation the original ran
    bitwise_off_eager: bool | None = None  # calibration off against the original run with eager experts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def hidden_tokens(args: tuple, kwargs: dict) -> int:
    hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    return int(hidden.numel() // hidden.shape[-1])


@contextmanager
def rows_seen(modules: list[nn.Module], counting_themselves: bool = False) -> Iterator[list[int]]:
    """Count the input rows each module receives while the context is open.

    With ``counting_themselves`` the modules' dispatch counts their rows (the
    counter of ``autocal.coverage``): it is read, not hooked, so the dispatch
    keeps the path it takes when nothing is hooked (a hook on an expert module
    makes the calibration forward run experts one at a time). The counter is
    left as it was.
    """
    seen = [0] * len(modules)
    if counting_themselves:
        before = [module.__dict__.get(_COUNTER) for module in modules]
        for module in modules:
            module.__dict__[_COUNTER] = 0
        try:
            yield seen
        finally:
            for i, (module, count) in enumerate(zip(modules, before)):
                seen[i] = module.__dict__.pop(_COUNTER)
                if count is not None:
                    module.__dict__[_COUNTER] = count
        return
    handles = []
    for i, module in enumerate(modules):
        def hook(_, args, kwargs, i=i):  # the rows: the first tensor, also where given by keyword
            rows = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            seen[i] += int(rows.numel() // rows.shape[-1]) if rows is not None and rows.dim() else 0
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def counts_itself(calibration: nn.Module) -> bool:
    """Does the calibration module's dispatch count its experts' rows (no hook needed)?"""
    return getattr(getattr(calibration, "experts_container", None), "counts_tokens", False)


def _tokens_due(calibration: nn.Module, args: tuple, kwargs: dict, tokens: int, experts: int) -> list[int]:
    """The tokens each expert must see with calibration on: every token, or, for a module with several expert sets
    (``detect/expert_sets.py``), every token reaching the expert's set, as the module counts them."""
    due = getattr(calibration, "tokens_due", None)
    return due(args, fresh_inputs(kwargs)) if due is not None else [tokens] * experts


class Case(NamedTuple):
    """Inputs a calibration module is verified on, and the original's output on them where it is known."""

    args: tuple
    kwargs: dict
    expected: Any = None


def verification_cases(block: nn.Module, call: BlockCall | None, experts_path: str | None) -> list[Case]:
    """What the first block of a class is verified on: the caller's inputs, with the output the model's own call
    gave, or else made-up hidden states (another seed than detection used); then inputs that reach the branches
    the first may miss: one token (a decode branch), and several tokens where the first held one. Inputs the
    original cannot run are left out; it runs once on each branch's, and that output is kept."""
    experts = block.get_submodule(experts_path) if experts_path is not None else block
    runs = lambda a: _output(block, a, {}) is not _FAILED  # noqa: E731
    if call is not None:
        first = Case(call.args, call.kwargs, call.output)
    else:
        made = synthesize_inputs(block, experts, runs, num_tokens=33, seed=1)
        if made is None:
            return []
        first = Case(made, {})
    branches = [one_token(first.args, first.kwargs)]
    if hidden_tokens(first.args, first.kwargs) == 1 and not first.kwargs:
        branches.append((synthesize_inputs(block, experts, runs, num_tokens=9, seed=2), {}))
    cases = [first]
    for args, kwargs in branches:
        output = _output(block, args, kwargs) if args is not None else _FAILED
        cases += [Case(args, kwargs, output)] if output is not _FAILED else []
    return cases


_FAILED = object()


def _output(block: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Copies of the tensors ``block`` returns on these inputs (``kept_output``), or ``_FAILED`` where it raises."""
    try:
        with torch.no_grad():
            return kept_output(block(*fresh_inputs(args), **fresh_inputs(kwargs)))
    except Exception:
        return _FAILED


def verify(original: nn.Module, calibration: nn.Module, args: tuple, kwargs: dict | None = None, *,
           expected: Any = None, eager: bool = True) -> Verification:
    """Run both modules on ``args`` and raise ``verification-failed`` if they disagree.

    Coverage is counted on ``calibration.expert_modules()``, by the module's own
    counter where it has one, so the calibration forward runs as it will for the
    user (a hand-written module without that method is checked for equality only).
    ``expected`` is the original's output on these inputs where the caller has it
    (the model's own call of the block, ``BlockCall.output``): the original runs
    again only where the calibration module does not reproduce it (the model may
    have run the block under its autocast). ``eager`` also compares calibration
    off with the original run with transformers' eager experts, which ``explain``
    reports, at the cost of one more run of the original.
    """
    kwargs = kwargs or {}
    run_original = lambda: original(*fresh_inputs(args), **fresh_inputs(kwargs))  # noqa: E731
    mode = calibration.calibrate_all_experts
    given = expected is not None
    try:
        with torch.no_grad():
            expected = expected if given else run_original()
            calibration.calibrate_all_experts = False
            off = calibration(*fresh_inputs(args), **fresh_inputs(kwargs))
            calibration.calibrate_all_experts = True
            with rows_seen(getattr(calibration, "expert_modules", list)(), counts_itself(calibration)) as seen:
                on = calibration(*fresh_inputs(args), **fresh_inputs(kwargs))
    except errors.AutocalError as error:
        raise error.with_context(block_class=type(original).__name__)
    except Exception as error:  # the calibration module fails where the original runs: stated, never raw
        raise errors.AutocalError(
            errors.VERIFICATION_FAILED, f"the calibration module raises {type(error).__name__} on "
            f"{hidden_tokens(args, kwargs)} tokens where the original runs: {error}",
            block_class=type(original).__name__, source=_innermost_source(error),
            hints=["report this with the model config; meanwhile " + errors.override_hint(type(original).__name__)],
        ) from error
    finally:
        calibration.calibrate_all_experts = mode
    if given and not (compare_outputs(expected, off)[2] and compare_outputs(expected, on)[2]):
        with torch.no_grad():
            expected = run_original()
    implementation = experts_implementation(original)
    bitwise_eager = None
    if eager and implementation not in (None, "eager"):  # the calibration module computes experts as eager does
        with torch.no_grad(), eager_experts(original):
            bitwise_eager = compare_outputs(run_original(), off)[1]
    diff_off, bitwise_off, close_off = compare_outputs(expected, off)
    diff_on, _, close_on = compare_outputs(expected, on)
    _, on_equals_off, _ = compare_outputs(off, on)
    tokens = hidden_tokens(args, kwargs)
    due = _tokens_due(calibration, args, kwargs, tokens, len(seen))
    covered = sum(1 for n, d in zip(seen, due) if n >= d)  # a token routed twice to one expert counts twice
    result = Verification(diff_off, diff_on, bitwise_off, on_equals_off, tokens, covered, len(seen),
                          close_off and close_on and covered == len(seen), implementation,
                          bitwise_off if implementation == "eager" else bitwise_eager)
    if not (close_off and close_on) and not _repeatable(original, args, kwargs, expected):
        raise errors.AutocalError(
            errors.VERIFICATION_FAILED, "the original block gives different outputs when run twice on the same "
            "input: its forward draws random numbers (random token selection, noise on the router scores) or "
            "changes state it reads, so no calibration module can reproduce it", block_class=type(original).__name__,
            hints=["make its forward deterministic in eval mode (turn off the random token selection or the "
                   "noise), then convert"])
    if not result.passed:
        problem = (
            f"outputs differ by up to {max(diff_off, diff_on):.3g} on {tokens} tokens"
            if not (close_off and close_on)
            else f"only {covered} of {len(seen)} experts saw all {tokens} tokens with calibration on"
            if set(due) <= {tokens} else
            f"only {covered} of {len(seen)} experts saw all the tokens reaching their expert set with calibration on"
        )
        raise errors.AutocalError(
            errors.VERIFICATION_FAILED,
            f"the calibration module does not reproduce the original: {problem}",
            block_class=type(original).__name__,
            hints=["report this with the model config; meanwhile " + errors.override_hint(type(original).__name__)],
        )
    return result


def _repeatable(original: nn.Module, args: tuple, kwargs: dict, expected: Any) -> bool:
    """Does the original, run again on the same inputs, give ``expected`` again (within tolerance)?"""
    with torch.no_grad():
        return compare_outputs(expected, original(*fresh_inputs(args), **fresh_inputs(kwargs)))[2]


def _innermost_source(error: BaseException) -> str | None:
    """``file:line`` of the innermost frame of ``error``'s traceback outside torch."""
    found = None
    for frame, line in traceback.walk_tb(error.__traceback__):
        if not frame.f_code.co_filename.startswith(_TORCH_DIR):
            found = f"{frame.f_code.co_filename}:{line}"
    return found
