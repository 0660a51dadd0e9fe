"""LLM Compressor's ``oneshot`` end to end: autocal's calibration modules against LLM Compressor's own.

The flow users run: a random Qwen3-MoE model saved to disk and loaded with
``from_pretrained``, then quantized by ``oneshot`` with a static FP8 recipe
(every expert Linear observed on every calibration token) or, with ``--recipe awq``,
AWQ W4A16 (asymmetric, groups of 32), each run in a fresh subprocess:

- ``autocal``: ``autocal.integrations.llmcompressor.oneshot`` (converts, then
  calls ``llmcompressor.oneshot`` with every expert calibrated; in the
  propagation passes, with every hook disabled, only the routed experts run);
- ``autocal-propagate-all``: the same with ``propagate_routed=False``: every
  expert runs in the propagation passes too, as LLM Compressor's own path does;
- ``autocal-one-by-one``: the same, with every expert module called on its own
  (``prepare(group_experts=False)``), as autocal did before it recognised the
  offloading wrappers LLM Compressor's pipeline puts on every module (the rule
  of commit 5270eda called each expert under such a wrapper on its own);
- ``autocal-shared-observers``: ``autocal`` with ``SharedObserverQuantizationModifier`` (the input observer
  of each group of expert Linears sharing an input hooked on its first member only; FP8 only);
- ``autocal-shared-observers-propagate-all``: the same with ``propagate_routed=False`` (LLM Compressor's result);
- ``autocal-shared-observers-module-calls``: the same with every expert Linear called as a module, through
  compressed-tensors' wrappers (``autocal.linear_calls.called_as_modules``), as before session 12;
- ``incumbent``: ``llmcompressor.oneshot(..., moe_calibrate_all_experts=True)``
  on the unconverted model (LLM Compressor linearizes the experts itself).

Reported, as medians over the rounds (the methods alternating): the wall time
of the ``oneshot`` call; for autocal also of ``prepare`` (trace, detect, convert
and verify), which runs before it, so that "prepare + oneshot" compares with the
incumbent's ``oneshot``, which linearizes the experts inside; and that every
expert Linear got its scales (FP8: an input scale; AWQ: a weight scale). AWQ's grid
search replays the module holding the Linears it balances with every hook disabled, so
in ``autocal`` those replays, like the propagation passes, run the routed experts only.
On a machine without an accelerator AWQ's ``IntermediatesCache.pin_memory`` (a transfer
speed-up that needs one) is left out, for every method alike. On a machine with a GPU, LLM Compressor's
pipeline runs each layer there (the model is loaded on the CPU); use
``--dtype bfloat16``.

Usage (from the repository root, with llmcompressor installed)::

    python benchmarks/oneshot.py --rounds 3 --json /tmp/oneshot.json
    python benchmarks/oneshot.py --recipe awq --methods autocal autocal-propagate-all incumbent
    python benchmarks/oneshot.py --dtype bfloat16 --layers 4 --experts 128 --hidden 2048 --width 768 \
        --samples 32 --tokens 512     # on a GPU: Qwen3-30B-A3B's layer shape
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
from _common import PassTimer, Shape, machine, qwen3_moe_config, profiled, run_result, write_json  # noqa: E402

__all__ = ["main"]

METHODS = ("autocal", "autocal-propagate-all", "autocal-one-by-one", "autocal-shared-observers",
           "autocal-shared-observers-propagate-all", "autocal-shared-observers-module-calls", "incumbent")


def save_model(args, path: Path) -> None:
    """A random Qwen3-MoE model and a word-level tokenizer, saved where ``from_pretrained`` reads them."""
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    shape = Shape("oneshot", args.experts, args.hidden, args.width, args.top_k)
    config = qwen3_moe_config(shape, torch.float32, num_layers=args.layers, vocab_size=args.vocab,
                              intermediate_size=args.hidden * 2, num_attention_heads=4, num_key_value_heads=2,
                              head_dim=args.hidden // 4)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    vocabulary = {f"t{i}": i for i in range(args.vocab)}
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocabulary, unk_token="t0")),
                            unk_token="t0", pad_token="t0", eos_token="t1").save_pretrained(path)


_IGNORE = ["lm_head", "re:.*mlp.gate$"]


def make_recipe(args):
    """The recipe of ``args.recipe`` for ``args.method``."""
    if args.recipe == "awq":
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from llmcompressor.modifiers.awq import AWQModifier

        weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
        return AWQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                           ignore=_IGNORE)
    if args.method.startswith("autocal-shared-observers"):
        from autocal.integrations.llmcompressor.observers import SharedObserverQuantizationModifier

        return SharedObserverQuantizationModifier(targets="Linear", scheme="FP8", ignore=_IGNORE)
    from llmcompressor.modifiers.quantization import QuantizationModifier

    return QuantizationModifier(targets="Linear", scheme="FP8", ignore=_IGNORE)


def _has_scales(module: torch.nn.Module, recipe: str) -> bool:
    scale = getattr(module, "weight_scale" if recipe == "awq" else "input_scale", None)
    return scale is not None and bool(torch.isfinite(scale).all())


def child(args) -> dict:
    """One oneshot run of ``args.method`` on the saved model (this process)."""
    from compressed_tensors.quantization import QuantizationStatus  # noqa: F401  (llmcompressor's stack)
    from datasets import Dataset
    from llmcompressor.pipelines.cache import IntermediatesCache
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads or torch.get_num_threads())
    ids = torch.randint(2, args.vocab, (args.samples, args.tokens), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    kwargs = dict(dataset=dataset, num_calibration_samples=args.samples, max_seq_length=args.tokens,
                  shuffle_calibration_samples=False, batch_size=args.batch_size)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    recipe = make_recipe(args)
    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *a, **k: None  # pinning needs an accelerator
    passes = PassTimer()
    profile = args.profile / f"oneshot_profile_{args.method}.txt" if args.profile else None
    if args.method == "incumbent":
        import llmcompressor

        started = time.perf_counter()
        with profiled(profile):
            llmcompressor.oneshot(model=model, recipe=recipe, moe_calibrate_all_experts=True, **kwargs)
        seconds, prepare_seconds = time.perf_counter() - started, 0.0
    else:
        from autocal.integrations import llmcompressor as alc
        from autocal.linear_calls import called_as_modules

        started = time.perf_counter()
        alc.prepare(model, group_experts=args.method != "autocal-one-by-one")
        prepared = time.perf_counter()
        routed = args.method in ("autocal", "autocal-shared-observers", "autocal-shared-observers-module-calls")
        with called_as_modules() if args.method.endswith("module-calls") else contextlib.nullcontext(), \
                profiled(profile):
            alc.oneshot(model, recipe=recipe, propagate_routed=routed, **kwargs)
        seconds, prepare_seconds = time.perf_counter() - prepared, prepared - started
    experts = [m for n, m in model.named_modules() if ".experts." in n and isinstance(m, torch.nn.Linear)]
    scaled = sum(_has_scales(m, args.recipe) for m in experts)
    return {"method": args.method, "recipe": args.recipe, "oneshot_s": seconds, "prepare_s": prepare_seconds,
            **passes.seconds,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "expert_linears": len(experts),
            "expert_linears_with_scales": scaled}


def run_child(method: str, args, profile: Path | None = None) -> dict:
    command = [sys.executable, __file__, "--child", method, "--model", str(args.model)] + [
        f"--{k}={getattr(args, k)}" for k in ("layers", "experts", "hidden", "width", "top_k", "vocab", "samples",
                                               "tokens", "threads", "dtype", "batch_size", "recipe") if getattr(args, k) is not None]
    command += ["--profile", str(profile)] if profile else []
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if out.returncode:
        raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=16, help="calibration sequences")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per sequence")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each subprocess")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--batch_size", type=int, default=1, help="oneshot's calibration batch size (sequences)")
    parser.add_argument("--recipe", choices=("fp8", "awq"), default="fp8")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="subprocesses per method, alternating")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--profile", type=Path, help="a folder: after the rounds, one more run of each method under "
                        "cProfile, its statistics written there (oneshot_profile_<method>.txt)")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.method = args.child
        print(json.dumps(child(args)))
        return None
    if args.recipe == "awq" and any(m.startswith("autocal-shared-observers") for m in args.methods):
        parser.error("autocal-shared-observers runs the FP8 recipe only")
    with tempfile.TemporaryDirectory() as folder:
        args.model = Path(folder) / "model"
        save_model(args, args.model)
        runs = []
        for round_ in range(args.rounds):
            for method in args.methods:
                runs.append(run_child(method, args))
                print(f"round {round_ + 1}: {method:<22} prepare {runs[-1]['prepare_s']:6.2f} s, "
                      f"oneshot {runs[-1]['oneshot_s']:6.2f} s (calibration passes {runs[-1]['calibrating_s']:6.2f} s, "
                      f"propagation passes {runs[-1]['propagating_s']:6.2f} s)", flush=True)
        for method in args.methods if args.profile else ():  # an extra run each, profiled, not in the figures
            run_child(method, args, args.profile)
            print(f"profiled: {method} -> {args.profile}/oneshot_profile_{method}.txt", flush=True)
    medians = {m: statistics.median(r["oneshot_s"] for r in runs if r["method"] == m) for m in args.methods}
    prepare_medians = {m: statistics.median(r["prepare_s"] for r in runs if r["method"] == m) for m in args.methods}
    total_medians = {m: statistics.median(r["prepare_s"] + r["oneshot_s"] for r in runs if r["method"] == m)
                     for m in args.methods}
    print()
    print(f"| method | prepare s | oneshot s | prepare + oneshot s | every expert Linear has its {args.recipe} scales |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        complete = all(r["expert_linears_with_scales"] == r["expert_linears"] > 0
                       for r in runs if r["method"] == method)
        print(f"| {method} | {prepare_medians[method]:.2f} | {medians[method]:.2f} | {total_medians[method]:.2f} | "
              f"{'yes' if complete else 'no'} |")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where LLM Compressor runs the layers
    settings = {k: getattr(args, k) for k in ("layers", "experts", "hidden", "width", "top_k", "vocab", "samples",
                                              "tokens", "threads", "rounds", "dtype", "batch_size", "methods", "recipe")}
    result = run_result("oneshot", machine(device), settings=settings, medians_s=medians,
                        prepare_medians_s=prepare_medians, prepare_plus_oneshot_medians_s=total_medians, runs=runs)
    write_json(result, args.json)
    return result


if __name__ == "__main__":
    main()
