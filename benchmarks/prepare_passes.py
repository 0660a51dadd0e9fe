"""What LLM Compressor integration's ``prepare`` runs: each run of the MoE block and of its experts container, by
the autocal function that asked for it, with its time, on a random Qwen3-MoE layer of the given shape.

At DeepSeek-V3's shape ``prepare`` runs on the host's CPU over 22 GB of expert weights, and each run that reads
them is bound by memory bandwidth; the count of such runs is what a change to detection or verification
changes, whatever the machine. ``--autocal`` runs another checkout's autocal (an older commit: ``git worktree
add /tmp/old <commit>``), so two versions compare on one machine, in alternating processes:

    python benchmarks/prepare_passes.py --experts 256 --hidden 3584 --width 1024 --rounds 2 \\
        --autocal /tmp/old --autocal .
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> dict:
    """One ``prepare`` in this process, with the autocal of ``sys.path[0]``."""
    import collections
    import functools
    import time
    import traceback

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe import modeling_qwen3_moe as qwen3_moe

    runs: collections.Counter = collections.Counter()
    seconds: collections.Counter = collections.Counter()

    def counted(cls: type, label: str) -> None:
        forward = cls.forward

        @functools.wraps(forward)
        def wrapper(self, *a, **k):
            callers = [f.name for f in traceback.extract_stack()[:-1] if "/autocal/" in f.filename]
            key = f"{label} <- {callers[-1] if callers else '?'}"
            started = time.perf_counter()
            try:
                return forward(self, *a, **k)
            finally:
                runs[key] += 1
                seconds[key] += time.perf_counter() - started
        cls.forward = wrapper

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).eval()
    import llmcompressor  # noqa: F401  (imported before prepare, as a recipe imports it)

    from autocal.integrations import llmcompressor as alc

    counted(qwen3_moe.Qwen3MoeSparseMoeBlock, "block")
    counted(qwen3_moe.Qwen3MoeExperts, "experts")
    started = time.perf_counter()
    alc.prepare(model)
    total = time.perf_counter() - started
    import autocal

    return {"prepare_s": total, "autocal_file": autocal.__file__, "runs": dict(runs), "run_seconds": dict(seconds)}


def save_model(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    config = Qwen3MoeConfig(vocab_size=512, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                            moe_intermediate_size=args.width, num_experts=args.experts, num_experts_per_tok=8,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=args.hidden // 4, norm_topk_prob=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    for parameter in model.parameters():
        parameter.data.normal_(0, 0.02, generator=generator)
    model.save_pretrained(args.model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=3584)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--autocal", action="append", type=Path, help="a checkout to take autocal from (repeat)")
    parser.add_argument("--model", type=Path, help="where the random model is saved (kept for later runs)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model = args.model or Path(f"/tmp/autocal-prepare-{args.experts}-{args.hidden}-{args.width}")
    if args.child:
        print(json.dumps(child(args)))
        return
    if not (args.model / "config.json").exists():
        save_model(args)
    results = []
    for round_ in range(1, args.rounds + 1):
        for checkout in args.autocal or [ROOT]:
            command = [sys.executable, __file__, "--child", "--model", str(args.model)]
            path = os.pathsep.join([str(checkout.resolve()), os.environ.get("PYTHONPATH", "")])
            out = subprocess.run(command, capture_output=True, text=True,
                                 env={**os.environ, "TQDM_DISABLE": "1", "PYTHONPATH": path})
            if out.returncode:
                raise RuntimeError(out.stderr[-3000:])
            result = {"autocal": str(checkout), "round": round_, **json.loads(out.stdout.strip().splitlines()[-1])}
            results.append(result)
            print(f"round {round_}, {result['autocal_file']}: prepare {result['prepare_s']:.2f} s")
            for key, count in sorted(result["runs"].items()):
                print(f"    {count} x {key:60s} {result['run_seconds'][key]:6.3f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
