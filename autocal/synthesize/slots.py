"""Routing slots sorted by expert, for the experts container's dispatch, made without waiting for the device.

A host synchronisation per expert (``torch.where``, ``.tolist()``) stalls a GPU
between every expert's launches; here the slots are sorted once on the device
and the boundaries between experts (or groups of experts) are copied to the
host once, asynchronously where the device allows.
"""

from __future__ import annotations

from typing import Callable

import torch

__all__ = ["RoutedSlots", "routed_rows", "group_firsts"]


def routed_rows(slot_major: torch.Tensor, num_experts: int,
                token_major: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per expert, ``torch.where(slot_major == expert)``: its (slot, token) pairs in slot-major order
    (in token-major order with ``token_major``).

    From one stable sort and one copy of the experts' boundaries to the host,
    not a ``torch.where`` per expert, each of which waits for the device.
    """
    tokens, slots = slot_major.shape[1], slot_major.shape[0]
    flat = slot_major.T.reshape(-1) if token_major else slot_major.reshape(-1)
    expert, position = torch.sort(flat, stable=True)  # by expert, then position in that order
    bounds = torch.searchsorted(expert, group_firsts(num_experts, 1, expert)).tolist()
    if token_major:
        slot, token = position % slots, position // slots
    else:
        slot, token = position // tokens, position % tokens
    return [(slot[a:b], token[a:b]) for a, b in zip(bounds, bounds[1:])]


class RoutedSlots:
    """Every routing slot (expert, token, weight), sorted by expert then token, split into groups of experts.

    Made without a host synchronisation: the slots are sorted on the device, and
    the group boundaries are copied to the host asynchronously and read when the
    first group is combined. Slots whose index is not an expert (a sentinel of
    ``num_experts`` or more, or a negative one) fall in no group. A token routed
    twice to one expert has two slots, each added with its own weight, as the
    original sums over slots.
    """

    def __init__(self, index: torch.Tensor, weights: torch.Tensor, num_experts: int, size: int,
                 firsts: torch.Tensor | None = None) -> None:
        flat = index.reshape(-1)  # token-major: slot s of token t at t * k + s
        expert, order = torch.sort(flat, stable=True)  # by expert, then (stable) by token
        self.token, self.weight = order // index.shape[1], weights.reshape(-1, 1).index_select(0, order)
        self.row = self.token if size == 1 else torch.add(self.token, expert % size, alpha=index.shape[0])  # [G * T, H]
        firsts = group_firsts(num_experts, size, index) if firsts is None else firsts
        self._bounds = _on_host_later(torch.searchsorted(expert, firsts))
        self._split: list[tuple[torch.Tensor, ...]] | None = None

    def group(self, number: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The slots of group ``number``: each one's row in the group's ``[G * T, H]`` outputs, token and weight."""
        if self._split is None:
            bounds = self._bounds()
            sizes = [b - a for a, b in zip(bounds, bounds[1:])]
            parts = [t.narrow(0, bounds[0], bounds[-1] - bounds[0]).split_with_sizes(sizes)  # not Tensor.split's
                     for t in (self.row, self.token, self.weight)]                          # Python wrapper
            self._split = list(zip(*parts))
        return self._split[number]


def group_firsts(num_experts: int, size: int, index: torch.Tensor) -> torch.Tensor:
    """The first expert of every group of ``size``, and ``num_experts`` after the last (dtype, device: ``index``'s)."""
    firsts = torch.arange(0, num_experts + size, size, dtype=index.dtype).clamp(max=num_experts)
    return firsts.to(index.device)


def _on_host_later(tensor: torch.Tensor) -> Callable[[], list[int]]:
    """A function returning ``tensor.tolist()``, with the copy to the host started now and awaited on first call."""
    copied = _event(tensor.device)
    if copied is None:  # on the host already, or a device without events: copy now
        values = tensor.tolist()
        return lambda: values
    host = tensor.to("cpu", non_blocking=True)
    copied.record()

    def values() -> list[int]:
        copied.synchronize()
        return host.tolist()
    return values


def _event(device: torch.device) -> torch.Event | None:
    if device.type == "cpu":
        return None
    try:
        return torch.Event(device)
    except RuntimeError:
        return None
