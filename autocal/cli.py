"""Command line: ``autocal demo`` (``python -m autocal demo``).

``demo`` builds a tiny MoE model from a config in ``fixtures/models`` (random
weights, no download), prints what autocal detects, converts the model and
compares its logits with the original's, calibration off and on.
"""

from __future__ import annotations

import argparse
import sys

import torch

__all__ = ["main"]


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output[0]


def demo(architecture: str) -> int:
    import autocal
    from autocal.testing import zoo

    print(f"building a tiny random {architecture} model from fixtures/models/{architecture}.json")
    model = zoo.build_model(architecture)
    inputs = zoo.example_inputs(model)
    with torch.no_grad():
        reference = _logits(model(**inputs))
    print(autocal.explain(model))
    autocal.convert(model)
    calibration = [m for m in model.modules() if isinstance(m, autocal.MoECalibrationModule)]
    rows = []
    for mode in (False, True):
        for module in calibration:
            module.calibrate_all_experts = mode
        with torch.no_grad():
            logits = _logits(model(**inputs))
        diff = (logits - reference).abs().max().item()
        rows.append((mode, torch.equal(logits, reference), diff))
    print(f"\nconverted {len(calibration)} MoE block(s); whole-model logits against the original:")
    print(f"  {'calibrate_all_experts':<22}{'bitwise equal':<15}max |diff|")
    for mode, bitwise, diff in rows:
        print(f"  {str(mode):<22}{str(bitwise):<15}{diff:.3g}")
    print("\nexample expert code:\n" + calibration[0].code)
    return 0 if all(diff < 1e-4 for _, _, diff in rows) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autocal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="convert a built-in tiny MoE model and check it")
    demo_parser.add_argument("architecture", nargs="?", default="qwen3_moe",
                             help="a model type with a config in fixtures/models (default: qwen3_moe)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.architecture)
    return 2


if __name__ == "__main__":
    sys.exit(main())
