"""Would compiled element-wise segments bring the observed calibration forward within 1.2x of the floor?

A feasibility probe for issue 6's last target, hand-written for the Qwen3-30B-A3B layer shape (not
autocal's code): each expert's gate, up and down Linears are called one by one with the row-counting
hook (as the floor), and what runs between them is either

- ``eager``: what autocal's grouped run launches: the gate and up outputs stacked, SiLU, product,
  the product unbound for the down Linears, their outputs stacked, the routed rows gathered, weighted
  and added (``index_add``);
- ``compiled``: the same two segments through ``torch.compile`` (Inductor): one function from the
  lists of gate and up outputs to the product, one from the list of down outputs to the combined
  output, so the stacks are never written.

The routing (sorted slots) is computed once outside; times are medians of 30 interleaved calls, with
the floor and autocal's own forward in the same process (as run in session 7 the calls came in one
order every round; ``_common.interleaved`` now rotates it). Run on the GPU machine from the repository
root, with transformers on PYTHONPATH::

    python3 benchmarks/probes/fused_segments.py qwen3-30b-a3b:512 qwen3-30b-a3b:2048

An analysis probe, not a benchmark.
"""
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from autocal.synthesize.slots import RoutedSlots  # noqa: E402
from _common import SHAPES, interleaved  # noqa: E402
from calibration_forward import observed_layer  # noqa: E402

dev, dt = torch.device("cuda"), torch.bfloat16


def activation(gates, ups):
    return F.silu(torch.stack(gates)) * torch.stack(ups)


def combine(downs, row, token, weight, tokens: int):
    rows = torch.stack(downs).reshape(-1, downs[0].shape[-1]).index_select(0, row) * weight
    return torch.zeros(tokens, rows.shape[-1], dtype=rows.dtype, device=rows.device).index_add(0, token, rows)


compiled_activation = torch.compile(activation, dynamic=False, fullgraph=True)
compiled_combine = torch.compile(combine, dynamic=False, fullgraph=True)

for item in sys.argv[1:]:
    name, tokens = item.split(":")
    shape, tokens = SHAPES[name], int(tokens)
    block, experts, _, hidden, _, floor = observed_layer(shape, tokens, dev, dt)
    modules = experts.experts()
    gates, ups, downs = ([e._modules[n] for e in modules] for n in ("gate_proj", "up_proj", "down_proj"))
    with torch.no_grad():
        _, weights, index = block.gate(hidden)
        expected = experts(hidden, index, weights)
        slots = RoutedSlots(index, weights, len(modules), len(modules))
        row, token, weight = slots.group(0)

        def run(act_fn, combine_fn):
            def forward():
                act = act_fn([g(hidden) for g in gates], [u(hidden) for u in ups])
                return combine_fn([d(r) for d, r in zip(downs, act.unbind(0))], row, token, weight, tokens)
            return forward

        eager, compiled = run(activation, combine), run(compiled_activation, compiled_combine)
        started = time.perf_counter()
        got = compiled()
        compile_s = time.perf_counter() - started
        for label, out in (("eager", eager()), ("compiled", got)):
            diff = (out.float() - expected.float()).abs().max().item()
            print(f"   {label}: max |diff| against the original experts {diff:.3g}")
        fns = {"floor": floor, "autocal": lambda: experts(hidden, index, weights), "eager": eager, "compiled": compiled}
        times = interleaved(fns, dev, 30, warmup=3)
        floor_ms = statistics.median(times["floor"]) * 1e3
        print(f"== {name} {tokens} tokens (first compiled call {compile_s:.1f} s): ms, x floor")
        print("   " + "  ".join(f"{k} {statistics.median(v) * 1e3:.2f} ({statistics.median(v) * 1e3 / floor_ms:.3f}x)"
                               for k, v in times.items()))
    del block, experts, modules, gates, ups, downs, floor, fns
    torch.cuda.empty_cache()
