"""Calibration of experts run on a dispatched tensor (``detect/dispatched.py``): every token in every slot.

Within ``every_token_in_every_slot``, the block's forward runs as it is, but
the call of the experts module on the dispatched tensor runs it instead on every
token placed in every expert's slots (capacity: all tokens), so that each
expert's Linears see each token once; each slot of the dispatched tensor then
gets its own token's output (empty slots zeros, their combine weight is zero),
and the block's combine contraction goes on as before. Tokens the capacity
dropped stay dropped in the output.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn
from torch.overrides import TorchFunctionMode

from .. import errors
from ..trace.dispatch import SlotDispatch

__all__ = ["every_token_in_every_slot"]


class _Dispatched(TorchFunctionMode):
    """Keeps the dispatch contraction's output, its token rows, and each slot's token, while a forward runs."""

    def __init__(self, dispatch: SlotDispatch) -> None:
        super().__init__()
        self.dispatch, self.seen, self.found = dispatch, 0, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is self.dispatch.function and self.found is None:
            if self.seen == self.dispatch.ordinal and self.dispatch.operands(args) is not None:
                tokens = self.dispatch.operands(args)[1]
                self.found = (out, tokens.reshape(-1, tokens.shape[-1]), self.dispatch.slot_tokens(args, kwargs))
            self.seen += 1
        return out


@contextmanager
def every_token_in_every_slot(experts: nn.Module, dispatch: SlotDispatch) -> Iterator[None]:
    """Within, ``experts`` called on the dispatched tensor runs on every token in every slot (module docstring)."""
    seen = _Dispatched(dispatch)

    def forward(given, *args, **kwargs):
        if seen.found is None:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "the dispatch contraction found at detection did "
                                      f"not run before `{dispatch.experts}` was called",
                                      block_class=type(experts).__name__)
        dispatched, rows, slots = seen.found
        if given.numel() != dispatched.numel() or given.shape[-1] != dispatched.shape[-1]:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, f"`{dispatch.experts}` was called with another "
                                      "tensor than the dispatched tokens", block_class=type(experts).__name__)
        every = original(dispatch.every_token(rows.to(given.dtype), given), *args, **kwargs)
        return dispatch.slot_outputs(every, slots.reshape(given.shape[:-1]))

    own = experts.__dict__.get("forward")
    original = experts.forward
    experts.forward = forward
    try:
        with seen:
            yield
    finally:
        if own is None:
            del experts.forward
        else:
            experts.forward = own
