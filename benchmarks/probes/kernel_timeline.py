"""The device's kernel timeline of three observed calibration forwards (a marker kernel launched just before
each call): time from the marker to the first kernel, and every gap between kernels over 8 µs. Source of the
idle times before the first expert Linear and around the routed slots in docs/benchmarks.md (session 5).
Run on the GPU machine from the repository root, with transformers on PYTHONPATH:

    python3 benchmarks/probes/kernel_timeline.py <autocal checkout> <label> mixtral-8x7b 512

An analysis probe kept as it was run, not a benchmark.
"""
import sys, os
root, label = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks")); sys.path.insert(0, root)
import torch
import autocal
from _common import SHAPES, build_block
from calibration_forward import RowCounter, _linears
from torch.profiler import ProfilerActivity, profile
dev = torch.device("cuda"); dt = torch.bfloat16
shape = SHAPES[sys.argv[3]]; tokens = int(sys.argv[4])
block, _ = build_block(shape, dev, dt)
experts = autocal.synthesize(block).get_submodule("experts")
counter = RowCounter(_linears(experts))
hidden = torch.randn(tokens, shape.hidden, device=dev, dtype=dt)
marker = torch.zeros(1, device=dev)
with torch.no_grad():
    _, w, idx = block.gate(hidden)
    for _ in range(5): experts(hidden, idx, w)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            torch.cuda.synchronize()
            marker.add_(1)  # a kernel right before the call
            experts(hidden, idx, w)
            torch.cuda.synchronize()
kern = sorted([(e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA])
markers = [i for i, k in enumerate(kern) if "AUnaryFunctor" in k[2] or "add" in k[2].lower() and "CUDAFunctor_add" in k[2]]
# split at markers: the marker kernel is the one launched on a 1-element tensor; find it by duration and name
print(label, "kernels", len(kern))
starts = [i for i, k in enumerate(kern) if k[2].startswith("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctorOnSelf_add") or "CUDAFunctorOnSelf_add" in k[2]]
for n, s in enumerate(starts):
    end = starts[n + 1] if n + 1 < len(starts) else len(kern)
    fw = kern[s:end]
    t0 = fw[0][1]; busy = sum(e - b for b, e, _ in fw[1:]); span = fw[-1][1] - t0
    gaps = [(fw[i][0] - fw[i - 1][1], i, fw[i][2][:50]) for i in range(1, len(fw))]
    print(f"  forward {n}: first kernel after marker {fw[1][0]-t0:.0f} us, busy {busy:.0f} span {span:.0f} idle {span-busy:.0f}")
    for g, i, name in gaps:
        if g > 8: print(f"     gap {g:5.0f} before #{i} {name}")
