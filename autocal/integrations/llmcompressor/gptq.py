"""GPTQ with one Hessian per group of expert Linears that receive the same input (``autocal.shared_input_groups``).

In calibration mode every gate and up projection of a block's experts is called on the very same tensor,
so their GPTQ Hessians ``2 XᵀX / n`` are one and the same. ``SharedHessianGPTQModifier`` is LLM Compressor's
``GPTQModifier`` with, for each such group:

- one Hessian, accumulated once per calibration batch (under the group's first member);
- one factorization of it (activation order, dampening, Cholesky factor of the inverse), and the column-block
  updates batched over the group's stacked weights (``group_gptq``);
- in a distributed run (``torchrun``), one Hessian reduced across ranks, to the rank that compresses the whole
  group, which sends the quantized weights to the others.

Observers, the update arithmetic and the written weights and scales are LLM Compressor's own, so on a CPU the
result is what ``GPTQModifier`` gives through autocal, bitwise. Linears in no group (down projections,
attention) go through ``GPTQModifier``'s own path, in batches of one shape that stay under ``BATCH_BYTES``.

Sharing is checked, not assumed: within a group, the first Linear called on a tensor accumulates it and the
others only confirm that they were called on that same tensor (the same object, still referenced, so its
memory cannot have been reused). A group whose members saw different inputs raises ``SharingError`` at
compression instead of writing wrong weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from compressed_tensors.distributed import greedy_bin_packing
from compressed_tensors.offload import disable_offloading
from compressed_tensors.offload.dist_utils import is_distributed
from compressed_tensors.utils import get_execution_device, getattr_chain
from llmcompressor.core import Event, State
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.base import _GPTQ_Q_PARAMS
from llmcompressor.modifiers.gptq.helpers import (GPTQ_PRECISION, MIN_BATCHED_CHOLESKY_SIZE, batch_key,
                                                   update_batch_qparams)
from llmcompressor.utils.dist import broadcast_qparams_and_cleanup
from loguru import logger
from pydantic import PrivateAttr
from torch import distributed as dist
from torch import nn

from ... import errors
from ...linear_calls import register_group_hook
from ...sharing import expert_linear_sets, shared_input_groups
from .wrappers import hooked, install_transparency_rules, live
from .group_gptq import SharedFactorization, quantize_shared
from .stacked_hessians import StackedHessians

__all__ = ["BATCH_BYTES", "SharedHessianGPTQModifier", "SharingError"]

# With ``batched_quantization="auto"``, how much memory a batch of a group's Linears may take while quantized
# together. Fixed, rather than LLM Compressor's share of the free GPU memory, so that the peak does not grow with
# the group: batches of 36 DeepSeek-V3 expert projections (2048 x 7168), all 256 of a Qwen3-30B-A3B block
# (768 x 2048). 4 GiB rather than 1: at DeepSeek-V3's shape on an H100 it took compression from 9.9 s to 8.1 s
# (fewer batches, each with its own host work and syncs) for 3 GiB more of GPU peak (docs/benchmarks.md).
BATCH_BYTES = 4 * 2**30


def _on_cuda(module: nn.Module) -> bool:
    """Does ``module`` compute on a CUDA device (where offloaded: its execution device)?"""
    return torch.device(get_execution_device(module)).type == "cuda"


class SharingError(errors.AutocalError, RuntimeError):
    """Linears grouped as sharing an input did not receive the same tensor: their Hessians differ."""

    def __init__(self, message: str) -> None:
        super().__init__(errors.CALIBRATION_COVERAGE, message)


class _Group:
    """One group of Linears: the tensor it last accumulated, how many it accumulated, and which of those each
    member was called on (all of them, in order, when the members share their input)."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self.reset()

    def reset(self) -> None:
        self.last: torch.Tensor | None = None  # held, so that no other tensor can take its memory meanwhile
        self.accumulated = 0
        self.seen: dict[nn.Module, list[int]] = {member: [] for member in self.members}

    def is_new(self, inp: torch.Tensor) -> bool:
        last = self.last
        return last is None or not (inp is last or (inp.data_ptr() == last.data_ptr() and inp.shape == last.shape
                                                     and inp.stride() == last.stride()))

    def uneven(self) -> list[nn.Module]:
        """Members not called once on every accumulated input, in order."""
        return [member for member, seen in self.seen.items() if seen != list(range(self.accumulated))]


class SharedHessianGPTQModifier(GPTQModifier):
    """``GPTQModifier`` with one Hessian per group of expert Linears that share an input, factorized once, and
    the group's weights quantized together.

    Use it in place of ``GPTQModifier`` on a model ``prepare`` converted; the arguments are
    ``GPTQModifier``'s. Linears in no group (the down projections, attention) keep their own Hessian.
    """

    _groups: dict[nn.Module, _Group] = PrivateAttr(default_factory=dict)
    _group_hook: Any = PrivateAttr(default=None)
    _handle_of: dict[nn.Module, Any] = PrivateAttr(default_factory=dict)  # each Linear's GPTQ hook
    _stacks: dict[nn.Module, StackedHessians] = PrivateAttr(default_factory=dict)  # Linears in no group

    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        initialized = super().on_initialize(state, **kwargs)
        install_transparency_rules()
        self._groups = {}
        for paths in shared_input_groups(state.model):
            members = [state.model.get_submodule(path) for path in paths]
            members = [m for m in members if m in self._module_names]  # targeted, not ignored
            group = _Group(members)
            self._groups.update({member: group for member in members if len(members) > 1})
        self._stacks = {}
        for paths in expert_linear_sets(state.model):
            members = [state.model.get_submodule(path) for path in paths]
            if all(isinstance(m, nn.Linear) and m in self._module_names and m not in self._groups for m in members):
                stack = StackedHessians(members)
                self._stacks.update({member: stack for member in members})
        return initialized

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        """``GPTQModifier``'s hooks, and one group hook standing for them all (``autocal.linear_calls``)."""
        super().on_calibration_start(state, event, **kwargs)
        pairs = hooked(self._hooks, self._module_names, self.calibrate_module)
        self._handle_of = dict(pairs)
        self._group_hook = register_group_hook(self._calibrate_linears, pairs)

    def on_calibration_end(self, state: State, event: Event, **kwargs: Any) -> None:
        self._group_hook.remove()
        super().on_calibration_end(state, event, **kwargs)

    def _calibrate_linears(self, linears: Sequence[nn.Module], inputs: Sequence[torch.Tensor]) -> None:
        """What their hooks would do, for Linears computed together (one projection across experts): where
        they are one group on one tensor, its Hessian accumulated once and the others marked as seeing it."""
        linears, inputs = live(linears, inputs, self._handle_of)
        if not linears:
            return
        group = self._groups.get(linears[0])
        if group is None or any(i is not inputs[0] for i in inputs) or any(self._groups.get(m) is not group
                                                                          for m in linears):
            stack = self._stacks.get(linears[0])
            if stack is None or not stack.accumulate(linears, inputs, self._hessians, self._num_samples):
                for linear, inp in zip(linears, inputs):
                    self.calibrate_module(linear, (inp,), None)
            return
        self.calibrate_module(linears[0], (inputs[0],), None)
        for linear in linears[1:]:
            group.seen[linear].append(group.accumulated - 1)

    def calibrate_module(self, module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
        group = self._groups.get(module)
        if group is None:
            return super().calibrate_module(module, args, _output)
        inp = args[0]
        if group.is_new(inp):
            super().calibrate_module(group.members[0], args, _output)  # accumulated under its first member
            group.last, group.accumulated = inp, group.accumulated + 1
        group.seen[module].append(group.accumulated - 1)

    def _calibrated_groups(self) -> list[_Group]:
        """The groups whose Hessian was accumulated in this layer, checked to have shared their inputs."""
        groups = []
        for group in {id(g): g for g in self._groups.values()}.values():
            if group.members[0] not in self._hessians:
                continue
            uneven = [self._module_names[m] for m in group.uneven()]
            if uneven:
                raise SharingError(
                    f"expert Linears grouped as sharing one input received {group.accumulated} distinct inputs, and "
                    f"{uneven[:4]} were not called once on each: their inputs differ, and so would their Hessians. "
                    f"Use GPTQModifier (is calibration_chunk_size set?).")
            group.reset()
            groups.append(group)
        return groups

    def compress_modules(self) -> None:
        """Compress each group with one factorization of its Hessian, the others as ``GPTQModifier`` does."""
        groups = self._calibrated_groups()
        for stack in {id(s): s for s in self._stacks.values()}.values():
            stack.release()
        if is_distributed():
            return self._compress_distributed(groups)
        for group in groups:
            self._compress_group(group.members)
        super().compress_modules()

    def _compress_group(self, members: list[nn.Module]) -> None:
        """GPTQ on the Linears of one group: their Hessian (under the first) factorized once, their weights
        quantized in batches of one shape and scheme (``group_gptq``)."""
        first = members[0]
        hessian = self._hessians.pop(first)
        hessian = hessian / self._num_samples.pop(first).to(device=hessian.device)  # as ``prepare_batch`` does
        quant_args = getattr_chain(first, "quantization_scheme.weights")
        with torch.no_grad(), disable_offloading():
            shared = SharedFactorization.of(hessian, quant_args.actorder, self.dampening_frac)
            del hessian
            for batch in self._batches(members):
                self._compress_batch(batch, shared)

    def _batches(self, members: list[nn.Module]) -> list[list[nn.Module]]:
        """Members of one weight shape, dtype, device and scheme (``batch_key``), at most ``batched_quantization``
        at once where it is a number, one by one where it is None, and with "auto" as many as a working set of
        ``BATCH_BYTES`` holds (``quantize_shared``: the float32 weights, and as much again)."""
        batches: dict[tuple, list[nn.Module]] = {}
        for index, member in enumerate(members):
            batches.setdefault(batch_key(member) or (index,), []).append(member)
        split = []
        for batch in batches.values():
            limit = self.batched_quantization or 1
            if limit == "auto":
                limit = max(1, BATCH_BYTES // (2 * batch[0].weight.numel() * GPTQ_PRECISION.itemsize))
            split += [batch[i:i + limit] for i in range(0, len(batch), limit)]
        return split

    def _compress_batch(self, batch: list[nn.Module], shared: SharedFactorization) -> None:
        """GPTQ on one batch of a group, its weights and qparams written back (compressed-tensors' copies)."""
        quant_args = getattr_chain(batch[0], "quantization_scheme.weights")
        qparams = [module.weight_observer.get_qparams() for module in batch]
        names = [self._module_names[module] for module in batch]
        logger.info(f"Quantizing {len(batch)} module(s) sharing one Hessian factorization: {names}")
        scales = torch.stack([q["scale"] for q in qparams])
        zero_points = torch.stack([q["zero_point"] for q in qparams])
        global_scales = (torch.stack([q["global_scale"].reshape(-1)[0] for q in qparams])
                         if qparams[0]["global_scale"] is not None else None)
        quantized, _losses = quantize_shared([module.weight for module in batch], shared, scales, zero_points,
                                             global_scales, quant_args, self.block_size)
        if shared.fallback:
            self._rtn_fallback_module_names += names
        update_batch_qparams(batch, quantized, scales, zero_points, global_scales, quant_args)
        self._num_compressed_modules += len(batch)

    def compress_module_list(self, module_list: list[nn.Module]) -> None:
        """``GPTQModifier``'s, for the Linears in no group, with "auto" batches of one shape that stay under
        ``BATCH_BYTES``. LLM Compressor's "auto" quantizes them one by one on a CPU, and on a GPU fills 75% of
        the free memory (by its estimate, 53 GB for DeepSeek-V3's 256 down projections), factorizing a batch of
        16 or more Hessians with batched kernels and a smaller one Hessian by Hessian, with a host sync after
        each (``MIN_BATCHED_CHOLESKY_SIZE``). On a CPU the batches here stay under 16, so the result is that of
        one at a time, bitwise; on a GPU they are as large as ``BATCH_BYTES`` holds, and so factorized batched,
        as LLM Compressor's own are there (``benchmarks/gptq_batches.py`` measures the two)."""
        if self.batched_quantization != "auto":
            return super().compress_module_list(module_list)
        by_shape: dict[tuple, list[nn.Module]] = {}
        for module in module_list:
            by_shape.setdefault((*module.weight.shape, _on_cuda(module)), []).append(module)
        for (rows, columns, cuda), modules in by_shape.items():
            held = 3 * (columns * columns + rows * columns) * GPTQ_PRECISION.itemsize  # Hessians, weights, copies
            limit = max(1, BATCH_BYTES // held if cuda else min(MIN_BATCHED_CHOLESKY_SIZE - 1, BATCH_BYTES // held))
            try:
                self.batched_quantization = limit
                super().compress_module_list(modules)
            finally:
                self.batched_quantization = "auto"

    def _compress_distributed(self, groups: list[_Group]) -> None:
        """LLM Compressor's distributed compression, with a group as one unit: its one Hessian is reduced to
        the rank that compresses the whole group, which then broadcasts every member's quantized weight and
        qparams. On a CPU too: LLM Compressor 0.14 broadcasts nothing that executes on the CPU, and with a model
        loaded by each process (gloo, ``tests/distributed_oneshot.py``) the other ranks kept the unquantized
        weights, calibrated the next layers on them, and failed autocal's coverage check (scales of 0)."""
        units = {group.members[0]: group.members for group in groups}
        units.update({module: [module] for module in self._hessians if module not in units})
        order, by_rank, unit_rank = greedy_bin_packing(
            list(units), dist.get_world_size(),
            item_weight_fn=lambda first: self._hessians[first].shape[0] * len(units[first]))
        self._reduce_hessian_to_target_rank(order, unit_rank)
        singles = []
        for first in by_rank[dist.get_rank()]:
            if len(units[first]) > 1:
                self._compress_group(units[first])
            else:
                singles.append(first)
        self.compress_module_list(singles)
        rank_of = {member: unit_rank[first] for first, members in units.items() for member in members}
        broadcast_qparams_and_cleanup(list(rank_of), rank_of, _GPTQ_Q_PARAMS, skip_cpu=False)
