"""Qwen3-30B-A3B, observed (a row-counting pre-hook on every expert Linear), one H200: the floor's 384 Linear calls,
then the same calls in group order with their outputs dropped (B_order), kept for the group (C_keep), stacked
(D_stack), with the activation, product and per-expert views (E_unbind; E_index: views by indexing), and the whole
calibration forward (ours), each over the floor; then the host time of single ops. The "what is left" table of
docs/benchmarks.md (session 5). Run on the GPU machine from the repository root, with transformers on PYTHONPATH:

    python3 benchmarks/probes/grouped_calls.py

An analysis probe kept as it was run (it sets the group size by replacing a private method), not a benchmark.
"""
import sys, time, statistics, os
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks")); sys.path.insert(0, os.getcwd())
import torch, torch.nn.functional as F
from _common import SHAPES, build_block
import autocal
from autocal.synthesize import experts as E
from calibration_forward import RowCounter, _linears
dev = torch.device("cuda"); dt = torch.bfloat16
def sync(): torch.cuda.synchronize()
def bench(fns, rounds=15):
    for f in fns.values(): f(); f()
    res = {k: [] for k in fns}; host = {k: [] for k in fns}
    for r in range(rounds):
        for k, f in fns.items():
            sync(); t = time.perf_counter(); f(); h = time.perf_counter(); sync(); e = time.perf_counter()
            res[k].append(e - t); host[k].append(h - t)
    fl = statistics.median(res["floor"])
    for k in fns:
        m, h = statistics.median(res[k]) * 1e3, statistics.median(host[k]) * 1e3
        print(f"   {k:14s} wall {m:7.2f} host {h:7.2f}  /floor {m/fl/1e3:.3f}", flush=True)

def qwen(tokens, G=32):
    shape = SHAPES["qwen3-30b-a3b"]
    block, _ = build_block(shape, dev, dt)
    module = autocal.synthesize(block)
    experts = module.get_submodule("experts")
    linears = _linears(experts)
    ex = experts.experts()
    gates = [m._modules['gate_proj'] for m in ex]; ups = [m._modules['up_proj'] for m in ex]; downs = [m._modules['down_proj'] for m in ex]
    hidden = torch.randn(tokens, shape.hidden, device=dev, dtype=dt)
    inter = torch.randn(tokens, shape.width, device=dev, dtype=dt)
    counter = RowCounter(linears)
    calls = [(l, hidden if l.in_features == shape.hidden else inter) for l in linears]
    print(f"qwen3 {tokens} tokens G={G}")
    with torch.no_grad():
        _, w, idx = block.gate(hidden)
        def floor():
            for l, x in calls: l(x)
        def B():
            for s in range(0, 128, G):
                for l in gates[s:s+G]: l(hidden)
                for l in ups[s:s+G]: l(hidden)
                for l in downs[s:s+G]: l(inter)
        def C():
            for s in range(0, 128, G):
                a = [l(hidden) for l in gates[s:s+G]]
                b = [l(hidden) for l in ups[s:s+G]]
                c = [l(inter) for l in downs[s:s+G]]
        def D():
            for s in range(0, 128, G):
                a = torch.stack([l(hidden) for l in gates[s:s+G]])
                b = torch.stack([l(hidden) for l in ups[s:s+G]])
                c = torch.stack([l(inter) for l in downs[s:s+G]])
        def Eu():
            for s in range(0, 128, G):
                a = torch.stack([l(hidden) for l in gates[s:s+G]])
                b = torch.stack([l(hidden) for l in ups[s:s+G]])
                h = F.silu(a) * b; del a, b
                c = torch.stack([l(r) for l, r in zip(downs[s:s+G], h.unbind(0))])
        def Ev():
            for s in range(0, 128, G):
                a = torch.stack([l(hidden) for l in gates[s:s+G]])
                b = torch.stack([l(hidden) for l in ups[s:s+G]])
                h = F.silu(a) * b; del a, b
                c = torch.stack([l(h[i]) for i, l in enumerate(downs[s:s+G])])
        E.CalibrationExperts._group_size = lambda self, *a: G
        def ours(): experts(hidden, idx, w)
        bench(dict(floor=floor, B_order=B, C_keep=C, D_stack=D, E_unbind=Eu, E_index=Ev, ours=ours))
        # per-op host costs
        lst = [torch.empty(tokens, 768, device=dev, dtype=dt) for _ in range(G)]
        st = torch.stack(lst)
        for name, f in [("stack32", lambda: torch.stack(lst)), ("unbind32", lambda: st.unbind(0)), ("silu", lambda: F.silu(st)),
                        ("hooked linear", lambda: downs[0](inter)), ("F.linear", lambda: F.linear(inter, downs[0].weight)),
                        ("empty", lambda: torch.empty(tokens, 768, device=dev, dtype=dt))]:
            for _ in range(50): f()
            sync(); t = time.perf_counter()
            for _ in range(200): f()
            h = time.perf_counter(); sync()
            print(f"   op {name:14s} host {(h-t)/200*1e6:6.1f} us")
    counter.remove()
    del block, module, experts, linears, calls, ex, gates, ups, downs
    torch.cuda.empty_cache()

print(torch.cuda.get_device_name(0))
qwen(2048, 32)
qwen(512, 128)
