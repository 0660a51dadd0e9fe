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
themselves.
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
