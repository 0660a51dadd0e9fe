"""GPTQ through LLM Compressor's ``oneshot``: one Hessian per shared input against one per expert Linear.

A random Qwen3-MoE model saved to disk and loaded with ``from_pretrained``, quantized with GPTQ W4A16 (groups
of 128, or the hidden size if smaller), each run in a fresh subprocess:

- ``shared``: ``autocal_lc.oneshot`` with ``SharedHessianGPTQModifier`` (one Hessian per group of expert Linears
  that take the same input, ``autocal.shared_input_groups``);
- ``shared-module-calls``: ``shared`` with every expert Linear called as a module, through compressed-tensors'
  wrappers, one hook call per Linear (``autocal.linear_calls.called_as_modules``), as before session 12;
- ``gptq``: ``autocal_lc.oneshot`` with LLM Compressor's ``GPTQModifier`` (one Hessian per Linear);
- ``incumbent``: ``llmcompressor.oneshot(..., moe_calibrate_all_experts=True)`` with ``GPTQModifier`` on the
  unconverted model (LLM Compressor linearizes the experts itself).

Reported, as medians over the rounds (the methods alternating): the wall time of the ``oneshot`` call (and of
autocal's ``prepare`` before it), of the compression steps within it, the peak resident memory's growth during
it (``VmHWM`` after, less ``VmRSS`` before), on a GPU the peak allocated GPU memory, the Hessian bytes held at
compression, and how every expert Linear's ``weight_scale`` and the quantized weights of two experts per layer
compare with the reference run's (``gptq`` where it runs, else ``incumbent``).

Usage (from the repository root, with llmcompressor installed)::

    python benchmarks/gptq_shared.py --rounds 3 --json /tmp/gptq_shared.json
    python benchmarks/gptq_shared.py --shape deepseek-v3 --dtype bfloat16 --methods incumbent shared \
        --rounds 1 --json $OUT/gptq_shared_deepseek-v3.json   # on a GPU (benchmarks/gpu_run.sh)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PassTimer, Shape, machine, proc_status, qwen3_moe_config, profiled, run_result, write_json  # noqa: E402

__all__ = ["main"]

METHODS = ("shared", "shared-module-calls", "gptq", "incumbent")
SIZES = ("layers", "experts", "hidden", "width", "top_k", "vocab", "samples", "tokens", "threads", "dtype",
         "batch_bytes")
# The layer shapes of issue 21 (layers, experts, hidden, expert width, k, sequences, tokens), and a tiny one to
# check the script end to end on a CPU.
SHAPES = {
    "qwen3-30b-a3b": dict(layers=2, experts=128, hidden=2048, width=768, top_k=8, samples=32, tokens=512),
    "deepseek-v3": dict(layers=1, experts=256, hidden=7168, width=2048, top_k=8, samples=16, tokens=512),
    "tiny": dict(layers=1, experts=8, hidden=64, width=32, top_k=2, samples=2, tokens=16),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SAMPLED_EXPERTS = 2  # experts per layer whose quantized weights are compared (all of DeepSeek-V3's are 22 GB)


def save_model(args, path: Path) -> None:
    """A random Qwen3-MoE model and a word-level tokenizer, saved where ``from_pretrained`` reads them."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    shape = Shape("gptq", args.experts, args.hidden, args.width, args.top_k)
    dtype = DTYPES[args.dtype]
    config = qwen3_moe_config(shape, dtype, num_layers=args.layers, vocab_size=args.vocab,
                              intermediate_size=args.hidden * 2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=args.hidden // 4)
    torch.manual_seed(0)
    # Initialized on the GPU where there is one: DeepSeek-V3's layer (22 GB) took 6 minutes to initialize on a CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path)
    del model
    if torch.cuda.is_available():  # the runs are other processes: this one must not keep the model's GPU memory
        torch.cuda.empty_cache()
    vocabulary = {f"t{i}": i for i in range(args.vocab)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
                            unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(path)


def recipe(method: str, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    from autocal.integrations.llmcompressor.gptq import SharedHessianGPTQModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    modifier = SharedHessianGPTQModifier if method.startswith("shared") else GPTQModifier
    return modifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                    ignore=["lm_head", "re:.*mlp.gate$"])


def hessian_bytes(modifier) -> int:
    """Bytes of the distinct Hessians the modifier holds now (shared ones counted once)."""
    return sum(h.numel() * h.element_size() for h in {id(h): h for h in modifier._hessians.values()}.values())


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def quantized_tensors(model) -> dict[str, torch.Tensor]:
    """Every expert Linear's ``weight_scale``, and the quantized weights of the first and last experts per layer."""
    tensors = {}
    for name, module in model.named_modules():
        if ".experts." in name and isinstance(module, torch.nn.Linear) and hasattr(module, "weight_scale"):
            tensors[f"{name}.weight_scale"] = module.weight_scale.detach().cpu()
            expert = int(name.split(".experts.")[1].split(".")[0])
            if expert in (0, model.config.num_experts - 1)[:SAMPLED_EXPERTS]:
                tensors[f"{name}.weight"] = module.weight.detach().cpu()
    return tensors


def child(args) -> dict:
    """One oneshot run of ``args.method`` on the saved model (this process)."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or torch.get_num_threads())
    ids = torch.randint(2, args.vocab, (args.samples, args.tokens), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kwargs = dict(dataset=dataset, num_calibration_samples=args.samples, max_seq_length=args.tokens,
                  shuffle_calibration_samples=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype]).eval()
    modifier = recipe(args.method, min(128, args.hidden, args.width))
    peak_hessians, compressing = [0], [0.0]
    compress = type(modifier).compress_modules

    def measured(self):  # the Hessians held when a layer's modules are compressed (their peak), and the time
        peak_hessians[0] = max(peak_hessians[0], hessian_bytes(self))
        sync()
        started = time.perf_counter()
        compress(self)
        sync()
        compressing[0] += time.perf_counter() - started

    type(modifier).compress_modules = measured  # a benchmark probe, not part of either method
    prepare_s = 0.0
    if args.method == "incumbent":
        import llmcompressor

        oneshot = lambda: llmcompressor.oneshot(model=model, recipe=modifier,  # noqa: E731
                                                moe_calibrate_all_experts=True, **kwargs)
    else:
        from autocal.integrations import llmcompressor as alc
        from autocal.integrations.llmcompressor import gptq

        gptq.BATCH_BYTES = args.batch_bytes or gptq.BATCH_BYTES

        started = time.perf_counter()
        with profiled(args.profile / f"gptq_profile_{args.method}_prepare.txt" if args.profile else None):
            alc.prepare(model)
        prepare_s = time.perf_counter() - started
        from autocal.linear_calls import called_as_modules

        def oneshot():
            with called_as_modules() if args.method == "shared-module-calls" else contextlib.nullcontext():
                return alc.oneshot(model, recipe=modifier, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    passes = PassTimer()
    before = proc_status("VmRSS")
    started = time.perf_counter()
    with profiled(args.profile / f"gptq_profile_{args.method}.txt" if args.profile else None):
        oneshot()
        sync()
    seconds = time.perf_counter() - started
    growth = proc_status("VmHWM") - before
    gpu_peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    tensors = quantized_tensors(model)
    torch.save(tensors, args.scales)
    return {"method": args.method, "oneshot_s": seconds, "prepare_s": prepare_s, "compress_s": compressing[0],
            **passes.seconds, "peak_growth_bytes": growth, "gpu_peak_bytes": gpu_peak, "hessian_bytes": peak_hessians[0],
            "expert_linears": sum(k.endswith("weight_scale") for k in tensors),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}


def run_child(method: str, args, scales: Path, profile: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", method, "--model", str(args.model), "--scales", str(scales)] + [
        f"--{k}={getattr(args, k)}" for k in SIZES if getattr(args, k) is not None]
    command += ["--profile", str(profile)] if profile else []
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def agreement(ours: Path, reference: Path) -> dict:
    """How the expert scales and the sampled quantized weights compare: bitwise equal, and the largest difference
    (scales: relative; weights: in quantization steps)."""
    a, b = torch.load(ours), torch.load(reference)
    if a.keys() != b.keys():
        return {"scales_identical": False, "weights_identical": False, "note": "different modules"}
    scales = [k for k in a if k.endswith("weight_scale")]
    weights = [k for k in a if k.endswith(".weight")]
    worst_scale = max(((a[k].float() - b[k].float()).abs() / b[k].float().abs().clamp_min(1e-12)).max().item()
                      for k in scales)
    worst_steps = 0.0
    for k in weights:
        scale = b[k.removesuffix("weight") + "weight_scale"].float()
        step = scale.repeat_interleave(a[k].shape[1] // scale.shape[1], dim=1)
        worst_steps = max(worst_steps, ((a[k].float() - b[k].float()).abs() / step).max().item())
    return {"scales_identical": all(torch.equal(a[k], b[k]) for k in scales), "scales_max_rel": worst_scale,
            "weights_identical": all(torch.equal(a[k], b[k]) for k in weights), "weights_max_steps": worst_steps,
            "weights_differing": sum((a[k] != b[k]).sum().item() for k in weights),
            "weights_compared": sum(a[k].numel() for k in weights)}


def _format(run: dict) -> str:
    gpu = f", GPU peak {run['gpu_peak_bytes'] / 2**30:6.1f} GiB" if run["gpu_peak_bytes"] is not None else ""
    return (f"oneshot {run['oneshot_s']:7.2f} s (compressing {run['compress_s']:6.2f} s, calibration passes "
            f"{run['calibrating_s']:6.2f} s, propagation passes {run['propagating_s']:6.2f} s; prepare "
            f"{run['prepare_s']:5.2f} s), peak growth {run['peak_growth_bytes'] / 2**20:8.1f} MiB{gpu}, Hessians "
            f"{run['hessian_bytes'] / 2**20:8.1f} MiB")


def compared(agreement_: dict) -> str:
    if not agreement_:
        return "(reference) | (reference)"
    scales = "identical" if agreement_["scales_identical"] else f"within {agreement_['scales_max_rel']:.1e}"
    weights = ("identical" if agreement_["weights_identical"] else
               f"{agreement_['weights_differing']} of {agreement_['weights_compared']} differ, at most "
               f"{agreement_['weights_max_steps']:.2f} steps")
    return f"{scales} | {weights}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=SHAPES, help="a layer shape of issue 21 (sets the sizes below)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="of the saved and loaded model")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each subprocess")
    parser.add_argument("--batch_bytes", type=int, help="the shared methods' BATCH_BYTES (autocal's default: 4 * 2**30)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per method, alternating")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, help="a folder: after the rounds, one more run of each method under "
                        "cProfile, its statistics written there (gptq_profile_<method>.txt, and autocal's prepare in "
                        "gptq_profile_<method>_prepare.txt)")
    parser.add_argument("--model_dir", type=Path, help="where the random model is saved, and kept: a later command "
                        "with the same sizes reuses it (default: a temporary folder)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scales", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in SHAPES.get(args.shape, {}).items():
        setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict | None:
    args = parse(argv)
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return None
    with tempfile.TemporaryDirectory() as folder:
        args.model = args.model_dir or Path(folder) / "model"
        if not (args.model / "config.json").exists():
            started = time.perf_counter()
            save_model(args, args.model)
            print(f"model saved in {time.perf_counter() - started:.1f} s", flush=True)
        runs = []
        for round_ in range(args.rounds):
            for method in args.methods:
                runs.append(run_child(method, args, Path(folder) / f"{method}.pt"))
                print(f"round {round_ + 1}: {method:<10} {_format(runs[-1])}", flush=True)
        for method in args.methods if args.profile else ():  # an extra run each, profiled, not in the figures
            run_child(method, args, Path(folder) / f"{method}_profiled.pt", args.profile)
            print(f"profiled: {method} -> {args.profile}/gptq_profile_{method}.txt", flush=True)
        reference = next(m for m in ("gptq", "incumbent", *args.methods) if m in args.methods)
        agreements = {m: agreement(Path(folder) / f"{m}.pt", Path(folder) / f"{reference}.pt")
                      for m in args.methods if m != reference}
    keys = ("oneshot_s", "prepare_s", "compress_s", "peak_growth_bytes", "gpu_peak_bytes", "hessian_bytes")
    median = {key: {m: statistics.median(r[key] for r in runs if r["method"] == m)
                    if runs[0][key] is not None else None for m in args.methods} for key in keys}
    print(f"\n| method | oneshot s | compressing s | prepare s | peak memory growth MiB | GPU peak GiB | Hessians MiB "
          f"| expert scales vs {reference} | quantized weights vs {reference} |")
    print("|---|---|---|---|---|---|---|---|---|")
    for m in args.methods:
        gpu = median["gpu_peak_bytes"][m]
        print(f"| {m} | {median['oneshot_s'][m]:.2f} | {median['compress_s'][m]:.2f} | {median['prepare_s'][m]:.2f} "
              f"| {median['peak_growth_bytes'][m] / 2**20:.1f} | {'-' if gpu is None else f'{gpu / 2**30:.1f}'} | "
              f"{median['hessian_bytes'][m] / 2**20:.1f} | {compared(agreements.get(m, {}))} |")
    settings = {k: getattr(args, k) for k in (*SIZES, "shape", "rounds", "methods")}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = run_result("gptq_shared", machine(device), settings=settings, medians=median, reference=reference,
                        agreement=agreements, runs=runs)
    write_json(result, args.json)
    return result

if __name__ == "__main__":
    main()
