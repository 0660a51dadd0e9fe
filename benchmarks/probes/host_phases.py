"""Where the host is during one calibration forward: microsecond stamps at each group's run, the routed slots,
each group() and combine, the return and the device's end (medians of 10 forwards), Qwen3-30B-A3B at 512 and
2048 tokens and Mixtral-8x7B at 512, observed. Source of the routed slots' and combines' host times in
docs/benchmarks.md (session 5). Run on the GPU machine from the repository root, with transformers on PYTHONPATH:

    python3 benchmarks/probes/host_phases.py

An analysis probe kept as it was run (it wraps private methods to stamp them), not a benchmark.
"""
import sys, os, time, statistics
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks")); sys.path.insert(0, os.getcwd())
import torch
import autocal
from _common import SHAPES, build_block
from autocal.synthesize import experts as E
from calibration_forward import RowCounter, _linears
dev = torch.device("cuda"); dt = torch.bfloat16
stamps = []
def stamp(name): stamps.append((name, time.perf_counter()))
def wrap(cls, attr, name, static=False):
    orig = cls.__dict__[attr]
    fn = orig.__func__ if static else orig
    def w(*a, **k):
        stamp(name + ">"); r = fn(*a, **k); stamp(name + "<"); return r
    setattr(cls, attr, staticmethod(w) if static else w)
wrap(E.CalibrationExperts, "_combine", "combine", static=True)
wrap(E.RoutedSlots, "__init__", "slots")
wrap(E.RoutedSlots, "group", "group")
from autocal.synthesize.grouped import GroupedTemplate
wrap(GroupedTemplate, "__call__", "run")
for shape_name, tokens in (("qwen3-30b-a3b", 512), ("qwen3-30b-a3b", 2048), ("mixtral-8x7b", 512)):
    shape = SHAPES[shape_name]
    block, _ = build_block(shape, dev, dt)
    experts = autocal.synthesize(block).get_submodule("experts")
    counter = RowCounter(_linears(experts))
    hidden = torch.randn(tokens, shape.hidden, device=dev, dtype=dt)
    with torch.no_grad():
        _, w, idx = block.gate(hidden)
        for _ in range(5): experts(hidden, idx, w)
        runs = []
        for _ in range(10):
            torch.cuda.synchronize(); stamps.clear(); t0 = time.perf_counter(); experts(hidden, idx, w); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
            runs.append([(n, (t - t0) * 1e6) for n, t in stamps] + [("return", (t1 - t0) * 1e6), ("device done", (t2 - t0) * 1e6)])
    print(f"== {shape_name} {tokens}: median host stamps (us from call)")
    for i, (n, _) in enumerate(runs[0]):
        print(f"   {n:12s} {statistics.median(r[i][1] for r in runs):9.1f}")
    del block, experts; torch.cuda.empty_cache()
