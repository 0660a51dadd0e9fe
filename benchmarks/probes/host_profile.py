"""Where the host's time goes in one observed calibration forward on a GPU, against the floor's.

For each ``shape:tokens`` given (Qwen3-30B-A3B-like blocks from benchmarks/_common.py, bfloat16,
a row-counting pre-hook on every expert Linear as in calibration_forward.py's observed mode):

- wall time per call (median of 30, each bracketed by synchronize) of the floor, of the whole
  calibration forward, of the grouped template alone (every group), and of two hand-written
  stand-ins for the template: the Linear calls keeping their outputs, and the same stacked with the
  activation and product (what the template computes, without the interpreter);
- the device's busy time per call (kernels summed, torch.profiler) of the floor and of autocal;
- a cProfile of 20 calibration forwards: the functions with the most host time of their own, in µs
  per forward (cProfile's own cost inflates Python-level rows; C-level rows such as a kernel launch
  or a wait for the device are close to what they cost).

Run on the GPU machine from the repository root, with transformers on PYTHONPATH::

    python3 benchmarks/probes/host_profile.py qwen3-30b-a3b:512 qwen3-30b-a3b:2048
    GROUP_ELEMENTS=27,29 python3 benchmarks/probes/host_profile.py qwen3-30b-a3b:2048   # also the forward with
                                                         # GROUP_ELEMENTS (GPU) set to 2^27 and 2^29, same process

An analysis probe, not a benchmark.
"""
import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from autocal.synthesize import experts as experts_stage  # noqa: E402
from _common import SHAPES  # noqa: E402
from calibration_forward import observed_layer  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16


def wall(fns: dict, rounds: int = 30) -> tuple[dict, dict]:
    """Per function, the median time to return and the median time until the device is done, in ms."""
    returned, done = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(3):
        for fn in fns.values():
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            returned[name].append(time.perf_counter() - start)
            torch.cuda.synchronize()
            done[name].append(time.perf_counter() - start)
    median = lambda times: {name: statistics.median(t) * 1e3 for name, t in times.items()}  # noqa: E731
    return median(done), median(returned)


def busy_us(fn, calls: int = 5) -> float:
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return sum(e.time_range.end - e.time_range.start for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA) / calls


for item in sys.argv[1:]:
    name, tokens = item.split(":")
    shape, tokens = SHAPES[name], int(tokens)
    block, experts, _, hidden, intermediate, floor = observed_layer(shape, tokens, dev, dt)
    modules = experts.experts()
    size = experts._group_size(tokens, False)
    groups = [modules[i:i + size] for i in range(0, len(modules), size)]
    group_linears = [[[e._modules[n] for e in group] for n in ("gate_proj", "up_proj", "down_proj")] for group in groups]
    with torch.no_grad():
        _, weights, index = block.gate(hidden)

        def template():
            for group in groups:
                experts._grouped(group, hidden)

        def keep():
            for gates, ups, downs in group_linears:
                [g(hidden) for g in gates], [u(hidden) for u in ups], [d(intermediate) for d in downs]

        def hand():
            for gates, ups, downs in group_linears:
                act = F.silu(torch.stack([g(hidden) for g in gates])) * torch.stack([u(hidden) for u in ups])
                torch.stack([d(row) for d, row in zip(downs, act.unbind(0))])

        forward = lambda: experts(hidden, index, weights)  # noqa: E731
        default = experts_stage.GROUP_ELEMENTS[False]

        def with_group_elements(exponent):
            def run():
                experts_stage.GROUP_ELEMENTS[False] = 1 << exponent
                try:
                    experts(hidden, index, weights)
                finally:
                    experts_stage.GROUP_ELEMENTS[False] = default
            return run

        variants = {f"autocal@2^{e}": with_group_elements(int(e))
                    for e in os.environ.get("GROUP_ELEMENTS", "").split(",") if e}
        times, returned = wall({"floor": floor, "autocal": forward, "template": template, "keep": keep, "hand": hand,
                                **variants})
        print(f"== {name} {tokens} tokens, groups of {size}: ms per call (x floor), [ms until the call returned]")
        print("   " + "  ".join(f"{k} {v:.2f} ({v / times['floor']:.2f}x) [{returned[k]:.2f}]" for k, v in times.items()))
        print(f"   device busy: floor {busy_us(floor):.0f} us, autocal {busy_us(forward):.0f} us")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            forward()
        torch.cuda.synchronize()
        profiler.disable()
        rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda item: -item[1][2])[:30]
        print("   own us, cumulative us, calls per forward")
        for (file, line, function), (_, calls, own, cumulative, _) in rows:
            where = f"{os.path.basename(file)}:{line}({function})" if file != "~" else function
            print(f"   {own / 20 * 1e6:8.1f} {cumulative / 20 * 1e6:8.1f}  {calls / 20:7.1f}  {where}")
    del block, experts, modules, groups, group_linears, floor
    torch.cuda.empty_cache()
