"""Calibration-mode forward of one MoE layer: autocal against LLM Compressor's ``LinearExperts2D``, and the floor.

One ``Qwen3MoeSparseMoeBlock`` per shape (random normal weights, transformers v5
packed layout) is converted twice:

- autocal: ``autocal.synthesize(block)``, whose expert Linears are views of the
  block's packed weights;
- the incumbent: ``LinearExperts2D.get_linear_experts_cls(type(experts))
  .from_experts_module(experts, config)`` (a copy of the same weights), in
  calibration mode through ``moe_calibration_context()``.

The router runs once per token count; both experts containers are called with
the same ``(hidden, top_k_index, top_k_weights)``. The floor is the per-expert
``nn.Linear`` calls alone (gate, up and down of every expert on all tokens,
on autocal's unpacked Linears): what any all-experts calibration must compute.

Two modes, each timed separately:

- ``plain``: nothing attached to the expert Linears;
- ``observed``: a forward pre-hook on every expert Linear, as a quantizer's
  observer attaches (it counts rows, which also checks that every Linear saw
  every token once). This is the mode calibration runs in.

Every call of the three is timed in one process, interleaved (the order rotates
every round) after warm-up; the table gives medians.

Usage (from the repository root)::

    python benchmarks/calibration_forward.py                           # CPU, float32, hidden/width ÷ 8
    python benchmarks/calibration_forward.py --device cuda --scale 1   # GPU, bfloat16, full shapes
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (SHAPES, build_block, import_incumbent, interleaved, linearize, machine, median_ms,  # noqa: E402
                     run_result, write_json)

import autocal  # noqa: E402  (the checkout's, via _common)

__all__ = ["measure_shape", "observed_layer", "floor_of", "main"]

MODES = ("plain", "observed")
METHODS = ("incumbent", "autocal", "floor")


def _linears(module: nn.Module) -> list[nn.Linear]:
    return [m for m in module.modules() if isinstance(m, nn.Linear)]


class RowCounter:
    """A forward pre-hook on every given Linear that counts the rows it receives (the observer)."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.rows = [0] * len(linears)
        self.handles = [linear.register_forward_pre_hook(self._hook(i)) for i, linear in enumerate(linears)]

    def _hook(self, i: int):
        def hook(module, args):
            self.rows[i] += args[0].shape[0]
        return hook

    def reset(self) -> None:
        self.rows = [0] * len(self.rows)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def floor_of(linears: list[nn.Linear], hidden: torch.Tensor, intermediate: torch.Tensor):
    """The floor: a function calling each Linear on all tokens, ``hidden`` or ``intermediate`` as its input takes."""
    calls = [(linear, hidden if linear.in_features == hidden.shape[-1] else intermediate) for linear in linears]

    def floor():
        for linear, x in calls:
            linear(x)
    return floor


def observed_layer(shape, tokens: int, device: torch.device, dtype: torch.dtype):
    """What the GPU probes time: one block of ``shape`` converted by autocal, a ``RowCounter`` on every expert
    Linear, random inputs of ``tokens`` tokens, and the floor on them.

    Returns ``(block, experts container, counter, hidden, intermediate, floor)``.
    """
    block, _ = build_block(shape, device, dtype)
    experts = autocal.synthesize(block).get_submodule("experts")
    linears = _linears(experts)
    hidden = torch.randn(tokens, shape.hidden, device=device, dtype=dtype)
    intermediate = torch.randn(tokens, shape.width, device=device, dtype=dtype)
    return block, experts, RowCounter(linears), hidden, intermediate, floor_of(linears, hidden, intermediate)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def measure_shape(shape, tokens_list, device, dtype, repeats, warmup, modes, incumbent, seed=0,
                  offloaded=False) -> list[dict]:
    """Rows of results (one per token count and mode) for one shape."""
    started = time.perf_counter()
    block, config = build_block(shape, device, dtype, seed)
    built_s = time.perf_counter() - started

    started = time.perf_counter()
    module = autocal.synthesize(block)
    synthesize_s = time.perf_counter() - started
    module.calibrate_all_experts = True
    ours = module.get_submodule("experts")

    started = time.perf_counter()
    theirs = linearize(incumbent, block.experts, config)
    linearize_s = time.perf_counter() - started
    if offloaded:
        _offload_in_place(ours, theirs)
    print(f"  {shape.name}: built {built_s:.1f}s, autocal.synthesize {synthesize_s:.1f}s, "
          f"LinearExperts2D {linearize_s:.1f}s", flush=True)

    our_linears = _linears(ours)
    rows = []
    generator = torch.Generator(device=device).manual_seed(seed + 1)
    for tokens in tokens_list:
        hidden = torch.randn(tokens, shape.hidden, device=device, dtype=dtype, generator=generator)
        intermediate = torch.randn(tokens, shape.width, device=device, dtype=dtype, generator=generator)
        with torch.no_grad():
            _, weights, index = block.gate(hidden)
            with incumbent.moe_calibration_context():
                expected = block.experts(hidden, index, weights)  # the original packed experts, eager
                fns = {"incumbent": lambda: theirs(hidden, index, weights),
                       "autocal": lambda: ours(hidden, index, weights),
                       "floor": floor_of(our_linears, hidden, intermediate)}  # autocal's expert Linears
                for mode in modes:
                    counters = {}
                    if mode == "observed":
                        counters = {"incumbent": RowCounter(_linears(theirs)), "autocal": RowCounter(our_linears)}
                    diffs = {name: _max_diff(fns[name](), expected) for name in ("incumbent", "autocal")}
                    coverage = {}
                    for name, counter in counters.items():
                        coverage[name] = all(r == tokens for r in counter.rows)
                        counter.reset()
                    times = interleaved(fns, device, repeats, warmup)
                    for counter in counters.values():
                        counter.remove()
                    rows.append(_row(shape, tokens, mode, times, diffs, coverage, expected))
                    print("    " + _format_row(rows[-1]), flush=True)
        del hidden, intermediate, expected, fns
    rows[0]["setup_s"] = {"build": built_s, "autocal_synthesize": synthesize_s, "incumbent_linearize": linearize_s}
    if device.type == "cuda":
        rows[0]["cuda_max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    return rows


def _offload_in_place(*containers: nn.Module) -> None:
    """Every module's forward wrapped as LLM Compressor's pipeline wraps it (compressed-tensors offloading),
    each module offloaded to the device it is on and onloaded there: the wrappers' cost, no copies."""
    from compressed_tensors.offload import set_onload_device

    for container in containers:
        set_onload_device(container, next(container.parameters()).device)


def _row(shape, tokens, mode, times, diffs, coverage, expected) -> dict:
    ms = {name: median_ms(samples) for name, samples in times.items()}
    return {
        "shape": shape.name, "num_experts": shape.num_experts, "hidden": shape.hidden, "width": shape.width,
        "top_k": shape.top_k, "tokens": tokens, "mode": mode,
        "incumbent_ms": ms["incumbent"], "autocal_ms": ms["autocal"], "floor_ms": ms["floor"],
        "speedup_vs_incumbent": ms["incumbent"] / ms["autocal"],
        # the same ratio per round (the calls of one round ran back to back), then the median: steadier under load
        "speedup_vs_incumbent_paired": statistics.median(i / a for i, a in zip(times["incumbent"], times["autocal"])),
        "autocal_over_floor": ms["autocal"] / ms["floor"],
        "incumbent_over_floor": ms["incumbent"] / ms["floor"],
        "samples_ms": {name: [s * 1e3 for s in samples] for name, samples in times.items()},
        "max_abs_diff_vs_original": diffs,
        "max_abs_original": float(expected.float().abs().max()),
        "every_linear_saw_every_token": coverage or None,
    }


HEADER = ("shape", "tokens", "mode", "incumbent ms", "autocal ms", "floor ms", "incumbent/autocal",
          "(per round)", "autocal/floor", "incumbent/floor")


def _format_row(row: dict) -> str:
    return (f"{row['shape']:<18} {row['tokens']:>6} {row['mode']:<8} {row['incumbent_ms']:>12.2f} "
            f"{row['autocal_ms']:>10.2f} {row['floor_ms']:>9.2f} {row['speedup_vs_incumbent']:>17.2f} "
            f"{row['speedup_vs_incumbent_paired']:>11.2f} {row['autocal_over_floor']:>13.2f} {row['incumbent_over_floor']:>15.2f}")


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['mode']} | {r['incumbent_ms']:.2f} | "
                     f"{r['autocal_ms']:.2f} | {r['floor_ms']:.2f} | {r['speedup_vs_incumbent']:.2f}× | "
                     f"{r['speedup_vs_incumbent_paired']:.2f}× | "
                     f"{r['autocal_over_floor']:.2f}× | {r['incumbent_over_floor']:.2f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--tokens", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--scale", type=int, help="divide hidden size and width by this (default: 1 on cuda, 8 on cpu)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default: 20 on cuda, 5 on cpu)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    parser.add_argument("--offloaded", action="store_true",
                        help="wrap every module of both experts containers as LLM Compressor's pipeline does "
                             "(compressed-tensors offloading, onloaded where it is)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    scale = args.scale or (1 if device.type == "cuda" else 8)
    repeats = args.repeats or (20 if device.type == "cuda" else 5)
    if args.threads:
        torch.set_num_threads(args.threads)
    incumbent, imported = import_incumbent()
    info = machine(device)
    print(f"device {device} ({info.get('gpu') or info['cpu']}), {dtype}, hidden/width ÷ {scale}, "
          f"{repeats} rounds, torch {info['torch']}, transformers {info['transformers']}, "
          f"llmcompressor {info['llmcompressor']} ({imported})", flush=True)
    print("    " + " ".join(HEADER), flush=True)

    rows = []
    for name in args.shapes:
        rows += measure_shape(SHAPES[name].scaled(scale), args.tokens, device, dtype, repeats, args.warmup,
                              args.modes, incumbent, offloaded=args.offloaded)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = run_result("calibration_forward", info, dtype=str(dtype).removeprefix("torch."), scale=scale,
                        repeats=repeats, warmup=args.warmup, incumbent_import=imported, offloaded=args.offloaded,
                        rows=rows)
    print()
    print(markdown_table(rows))
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
