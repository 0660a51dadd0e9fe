"""Command line: ``autocal demo`` and ``autocal explain`` (also ``python -m autocal ...``).

``demo`` builds a tiny MoE model from a config in ``fixtures/models`` (random
weights, no download), prints what autocal detects, converts the model and
compares its logits with the original's, calibration off and on.

``explain PATH`` reads a ``config.json`` (or a model directory), builds the model
on the meta device (no weights are read or allocated) and prints what autocal
detects in every distinct MoE block class.
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
    print(autocal.explain(model).render())
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
    print("\nexample expert code:\n" + calibration[0].code.strip())
    return 0 if all(diff < 1e-4 for _, _, diff in rows) else 1


def explain_config(path: str, as_json: bool, show_code: bool) -> int:
    import time

    import autocal
    from autocal.integrations.transformers import load_config, meta_model

    start = time.perf_counter()
    try:
        model = meta_model(load_config(path))
    except (FileNotFoundError, ValueError) as error:
        print(f"autocal explain: {error}", file=sys.stderr)
        return 2
    report = autocal.explain(model)
    if as_json:
        print(report.to_json())
    else:
        print(report.render())  # a table in a terminal, plain lines when piped
        if show_code:
            for block in report.blocks:
                if block.code:
                    print(f"\n# {block.block_class}: generated code\n{block.code}")
        print(f"\n({time.perf_counter() - start:.1f} s, model on the meta device: no weights read)")
    if not report.blocks:
        print("autocal explain: no MoE block in this model", file=sys.stderr)
        return 1
    return 0 if report.successful() else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="autocal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="convert a built-in tiny MoE model and check it")
    demo_parser.add_argument("architecture", nargs="?", default="qwen3_moe",
                             help="a model type with a config in fixtures/models (default: qwen3_moe)")
    explain_parser = commands.add_parser("explain", help="show what autocal detects, from a config alone")
    explain_parser.add_argument("path", help="a config.json, or a model directory holding one")
    explain_parser.add_argument("--json", action="store_true", help="print the report as JSON")
    explain_parser.add_argument("--code", action="store_true", help="also print the generated calibration code")
    args = parser.parse_args(argv)
    if args.command == "demo":
        return demo(args.architecture)
    return explain_config(args.path, args.json, args.code)


if __name__ == "__main__":
    sys.exit(main())
