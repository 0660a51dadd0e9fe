"""Peak activation memory of one MoE layer's calibration forward: token chunks against none, and the incumbent.

One ``Qwen3MoeSparseMoeBlock`` of a given shape, random weights; the experts
container is called in calibration mode with a row-counting hook on every
expert Linear (as a quantizer's observer), by:

- ``incumbent``: LLM Compressor's ``LinearExperts2D`` (each expert on every token);
- ``autocal``: autocal's calibration forward as it runs by default (experts in groups);
- ``autocal chunks=N``: with ``autocal.set_calibration_chunk_size(model, N)``: each
  expert on its routed tokens, then on the rest N tokens at a time.

Each method runs in a fresh subprocess that builds the block, converts it and
runs one warm-up forward, then measures one forward's peak memory above what
was held before it: on a GPU ``torch.cuda.max_memory_allocated``; on a CPU the
peak RSS (``VmHWM`` after resetting it through ``/proc/self/clear_refs``), with
glibc told to return every freed block of 64 KiB or more to the system
(``MALLOC_MMAP_THRESHOLD_``), so RSS follows what is alive. Also reported: the
forward's median time over ``--repeats`` calls, that every Linear saw every
token once, and, for the chunked runs, that the output equals the output
with calibration off bitwise (as ``tests/test_equivalence.py`` checks on the toys).

Usage (from the repository root)::

    python benchmarks/chunk_memory.py --threads 1                             # CPU: Mixtral-8x7B ÷ 8, float32
    python benchmarks/chunk_memory.py --device cuda --tokens 16384 --chunks 4096 1024   # GPU: full shape, bfloat16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SHAPES, build_block, import_incumbent, linearize, machine, proc_status, run_result,  # noqa: E402
                     sync, write_json)
from calibration_forward import RowCounter, _linears  # noqa: E402

import autocal  # noqa: E402  (the checkout's, via _common)

__all__ = ["main"]


def child(args) -> dict:
    """One method's forward in this process: peak memory above the memory held before it, time, checks."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape].scaled(args.scale)
    block, config = build_block(shape, device, dtype)
    hidden = torch.randn(args.tokens, shape.hidden, device=device, dtype=dtype,
                         generator=torch.Generator(device=device).manual_seed(1))
    with torch.no_grad():
        _, weights, index = block.gate(hidden)
    method, chunks = args.child.partition(":")[::2]
    if method == "incumbent":
        incumbent = import_incumbent()[0]
        experts = linearize(incumbent, block.experts, config)
        del block
        context = incumbent.moe_calibration_context
    else:
        module = autocal.synthesize(block)
        if chunks:
            autocal.set_calibration_chunk_size(torch.nn.Sequential(module), int(chunks))
        experts = module.get_submodule("experts")
        context = None
    counter = RowCounter(_linears(experts))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            if context is None:
                return experts(hidden, index, weights)
            with context():
                return experts(hidden, index, weights)

    forward()  # warm-up: one-time work (checks, generated code) is not a calibration forward's memory
    sync(device)
    counter.reset()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = proc_status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    output = forward()
    sync(device)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda" else proc_status("VmHWM")) - before
    every_token_once = all(rows == args.tokens for rows in counter.rows)
    times = []
    for _ in range(args.repeats):
        started = time.perf_counter()
        forward()
        sync(device)
        times.append(time.perf_counter() - started)
    same = None
    if chunks:
        module.calibrate_all_experts = False
        same = bool(torch.equal(output, forward()))
    return {"method": args.child, "peak_bytes": peak, "ms": statistics.median(times) * 1e3,
            "every_linear_saw_every_token_once": every_token_once, "bitwise_as_calibration_off": same}


def run_child(method: str, args) -> dict:
    command = [sys.executable, __file__, "--child", method] + [
        f"--{k}={getattr(args, k)}" for k in ("device", "dtype", "shape", "scale", "tokens", "repeats", "threads")
        if getattr(args, k) is not None]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--shape", default="mixtral-8x7b", choices=list(SHAPES))
    parser.add_argument("--scale", type=int, help="divide hidden size and width by this (default: 8 on cpu, 1 on cuda)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 256])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    on_gpu = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if on_gpu else "float32")
    args.scale = args.scale or (1 if on_gpu else 8)
    if args.child:
        print(json.dumps(child(args)))
        return None
    methods = ["incumbent", "autocal"] + [f"autocal:{n}" for n in args.chunks]
    rows = [run_child(method, args) for method in methods]
    unit = 2 ** 20
    print(f"{args.shape} ÷ {args.scale}, {args.tokens} tokens, {args.dtype}, {args.device}")
    print("| method | peak above before, MiB | ms (median) | every Linear saw every token once | "
          "bitwise as calibration off |")
    print("|---|---|---|---|---|")
    for row in rows:
        label = row["method"].replace("autocal:", "autocal, chunks of ")
        same = "—" if row["bitwise_as_calibration_off"] is None else ("yes" if row["bitwise_as_calibration_off"] else "no")
        print(f"| {label} | {row['peak_bytes'] / unit:.0f} | {row['ms']:.1f} | "
              f"{'yes' if row['every_linear_saw_every_token_once'] else 'no'} | {same} |")
    result = run_result("chunk_memory", machine(torch.device(args.device)), shape=args.shape, scale=args.scale,
                        tokens=args.tokens, dtype=args.dtype, rows=rows)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
