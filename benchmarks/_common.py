"""Shared pieces of the benchmarks: shapes, the random MoE block, the incumbent's import, timing, machine info.

Not part of the ``autocal`` package; run the scripts beside this file from the
repository root (``python benchmarks/<script>.py``).
"""

from __future__ import annotations

import contextlib
import cProfile
import importlib
import io
import json
import importlib.util
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # import the autocal of this checkout, installed or not
    sys.path.insert(0, str(ROOT))

__all__ = ["Shape", "SHAPES", "build_block", "import_incumbent", "linearize", "interleaved", "machine",
           "run_result", "sync", "write_json"]


@dataclass(frozen=True)
class Shape:
    """One MoE layer's shape: experts, hidden size, expert width (moe_intermediate_size), top-k."""

    name: str
    num_experts: int
    hidden: int
    width: int
    top_k: int

    def scaled(self, factor: int) -> "Shape":
        """Hidden size and width divided by ``factor`` (experts and k kept: the overhead is per expert)."""
        if factor == 1:
            return self
        return Shape(f"{self.name}/{factor}", self.num_experts, self.hidden // factor, self.width // factor,
                     self.top_k)

    def expert_params(self) -> int:
        return self.num_experts * 3 * self.hidden * self.width


SHAPES = {
    "qwen3-30b-a3b": Shape("qwen3-30b-a3b", 128, 2048, 768, 8),
    "mixtral-8x7b": Shape("mixtral-8x7b", 8, 4096, 14336, 2),
    "deepseek-v3": Shape("deepseek-v3", 256, 7168, 2048, 8),
}


def qwen3_moe_config(shape: Shape, dtype: torch.dtype, num_layers: int = 1, **extra):
    """A ``Qwen3MoeConfig`` with ``shape``'s sizes, eager experts (the loop autocal records)."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(
        hidden_size=shape.hidden, moe_intermediate_size=shape.width, num_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k, norm_topk_prob=True, num_hidden_layers=num_layers,
        decoder_sparse_step=1, mlp_only_layers=[], **extra,
    )
    config.dtype = dtype
    config._experts_implementation = "eager"
    return config


def build_block(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """One ``Qwen3MoeSparseMoeBlock`` of ``shape`` on ``device``: normal(0, 0.02) weights, built in place.

    The block is made on the meta device and materialised with ``to_empty``, so a
    full-size DeepSeek-V3 layer (5.6e9 expert parameters) is never initialised twice.
    """
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = qwen3_moe_config(shape, dtype)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            block = Qwen3MoeSparseMoeBlock(config)
    finally:
        torch.set_default_dtype(default)
    block.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for param in block.parameters():
            param.normal_(0.0, 0.02, generator=generator)
    return block.eval(), config


# -- the incumbent ----------------------------------------------------------------------------------------


def import_incumbent() -> tuple[types.SimpleNamespace, str]:
    """LLM Compressor's ``LinearExperts2D``, ``moe_calibration_context`` and ``linearize_moe``, and how they came.

    ``import llmcompressor`` runs the package's ``__init__`` (sessions, entrypoints,
    datasets, pandas, pyarrow: about 100 MB of wheels). Where that fails (the GPU
    machine carries only what the MoE modules need), the three modules are
    imported from the same installed files under empty parent packages, and
    ``datasets`` (imported by ``llmcompressor.typing`` for type aliases only) is
    stubbed if missing. The code that runs, ``linear_experts.py``, is the same.
    """
    names = ("llmcompressor.modeling.moe.linear_experts", "llmcompressor.modeling.moe.context",
             "llmcompressor.modeling.moe.linearize")
    try:
        modules = [importlib.import_module(name) for name in names]
        how = "import llmcompressor"
    except ImportError as error:
        reason = f"{type(error).__name__}: {error}"
        for name in [n for n in sys.modules if n == "llmcompressor" or n.startswith("llmcompressor.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("llmcompressor")
        if spec is None or not spec.submodule_search_locations:
            raise
        root = Path(list(spec.submodule_search_locations)[0])
        for package in ("llmcompressor", "llmcompressor.modeling", "llmcompressor.modeling.moe",
                        "llmcompressor.utils"):
            module = types.ModuleType(package)
            module.__path__ = [str(root.joinpath(*package.split(".")[1:]))]
            sys.modules[package] = module
        stubbed = []
        if not _importable("datasets"):
            stub = types.ModuleType("datasets")
            for cls in ("Dataset", "DatasetDict", "IterableDataset"):
                setattr(stub, cls, type(cls, (), {}))
            sys.modules["datasets"] = stub
            stubbed.append("datasets")
        modules = [importlib.import_module(name) for name in names]
        how = f"modules only (full import failed: {reason}; stubbed: {stubbed or 'nothing'})"
    linear_experts, context, linearize_module = modules
    return types.SimpleNamespace(LinearExperts2D=linear_experts.LinearExperts2D,
                                 moe_calibration_context=context.moe_calibration_context,
                                 linearize_moe=linearize_module.linearize_moe), how


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


def linearize(incumbent: types.SimpleNamespace, experts: torch.nn.Module, config) -> torch.nn.Module:
    """The incumbent's per-expert ``nn.Linear`` container for one packed experts module (a copy of its weights)."""
    cls = incumbent.LinearExperts2D.get_linear_experts_cls(type(experts))
    device = next(experts.parameters()).device
    with torch.device(device):  # LinearExperts2D allocates its Linears on the default device
        return cls.from_experts_module(experts, config).to(device)


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


# -- timing -----------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device, repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each function: ``warmup`` calls each, then ``repeats`` rounds, one call of each per round.

    The order rotates every round, so no function always runs first (or right
    after the same other one) while the machine's load drifts.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            sync(device)
            start = time.perf_counter()
            fns[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


class PassTimer:
    """Seconds LLM Compressor's sequential pipeline spends in its subgraphs' forwards, calibration passes
    (hooks live) and propagation passes (hooks disabled) apart, the device synchronized around each: a
    benchmark probe on ``Subgraph.forward``, installed for the life of the process."""

    def __init__(self) -> None:
        from llmcompressor.modifiers.utils.hooks import HooksMixin
        from llmcompressor.pipelines.sequential.helpers import Subgraph

        self.seconds = {"calibrating_s": 0.0, "propagating_s": 0.0}
        forward = Subgraph.forward

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

        def timed(subgraph, *args, **kwargs):
            sync(device)
            started = time.perf_counter()
            try:
                return forward(subgraph, *args, **kwargs)
            finally:
                sync(device)
                key = "propagating_s" if HooksMixin._HOOKS_DISABLED else "calibrating_s"
                self.seconds[key] += time.perf_counter() - started

        Subgraph.forward = timed


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


# -- where it ran -----------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    """What the figures were measured on, for the JSON and docs/benchmarks.md."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "commit": _git("rev-parse", "--short", "HEAD"),
        "autocal_dirty": bool(_git("status", "--porcelain", "autocal")),
    }
    from importlib import metadata
    for package in ("transformers", "llmcompressor", "compressed-tensors"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_result(benchmark: str, machine_info: dict, **fields) -> dict:
    """A run's JSON: the benchmark, the command that ran it and the machine (``machine``), then ``fields``."""
    return {"benchmark": benchmark, "command": " ".join(["python", *sys.argv]), "machine": machine_info, **fields}


@contextlib.contextmanager
def profiled(path: Path | None):
    """Under cProfile, its statistics written to ``path`` (``write_profile``); nothing without a path."""
    if path is None:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        write_profile(profiler, path)


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    """Where a run's host time went: the 70 calls of largest cumulative time, then the 40 of largest own time."""
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("cumulative").print_stats(70)
    stats.sort_stats("tottime").print_stats(40)
    path.write_text(text.getvalue())


def write_json(result: dict, path: Path | None) -> None:
    """``result`` written to ``path``, its folder made if missing; nothing without a path."""
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1, default=str))
        print(f"\nwrote {path}")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except Exception:
        return ""
