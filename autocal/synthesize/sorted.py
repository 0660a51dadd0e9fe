"""Calibration for sorted dispatch through weight banks (see ``detect/sorted.py``).

Each bank becomes a ``SegmentBank``: one ``nn.Linear`` per expert, viewing the
bank's weight, applied to that expert's segment of the sorted rows, so that
hooks and observers see every routed row. While nothing is attached to those
Linears, the original bank runs instead (bitwise the original). With calibration
on, after the block's own forward, each expert's chain of bank slices, with the
block's ops between them replayed, runs on the token rows it was not given
(compared by value, as at the recorded level).

Where those ops mix rows (attention experts), the block's forward instead runs
again once per group of ``k`` experts with the top-k forced to that group for
every token (``detect/reroute.py``): each expert is observed in its group's run,
on every token, and nowhere else (``synthesize/forced.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..coverage import add_tokens
from ..detect.plans import SortedBanksPlan
from .forced import ExpertViews, forced_forward
from .module import KeptForwardMoE, adopt, kept_forward_class, owned
from .ops import RowComplement

__all__ = ["SegmentBank", "SortedCalibrationMoE", "build_sorted_calibration"]


class SegmentBank(ExpertViews):
    """A weight bank ``[E, a, b]`` as ``E`` Linears (views), called like the bank: ``(rows, counts)``."""

    def __init__(self, bank: nn.Module, weight: nn.Parameter, orientation: str) -> None:
        super().__init__(weight, orientation)
        self.__dict__["_bank"] = bank

    def forward(self, rows: torch.Tensor, counts, *args, **kwargs) -> torch.Tensor:
        self.__dict__["last_counts"] = counts  # the block may compute them on the host: kept, not replayed
        self.__dict__["last_rows"] = rows
        sizes = _sizes(counts)
        quiet = self.__dict__.get("observed") == set()
        if self.plain() and (quiet or not self.hooked()):
            for linear, size in zip(self.children(), sizes if not quiet else ()):
                add_tokens(linear, size)
            return self._bank(rows, counts, *args, **kwargs)
        return torch.cat([self.call(expert, part) for expert, part in enumerate(rows.split(sizes))])


def _sizes(counts) -> list[int]:
    """Each expert's row count, as ints: counts made by ``torch.histc`` are floats."""
    return [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]


class SortedCalibrationMoE(KeptForwardMoE):
    """The block with its banks as ``SegmentBank``s; calibration runs each expert chain on its other tokens."""

    def __init__(self, original: nn.Module, config=None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        dispatch = self.plan.dispatch
        for name in dispatch.banks:
            bank = original.get_submodule(name)
            parent, _, child = name.rpartition(".")
            owned(self, original, parent)._modules[child] = SegmentBank(bank, next(bank.parameters()),
                                                                        dispatch.orientation[name])
        self.calibrate_all_experts = calibrate_all_experts

    @property
    def experts_container(self) -> nn.Module:
        return self.get_submodule(self.plan.dispatch.banks[0])

    def _banks(self) -> list[SegmentBank]:
        return [self.get_submodule(name) for name in self.plan.dispatch.banks]

    def forward(self, *args, **kwargs):
        choice = self.plan.dispatch.choice
        try:
            if choice is None or not self.calibrate_all_experts:
                return super().forward(*args, **kwargs)
            return forced_forward(self, choice, self._banks(), args, kwargs)
        finally:
            for bank in self._banks():  # what the banks last got is for this forward only
                bank.__dict__.pop("last_counts", None)
                bank.__dict__.pop("last_rows", None)

    def run_unrouted(self, bound: dict, seen: None) -> None:
        dispatch, shared = self.plan.dispatch, {}
        banks = self._banks()
        counts = _sizes(banks[0].__dict__["last_counts"])
        given = banks[0].__dict__["last_rows"].split(counts)  # each expert's segment of the first bank's rows
        rows = RowComplement(dispatch.rows(bound, shared))
        for expert in range(len(counts)):
            x = rows.rest([given[expert]])
            if not x.shape[0]:
                continue
            for step, bank in enumerate(banks):
                if step:
                    x = dispatch.between(step, x, bound, shared)
                x = bank.call(expert, x)


def build_sorted_calibration(plan: SortedBanksPlan, block: nn.Module) -> type[SortedCalibrationMoE]:
    return kept_forward_class(SortedCalibrationMoE, plan, block)
