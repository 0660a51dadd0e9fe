"""GPTQ on a group of Linears that share one Hessian: one factorization, block updates batched over the group.

GPTQ's activation order (the Hessian's diagonal, sorted), its dampening and its Cholesky factor of the
inverse depend on the Hessian alone. For Linears that share a Hessian (``autocal.shared_input_groups``)
``SharedFactorization`` computes them once, and ``quantize_shared`` runs the column-block updates on the
stacked weights ``[G, out, in]`` of any number of those Linears at once, the factor broadcast over them:
GPTQ's per-column loop then runs once per batch of Linears instead of once per Linear.

The arithmetic is LLM Compressor's own, called, not copied: its ``apply_activation_ordering`` and
``factorize_hessian`` on the one Hessian, and its ``gptq_block_update`` (the eager loop, or the fused Triton
kernel on a GPU) on the stacked weights, the one factor seen by every weight through a broadcast view
(no copy), and the error each block propagates to the later columns as one batched product per weight, of
the shape LLM Compressor multiplies. Per weight the arithmetic is that of its ``quantize_weight`` on one
weight at a time (its default on a CPU), so the quantized weights are identical
(``tests/test_llmcompressor.py``). On a GPU, LLM Compressor batches same-shape Linears and factorizes
16 or more Hessians at once with the batched Cholesky kernels, whose rounding may differ from the
single-matrix ones used here (``benchmarks/gptq_shared.py`` reports the difference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from compressed_tensors.quantization import ActivationOrdering, QuantizationArgs, QuantizationStrategy
from llmcompressor.modifiers.gptq.gptq_quantize import gptq_block_update
from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION, apply_activation_ordering, factorize_hessian

__all__ = ["SharedFactorization", "quantize_shared"]


@dataclass
class SharedFactorization:
    """What GPTQ derives from one Hessian, for every weight that shares it.

    ``perm``: the activation order of the columns (None without one); ``dead``: the columns no input ever
    reached (zeroed in every weight), in that order; ``factor``: the upper Cholesky factor of the dampened
    inverse Hessian, in that order; ``fallback``: the Hessian was not positive definite, and ``factor`` is
    the identity (GPTQ becomes round-to-nearest, as in LLM Compressor).
    """

    perm: torch.Tensor | None
    dead: torch.Tensor
    factor: torch.Tensor
    fallback: bool

    @classmethod
    def of(cls, hessian: torch.Tensor, actorder: ActivationOrdering | None, percdamp: float) -> SharedFactorization:
        """Factorize a normalized Hessian ``[in, in]`` (overwritten)."""
        columns = hessian.shape[-1]
        # LLM Compressor's helpers permute and zero the weights with the Hessian; the weights are handled per
        # group of Linears instead (``quantize_shared``), so they are given none here.
        no_weights = hessian.new_empty((1, 0, columns))
        hessians = hessian.to(GPTQ_PRECISION).unsqueeze(0)
        _, hessians, perm = apply_activation_ordering(no_weights, hessians, actorder)
        dead = torch.diagonal(hessians[0]) == 0
        fallback = torch.zeros(1, dtype=torch.bool, device=hessians.device)
        factor = factorize_hessian(no_weights, hessians, percdamp, fallback)[0]
        return cls(None if perm is None else perm[0], dead, factor, bool(fallback.item()))


def _group_index(quant_args: QuantizationArgs, columns: int, perm: torch.Tensor | None,
                 device: torch.device) -> torch.Tensor | None:
    """The quantization group of each column, in the order the columns are quantized."""
    strategy = quant_args.strategy
    if strategy not in (QuantizationStrategy.GROUP, QuantizationStrategy.TENSOR_GROUP, QuantizationStrategy.BLOCK):
        return None
    width = quant_args.block_structure[1] if strategy == QuantizationStrategy.BLOCK else quant_args.group_size
    index = torch.arange(columns, device=device, dtype=torch.int) // width
    if quant_args.actorder == ActivationOrdering.WEIGHT:  # groups follow the columns (STATIC keeps them in place)
        index = index[perm]
    return index


def quantize_shared(weights: Sequence[torch.Tensor], shared: SharedFactorization, scale: torch.Tensor,
                    zero_point: torch.Tensor, global_scale: torch.Tensor | None, quant_args: QuantizationArgs,
                    blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on weights of one shape ``[out, in]`` that share ``shared``'s Hessian, stacked ``[G, out, in]``.

    ``scale``, ``zero_point`` and ``global_scale`` are the weight observers' qparams, stacked as LLM
    Compressor's ``prepare_batch`` stacks them. Returns the quantized weights, stacked, in float32, and each
    weight's loss. Memory: the stacked weights in float32, and at most as much again for the error a block
    propagates to the columns after it.
    """
    count, (rows, columns) = len(weights), weights[0].shape
    work = torch.empty((count, rows, columns), dtype=GPTQ_PRECISION, device=weights[0].device)
    for index, weight in enumerate(weights):  # one weight at a time: no second stacked copy
        work[index].copy_(weight if shared.perm is None else weight[:, shared.perm])
    work.masked_fill_(shared.dead, 0)
    group_index = _group_index(quant_args, columns, shared.perm, work.device)
    factor = shared.factor.expand(count, columns, columns)  # one factor, seen by every weight
    losses = torch.zeros(count, rows, device=work.device)
    for start in range(0, columns, blocksize):
        end = min(start + blocksize, columns)
        block = work[:, :, start:end].clone()
        quantized, error, loss = torch.zeros_like(block), torch.zeros_like(block), torch.zeros_like(block)
        gptq_block_update(block, factor[:, start:end, start:end], quantized, error, loss, scale=scale,
                          zero_point=zero_point, global_scale=global_scale, g_idx=group_index,
                          quant_args=quant_args, i1=start)
        work[:, :, start:end] = quantized
        losses += loss.sum(2) / 2
        if end < columns:
            work[:, :, end:] -= torch.bmm(error, factor[:, start:end, end:])
    if shared.perm is not None:
        inverse = torch.argsort(shared.perm)
        for index in range(count):
            work[index] = work[index][:, inverse]
    return work, losses.sum(1)
