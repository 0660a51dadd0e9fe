"""Speed and peak memory of the observed calibration forward against the GPU group budget (GROUP_ELEMENTS).

For each ``shape:tokens`` given, in one process:

- the floor (every expert Linear on all tokens, with the row-counting hook of calibration_forward.py's
  observed mode), the calibration forward with autocal's budget, and with ``GROUP_ELEMENTS`` on the GPU
  set to each 2^e given: medians of 30 interleaved rounds, each call bracketed by synchronize;
- per budget, the peak allocated during one forward above what was allocated before it
  (``torch.cuda.max_memory_allocated``).

Run on the GPU machine from the repository root, with transformers on PYTHONPATH::

    python3 benchmarks/probes/group_budget.py 27,28,29 qwen3-30b-a3b:512 qwen3-30b-a3b:2048 deepseek-v3:512

An analysis probe, not a benchmark. As run in session 7, the calls came in one order every round
(``_common.interleaved`` now rotates it), and on the H100 "default" was a trial budget since taken back,
1/64 of the device's memory per stacked activation (docs/benchmarks.md, "What is left of the 1.2× target").
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402

from autocal.synthesize import experts as experts_stage  # noqa: E402
from _common import SHAPES, interleaved  # noqa: E402
from calibration_forward import observed_layer  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16
exponents = [int(e) for e in sys.argv[1].split(",")]
default = experts_stage.GROUP_ELEMENTS[False]


def with_budget(exponent, fn):
    def run():
        experts_stage.GROUP_ELEMENTS[False] = 1 << exponent
        try:
            return fn()
        finally:
            experts_stage.GROUP_ELEMENTS[False] = default
    return run


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


for item in sys.argv[2:]:
    name, tokens = item.split(":")
    shape, tokens = SHAPES[name], int(tokens)
    block, experts, counter, hidden, _, floor = observed_layer(shape, tokens, dev, dt)
    with torch.no_grad():
        _, weights, index = block.gate(hidden)
        expected = experts(hidden, index, weights)
        fns = {"floor": floor, "default": lambda: experts(hidden, index, weights)}
        for e in exponents:
            fns[f"2^{e}"] = with_budget(e, lambda: experts(hidden, index, weights))
        counter.reset()
        for label, fn in fns.items():
            if label != "floor":
                assert torch.allclose(fn().float(), expected.float(), rtol=2e-2, atol=2e-2), label
        assert all(rows == tokens * (len(fns) - 1) for rows in counter.rows)
        times = interleaved(fns, dev, 30, warmup=3)
        floor_ms = statistics.median(times["floor"]) * 1e3
        print(f"== {name} {tokens} tokens: floor {floor_ms:.2f} ms")
        for e in [None] + exponents:
            label = "default" if e is None else f"2^{e}"
            size = with_budget(e, lambda: experts._group_size(tokens, False))() if e is not None \
                else experts._group_size(tokens, False)
            ms = statistics.median(times[label]) * 1e3
            print(f"   GROUP_ELEMENTS {label:>7}: groups of {size:3d}  {ms:7.2f} ms  {ms / floor_ms:.3f}x floor  "
                  f"peak {peak_mib(fns[label]):7.0f} MiB above before")
    counter.remove()
    del block, experts, floor, fns, expected
    torch.cuda.empty_cache()
