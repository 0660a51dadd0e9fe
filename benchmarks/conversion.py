"""Whole-model conversion: time and peak memory of ``autocal.convert`` against ``linearize_moe``.

Each conversion runs in a fresh subprocess that builds the same random
Qwen3-MoE model (same config, same seed; built on the meta device and
materialised in place, so building never holds two copies), then converts it:

- autocal: ``autocal.convert(model)``: find, record, detect, synthesize, unpack
  (views of the packed weights) and verify the first block of the class;
- the incumbent: ``llmcompressor.modeling.moe.linearize_moe(model)``.

Time is the wall-clock and the CPU time (user + system, all threads) of that
one call; on a shared machine the CPU time is the steadier of the two. Memory is the process's resident
set (``VmRSS``/``VmHWM`` of ``/proc/self/status``): the peak counter is reset
(``/proc/self/clear_refs``) after the model is built, so the reported peak is
that of the conversion alone; ``ru_maxrss`` (peak of the whole process,
building included) is reported too. After the peak is read, the converted
model runs a few tokens and its logits are compared with the original's,
computed before conversion, to show the conversion is complete and correct.

The subprocesses alternate (autocal, incumbent, autocal, …) and the table gives
medians of the times and the largest peak of each method.

Usage (from the repository root)::

    python benchmarks/conversion.py                  # 24 layers x 64 experts, hidden 1024, width 128: 2.7 GB float32
    python benchmarks/conversion.py --rounds 3 --json /tmp/conversion.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Shape, import_incumbent, machine, proc_status, qwen3_moe_config, run_result, write_json  # noqa: E402

__all__ = ["main"]

METHODS = ("autocal", "incumbent")
GB = 1e9


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def build_model(args):
    """The random Qwen3-MoE model (float32, normal(0, 0.02) weights), built without a second copy."""
    from transformers import Qwen3MoeForCausalLM

    shape = Shape("conversion", args.experts, args.hidden, args.width, args.top_k)
    config = qwen3_moe_config(shape, torch.float32, num_layers=args.layers, vocab_size=args.vocab,
                              intermediate_size=args.width, num_attention_heads=8, num_key_value_heads=4,
                              head_dim=args.hidden // 8, tie_word_embeddings=False)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
        for module in model.modules():  # buffers to_empty left empty (rotary inv_freq): rebuild them on the CPU
            if "inv_freq" in module._buffers and hasattr(module, "config"):
                fresh = type(module)(module.config)
                for name, buffer in fresh.named_buffers(recurse=False):
                    module._buffers[name] = buffer
    return model.eval(), config


def child(args) -> dict:
    """One conversion in this process; returns what it measured."""
    if args.threads:
        torch.set_num_threads(args.threads)
    incumbent = import_incumbent()[0] if args.child == "incumbent" else None
    import autocal  # noqa: F401  (imported before measuring, like the incumbent)

    rss_start = proc_status("VmRSS")
    started = time.perf_counter()
    model, config = build_model(args)
    build_s = time.perf_counter() - started
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    experts_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)
    layer_experts_bytes = experts_bytes // args.layers
    ids = torch.randint(0, args.vocab, (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(ids).logits
    rss_before = proc_status("VmRSS")
    reset = _reset_peak()

    cpu_started = time.process_time()
    started = time.perf_counter()
    if args.child == "autocal":
        autocal.convert(model)
    else:
        incumbent.linearize_moe(model)
    convert_s = time.perf_counter() - started
    convert_cpu_s = time.process_time() - cpu_started

    peak = proc_status("VmHWM")
    rss_after = proc_status("VmRSS")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        got = model(ids).logits
    kind = autocal.MoECalibrationModule if args.child == "autocal" else incumbent.LinearExperts2D
    converted = sum(isinstance(m, kind) for m in model.modules())  # blocks (autocal) or experts containers
    return {
        "method": args.child, "build_s": build_s, "convert_s": convert_s,
        "convert_cpu_s": convert_cpu_s, "torch_threads": torch.get_num_threads(),
        "model_bytes": model_bytes, "experts_bytes": experts_bytes, "layer_experts_bytes": layer_experts_bytes,
        "rss_start": rss_start, "rss_before": rss_before, "rss_after": rss_after,
        "peak_rss": peak if reset else None, "peak_reset": reset, "ru_maxrss": maxrss,
        "peak_over_before": (peak - rss_before) if reset else None,
        "rss_growth": rss_after - rss_before,
        "converted_modules": converted,
        "max_abs_logit_diff": float((got - expected).abs().max()),
    }


def run_child(method: str, args) -> dict:
    command = [sys.executable, __file__, "--child", method, "--layers", str(args.layers),
               "--experts", str(args.experts), "--hidden", str(args.hidden), "--width", str(args.width),
               "--top-k", str(args.top_k), "--vocab", str(args.vocab), "--seed", str(args.seed)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict]) -> dict[str, dict]:
    summary = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        peaks = [r["peak_over_before"] for r in mine if r["peak_over_before"] is not None]
        summary[method] = {
            "convert_s_median": statistics.median(r["convert_s"] for r in mine),
            "convert_s": [r["convert_s"] for r in mine],
            "convert_cpu_s_median": statistics.median(r["convert_cpu_s"] for r in mine),
            "convert_cpu_s": [r["convert_cpu_s"] for r in mine],
            "peak_over_before_max": max(peaks) if peaks else None,
            "peak_rss_max": max((r["peak_rss"] or 0) for r in mine),
            "rss_growth_max": max(r["rss_growth"] for r in mine),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in mine),
            "converted_modules": mine[0]["converted_modules"],
        }
    return summary


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=128, help="moe_intermediate_size")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per method, alternating")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)))
        return None
    if args.threads:
        torch.set_num_threads(args.threads)  # as in the subprocesses, so that the machine info says so

    runs = []
    for round_ in range(args.rounds):
        for method in args.methods:
            run = run_child(method, args)
            runs.append(run)
            print(f"round {round_}: {method:<9} convert {run['convert_s']:6.2f} s (CPU {run['convert_cpu_s']:6.2f} s)  peak-before "
                  f"{(run['peak_over_before'] or 0) / GB:5.2f} GB  growth {run['rss_growth'] / GB:5.2f} GB  "
                  f"(model {run['model_bytes'] / GB:.2f} GB, one layer's experts "
                  f"{run['layer_experts_bytes'] / GB:.3f} GB, logits diff {run['max_abs_logit_diff']:.1e})",
                  flush=True)
    summary = summarise(runs)
    first = runs[0]
    print(f"\nmodel: {args.layers} layers x {args.experts} experts, hidden {args.hidden}, width {args.width}, "
          f"k {args.top_k}, vocab {args.vocab}, float32: {first['model_bytes'] / GB:.2f} GB "
          f"({first['experts_bytes'] / GB:.2f} GB experts, {first['layer_experts_bytes'] / GB:.3f} GB per layer)")
    print(markdown_table(summary, first))
    config = {k: v for k, v in vars(args).items() if k not in ("json", "child")}
    result = run_result("conversion", machine(torch.device("cpu")), config=config, summary=summary, runs=runs)
    write_json(result, args.json)
    return result


def markdown_table(summary: dict, first: dict) -> str:
    lines = ["| method | convert s, wall (median) | convert s, CPU (median) | peak RSS above pre-conversion RSS | RSS kept after | "
             "peak within model + one layer's experts | logits max abs diff |", "|---|---|---|---|---|---|---|"]
    budget = first["layer_experts_bytes"]
    for method, s in summary.items():
        peak = s["peak_over_before_max"]
        lines.append(f"| {method} | {s['convert_s_median']:.2f} | {s['convert_cpu_s_median']:.2f} | {peak / GB:.2f} GB | "
                     f"{s['rss_growth_max'] / GB:.2f} GB | {'yes' if peak is not None and peak <= budget else 'no'} | "
                     f"{s['max_abs_logit_diff']:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
