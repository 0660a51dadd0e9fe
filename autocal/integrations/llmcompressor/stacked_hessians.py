"""GPTQ Hessians of a run of experts' Linears accumulated by one batched product.

Linears that share no input (the down projections) each keep their own Hessian. In the grouped
calibration forward (``autocal.linear_calls``) a group hook still receives them together: the same
template Linear of a run of consecutive experts, each on its own rows. ``StackedHessians`` holds the
Hessians of one template Linear across all experts of a container (``autocal.sharing.expert_linear_sets``)
as views of one ``[E, in, in]`` tensor, so that such a call accumulates into the run's views with one
``bmm`` instead of one matmul (and its launches) per Linear.

The arithmetic is that of LLM Compressor's ``accumulate_hessian`` on each Linear's input (``√2 · x``
in float32, then ``H += xᵀx`` and one more sample), batched; on a CPU the Hessians are bitwise the
per-Linear ones (``tests/test_llmcompressor.py``). Each Linear's view and sample count go into the
modifier's ``_hessians`` and ``_num_samples`` as it is first accumulated, so LLM Compressor's compression
finds them where it looks. A Linear whose Hessian was made otherwise (accumulated alone before) is not
batched again; it keeps going through ``GPTQModifier.calibrate_module``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION
from torch import nn

__all__ = ["StackedHessians"]


class StackedHessians:
    """The Hessians and sample counts of ``members`` (one template Linear in each expert, in expert order)."""

    def __init__(self, members: list[nn.Linear]) -> None:
        self.members = members
        self.columns = members[0].in_features
        self.index = {member: number for number, member in enumerate(members)}
        self.hessians: torch.Tensor | None = None  # [E, in, in], made when first accumulated
        self.counts: torch.Tensor | None = None  # [E]
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []  # each member's (Hessian, count)

    def accumulate(self, linears: Sequence[nn.Module], inputs: Sequence[torch.Tensor],
                   hessians: dict[nn.Module, torch.Tensor], counts: dict[nn.Module, torch.Tensor]) -> bool:
        """Accumulate each Linear's 2-D input into its Hessian, all at once, and say True; or False, with
        nothing done, where they are not a run of consecutive members whose Hessians are this stack's."""
        run = self._run(linears, inputs)
        if run is None:
            return False
        if self.hessians is None:
            if any(linear in hessians for linear in linears):
                return False
            self._allocate(inputs[0].device)
        views = self.views[run]
        if any(hessians.get(linear, hessian) is not hessian for linear, (hessian, _) in zip(linears, views)):
            return False
        stacked = math.sqrt(2) * torch.stack(inputs).to(dtype=GPTQ_PRECISION)
        self.hessians[run] += torch.bmm(stacked.transpose(1, 2), stacked)
        self.counts[run] += 1
        for linear, (hessian, count) in zip(linears, views):
            hessians.setdefault(linear, hessian)
            counts.setdefault(linear, count)
        return True

    def release(self) -> None:
        """Drop the stack: what the modifier holds (views) stays alive until it pops them."""
        self.hessians, self.counts, self.views = None, None, []

    def _run(self, linears: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> slice | None:
        """Where ``linears`` lie among the members, if a run of consecutive ones, each on 2-D rows of one shape."""
        first = self.index.get(linears[0])
        if first is None or first + len(linears) > len(self.members) or \
                any(self.members[first + n] is not linear for n, linear in enumerate(linears)):
            return None
        shape, device = inputs[0].shape, inputs[0].device
        if len(shape) != 2 or shape[1] != self.columns or any(i.shape != shape or i.device != device for i in inputs):
            return None
        if self.hessians is not None and self.hessians.device != device:
            return None
        return slice(first, first + len(linears))

    def _allocate(self, device: torch.device) -> None:
        self.hessians = torch.zeros((len(self.members), self.columns, self.columns), dtype=GPTQ_PRECISION,
                                    device=device)
        self.counts = torch.zeros(len(self.members), device=device)
        self.views = list(zip(self.hessians.unbind(0), self.counts.unbind(0)))
