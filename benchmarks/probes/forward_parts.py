"""Qwen3-30B-A3B, observed, one H200: the floor, the group-order calls with activation (E_unbind), the grouped
template alone per group (grouped_only), the grouped calibration forward without the container's call (dense),
the whole forward (ours), and the routed slots alone (slots), each over the floor. The "what is left" table of
docs/benchmarks.md (session 5). Run on the GPU machine from the repository root, with transformers on PYTHONPATH:

    python3 benchmarks/probes/forward_parts.py

An analysis probe kept as it was run (it calls private methods), not a benchmark.
"""
import sys, os, time, statistics
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks")); sys.path.insert(0, os.getcwd())
import torch, torch.nn.functional as F
import autocal
from _common import SHAPES, build_block
from autocal.synthesize import experts as E
from calibration_forward import RowCounter, _linears
dev = torch.device("cuda"); dt = torch.bfloat16
def sync(): torch.cuda.synchronize()
shape = SHAPES["qwen3-30b-a3b"]
block, _ = build_block(shape, dev, dt)
experts = autocal.synthesize(block).get_submodule("experts")
linears = _linears(experts)
counter = RowCounter(linears)
ex = experts.experts()
gates = [m._modules['gate_proj'] for m in ex]; ups = [m._modules['up_proj'] for m in ex]; downs = [m._modules['down_proj'] for m in ex]
for tokens, G in ((512, 128), (2048, 32)):
    hidden = torch.randn(tokens, shape.hidden, device=dev, dtype=dt)
    inter = torch.randn(tokens, shape.width, device=dev, dtype=dt)
    calls = [(l, hidden if l.in_features == shape.hidden else inter) for l in linears]
    with torch.no_grad():
        _, w, idx = block.gate(hidden)
        def floor():
            for l, x in calls: l(x)
        def E_unbind():
            for s in range(0, 128, G):
                a = torch.stack([l(hidden) for l in gates[s:s+G]])
                b = torch.stack([l(hidden) for l in ups[s:s+G]])
                h = F.silu(a) * b; del a, b
                c = torch.stack([l(r) for l, r in zip(downs[s:s+G], h.unbind(0))])
        def grouped_only():
            for s in range(0, 128, G): experts._grouped(ex[s:s+G], hidden)
        def dense():
            experts._dense_grouped(ex, hidden, idx, w)
        def ours(): experts(hidden, idx, w)
        def slots(): E.RoutedSlots(idx, w, 128, G, experts._firsts(G, idx)).group(0)
        fns = dict(floor=floor, E_unbind=E_unbind, grouped_only=grouped_only, dense=dense, ours=ours, slots=slots)
        for f in fns.values(): f(); f()
        res = {k: [] for k in fns}; host = {k: [] for k in fns}
        for r in range(15):
            for k, f in fns.items():
                sync(); t = time.perf_counter(); f(); h = time.perf_counter(); sync(); e = time.perf_counter()
                res[k].append(e - t); host[k].append(h - t)
        fl = statistics.median(res["floor"])
        print(f"qwen3 {tokens} G={G}")
        for k in fns:
            m, h = statistics.median(res[k]), statistics.median(host[k])
            print(f"   {k:14s} wall {m*1e3:7.2f} host {h*1e3:7.2f}  /floor {m/fl:.3f}", flush=True)
