"""Functions that generated expert code calls (fx prints them by qualified name)."""

from __future__ import annotations

import math

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as module_globals

__all__ = ["Geometry", "ProjectionLayout", "RowComplement", "geometry", "assemble_columns", "call_linear", "inputs_seen", "project",
           "run_on_the_rest", "run_unrouted", "unrouted_rows", "unobserved", "untouched"]

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

def call_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)``; under ``unobserved()`` its matmul alone, which no hook sees."""
    if _UNOBSERVED.get():
        return F.linear(x, linear.weight, linear.bias)
    return linear(x)


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
        if layout.op == "linear" and layout.bias_in_op:
            return F.linear(x, operand, bias)
        out = F.linear(x, operand) if layout.op == "linear" else torch.matmul(x, operand)
        return out if bias is None else out + bias
    pieces = tuple(call_linear(linear, x) for linear in linears)
    return pieces[0] if len(pieces) == 1 else assemble_columns(pieces, columns, features)


def unrouted_rows(source: torch.Tensor, routed: torch.Tensor) -> torch.Tensor:
    """The rows of ``source`` whose index is not in ``routed``."""
    unrouted = torch.ones(source.shape[0], dtype=torch.bool, device=source.device)
    unrouted[routed] = False
    return source[unrouted]


def run_unrouted(expert: nn.Module, source: torch.Tensor, routed: torch.Tensor, enabled: bool) -> None:
    """With ``enabled``, run ``expert`` on the rows of ``source`` not in ``routed``; the result is discarded."""
    if not enabled:
        return
    rows = unrouted_rows(source, routed)
    if rows.shape[0]:
        expert(rows)


class RowComplement:
    """The rows of ``source`` that an expert was not given, from the rows it was given (compared by value).

    Each given row claims one equal row of ``source`` (a multiset difference):
    equal rows are interchangeable for calibration, so which of two equal rows
    is left does not matter. Rows are compared by their bits, through an exact
    integer hash computed once for ``source``.
    """

    def __init__(self, source: torch.Tensor) -> None:
        self.source = source
        keys = _row_keys(source)
        self.order = torch.argsort(keys, stable=True)
        self.keys = keys[self.order]
        self.rank = torch.arange(self.keys.numel(), device=source.device) - torch.searchsorted(self.keys, self.keys)

    def rest(self, given: list[torch.Tensor]) -> torch.Tensor:
        given = [rows for rows in given if rows.shape[0]]
        if not given or not self.keys.numel():
            return self.source
        keys, counts = torch.unique(_row_keys(torch.cat(given).to(self.source.dtype)), return_counts=True)
        slot = torch.searchsorted(keys, self.keys).clamp(max=keys.numel() - 1)
        claimed = torch.where(keys[slot] == self.keys, counts[slot], 0)
        left = torch.empty_like(self.rank, dtype=torch.bool)
        left[self.order] = self.rank >= claimed
        return self.source[left]


def _row_keys(rows: torch.Tensor) -> torch.Tensor:
    """One int64 per row from its bits (wrapping sums are exact, so equal rows get equal keys)."""
    bits = rows.reshape(rows.shape[0], math.prod(rows.shape[1:])).contiguous()
    integers = bits.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[bits.element_size()])
    generator = torch.Generator().manual_seed(0)
    multipliers = torch.randint(1, 2 ** 62, (bits.shape[1],), generator=generator).to(rows.device) | 1
    return (integers.to(torch.int64) * multipliers).sum(-1)


@contextmanager
def inputs_seen(modules: list[nn.Module]) -> Iterator[list[list[torch.Tensor]]]:
    """Within, the first tensor input of every call of each module, per module."""
    seen: list[list[torch.Tensor]] = [[] for _ in modules]

    def keep(index: int):
        def hook(module, args, kwargs):
            first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
            if first is not None:
                seen[index].append(first.reshape(-1, first.shape[-1]))
        return hook

    handles = [m.register_forward_pre_hook(keep(i), with_kwargs=True) for i, m in enumerate(modules)]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def run_on_the_rest(expert: nn.Module, rows: RowComplement, seen: list[torch.Tensor]) -> None:
    """Run ``expert`` on the rows it was not given in the block's own forward (``seen``), output discarded.

    By value rather than by a recorded recipe of which rows go where: a recipe
    replays constants recorded at one number of tokens (a capacity, the counts
    behind slices of rows sorted by expert), the rows an expert was really given
    are what they are.
    """
    rest = rows.rest(seen)
    if rest.shape[0]:
        expert(rest)
