"""How the size of a batch of GPTQ Linears with Hessians of their own changes LLM Compressor's quantization time.

LLM Compressor's ``quantize_weight`` factorizes a batch of under 16 Hessians one at a time, each followed by a
host sync (``helpers.factorize_hessian``), and a batch of 16 or more with batched kernels. autocal quantizes the
Linears that share no Hessian (the down projections) through that function in batches of its own choosing
(``SharedHessianGPTQModifier.compress_module_list``); this measures what the choice costs, apart from the
model and the offloaded copies: the same random weights and Hessians, quantized in batches of each size, in
one process, with the per-module loss and fallback reads LLM Compressor's ``compress_module_list`` makes.

    python benchmarks/gptq_batches.py --device cuda --json $OUT/gptq_batches.json   # DeepSeek-V3's down projections
    python benchmarks/gptq_batches.py --device cpu --modules 32 --rows 256 --columns 128 --sizes 1 15 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from compressed_tensors.quantization import QuantizationArgs
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight


def operands(modules: int, rows: int, columns: int, group: int, device: str) -> tuple:
    """Random bfloat16 weights, Hessians ``XᵀX / n`` of random inputs, and absmax group scales (4-bit)."""
    generator = torch.Generator(device=device).manual_seed(0)
    weights = torch.randn(modules, rows, columns, device=device, generator=generator).to(torch.bfloat16)
    hessians = torch.empty(modules, columns, columns, device=device)
    for hessian in hessians:  # one module's inputs at a time
        inputs = torch.randn(4 * columns, columns, device=device, generator=generator)
        torch.matmul(inputs.T, inputs / inputs.shape[0], out=hessian)
    scales = weights.float().reshape(modules, rows, columns // group, group).abs().amax(-1) / 7
    return weights, hessians, scales, torch.zeros_like(scales, dtype=torch.int8)


def quantize_in_batches(size: int, weights, hessians, scales, zeros, args: QuantizationArgs) -> torch.Tensor:
    """Every module quantized, ``size`` at a time, as ``GPTQModifier.compress_module_list`` calls it."""
    quantized = []
    for start in range(0, weights.shape[0], size):
        part = slice(start, start + size)
        out, losses, fallback = quantize_weight(weights[part].float(), hessians[part].clone(), scales[part],
                                                zeros[part], None, args, blocksize=128, percdamp=0.01)
        for index in range(out.shape[0]):  # the per-module reads LLM Compressor makes (its logging)
            losses[index].item()
            fallback[index].item()
        quantized.append(out)
    return torch.cat(quantized)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--modules", type=int, default=256, help="Linears (DeepSeek-V3: 256 down projections)")
    parser.add_argument("--rows", type=int, default=7168)
    parser.add_argument("--columns", type=int, default=2048)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[15, 19, 32])
    parser.add_argument("--rounds", type=int, default=3, help="each size this many times, the sizes alternating")
    parser.add_argument("--json", type=Path)
    options = parser.parse_args()
    args = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=options.group)
    data = operands(options.modules, options.rows, options.columns, options.group, options.device)
    quantize_in_batches(options.sizes[0], *(d[:2] for d in data), args)  # warm-up (kernels compiled)
    seconds: dict[int, list[float]] = {size: [] for size in options.sizes}
    results = {}
    for _ in range(options.rounds):
        for size in options.sizes:
            sync(options.device)
            started = time.perf_counter()
            results[size] = quantize_in_batches(size, *data, args)
            sync(options.device)
            seconds[size].append(time.perf_counter() - started)
    reference = results[options.sizes[0]]
    summary = {
        "device": torch.cuda.get_device_name() if options.device == "cuda" else "cpu",
        "torch": torch.__version__, **{k: getattr(options, k) for k in ("modules", "rows", "columns", "group")},
        "sizes": {size: {"seconds": seconds[size], "median_s": statistics.median(seconds[size]),
                         "against_first": statistics.median(seconds[size]) / statistics.median(seconds[options.sizes[0]]),
                         "weights_differing_from_first": int((results[size] != reference).sum())}
                  for size in options.sizes},
    }
    for size, row in summary["sizes"].items():
        print(f"batches of {size:3d}: median {row['median_s']:.3f} s ({row['against_first']:.2f}x the first), "
              f"{row['weights_differing_from_first']} quantized weights differ from the first")
    if options.json:
        options.json.write_text(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
