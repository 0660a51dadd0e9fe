"""Fused expert ops run as the plain ops they stand for, so that recording and calibration can see each expert.

A grouped matmul (``F.grouped_mm``, ``torch._grouped_mm``: training frameworks'
grouped experts) multiplies consecutive row segments, one per expert, by that
expert's matrix of an ``[E, in, out]`` weight, in one op. Recorded as one op it
hides which rows meet which expert. Run as what it means, a loop over the
experts slicing ``w[e]`` and multiplying its rows, it is the spelling
``detect/gathered.py`` reads (a slice per expert, contracted with its rows), and
calibration computes each slice's product by that expert's Linear.

The modes that need it (``trace/record.py``'s recorder, ``trace/gathers.py``'s
tracker) call :func:`decomposition` on every op and run what it returns inside
themselves. A slice of one expert's matrix, ``w[e:e + 1]``, is recorded as ``w[e]`` kept 3-D, for the same reason.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["decomposition", "not_padding"]

_GROUPED = tuple(op for op in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if op)


def decomposition(func: Callable, args: tuple, kwargs: dict) -> Callable[[], Any] | None:
    """A function computing ``func(*args, **kwargs)`` by plain ops, for an op autocal decomposes; else None."""
    expert = _one_expert_slice(func, args, kwargs)
    if expert is not None:  # ``w[e:e + 1]``, ``w.narrow(0, e, 1)``: expert e's matrix, kept 3-D
        return lambda: args[0][expert].unsqueeze(0)
    if func not in _GROUPED:
        return None
    try:
        bound = inspect.signature(func).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):  # a builtin without a signature
        bound = dict(zip(("mat_a", "mat_b"), args)) | kwargs
    rows, weight, offsets = bound.get("mat_a"), bound.get("mat_b"), bound.get("offs")
    if not (isinstance(rows, torch.Tensor) and isinstance(weight, torch.Tensor) and isinstance(offsets, torch.Tensor)
            and rows.dim() == 2 and weight.dim() == 3 and bound.get("bias") is None):
        return None
    dtype = bound.get("out_dtype") or torch.result_type(rows, weight)
    return lambda: _by_segments(rows, weight, offsets, dtype)


def _one_expert_slice(func: Callable, args: tuple, kwargs: dict) -> int | None:
    """``e``, where ``func`` takes one entry of a stored ``[E, a, b]`` weight as a slice of length one along its
    first dimension (``bmm(rows[None], w[e:e + 1])``): recorded as ``w[e]`` then ``unsqueeze(0)``, the spelling
    ``detect/gathered.py`` reads as one expert's matrix."""
    weight = args[0] if args else None
    stored = isinstance(weight, torch.nn.Parameter) or isinstance(getattr(weight, "_base", None), torch.nn.Parameter)
    if not stored or weight.dim() != 3 or kwargs:
        return None
    if func is torch.Tensor.__getitem__ and isinstance(args[1], slice) and args[1].step in (None, 1):
        start, stop, _ = args[1].indices(weight.shape[0])
        return start if stop - start == 1 else None
    if getattr(func, "__name__", "") == "narrow" and len(args) == 4 and args[1] == 0 and args[3] == 1:
        return int(args[2]) if isinstance(args[2], int) else None
    return None


def _by_segments(rows: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows ``offsets[e-1]:offsets[e]`` times ``weight[e]``; rows past the last offset, which the fused op leaves
    unset, are zeros."""
    out = rows.new_zeros(rows.shape[0], weight.shape[-1], dtype=dtype)
    start = 0
    for expert, end in enumerate(offsets.tolist()):
        kept = not_padding(rows[start:end])
        if kept.numel():
            out[start + kept] = (rows[start + kept] @ weight[expert]).to(dtype)
        start = end
    return out


def not_padding(segment: torch.Tensor) -> torch.Tensor:
    """The rows of one expert's segment that are not all zeros.

    Training frameworks pad each expert's rows with zero rows to a multiple of
    an alignment before a grouped matmul (torchtitan's permute indices), and drop
    them after. Those rows are no tokens: a zero row gives a zero row (no bias
    here), so leaving it out changes no output, and it keeps what the experts'
    Linears observe to tokens. Seen by a static observer, zero rows would pull
    an activation mean (AWQ) towards zero, widen a min/max to include 0, count
    in a Hessian's token total (GPTQ) and in the coverage counts; an expert with
    no token routed to it would look calibrated by its padding alone. A real
    token whose row is all zeros is left out too; the coverage check then
    reports it.
    """
    return segment.ne(0).any(-1).nonzero().squeeze(-1)
