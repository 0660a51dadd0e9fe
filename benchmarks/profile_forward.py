"""Where the calibration forward spends its time: torch.profiler over autocal's experts and the floor.

    python benchmarks/profile_forward.py --shape mixtral-8x7b --tokens 512 --device cuda --dtype bfloat16

Prints the top operators by device time for autocal's observed forward (a row-counting
pre-hook on every expert Linear, as in calibration_forward.py) and for the floor (the
per-expert Linear calls alone), run back to back in one process.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from _common import SHAPES, build_block, sync

import autocal
from calibration_forward import RowCounter, _linears


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="mixtral-8x7b", choices=sorted(SHAPES))
    parser.add_argument("--scale", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = SHAPES[args.shape].scaled(args.scale)
    block, _ = build_block(shape, device, dtype)
    module = autocal.synthesize(block)
    experts = module.get_submodule("experts")
    linears = _linears(experts)
    hidden = torch.randn(args.tokens, shape.hidden, device=device, dtype=dtype)
    intermediate = torch.randn(args.tokens, shape.width, device=device, dtype=dtype)
    counter = RowCounter(linears)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with torch.no_grad():
        _, weights, index = block.gate(hidden)

        def ours():
            experts(hidden, index, weights)

        def floor():
            for linear in linears:
                linear(hidden if linear.in_features == shape.hidden else intermediate)

        for name, fn in (("autocal (observed)", ours), ("floor (observed)", floor)):
            for _ in range(3):
                fn()
            sync(device)
            with profile(activities=activities) as prof:
                for _ in range(5):
                    fn()
                sync(device)
            print(f"\n== {name}: {shape.name}, {args.tokens} tokens, {args.dtype}, 5 forwards")
            print(prof.key_averages().table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
    counter.remove()


if __name__ == "__main__":
    main()
