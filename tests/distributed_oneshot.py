"""One rank of a distributed ``oneshot`` on the CPU (gloo), run by ``torchrun`` from ``tests/test_llmcompressor.py``.

    torchrun --standalone --nproc-per-node 2 tests/distributed_oneshot.py MODEL_DIR OUT_DIR GROUP_SIZE

Loads the saved model, ``autocal_lc.prepare``s it, and quantizes it with ``SharedHessianGPTQModifier`` (GPTQ
W4A16, symmetric, groups of GROUP_SIZE) on its share of 8 sequences of 16 random tokens (the test's calibration
set): rank r passes rows ``[r·8/n, (r+1)·8/n)`` itself. (LLM Compressor 0.14 partitions an identical dataset
across ranks by selecting each rank's rows for its sampler, but then hands the sampler's indices to a
``DataLoader`` over the whole dataset, so every rank calibrates on the first rows.)

Writes ``OUT_DIR/rank<r>.pt``: every quantized module's parameters, and how many Hessians (square float
tensors) this rank passed to ``torch.distributed.reduce``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

CALIBRATION = (8, 16)  # sequences, tokens: the test's


def count_hessian_reductions() -> dict[str, int]:
    """Count the square float tensors this process reduces (LLM Compressor calls ``dist.reduce`` at call time)."""
    counts = {"hessians": 0}
    reduce = dist.reduce

    def counting(tensor, *args, **kwargs):
        if tensor.dim() == 2 and tensor.shape[0] == tensor.shape[1] and tensor.is_floating_point():
            counts["hessians"] += 1
        return reduce(tensor, *args, **kwargs)

    dist.reduce = counting
    return counts


def main(model_dir: Path, out: Path, group_size: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = count_hessian_reductions()

    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from autocal.integrations import llmcompressor as alc
    from autocal.integrations.llmcompressor.gptq import SharedHessianGPTQModifier

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    alc.prepare(model)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(2, vocab, CALIBRATION, generator=torch.Generator().manual_seed(0))
    share = CALIBRATION[0] // world
    ids = ids[rank * share:(rank + 1) * share]
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=group_size)
    recipe = SharedHessianGPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                                     weights=weights)},
                                       ignore=["lm_head"])
    alc.oneshot(model, recipe=recipe, dataset=dataset, num_calibration_samples=share,
                max_seq_length=CALIBRATION[1], shuffle_calibration_samples=False)
    state = {name: {key: value.detach().clone() for key, value in module.named_parameters(recurse=False)}
             for name, module in model.named_modules() if hasattr(module, "weight_scale")}
    torch.save({"state": state, "hessian_reductions": counts["hessians"]}, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]))
