"""Run autocal on every architecture of the model zoo and record what happened.

For one architecture: build the tiny model with random weights, convert it,
compare whole-model logits before and after (calibration off: bitwise;
calibration on: within rounding), count the tokens every expert Linear sees
with calibration on, restore the blocks, convert the same model built on the
meta device, and time it all.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .. import errors
from ..api import convert, restore
from ..explain import explain
from ..registry import MoECalibrationModule
from ..trace.hf import eager_experts
from ..verify import compare_outputs, counts_itself, rows_seen
from . import zoo

__all__ = ["ZooResult", "run_architecture"]


@dataclass
class ZooResult:
    """One row of the zoo table."""

    architecture: str
    passed: bool = False
    blocks: list[dict[str, Any]] = field(default_factory=list)
    converted: int = 0
    bitwise_off: bool | None = None
    max_diff_on: float | None = None
    experts_covered: str = ""
    restored: bool | None = None
    meta: bool | None = None
    seconds: float = 0.0
    failure: str = ""
    unbuildable: str = ""  # the original model itself cannot be built or run: listed with the reason

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _logits(output: Any) -> torch.Tensor:
    if hasattr(output, "logits") and output.logits is not None:
        return output.logits
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    if hasattr(output, "feature_maps"):
        return output.feature_maps[-1]
    return output[0]


def _block_facts(report) -> list[dict[str, Any]]:
    facts = []
    for block in report.blocks:
        if block.failure is not None or block.structure is None:
            facts.append({"class": block.block_class, "how": block.how, "failure": block.failure})
            continue
        router, experts = block.structure["router"], block.structure["experts"]
        facts.append({
            "class": block.block_class,
            "count": len(block.paths),
            "level": block.structure["level"],
            "scoring": router["scoring"],
            "selection": router.get("selection", "topk"),
            "scored_after_selection": router.get("scored_after_selection", False),
            "top_k": router["top_k"],
            "num_experts": experts["num_experts"],
            "storage": experts["storage"],
            "gate_up": experts["layout"].get("gate_up"),
            "computation": experts["computation"],
            "shared": block.structure["shared_modules"],
            "weights_applied": experts["weights_applied"],
        })
    return facts


def _coverage(model: nn.Module, run) -> tuple[str, bool]:
    """Rows each expert module saw with calibration on, against the rows its block received."""
    modules = [m for m in model.modules() if isinstance(m, MoECalibrationModule) and hasattr(m, "expert_modules")]
    block_rows: dict[int, int] = {}

    def count_block(module, args, kwargs):
        hidden = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        block_rows[id(module)] = block_rows.get(id(module), 0) + hidden.numel() // hidden.shape[-1]

    handles = [m.register_forward_pre_hook(count_block, with_kwargs=True) for m in modules]
    experts = [(m, e) for m in modules for e in m.expert_modules()]
    counting = [(m, e) for m, e in experts if counts_itself(m)]  # read their own counter: no hook on them
    hooked = [(m, e) for m, e in experts if not counts_itself(m)]
    try:
        with rows_seen([e for _, e in counting], counting_themselves=True) as counted, \
                rows_seen([e for _, e in hooked]) as seen:
            run()
    finally:
        for handle in handles:
            handle.remove()
    reached = [(m, n) for (m, _), n in zip(counting + hooked, counted + seen) if id(m) in block_rows]
    covered = sum(1 for m, n in reached if n >= block_rows[id(m)])
    return f"{covered}/{len(reached)}", covered == len(reached)


def run_architecture(name: str, *, given_inputs: bool = True, experts_implementation: str = "eager") -> ZooResult:
    """Convert the zoo model ``name`` and check it; never raises.

    ``given_inputs``: autocal is given the zoo's example inputs (``zoo.example_inputs``); with False it is given
    none (``convert(model)`` alone, as a user would call it) and the inputs only serve to compare the outputs.
    ``experts_implementation``: the one transformers' decorated experts run (``zoo.build_model``); the outputs are
    compared with the model run with eager experts, which autocal's modules compute as (docs/how-it-works.md).
    """
    result = ZooResult(name)
    start = time.perf_counter()
    try:
        model = zoo.build_model(name, experts_implementation=experts_implementation)
        forward = zoo.forward_module(model)
        inputs = zoo.example_inputs(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.no_grad(), eager_experts(model):
            reference = _logits(forward(**inputs))
    except Exception as error:  # before autocal runs: the architecture cannot be built or run here
        result.unbuildable = f"the original model fails: {_where(error)}"
        result.seconds = round(time.perf_counter() - start, 2)
        return result
    try:
        given = {"example_inputs": inputs, "forward": forward} if given_inputs else {}
        result.blocks = _block_facts(explain(model, verify=False, **given))
        convert(model, **given)
        converted = [m for m in model.modules() if isinstance(m, MoECalibrationModule)]
        result.converted = len(converted)
        for module in converted:
            module.calibrate_all_experts = False
        with torch.no_grad():
            result.bitwise_off = torch.equal(_logits(forward(**inputs)), reference)
        for module in converted:
            module.calibrate_all_experts = True
        outputs = []
        with torch.no_grad():
            result.experts_covered, covered = _coverage(model, lambda: outputs.append(_logits(forward(**inputs))))
        diff, _, close = compare_outputs(reference, outputs[0])
        result.max_diff_on = diff
        restored = _restored_parameters(model)
        result.restored = all(torch.equal(before[n], p) for n, p in restored.items()) and set(restored) == set(before)
        result.meta = _converts_on_meta(name, inputs if given_inputs else None, result.converted)
        result.passed = bool(converted) and result.bitwise_off and close and covered and result.restored and result.meta
        if not result.passed:
            result.failure = _why(result, close, covered)
    except errors.AutocalError as error:
        result.failure = f"[{error.kind}] {error.explanation}" + (f" at {error.module_path}" if error.module_path else "")
    except Exception as error:  # a zoo row records any failure
        result.failure = _where(error)
    result.seconds = round(time.perf_counter() - start, 2)
    return result


def _where(error: Exception) -> str:
    frame = traceback.extract_tb(error.__traceback__)[-1]
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200]} ({frame.filename}:{frame.lineno})"


def _converts_on_meta(name: str, inputs: dict | None, expected: int) -> bool:
    """The same model built on the meta device converts the same number of blocks, and stays on meta."""
    model = zoo.build_model(name, device="meta")
    convert(model, **({"example_inputs": inputs, "forward": zoo.forward_module(model)} if inputs is not None else {}))
    converted = sum(isinstance(m, MoECalibrationModule) for m in model.modules())
    return converted == expected and all(p.is_meta for p in model.parameters())


def _restored_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters of the model with every calibration module put back to its original (non-destructively)."""
    restore(model)
    swapped = []
    for path, module in list(model.named_modules()):
        if isinstance(module, MoECalibrationModule) and path:
            parent, _, leaf = path.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            owner._modules[leaf] = module.restore()
            swapped.append((owner, leaf, module))
    params = {n: p.detach() for n, p in model.named_parameters()}
    for owner, leaf, module in swapped:
        owner._modules[leaf] = module
    return params


def _why(result: ZooResult, close: bool, covered: bool) -> str:
    if not result.converted:
        return "no block converted"
    reasons = []
    if not result.bitwise_off:
        reasons.append("calibration off is not bitwise the original")
    if not close:
        reasons.append(f"calibration on differs by {result.max_diff_on:.3g}")
    if not covered:
        reasons.append(f"experts covered {result.experts_covered}")
    if not result.restored:
        reasons.append("restore() did not give the parameters back")
    if not result.meta:
        reasons.append("the meta-device model did not convert the same blocks")
    return "; ".join(reasons)
