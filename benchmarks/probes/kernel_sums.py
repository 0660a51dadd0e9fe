"""Device time of the floor and of autocal's calibration forward, kernel by kernel (plain mode, no hooks).

For each shape and token count given: five calls of each under torch.profiler,
then per call the span from its first kernel's start to its last kernel's end,
the busy time (kernels summed), and the busy time per kernel kind (matmul or
other), so a gap over the floor can be put on the matmuls, on the other
kernels or on idle device time. Run on the GPU machine from the repository
root, with transformers on PYTHONPATH::

    python3 benchmarks/probes/kernel_sums.py mixtral-8x7b:512 qwen3-30b-a3b:2048

An analysis probe, not a benchmark. As first run (session 6) it counted the "call"
annotation's own range on the device as an "other" kernel; the figures in
docs/benchmarks.md subtract it (it spans the call), and the probe now leaves it out.
"""
import os
import statistics
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
sys.path.insert(0, os.getcwd())
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import autocal  # noqa: E402
from _common import SHAPES, build_block  # noqa: E402
from calibration_forward import _linears  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16


def kind(name: str) -> str:
    lowered = name.lower()
    return "matmul" if any(s in lowered for s in ("gemm", "cutlass", "sm90", "xmma", "nvjet")) else "other"


def measure(fn, calls: int = 5) -> dict:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.cuda.synchronize()
            with torch.profiler.record_function("call"):
                fn()
            torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA and e.name != "call")  # not the annotation
    calls_ranges = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                          if e.name == "call" and e.device_type == torch.autograd.DeviceType.CPU)
    per_call = []
    for n, (start, _) in enumerate(calls_ranges):
        end = calls_ranges[n + 1][0] if n + 1 < len(calls_ranges) else float("inf")
        mine = [k for k in kernels if start <= k[0] < end]
        busy = defaultdict(float)
        for b, e, name in mine:
            busy[kind(name)] += e - b
        per_call.append({"span": mine[-1][1] - mine[0][0], "matmul": busy["matmul"], "other": busy["other"],
                         "kernels": len(mine), "first_after_call": mine[0][0] - start})
    return {k: statistics.median(c[k] for c in per_call) for k in per_call[0]}


for item in sys.argv[1:]:
    name, tokens = item.split(":")
    shape, tokens = SHAPES[name], int(tokens)
    block, _ = build_block(shape, dev, dt)
    experts = autocal.synthesize(block).get_submodule("experts")
    hidden = torch.randn(tokens, shape.hidden, device=dev, dtype=dt)
    intermediate = torch.randn(tokens, shape.width, device=dev, dtype=dt)
    calls = [(lin, hidden if lin.in_features == shape.hidden else intermediate) for lin in _linears(experts)]
    with torch.no_grad():
        _, weights, index = block.gate(hidden)

        def floor():
            for linear, x in calls:
                linear(x)

        results = {"floor": measure(floor), "autocal": measure(lambda: experts(hidden, index, weights))}
    print(f"{name} {tokens} tokens (µs, median of 5 calls)")
    for method, r in results.items():
        print(f"  {method:<8} span {r['span']:8.0f}  matmul {r['matmul']:8.0f}  other {r['other']:7.0f}  "
              f"idle {r['span'] - r['matmul'] - r['other']:7.0f}  kernels {r['kernels']:5.0f}  "
              f"first kernel after call {r['first_after_call']:5.0f}")
    del block, experts
    torch.cuda.empty_cache()
