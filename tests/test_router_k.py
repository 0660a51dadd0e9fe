"""``explain`` reports the k a block really routes each token to, also for selections made one after another."""

from __future__ import annotations

import torch

import autocal
from autocal.testing.corpus import ENTRIES


def _experts_per_token(block, x) -> float:
    """The rows all experts receive, per token: k, measured on the block's own forward."""
    rows = []
    handles = [e.register_forward_pre_hook(lambda _, args: rows.append(args[0].shape[0])) for e in block.experts]
    try:
        with torch.no_grad():
            block(x)
    finally:
        for handle in handles:
            handle.remove()
    return sum(rows) / (x.numel() // x.shape[-1])


def test_argmax_then_masked_argmax_is_k_2():
    entry = ENTRIES["sparsemixer"]
    block = entry.build(0)
    (x,), _ = entry.inputs(2, 7)
    report = autocal.explain(block, verify=False)
    assert report.blocks[0].top_k == _experts_per_token(block, x)
