"""Numerics shared by the stages: how outputs are compared, and how generated expert code computes a projection.

Below every stage (it imports torch and ``linear_calls`` only): detection checks a forced routing
against the recorded output with ``compare_outputs``, and the expert templates
it builds call ``project``, which the synthesized modules run.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals
from torch.utils._pytree import tree_flatten

from . import linear_calls

__all__ = ["TOLERANCES", "compare_outputs", "output_tensors", "kept_output", "Geometry", "ProjectionLayout", "geometry",
           "assemble_columns", "call_linear", "observation_off", "project", "unobserved", "untouched"]

# (rtol, atol): outputs agree when max|a - b| <= atol + rtol * max|b|. Unpacked
# experts compute gate and up as two matmuls where the original did one, and a
# Linear adds its bias inside the matmul where some originals add it after;
# results can then differ by a few units in the last place of the dtype.
TOLERANCES = {
    torch.float32: (1e-5, 1e-6),
    torch.float64: (1e-12, 1e-12),
    torch.bfloat16: (1.6e-2, 1e-2),
    torch.float16: (1e-3, 1e-4),
}


def output_tensors(output: Any) -> list[torch.Tensor]:
    """Every tensor of a block's output, in order: in tuples, lists, dicts, named tuples and transformers'
    ``ModelOutput`` (pytree containers), and in the fields of a dataclass, which pytree takes for one opaque leaf
    unless registered (a block returning ``@dataclass`` outputs would otherwise compare equal to anything)."""
    tensors = []
    for leaf in tree_flatten(output)[0]:
        if isinstance(leaf, torch.Tensor):
            tensors.append(leaf)
        elif is_dataclass(leaf) and not isinstance(leaf, type):
            tensors += output_tensors([getattr(leaf, field.name) for field in fields(leaf)])
    return tensors


def kept_output(output: Any) -> list[torch.Tensor]:
    """Copies of every tensor of a block's output (``output_tensors``), which ``compare_outputs`` takes in its
    place: what a call returned, safe from later writes into it."""
    return [tensor.detach().clone() for tensor in output_tensors(output)]


def compare_outputs(expected: Any, actual: Any) -> tuple[float, bool, bool]:
    """``(max abs difference, bitwise equal, within tolerance)`` over all tensors of two outputs."""
    left, right = output_tensors(expected), output_tensors(actual)
    if len(left) != len(right) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(left, right)):
        return float("inf"), False, False
    diff, bitwise, close = 0.0, True, True
    for a, b in zip(left, right):
        if a.numel():
            diff = max(diff, (a.double() - b.double()).abs().max().item())
        bitwise &= torch.equal(a, b)
        rtol, atol = TOLERANCES.get(a.dtype, (0, 0))
        if a.numel() and not torch.equal(a.isnan(), b.isnan()):
            close = False
        elif a.numel():
            scale = a.double().nan_to_num().abs().max().item()
            close &= (a.double() - b.double()).nan_to_num().abs().max().item() <= atol + rtol * scale
    return diff, bitwise, close


_UNOBSERVED: ContextVar[bool] = ContextVar("autocal_unobserved", default=False)


@contextmanager
def unobserved() -> Iterator[None]:
    """Compute projections on the packed storage even where hooks would observe the Linears.

    For values the original computes but calibration must not see (an expert
    applied to the zero rows of tokens it was not routed).
    """
    token = _UNOBSERVED.set(True)
    try:
        yield
    finally:
        _UNOBSERVED.reset(token)

def observation_off() -> bool:
    """Are we under ``unobserved()``?"""
    return _UNOBSERVED.get()


def call_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` (wrappers known to change nothing skipped: ``linear_calls``); under ``unobserved()`` its
    matmul alone, which no hook sees."""
    if _UNOBSERVED.get():
        return F.linear(x, linear.weight, linear.bias)
    return linear_calls.call_linear(linear, x)


Geometry = tuple[tuple[int, ...], tuple[int, ...], int]  # size, stride, storage offset


def geometry(tensor: torch.Tensor) -> Geometry:
    return tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset()


@dataclass(frozen=True)
class ProjectionLayout:
    """Where one expert's original matmul operand lies in the storage its Linears view."""

    op: str
    operand: Geometry
    bias: Geometry | None
    bias_in_op: bool
    weights: tuple[Geometry, ...]
    addresses: tuple[tuple[int, int | None], ...] = ()  # (weight, bias) data pointers as unpacked


def assemble_columns(pieces: tuple[torch.Tensor, ...], columns: tuple[slice, ...], features: int) -> torch.Tensor:
    """Write each piece into its columns of one ``[..., features]`` tensor."""
    first = pieces[0]
    out = first.new_empty(*first.shape[:-1], features)
    for piece, cols in zip(pieces, columns):
        out[..., cols] = piece
    return out


def untouched(linears: tuple[nn.Linear, ...], layout: ProjectionLayout | None) -> bool:
    """Are these still plain Linears viewing the packed storage as unpacked, with no hook to feed?"""
    if layout is None:
        return False
    if _UNOBSERVED.get():
        return _same_geometry(linears, layout)
    if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
        return False
    if any(type(linear) is not nn.Linear or "forward" in linear.__dict__ or linear._forward_hooks
           or linear._forward_pre_hooks for linear in linears):
        return False
    if torch.is_grad_enabled() and any(linear.weight.requires_grad for linear in linears):
        return False
    return _same_geometry(linears, layout)


def _same_geometry(linears: tuple[nn.Linear, ...], layout: ProjectionLayout) -> bool:
    """Do the Linears still view the packed storage exactly as they were unpacked?

    Same address and strides as when unpacked: replaced or moved weights (``.to``,
    ``weight.data = …``) fail this; weights updated in place pass, and the packed
    storage they view holds the update.
    """
    for linear, (weight, bias), (size, stride, _) in zip(linears, layout.addresses, layout.weights):
        tensor = linear.weight
        if tensor.data_ptr() != weight or tensor.stride() != stride or tensor.shape != size:
            return False
        if (linear.bias is None) != (bias is None) or (bias is not None and linear.bias.data_ptr() != bias):
            return False
    return bool(layout.addresses)


def project(x: torch.Tensor, linears: tuple[nn.Linear, ...], columns: tuple[slice, ...], features: int,
            layout: ProjectionLayout | None) -> torch.Tensor:
    """The output of one matmul of the original expert, computed by the Linears cut from it.

    While the Linears are untouched, the original matmul runs on the packed
    storage they view, so the result is bitwise the original's (BLAS may round
    a matmul split into Linears differently). Otherwise (a hook, a quantization
    wrapper, replaced weights, autograd) each Linear is called (under
    ``unobserved()``, its matmul alone: moved weights, as offloading leaves
    them, must not let hooks see what calibration must not) and the pieces are
    written into one tensor, so that slicing it the way the original sliced its
    matmul output gives views with the original's strides: the elementwise ops
    that follow then vectorize, and round, as they did in the original.
    """
    if untouched(linears, layout):
        operand = linears[0].weight.as_strided(*layout.operand)
        bias = linears[0].bias.as_strided(*layout.bias) if layout.bias is not None else None
        if layout.op == "conv1d":  # x has its channels last, as the Linears take them
            return F.conv1d(x.movedim(-1, 1), operand, bias).movedim(1, -1)
        if layout.op == "linear" and layout.bias_in_op:
            return F.linear(x, operand, bias)
        out = F.linear(x, operand) if layout.op == "linear" else torch.matmul(x, operand)
        return out if bias is None else out + bias
    pieces = tuple(call_linear(linear, x) for linear in linears)
    return pieces[0] if len(pieces) == 1 else assemble_columns(pieces, columns, features)
