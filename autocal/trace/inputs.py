"""Example inputs for one block, made from the block's own parameters.

No data set is needed: the hidden size is one of the dimensions of the block's
parameters, so each candidate size is tried (most frequent first) until the
forward runs and calls the experts container.
"""

from __future__ import annotations

import inspect
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .. import errors

__all__ = ["BlockCall", "block_call", "keyword_arguments", "call_arguments", "call_by_name", "hidden_size_candidates", "synthesize_inputs", "required_inputs", "capture_block_inputs",
           "mixed_dtypes", "one_token"]


@dataclass
class BlockCall:
    """Example inputs of one block call, and copies of the tensors it returned where its output was kept
    (``capture_calls``; ``numerics.kept_output``)."""

    args: tuple
    kwargs: dict
    output: Any = None


def block_call(block: nn.Module, inputs: dict) -> BlockCall:
    """The block call of ``inputs`` given by parameter name: the first parameter positional (the hidden states, as
    a model passes them), the rest by keyword. A name the forward does not take is an error."""
    signature = inspect.signature(block.forward)
    try:
        bound = signature.bind_partial(**inputs)
    except TypeError as error:
        raise errors.AutocalError(errors.BAD_INPUT, f"example_inputs do not fit the block's forward: {error}",
                                  block_class=type(block).__name__) from error
    first = next(iter(signature.parameters))
    kwargs = dict(bound.arguments)
    return BlockCall((kwargs.pop(first),), kwargs) if first in kwargs else BlockCall((), kwargs)


def keyword_arguments(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A call's inputs by parameter name, ``**kwargs`` spread out: how recordings and recipes take them. The
    values of ``*args`` are named by their place in it (``input0``, ``input1`` for ``*input``; DeepSpeed's and
    fairseq's MoE layers take their inputs so); ``call_arguments`` turns the names back into a call."""
    spread = {}
    for name, argument in signature.bind(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            spread.update({f"{name}{place}": value for place, value in enumerate(argument)})
        else:
            spread.update(argument if kind is inspect.Parameter.VAR_KEYWORD else {name: argument})
    return spread


def call_arguments(signature: inspect.Signature, named: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` that call a forward of ``signature`` with the inputs ``keyword_arguments`` named: all by
    keyword, unless the forward takes ``*args``, whose values (and the parameters before them) go by position."""
    variadic = next((p for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if variadic is None:
        return (), dict(named)
    kwargs, args = dict(named), []
    for parameter in signature.parameters.values():
        if parameter is variadic:
            break
        args.append(kwargs.pop(parameter.name, parameter.default))  # a default kept in its place
    place = 0
    while f"{variadic.name}{place}" in kwargs:
        args.append(kwargs.pop(f"{variadic.name}{place}"))
        place += 1
    return tuple(args), kwargs


def call_by_name(module: nn.Module, named: dict) -> Any:
    """``module`` called with inputs named as ``keyword_arguments`` names them."""
    args, kwargs = call_arguments(inspect.signature(module.forward), named)
    return module(*args, **kwargs)


def hidden_size_candidates(block: nn.Module, container: nn.Module) -> list[int]:
    """Sizes that could be the hidden size, most plausible first (a 3-D weight's leading size, its number of
    experts, adds no plausibility: a block holding its experts' weights beside an ``[E, H]`` router would otherwise
    rank ``E`` with ``H``)."""
    container_dims = {d for p in container.parameters() for d in p.shape[-2:]}
    counts = Counter(d for p in block.parameters() for d in (p.shape[1:] if p.dim() >= 3 else p.shape) if d > 1)
    ranked = sorted(container_dims, key=lambda d: (-counts[d], d))
    return ranked + [d for d, _ in counts.most_common() if d not in container_dims]


def required_inputs(block: nn.Module) -> list[str]:
    """Names of forward parameters with no default (beyond the first)."""
    params = list(inspect.signature(block.forward).parameters.values())
    return [
        p.name
        for p in params[1:]
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]


def synthesize_inputs(
    block: nn.Module,
    container: nn.Module,
    accepts: Callable[[tuple], bool],
    *,
    num_tokens: int,
    seed: int = 0,
) -> tuple | None:
    """The first ``(hidden_states,)`` that ``accepts`` takes, or None.

    Tries ``[1, tokens, H]`` then ``[tokens, H]`` for each candidate ``H``; for a forward taking ``*args``,
    each also followed by None. In the experts' dtype first, then in each other float dtype of the block's
    parameters (bfloat16 experts behind a float32 router take float32 hidden states and cast them).
    """
    reference = next(container.parameters())  # dtype and device of the experts
    dtypes = dict.fromkeys([reference.dtype, *(p.dtype for p in block.parameters() if p.is_floating_point())])
    generator = torch.Generator(device="cpu").manual_seed(seed)
    variadic = any(p.kind is p.VAR_POSITIONAL for p in inspect.signature(block.forward).parameters.values())
    for dtype in dtypes:
        for hidden in hidden_size_candidates(block, container):
            for shape in ((1, num_tokens, hidden), (num_tokens, hidden)):
                x = torch.randn(shape, generator=generator).to(dtype=dtype, device=reference.device)
                # a forward taking *args may read a second input that is optional in meaning (a token mask): None
                for args in ((x,), (x, None)) if variadic else ((x,),):
                    if accepts(args):
                        return args
    return None


def _calls(block: nn.Module, experts: nn.Module, failures: list[Exception],
           uncalled: list[tuple] | None = None) -> Callable[[tuple], bool]:
    """Does the block run with these inputs and call into ``experts``? (What it raised goes to ``failures``; the
    shapes it ran on without calling them to ``uncalled``.)"""

    def accepts(args: tuple) -> bool:
        seen = []
        handles = [m.register_forward_pre_hook(lambda *_: seen.append(True)) for m in experts.modules()]
        try:
            with torch.no_grad():
                block(*args)
        except Exception as error:
            failures.append(error)
            return False
        finally:
            for handle in handles:
                handle.remove()
        if not seen and uncalled is not None:
            uncalled.append(tuple(a.shape for a in args if isinstance(a, torch.Tensor)))
        return bool(seen)

    return accepts


def capture_block_inputs(block: nn.Module, experts: nn.Module, *, num_tokens: int) -> BlockCall:
    """Example inputs synthesized from the block's parameters, such that its experts get called."""
    hint = "pass example inputs of the whole model: autocal.convert(model, example_inputs={...})"
    missing = required_inputs(block)
    if missing:  # the values of such an input (which expert set a token id selects, say) are not in the weights
        raise errors.AutocalError(
            errors.TRACE_FAILED, f"the block's forward needs inputs autocal cannot make up: {', '.join(missing)}",
            block_class=type(block).__name__,
            hints=[f"pass the block's inputs: autocal.synthesize(block, example_inputs={{...}}) with "
                   f"{', '.join(missing)} beside the hidden states, or {hint}"],
        )
    failures: list[Exception] = []
    uncalled: list[tuple] = []
    args = synthesize_inputs(block, experts, _calls(block, experts, failures, uncalled), num_tokens=num_tokens)
    if args is None and uncalled:
        shape = list(uncalled[0][0]) if uncalled[0] else []
        path = next((p for p, m in block.named_modules() if m is experts), "") or "<block>"
        raise errors.AutocalError(  # the kind of every made-up-input failure: rules read it (not an MoE, maybe)
            errors.TRACE_FAILED, f"the block's forward runs on made-up hidden states {shape} but never calls "
            f"a module in `{path}`: the experts run without module calls (torch.func.functional_call, "
            "`expert.forward(x)`), which calibration hooks do not see, or not on such inputs",
            block_class=type(block).__name__, hints=["call the experts as modules: `expert(x)`", hint])
    if args is None:
        explanation = "no hidden-state shape made of the block's parameter sizes runs its forward"
        dtypes = mixed_dtypes(block)
        if dtypes:
            explanation = f"the block's parameters mix {dtypes}, and its forward fails on them"
            hint = "cast the model to one dtype before converting it (model.to(torch.bfloat16), or float32)"
        if failures:  # the most plausible hidden size was tried first: its error says most
            explanation += f"; with the first shape tried it raised {type(failures[0]).__name__}: {failures[0]}"
        raise errors.AutocalError(errors.TRACE_FAILED, explanation, block_class=type(block).__name__,
                                  hints=[hint]) from (failures[0] if failures else None)
    return BlockCall(args, {})


def mixed_dtypes(block: nn.Module) -> str | None:
    """``"bfloat16 (experts) and float32 (gate)"`` when the block's floating parameters are of several dtypes."""
    owners: dict[torch.dtype, list[str]] = {}
    for name, param in block.named_parameters():
        if param.is_floating_point():
            owner = owners.setdefault(param.dtype, [])
            child = name.split(".")[0] if "." in name else "the block"
            if child not in owner:
                owner.append(child)
    if len(owners) < 2:
        return None
    return " and ".join(f"{str(dtype).removeprefix('torch.')} ({', '.join(names[:3])})"
                        for dtype, names in owners.items())


def one_token(args: tuple, kwargs: dict) -> tuple[tuple | None, dict]:
    """The first token of a block call: the hidden states cut to one position in every leading dimension, and
    each tensor input with the same leading dimensions cut alike (``token_type_ids``). None when there are no
    hidden states to cut."""
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if hidden is None or hidden.dim() < 2:
        return None, kwargs
    leading = hidden.shape[:-1]

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.shape[:len(leading)] == leading:
            return value[(slice(0, 1),) * len(leading)]
        return value
    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}
