"""Quantize a tiny MoE model with LLM Compressor through autocal: no model code, no download.

Builds a random-weight model from ``fixtures/models/<model>.json``, saves it with a
word-level tokenizer (LLM Compressor loads the config and processor from disk, as for a
real checkpoint), then for each scheme:

1. ``AutoModelForCausalLM.from_pretrained`` and ``autocal_lc.prepare``: every MoE block
   becomes a calibration module with per-expert ``nn.Linear`` views;
2. ``autocal_lc.oneshot``: GPTQ W4A16 (int4, groups of 16: the tiny layers are 16-64 wide)
   or FP8 with static per-tensor activation scales, every token through every expert;
3. prints the tokens each expert Linear saw and its quantization parameters;
4. ``autocal_lc.save_pretrained(save_compressed=True)``: checked before writing, reloaded
   and compared tensor by tensor after;
5. reloads the checkpoint with transformers (W4A16; dequantized into its packed experts)
   and compares its logits with the fake-quantized model's.

Run (the environment of the ``autocal[llmcompressor]`` extra: transformers 5.17.0)::

    python examples/quantize_tiny_moe.py --model mixtral --out /tmp/tiny-mixtral
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from autocal.integrations import llmcompressor as autocal_lc
from autocal.testing import zoo


def recipe(scheme: str, ignore: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if scheme == "w4a16":  # the "W4A16" preset, with groups of 16 instead of 128
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=16)
        return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=ignore)
    if scheme == "fp8":  # FP8 weights and static per-tensor FP8 activation scales
        return QuantizationModifier(targets="Linear", scheme="FP8", ignore=ignore)
    if scheme == "nvfp4":  # FP4 groups of 16, static global activation scale
        return QuantizationModifier(targets="Linear", scheme="NVFP4", ignore=ignore)
    raise ValueError(scheme)


def save_original(name: str, directory: Path) -> int:
    """The tiny model and a tokenizer covering its vocabulary, as a checkpoint; returns the vocabulary size."""
    model = zoo.build_model(name)
    vocab = model.config.get_text_config().vocab_size
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")),
        unk_token="t0", pad_token="t0", eos_token="t1")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return vocab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen3_moe",
                        help="fixture name (qwen3_moe, mixtral, deepseek_v3, gpt_oss, …)")
    parser.add_argument("--out", type=Path, default=Path("tiny-moe-quantized"))
    parser.add_argument("--schemes", nargs="+", default=["w4a16", "fp8"], choices=["w4a16", "fp8", "nvfp4"])
    parser.add_argument("--samples", type=int, default=8, help="calibration sequences")
    parser.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    parser.add_argument("--verbose", action="store_true", help="keep LLM Compressor's INFO logs")
    args = parser.parse_args()
    if not args.verbose:
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING")

    original = args.out / "original"
    vocab = save_original(args.model, original)
    per_expert_original = any(re.search(r"\.experts\.\d+\.", k) for k in autocal_lc.load_saved_state_dict(original))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (args.samples, args.seq), generator=generator)
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    held_out = torch.randint(2, vocab, (4, args.seq), generator=generator)

    for scheme in args.schemes:
        print(f"\n=== {args.model}: {scheme} ===")
        model = AutoModelForCausalLM.from_pretrained(original, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = model(input_ids=held_out).logits

        print(autocal_lc.prepare(model))
        coverage = autocal_lc.oneshot(model, recipe=recipe(scheme, autocal_lc.default_ignore(model)),
                                      dataset=dataset, num_calibration_samples=args.samples,
                                      max_seq_length=args.seq)
        print(coverage)
        first_block = next(iter(coverage.block_tokens))
        print(coverage.table(first_block))

        with torch.no_grad():
            quantized = model(input_ids=held_out).logits
        error = ((quantized - reference).norm() / reference.norm()).item()
        print(f"fake-quantized logits vs original, relative L2 on held-out tokens: {error:.3f}")

        target = args.out / scheme
        saved = autocal_lc.save_pretrained(model, target, save_compressed=True)
        print(f"saved {len(saved.keys)} tensors to {target} ({saved.expert_keys} expert tensors), e.g.:")
        for key in [k for k in saved.keys if ".layers.0." in k and ".experts.0." in k][:6]:
            print(f"  {key}")
        print(f"quantization_config.ignore: {saved.quantization_config['ignore']}")
        print("reloaded every tensor: identical to what was saved")

        if scheme == "w4a16" and per_expert_original:
            reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
            with torch.no_grad():
                logits = reloaded(input_ids=held_out).logits
            diff = ((logits - quantized).norm() / quantized.norm()).item()
            print(f"checkpoint reloaded by transformers vs fake-quantized model, relative L2: {diff:.2e}")
        elif scheme == "w4a16":
            print("not reloaded with transformers: this architecture's original checkpoint stores experts packed, "
                  "so transformers has no per-expert keys to load (vLLM's loader maps them)")
        (target / "autocal_coverage.json").write_text(json.dumps(coverage.to_dict(), indent=1, default=str))


if __name__ == "__main__":
    main()
