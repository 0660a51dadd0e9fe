"""Calibration for sorted dispatch through weight banks (see ``detect/sorted.py``).

Each bank becomes a ``SegmentBank``: one ``nn.Linear`` per expert, viewing the
bank's weight, applied to that expert's segment of the sorted rows, so that
hooks and observers see every routed row. While nothing is attached to those
Linears, the original bank runs instead (bitwise the original). With calibration
on, after the block's own forward, each expert's chain of bank slices, with the
block's ops between them replayed, runs on the tokens it was not routed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as module_globals

from ..detect.structure import MoEStructure
from .module import KeptForwardMoE, adopt, kept_forward_class
from .ops import unrouted_rows

__all__ = ["SegmentBank", "SortedCalibrationMoE", "build_sorted_calibration"]


class SegmentBank(nn.Module):
    """A weight bank ``[E, a, b]`` as ``E`` Linears (views), called like the bank: ``(rows, counts)``."""

    def __init__(self, bank: nn.Module, weight: nn.Parameter, orientation: str) -> None:
        super().__init__()
        self.__dict__["_bank"] = bank
        for expert in range(weight.shape[0]):
            view = weight[expert] if orientation == "linear" else weight[expert].T
            linear = nn.Linear(view.shape[1], view.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(view.detach(), requires_grad=weight.requires_grad)
            self.add_module(str(expert), linear)
        self.__dict__["_addresses"] = [m.weight.data_ptr() for m in self.children()]

    def experts(self) -> list[nn.Linear]:
        return list(self.children())

    def forward(self, rows: torch.Tensor, counts, *args, **kwargs) -> torch.Tensor:
        self.__dict__["last_counts"] = counts  # the block may compute them on the host: kept, not replayed
        if self._untouched():
            return self._bank(rows, counts, *args, **kwargs)
        sizes = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        return torch.cat([linear(part) for linear, part in zip(self.children(), rows.split(sizes))])

    def _untouched(self) -> bool:
        """Plain Linears still viewing the bank, with no hook: the bank itself computes the same, bitwise."""
        if module_globals._global_forward_hooks or module_globals._global_forward_pre_hooks:
            return False
        return all(type(m) is nn.Linear and not (m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__)
                   and m.weight.data_ptr() == address for m, address in zip(self.children(), self._addresses))


class SortedCalibrationMoE(KeptForwardMoE):
    """The block with its banks as ``SegmentBank``s; calibration runs each expert chain on its other tokens."""

    def __init__(self, original: nn.Module, config=None, calibrate_all_experts: bool = True) -> None:
        adopt(self, original)
        dispatch = self.structure.tokens
        for name in dispatch.banks:
            bank = original._modules[name]
            self._modules[name] = SegmentBank(bank, next(bank.parameters()), dispatch.orientation[name])
        self.calibrate_all_experts = calibrate_all_experts

    @property
    def experts_container(self) -> nn.Module:
        return self._modules[self.structure.tokens.banks[0]]

    def run_unrouted(self, bound: dict) -> None:
        dispatch, shared = self.structure.tokens, {}
        banks = [self._modules[name] for name in dispatch.banks]
        rows, tokens = dispatch.routing(bound, shared)
        counts = banks[0].__dict__.pop("last_counts")
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
        start = 0
        for expert, count in enumerate(counts):
            x = unrouted_rows(rows, tokens[start:start + count])
            start += count
            if not x.shape[0]:
                continue
            for step, bank in enumerate(banks):
                if step:
                    x = dispatch.between(step, x, bound, shared)
                x = bank._modules[str(expert)](x)


def build_sorted_calibration(structure: MoEStructure, block: nn.Module) -> type[SortedCalibrationMoE]:
    return kept_forward_class(SortedCalibrationMoE, structure, block)
