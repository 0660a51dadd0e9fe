"""GPTQ through LLM Compressor's ``oneshot``: one Hessian per shared input against one per expert Linear.

A random Qwen3-MoE model saved to disk and loaded with ``from_pretrained``, quantized with GPTQ W4A16 (groups
of 128, or the hidden size if smaller), each run in a fresh subprocess:

- ``shared``: ``autocal_lc.oneshot`` with ``SharedHessianGPTQModifier`` (one Hessian per group of expert Linears
  that take the same input, ``autocal.shared_input_groups``);
- ``gptq``: ``autocal_lc.oneshot`` with LLM Compressor's ``GPTQModifier`` (one Hessian per Linear);
- ``incumbent``: ``llmcompressor.oneshot(..., moe_calibrate_all_experts=True)`` with ``GPTQModifier`` on the
  unconverted model (LLM Compressor linearizes the experts itself).

Reported, as medians over the rounds (the methods alternating): the wall time of the ``oneshot`` call, the
peak resident memory's growth during it (``VmHWM`` after, less ``VmRSS`` before: the Hessians are held on the
CPU here), the Hessian bytes each method allocates, and whether every expert Linear's ``weight_scale`` equals the
``gptq`` run's (``shared`` should be bitwise; ``incumbent`` within rounding).

Usage (from the repository root, with llmcompressor installed)::

    python benchmarks/gptq_shared.py --rounds 3 --json /tmp/gptq_shared.json
"""

from __future__ import annotations

import argparse
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
from _common import Shape, machine, proc_status, qwen3_moe_config, run_result, write_json  # noqa: E402

__all__ = ["main"]

METHODS = ("shared", "gptq", "incumbent")
SIZES = ("layers", "experts", "hidden", "width", "top_k", "vocab", "samples", "tokens", "threads")


def save_model(args, path: Path) -> None:
    """A random Qwen3-MoE model and a word-level tokenizer, saved where ``from_pretrained`` reads them."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    shape = Shape("gptq", args.experts, args.hidden, args.width, args.top_k)
    config = qwen3_moe_config(shape, torch.float32, num_layers=args.layers, vocab_size=args.vocab,
                              intermediate_size=args.hidden * 2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=args.hidden // 4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    vocabulary = {f"t{i}": i for i in range(args.vocab)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
                            unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(path)


def recipe(method: str, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier

    from autocal.integrations.llmcompressor.gptq import SharedHessianGPTQModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    modifier = SharedHessianGPTQModifier if method == "shared" else GPTQModifier
    return modifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                    ignore=["lm_head", "re:.*mlp.gate$"])


def hessian_bytes(modifier) -> int:
    """Bytes of the distinct Hessians the modifier holds now (shared ones counted once)."""
    return sum(h.numel() * h.element_size() for h in {id(h): h for h in modifier._hessians.values()}.values())


def child(args) -> dict:
    """One oneshot run of ``args.method`` on the saved model (this process)."""
    from datasets import Dataset
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or torch.get_num_threads())
    ids = torch.randint(2, args.vocab, (args.samples, args.tokens), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kwargs = dict(dataset=dataset, num_calibration_samples=args.samples, max_seq_length=args.tokens,
                  shuffle_calibration_samples=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    modifier = recipe(args.method, min(128, args.hidden, args.width))
    peak_hessians = [0]
    compress = GPTQModifier.compress_modules

    def measured(self):  # the Hessians held when a layer's modules are compressed: their peak
        peak_hessians[0] = max(peak_hessians[0], hessian_bytes(self))
        return compress(self)

    GPTQModifier.compress_modules = measured  # a benchmark probe, not part of either method
    if args.method == "incumbent":
        import llmcompressor

        before = proc_status("VmRSS")
        started = time.perf_counter()
        llmcompressor.oneshot(model=model, recipe=modifier, moe_calibrate_all_experts=True, **kwargs)
    else:
        from autocal.integrations import llmcompressor as alc

        alc.prepare(model)
        before = proc_status("VmRSS")
        started = time.perf_counter()
        alc.oneshot(model, recipe=modifier, **kwargs)
    seconds = time.perf_counter() - started
    growth = proc_status("VmHWM") - before
    scales = {n: m.weight_scale.detach() for n, m in model.named_modules()
              if ".experts." in n and isinstance(m, torch.nn.Linear) and hasattr(m, "weight_scale")}
    torch.save(scales, args.scales)
    return {"method": args.method, "oneshot_s": seconds, "peak_growth_bytes": growth,
            "hessian_bytes": peak_hessians[0], "expert_linears": len(scales)}


def run_child(method: str, args, scales: Path) -> dict:
    command = [sys.executable, __file__, "--child", method, "--model", str(args.model), "--scales", str(scales)] + [
        f"--{k}={getattr(args, k)}" for k in SIZES if getattr(args, k) is not None]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def same_scales(ours: Path, reference: Path) -> tuple[bool, float]:
    """(bitwise equal, largest relative difference) of every expert Linear's weight_scale."""
    a, b = torch.load(ours), torch.load(reference)
    if a.keys() != b.keys():
        return False, float("inf")
    worst = max(((a[k] - b[k]).abs() / b[k].abs().clamp_min(1e-12)).max().item() for k in a)
    return all(torch.equal(a[k], b[k]) for k in a), worst


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--top_k", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per sequence")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each subprocess")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per method, alternating")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--scales", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return None
    with tempfile.TemporaryDirectory() as folder:
        args.model = Path(folder) / "model"
        save_model(args, args.model)
        runs = []
        for round_ in range(args.rounds):
            for method in args.methods:
                runs.append(run_child(method, args, Path(folder) / f"{method}.pt"))
                print(f"round {round_ + 1}: {method:<10} oneshot {runs[-1]['oneshot_s']:7.2f} s, peak growth "
                      f"{runs[-1]['peak_growth_bytes'] / 2**20:8.1f} MiB", flush=True)
        reference = Path(folder) / "gptq.pt"
        agreement = {m: same_scales(Path(folder) / f"{m}.pt", reference) for m in args.methods
                     if m != "gptq" and reference.exists()}
    median = {key: {m: statistics.median(r[key] for r in runs if r["method"] == m) for m in args.methods}
              for key in ("oneshot_s", "peak_growth_bytes", "hessian_bytes")}
    print("\n| method | oneshot s | peak memory growth MiB | Hessians MiB | expert scales vs gptq |")
    print("|---|---|---|---|---|")
    for m in args.methods:
        equal, worst = agreement.get(m, (True, 0.0))
        print(f"| {m} | {median['oneshot_s'][m]:.2f} | {median['peak_growth_bytes'][m] / 2**20:.1f} | "
              f"{median['hessian_bytes'][m] / 2**20:.1f} | {'identical' if equal else f'within {worst:.1e}'} |")
    settings = {k: getattr(args, k) for k in (*SIZES, "rounds", "methods")}
    result = run_result("gptq_shared", machine(torch.device("cpu")), settings=settings, medians=median,
                        scales_vs_gptq=agreement, runs=runs)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
