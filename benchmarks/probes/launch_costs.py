"""Host time per call of the ops the calibration forward's routing, stacking and combine launch, on a GPU.

Each op runs 200 times back to back (the device is never waited for inside the loop; the queue is
drained before each op's loop), and the host time per call is printed with the device time per
call (the loop's wall time once drained). Shapes: Qwen3-30B-A3B's layer (128 experts, hidden 2048,
top-8) at 512 and 2048 tokens, bfloat16. Run on the GPU machine from the repository root::

    python3 benchmarks/probes/launch_costs.py

An analysis probe, not a benchmark.
"""
import time

import torch

dev, dt = torch.device("cuda"), torch.bfloat16
E, H, W, K = 128, 2048, 768, 8


def cost(name, fn, n=200):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    print(f"  {name:<48} host {host / n * 1e6:7.1f} us   wall {total / n * 1e6:7.1f} us")


for T in (512, 2048):
    print(f"== {T} tokens")
    index = torch.randint(0, E, (T, K), device=dev)
    weights = torch.rand(T, K, device=dev, dtype=dt)
    flat = index.reshape(-1)
    flat32, flat16 = flat.to(torch.int32), flat.to(torch.int16)
    G = min(E, (1 << 27) // (T * H))
    unweighted = torch.randn(G * T, H, device=dev, dtype=dt)
    output = torch.zeros(T, H, device=dev, dtype=dt)
    rows = torch.randint(0, G * T, (T * K * G // E,), device=dev)
    tokens = torch.randint(0, T, (T * K * G // E,), device=dev)
    w = torch.rand(rows.numel(), 1, device=dev, dtype=dt)
    firsts = torch.arange(0, E + G, G, device=dev).clamp(max=E)
    outs = [torch.randn(T, W, device=dev, dtype=dt) for _ in range(G)]
    act = torch.randn(G, T, W, device=dev, dtype=dt)
    expert_sorted, order = torch.sort(flat, stable=True)
    cost("sort int64 stable", lambda: torch.sort(flat, stable=True))
    cost("sort int32 stable", lambda: torch.sort(flat32, stable=True))
    cost("sort int16 stable", lambda: torch.sort(flat16, stable=True))
    cost("sort int64 unstable", lambda: torch.sort(flat))
    cost("argsort int64 stable", lambda: torch.argsort(flat, stable=True))
    cost("order // K", lambda: order // K)
    cost("torch.div(order, K, rounding_mode=floor)", lambda: torch.div(order, K, rounding_mode="floor"))
    cost("weights index_select", lambda: weights.reshape(-1, 1).index_select(0, order))
    cost("expert % G", lambda: expert_sorted % G)
    cost("searchsorted", lambda: torch.searchsorted(expert_sorted, firsts))
    cost("to cpu non_blocking + event", lambda: (firsts.to("cpu", non_blocking=True), torch.Event(dev).record()))
    cost(f"stack {G} x [T, W]", lambda: torch.stack(outs))
    cost(f"unbind [{G}, T, W]", lambda: act.unbind(0))
    cost("unweighted index_select rows", lambda: unweighted.index_select(0, rows))
    cost("unweighted[rows]", lambda: unweighted[rows])
    cost("rows * w", lambda: unweighted.index_select(0, rows) * w)
    cost("index_add_", lambda: output.index_add_(0, tokens, unweighted[: tokens.numel()]))
    cost("new_zeros", lambda: output.new_zeros(T, H))
    cost("silu", lambda: torch.nn.functional.silu(act))
    cost("mul", lambda: act * act)
