"""autocal × LLM Compressor: ``oneshot`` on autocal-converted tiny MoE models, end to end on CPU.

Runs only where the extra is installed (llmcompressor 0.14.0.1, compressed-tensors 0.19.0,
transformers 5.17.0); skipped elsewhere. Tiny random-weight models from ``fixtures/models``,
saved once with a word-level tokenizer and loaded back with ``from_pretrained`` (LLM Compressor
re-reads the config from disk), calibrated on 8 sequences of 16 random tokens.

Tolerances (relative L2 error, ||quantized - original|| / ||original||, on 4 held-out sequences of 16 tokens):

- MoE block output, on the same held-out hidden states (routing is then the original's, the
  router is not quantized): <= 0.25 for W4A16 (int4, groups of 16, GPTQ), <= 0.12 for FP8
  (per-tensor static weights and activations), <= 0.35 for NVFP4 (FP4 weights and activations,
  static global scales; Qwen3-MoE only). Measured: 0.12-0.19, 0.06-0.08, 0.23-0.25.
- Model logits: <= 0.8 (W4A16, NVFP4) and <= 0.65 (FP8). Measured 0.36-0.68, 0.44 and 0.15-0.53: the tiny
  random routers sit near ties, so quantization error upstream flips expert choices. LLM
  Compressor's own path gives the same figures: its logits and autocal's agree within 1e-4.
- Reloaded W4A16 checkpoint (transformers dequantizes it into its packed experts) vs the
  fake-quantized model: <= 1e-5 (measured 0).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

pytest.importorskip("llmcompressor")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast  # noqa: E402

import autocal  # noqa: E402
from autocal.integrations import llmcompressor as alc  # noqa: E402
from autocal.synthesize.experts import CalibrationExperts  # noqa: E402
from autocal.testing import zoo  # noqa: E402
from autocal.testing.corpus import EXPERTS, HIDDEN, INTER, TOP_K, SwiGLUExpert, _loop_experts, init_normal  # noqa: E402

MODELS = ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"]
SCHEMES = ["w4a16", "fp8"]
CALIBRATION = (8, 16)  # sequences, tokens
HELD_OUT = (4, 16)
GROUP_SIZE = 16  # tiny models have in_features 16..64; the W4A16 preset's groups of 128 do not divide them
BLOCK_TOL = {"w4a16": 0.25, "fp8": 0.12, "nvfp4": 0.35}
MODEL_TOL = {"w4a16": 0.8, "fp8": 0.65, "nvfp4": 0.8}
SIDE_BY_SIDE_TOL = 1e-4
FLIP_TOL = 1e-2  # logits, where GPTQ rounded some weights one step apart (test_side_by_side_with_llmcompressor_own_path)
# Quantized activations (W8A8: int8 per token, computed at run time) turn a last-bit difference between the two
# paths' calibration forwards (a sum in another order) into a whole quantization step of some activations:
# GPT-OSS's logits then differ by 5.4e-4 (relative) on an AVX-512 CPU. An uncalibrated expert differs by ~1e-1.
QUANTIZED_ACTIVATIONS_TOL = 2e-3
RELOAD_TOL = 1e-5
CALIBRATION_TOKENS = CALIBRATION[0] * CALIBRATION[1]
# What the original checkpoint calls each expert Linear, for the architectures whose checkpoints store
# experts one by one (read from the checkpoint transformers writes for the unconverted model).
PER_EXPERT_KEY = re.compile(r"^(?P<prefix>.*\.experts\.(?P<expert>\d+)\.(?P<name>[^.]+))\.weight$")


def recipe(scheme: str, gptq=None):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if scheme == "w4a16":
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
        config_groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        return (gptq or GPTQModifier)(config_groups=config_groups, ignore=["lm_head"])
    return QuantizationModifier(targets="Linear", scheme=scheme.upper(), ignore=["lm_head"])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same_expert_scales(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Every quantization scale of autocal's expert Linears equals LLM Compressor's own path's (its
    ``LinearExperts2D`` uses the same module paths)."""
    for lin in alc.expert_linears(ours):
        for scale_name, scale in ours.get_submodule(lin.path).named_parameters():
            if scale_name.endswith("scale"):
                torch.testing.assert_close(scale, getattr(theirs.get_submodule(lin.path), scale_name),
                                           rtol=1e-6, atol=0)


def tokens(shape: tuple[int, int], seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(2, vocab, shape, generator=torch.Generator().manual_seed(seed))


def calibration_dataset(vocab: int) -> Dataset:
    ids = tokens(CALIBRATION, 0, vocab)
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def oneshot_kwargs(vocab: int) -> dict:
    # unshuffled: both paths of the side-by-side see the batches in the same order
    return dict(dataset=calibration_dataset(vocab), num_calibration_samples=CALIBRATION[0],
                max_seq_length=CALIBRATION[1], shuffle_calibration_samples=False)


@dataclass
class Original:
    path: Path
    vocab: int
    keys: list[str]


@dataclass
class Run:
    """One model quantized through autocal, with what the tests check."""

    name: str
    scheme: str
    model: torch.nn.Module
    original: Original
    preparation: alc.Preparation
    coverage: alc.Coverage
    reference: torch.Tensor
    quantized: torch.Tensor
    block_errors: dict[str, float]
    routers_before: dict[str, torch.Tensor]
    scales: dict[str, dict[str, torch.Tensor]]
    saved: alc.SavedCheckpoint
    extra: dict = field(default_factory=dict)


_ORIGINALS: dict[str, Original] = {}
_RUNS: dict[tuple[str, str], Run] = {}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("llmcompressor")


def word_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A tokenizer of the words ``t0`` … for a model of ``vocab`` tokens (``oneshot`` wants one beside the model)."""
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")),
        unk_token="t0", pad_token="t0", eos_token="t1")


def original(name: str, workdir: Path) -> Original:
    """The tiny model of fixture ``name`` saved as a checkpoint with a tokenizer (built once)."""
    if name not in _ORIGINALS:
        model = zoo.build_model(name)
        vocab = model.config.get_text_config().vocab_size
        tokenizer = word_tokenizer(vocab)
        path = workdir / f"original-{name}"
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        _ORIGINALS[name] = Original(path, vocab, sorted(alc.load_saved_state_dict(path)))
    return _ORIGINALS[name]


def load(source: Original) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()


def run(name: str, scheme: str, workdir: Path) -> Run:
    """autocal's path for one model and scheme (run once, shared by the tests)."""
    key = (name, scheme)
    if key in _RUNS:
        return _RUNS[key]
    source = original(name, workdir)
    model = load(source)
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():
        reference = model(input_ids=held_out).logits
    preparation = alc.prepare(model)

    recorded = {}

    def record(path):
        def hook(module, args, kwargs, output):
            recorded.setdefault(path, (args, kwargs, output))
        return hook

    handles = [block.register_forward_hook(record(path), with_kwargs=True)
               for path, block in alc.calibration_blocks(model)]
    with torch.no_grad():
        model(input_ids=held_out)
    for handle in handles:
        handle.remove()
    routers_before = {g: model.get_submodule(g).weight.detach().clone() for g in preparation.gates}

    from llmcompressor.modifiers.utils.hooks import HooksMixin

    rows_by_pass = {True: 0, False: 0}  # rows all expert Linears received, in passes with LLM Compressor's hooks live

    def count(module, args):
        rows_by_pass[not HooksMixin._HOOKS_DISABLED] += args[0].numel() // args[0].shape[-1]

    counting = [model.get_submodule(lin.path).register_forward_pre_hook(count) for lin in alc.expert_linears(model)]
    grouped = CalibrationExperts._dense_grouped
    with warnings.catch_warnings(record=True) as caught, mock.patch.object(
            CalibrationExperts, "_dense_grouped", autospec=True, side_effect=grouped) as grouped_runs:
        warnings.simplefilter("always")
        coverage = alc.oneshot(model, recipe=recipe(scheme), **oneshot_kwargs(source.vocab))
    for handle in counting:
        handle.remove()
    extra = {"grouped_runs": grouped_runs.call_count, "rows_by_pass": rows_by_pass,
             "ungrouped": [str(w.message) for w in caught if "calls each expert module on its own" in str(w.message)]}

    with torch.no_grad():
        quantized = model(input_ids=held_out).logits
        block_errors = {}
        for path, block in alc.calibration_blocks(model):
            args, kwargs, expected = recorded[path]
            out = block(*args, **kwargs)
            first = lambda o: o if isinstance(o, torch.Tensor) else o[0]  # noqa: E731
            block_errors[path] = rel(first(out), first(expected))
    scales = {lin.path: {n: t.detach().clone() for n, t in model.get_submodule(lin.path).named_parameters()
                         if n.endswith("scale")} for lin in alc.expert_linears(model)}
    extra["quantized"] = {n: {k: t.detach().clone() for k, t in m.named_parameters(recurse=False)}
                          for n, m in model.named_modules() if hasattr(m, "weight_scale")}  # before saving packs them
    saved = alc.save_pretrained(model, workdir / f"quantized-{name}-{scheme}")
    _RUNS[key] = Run(name, scheme, model, source, preparation, coverage, reference, quantized, block_errors,
                     routers_before, scales, saved, extra)
    return _RUNS[key]


CASES = [pytest.param(m, s, id=f"{m}-{s}") for m in MODELS for s in SCHEMES] + [
    pytest.param("qwen3_moe", "nvfp4", id="qwen3_moe-nvfp4")]  # FP4 groups of 16, static global activation scale


# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_prepare_leaves_llmcompressor_nothing_to_linearize(name, workdir):
    model = load(original(name, workdir))
    assert len(alc.llmcompressor_moe_targets(model)) == 2, "LLM Compressor would linearize both packed containers"
    preparation = alc.prepare(model)
    assert alc.llmcompressor_moe_targets(model) == []
    assert preparation.linearized_by_llmcompressor == []
    assert len(preparation.blocks) == 2 and preparation.expert_linears == 2 * 8 * 3
    routers = [f"{block}.{model.get_submodule(block).structure.router.module_path}" for block in preparation.blocks]
    assert preparation.gates == routers
    assert alc.default_ignore(model) == routers + ["lm_head"]
    expected_names = {"mixtral": {"experts": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}}
    assert preparation.checkpoint_names == expected_names.get(name, {})
    assert alc.prepare(model).checkpoint_names == preparation.checkpoint_names  # idempotent


@pytest.mark.parametrize("name,scheme", CASES)
def test_oneshot_calibrates_every_expert(name, scheme, workdir):
    result = run(name, scheme, workdir)
    coverage = result.coverage
    assert coverage.ok, str(coverage)
    assert len(coverage.linears) == 2 * 8 * 3
    assert set(coverage.block_tokens.values()) == {CALIBRATION_TOKENS}
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION_TOKENS}, "every expert Linear saw every token"
    required = {"w4a16": {"weight_scale"}, "fp8": {"weight_scale", "input_scale"},
                "nvfp4": {"weight_scale", "weight_global_scale", "input_global_scale"}}[scheme]
    for lc in coverage.linears:
        assert required <= set(lc.qparams), lc
        assert not lc.nonfinite and not lc.missing and lc.scheme
    # gates were kept out of quantization, and calibration mode is off again
    for gate, weight in result.routers_before.items():
        module = result.model.get_submodule(gate)
        assert getattr(module, "quantization_scheme", None) is None
        assert torch.equal(module.weight, weight)
    assert not any(block.calibrate_all_experts for _, block in alc.calibration_blocks(result.model))
    # LLM Compressor's pipeline wraps every module's forward for offloading; the experts still ran in groups
    assert result.extra["grouped_runs"] > 0 and not result.extra["ungrouped"], result.extra


def test_oneshot_with_token_chunks_calibrates_every_expert(workdir):
    """``prepare(calibration_chunk_size=3)``: in the calibration passes each expert Linear gets its routed rows in
    one call and the rest 3 at a time, sees every calibration token, and gets its FP8 scales."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    source = original("qwen3_moe", workdir)
    model = load(source)
    alc.prepare(model, calibration_chunk_size=3)
    assert {block.calibration_chunk_size for _, block in alc.calibration_blocks(model)} == {3}
    calls = {lin.path: [] for lin in alc.expert_linears(model)}

    def record(path):
        def hook(module, args):
            if not HooksMixin._HOOKS_DISABLED:  # a calibration pass
                calls[path].append(args[0].numel() // args[0].shape[-1])
        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(record(path)) for path in calls]
    try:
        coverage = alc.oneshot(model, recipe=recipe("fp8"), **oneshot_kwargs(source.vocab))
    finally:
        for handle in handles:
            handle.remove()
    assert coverage.ok, str(coverage)
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION_TOKENS}
    assert all({"weight_scale", "input_scale"} <= set(lc.qparams) for lc in coverage.linears)
    for path, sizes in calls.items():
        assert sum(sizes) == CALIBRATION_TOKENS, (path, sizes)
        assert sum(size > 3 for size in sizes) <= CALIBRATION[0], (path, sizes)  # one routed call per sequence
        assert any(size <= 3 for size in sizes), (path, sizes)  # the unrouted rest, in chunks


@pytest.mark.parametrize("name", MODELS)
def test_propagation_passes_run_every_expert_by_default(name, workdir):
    """By default the propagation passes (every LLM Compressor hook disabled, after each layer's calibration pass)
    run every expert on every token too, as LLM Compressor's own path does: what the next layer calibrates on is
    that path's."""
    result = run(name, "fp8", workdir)
    live, propagation = result.extra["rows_by_pass"][True], result.extra["rows_by_pass"][False]
    assert live > 0 and propagation == live, (live, propagation)


@pytest.mark.parametrize("name", MODELS)
def test_propagate_routed_runs_only_the_routed_experts(name, workdir):
    """``propagate_routed=True`` (opt-in): in the propagation passes each expert gets only its routed tokens, k of E
    experts per token, against all E in the calibration pass; every expert Linear still sees every calibration
    token while LLM Compressor's hooks are live."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    source = original(name, workdir)
    model = load(source)
    alc.prepare(model)
    rows_by_pass = {True: 0, False: 0}

    def count(module, args):
        rows_by_pass[not HooksMixin._HOOKS_DISABLED] += args[0].numel() // args[0].shape[-1]

    handles = [model.get_submodule(lin.path).register_forward_pre_hook(count) for lin in alc.expert_linears(model)]
    try:
        coverage = alc.oneshot(model, recipe=recipe("fp8"), propagate_routed=True, **oneshot_kwargs(source.vocab))
    finally:
        for handle in handles:
            handle.remove()
    assert coverage.ok, str(coverage)
    config = model.config.get_text_config()
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or \
        config.n_routed_experts
    k = config.num_experts_per_tok
    live, propagation = rows_by_pass[True], rows_by_pass[False]
    assert live > 0 and propagation * experts == live * k, (live, propagation, experts, k)


@pytest.mark.parametrize("name,scheme", CASES)
def test_quantized_output_close_to_original(name, scheme, workdir):
    result = run(name, scheme, workdir)
    for path, error in result.block_errors.items():
        assert 1e-4 < error <= BLOCK_TOL[scheme], (path, error)
    error = rel(result.quantized, result.reference)
    assert 1e-4 < error <= MODEL_TOL[scheme], error


def expected_expert_prefixes(source: Original) -> set[str]:
    """Per-expert key prefixes the quantized checkpoint must use: the original checkpoint's own,
    or ``…experts.{i}.{gate,up,down}_proj`` where the original stores experts packed (GPT-OSS)."""
    prefixes = {m["prefix"] for k in source.keys if (m := PER_EXPERT_KEY.match(k))}
    if prefixes:
        return prefixes
    containers = {k.rsplit(".", 1)[0] for k in source.keys if k.endswith(".experts.gate_up_proj")}
    return {f"{c}.{i}.{n}" for c in containers for i in range(8) for n in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("name,scheme", CASES)
def test_checkpoint_keys_follow_original_naming(name, scheme, workdir):
    result = run(name, scheme, workdir)
    saved = alc.load_saved_state_dict(result.saved.path)
    prefixes = expected_expert_prefixes(result.original)
    assert len(prefixes) == 2 * 8 * 3
    weight = {"w4a16": "weight_packed", "fp8": "weight", "nvfp4": "weight_packed"}[scheme]
    for prefix in prefixes:
        assert f"{prefix}.{weight}" in saved and f"{prefix}.weight_scale" in saved, prefix
    experts_keys = {k for k in saved if ".experts." in k}
    assert {k.rsplit(".", 1)[0] for k in experts_keys} == prefixes, "nothing else (no packed tensor) under experts"
    # every tensor back exactly (save_pretrained verified it too; check independently here)
    layout = alc.checkpoint_layout(result.model)
    _, written = alc._state_dict_to_write(result.model, layout)
    alc.verify_saved(result.saved.path, written)
    # the routers are in the saved quantization config's ignore list, under their checkpoint names
    ignore = json.loads((result.saved.path / "config.json").read_text())["quantization_config"]["ignore"]
    routers = alc.saved_names(result.model, list(result.routers_before)).values()
    assert set(routers) <= set(ignore)
    assert all(f"{router}.weight" in saved for router in routers)


@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_reloaded_checkpoint_matches_fake_quantized_model(name, workdir):
    """transformers 5.17 loads per-expert compressed checkpoints named as the original into its packed
    experts (dequantizing them): wrong names would leave experts missing or swapped."""
    result = run(name, "w4a16", workdir)
    reloaded = AutoModelForCausalLM.from_pretrained(result.saved.path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = reloaded(input_ids=tokens(HELD_OUT, 1, result.original.vocab)).logits
    assert rel(logits, result.quantized) <= RELOAD_TOL


def step_flips(ours: dict[str, dict[str, torch.Tensor]], model: torch.nn.Module) -> int:
    """How many of ``ours``' quantized weights (``Run.extra["quantized"]``) differ from ``model``'s; each may
    differ by one quantization step at most (asserted)."""
    flips = 0
    for name, tensors in ours.items():
        theirs, weight, scale = model.get_submodule(name).weight, tensors["weight"], tensors["weight_scale"]
        step = scale.repeat_interleave(weight.shape[-1] // scale.shape[-1], dim=-1)
        assert ((theirs - weight).abs() <= step * (1 + 1e-5)).all(), name
        flips += (theirs != weight).sum().item()
    return flips


@pytest.mark.parametrize("name", MODELS)
def test_side_by_side_with_llmcompressor_own_path(name, workdir):
    """LLM Compressor's own path (post-load linearization, moe_calibrate_all_experts) on the same model and data
    gives the model autocal's ``oneshot`` gives by default: the same expert scales, and the same logits to
    rounding (the two paths sum the same rows in another order).

    That rounding reaches the Hessians, and GPTQ's rounding of a weight can then flip by one quantization step
    (``step_flips``): measured on AVX2 kernels (``MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2``),
    10 of GPT-OSS's 122880 quantized weights, which moved its logits by 2.4e-3; none on AVX-512. Flips must stay
    within one step and 0.1% of the weights, and the logits within ``FLIP_TOL`` where any weight flipped."""
    from llmcompressor import oneshot

    result = run(name, "w4a16", workdir)
    model = load(result.original)
    oneshot(model=model, recipe=recipe("w4a16"), **oneshot_kwargs(result.original.vocab))
    held_out = tokens(HELD_OUT, 1, result.original.vocab)
    with torch.no_grad():
        logits = model(input_ids=held_out).logits
    flips = step_flips(result.extra["quantized"], model)
    assert flips <= 1e-3 * sum(q["weight"].numel() for q in result.extra["quantized"].values())
    assert rel(logits, result.quantized) <= (FLIP_TOL if flips else SIDE_BY_SIDE_TOL)
    for path, scales in result.scales.items():
        for scale_name, scale in scales.items():
            torch.testing.assert_close(scale, getattr(model.get_submodule(path), scale_name), rtol=1e-6, atol=0)
    save_dir = result.saved.path.parent / f"llmcompressor-{name}"
    model.save_pretrained(save_dir, save_compressed=True)
    theirs = set(alc.load_saved_state_dict(save_dir))
    ours = set(alc.load_saved_state_dict(result.saved.path))
    # LLM Compressor 0.14.0.1 names experts gate/up/down_proj whatever the checkpoint used (Mixtral: w1/w3/w2)
    renames = {v: k for m in result.preparation.checkpoint_names.values() for k, v in m.items()}
    ours_as_theirs = {re.sub(r"\.experts\.(\d+)\.([^.]+)\.", lambda m: f".experts.{m[1]}.{renames.get(m[2], m[2])}.",
                             k) for k in ours}
    assert ours_as_theirs == theirs


@contextlib.contextmanager
def counting_group_calls():
    """How many times expert Linears were computed together, their hooks stood for by group hooks."""
    from autocal import linear_calls

    calls, run_hooks = [0], linear_calls.GroupCall.run_hooks

    def counting(self, *args):
        calls[0] += 1
        return run_hooks(self, *args)

    with mock.patch.object(linear_calls.GroupCall, "run_hooks", counting):
        yield calls


@pytest.mark.parametrize("batch_bytes", [None, 1], ids=["one-batch", "batches-of-one"])
def test_shared_hessian_gptq_gives_gptq_result(workdir, batch_bytes):
    """``SharedHessianGPTQModifier`` accumulates one Hessian per group of expert Linears that share an input (once
    per calibration batch, under the group's first member), factorizes it once, and quantizes the group's weights
    together: the quantized weights, the expert scales and the logits are bitwise those of ``GPTQModifier``
    through autocal, and equal LLM Compressor's own path's as that does
    (``test_side_by_side_with_llmcompressor_own_path``), also with batches of one Linear each."""
    from llmcompressor.modifiers.gptq import base, gptq_quantize

    from autocal.integrations.llmcompressor import gptq, group_gptq
    from autocal.integrations.llmcompressor.gptq import SharedHessianGPTQModifier

    result = run("qwen3_moe", "w4a16", workdir)  # GPTQModifier through autocal
    shared = load(result.original)
    accumulated, factorizations = {}, [0]
    accumulate, factorize = base.accumulate_hessian, gptq_quantize.factorize_hessian

    def counting(inp, module, *args):
        accumulated[module] = accumulated.get(module, 0) + 1
        return accumulate(inp, module, *args)

    def counting_factorizations(weights, hessians, *args):
        factorizations[0] += hessians.shape[0]
        return factorize(weights, hessians, *args)

    with mock.patch.object(base, "accumulate_hessian", counting), \
            mock.patch.object(gptq_quantize, "factorize_hessian", counting_factorizations), \
            mock.patch.object(group_gptq, "factorize_hessian", counting_factorizations), \
            mock.patch.object(gptq, "BATCH_BYTES", batch_bytes or gptq.BATCH_BYTES), counting_group_calls() as calls:
        alc.oneshot(shared, recipe=recipe("w4a16", SharedHessianGPTQModifier), **oneshot_kwargs(result.original.vocab))
    assert calls[0] > 0, "the group hooks stood for the expert Linears' hooks (autocal.linear_calls)"
    groups = autocal.shared_input_groups(shared)
    assert groups
    for group in groups:
        first, *rest = (shared.get_submodule(path) for path in group)
        assert accumulated.get(first) == CALIBRATION[0] and not any(m in accumulated for m in rest), group
    quantized = result.extra["quantized"]
    assert factorizations[0] == len(quantized) - sum(len(group) - 1 for group in groups)
    for name, expected in quantized.items():
        assert torch.equal(shared.get_submodule(name).weight, expected["weight"]), name
    with torch.no_grad():
        logits = shared(input_ids=tokens(HELD_OUT, 1, result.original.vocab)).logits
    assert torch.equal(logits, result.quantized)
    for path, scales in result.scales.items():
        for name, scale in scales.items():
            assert torch.equal(scale, getattr(shared.get_submodule(path), name)), (path, name)


@pytest.mark.parametrize("scheme", [
    dict(strategy="group", group_size=16, symmetric=True, actorder="static"),
    dict(strategy="group", group_size=16, symmetric=False, actorder="weight"),
    dict(strategy="group", group_size=16, symmetric=True, actorder=None),
    dict(strategy="channel", symmetric=True, actorder="static"),
    dict(strategy="tensor", symmetric=False, actorder=None),
], ids=["group-static", "group-weight-asymmetric", "group-no-order", "channel", "tensor"])
def test_one_factorization_quantizes_as_llmcompressor_quantize_weight(scheme):
    """``quantize_shared`` on 4 stacked weights with one factorization of their shared Hessian gives, bitwise,
    what LLM Compressor's ``quantize_weight`` gives for each weight on its own (its path on a CPU), for every
    activation order and scale layout; a dead input column (all zeros) included."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.observers import Observer

    from autocal.integrations.llmcompressor.group_gptq import SharedFactorization, quantize_shared

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 64, generator=generator) * torch.rand(64, generator=generator) * 3
    inputs[:, 5] = 0
    hessian = 2 * inputs.t() @ inputs / len(inputs)
    weights = torch.randn(4, 24, 64, generator=generator)
    args = QuantizationArgs(num_bits=4, type="int", **scheme)
    qparams = [Observer.load_from_registry("memoryless_minmax", base_name="weight", args=args)(w).get_qparams()
               for w in weights]
    scale = torch.stack([q["scale"] for q in qparams])
    zero_point = torch.stack([q["zero_point"] for q in qparams])
    expected = torch.cat([quantize_weight(weights[i:i + 1].clone(), hessian[None].clone(), scale[i:i + 1],
                                          zero_point[i:i + 1], None, args, 16, 0.01)[0] for i in range(4)])
    shared = SharedFactorization.of(hessian.clone(), args.actorder, 0.01)
    quantized, _ = quantize_shared(weights.clone(), shared, scale, zero_point, None, args, 16)
    assert torch.equal(quantized, expected)
    assert not torch.equal(quantized, weights)


def test_shared_hessian_gptq_refuses_inputs_that_differ(workdir):
    """Linears grouped as sharing an input but called on different tensors (here: experts given their own rows by
    ``calibration_chunk_size``, with the groups of the default calibration forward) stop the run."""
    from autocal.integrations.llmcompressor import gptq

    source = original("qwen3_moe", workdir)
    model = load(source)
    alc.prepare(model)
    dense_groups = autocal.shared_input_groups(model)
    autocal.set_calibration_chunk_size(model, 3)
    with mock.patch.object(gptq, "shared_input_groups", lambda m: dense_groups), \
            pytest.raises(gptq.SharingError, match="inputs differ"):
        alc.oneshot(model, recipe=recipe("w4a16", gptq.SharedHessianGPTQModifier), **oneshot_kwargs(source.vocab))



def test_shared_hessian_gptq_distributed_equals_one_process(workdir, tmp_path):
    """LLM Compressor's distributed ``oneshot`` (``torchrun``, 2 ranks on the CPU with gloo, each given half the
    calibration sequences) through autocal with ``SharedHessianGPTQModifier``: each shared group's one Hessian is
    reduced across ranks (not one per member), and every rank ends with the quantized weights and scales of one
    process running ``GPTQModifier`` on all the sequences.

    Scales and zero points are bitwise equal (the weight observers read the weights alone). The quantized weights
    are equal within one quantization step, in at most 0.1% of their elements: the ranks' partial Hessians are
    summed in another order than one process sums them, and GPTQ's rounding of a weight can flip on the last bit
    of its error (measured: 10 of 122880 elements, one step, on an AMD EPYC with AVX-512)."""
    source = original("qwen3_moe", workdir)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(Path(__file__).with_name("distributed_oneshot.py")), str(source.path), str(tmp_path),
               str(GROUP_SIZE)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "TQDM_DISABLE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    result = run("qwen3_moe", "w4a16", workdir)  # GPTQModifier through autocal, one process, every sequence
    quantized = result.extra["quantized"]
    groups = autocal.shared_input_groups(result.model)
    assert groups
    for rank in ranks:
        assert rank["hessian_reductions"] == len(quantized) - sum(len(group) - 1 for group in groups)
        assert rank["state"].keys() == quantized.keys()
        differing = 0
        for name, expected in quantized.items():
            state = rank["state"][name]
            assert torch.equal(state["weight_scale"], expected["weight_scale"]), name
            assert torch.equal(state["weight_zero_point"], expected["weight_zero_point"]), name
            step = expected["weight_scale"].repeat_interleave(GROUP_SIZE, dim=1)
            assert ((state["weight"] - expected["weight"]).abs() <= step * (1 + 1e-5)).all(), name
            differing += (state["weight"] != expected["weight"]).sum().item()
        assert differing <= 1e-3 * sum(expected["weight"].numel() for expected in quantized.values())


def test_shared_observers_give_quantization_modifier_result(workdir):
    """``SharedObserverQuantizationModifier`` (static FP8) hooks the input observer of each group's first member
    only: per calibration batch, E + 1 hooked expert Linear calls per block instead of 3E. The input scales, the
    weight scales and the logits are bitwise those of ``QuantizationModifier`` through autocal."""
    from llmcompressor.modifiers.quantization.quantization import mixin

    from autocal.integrations.llmcompressor.observers import SharedObserverQuantizationModifier

    result = run("qwen3_moe", "fp8", workdir)  # QuantizationModifier through autocal
    model = load(result.original)
    alc.prepare(model)
    observed = {}
    observe = mixin.calibrate_input_hook

    def counting(module, args):
        observed[module] = observed.get(module, 0) + 1
        return observe(module, args)

    recipe = SharedObserverQuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"])
    with mock.patch.object(mixin, "calibrate_input_hook", counting), counting_group_calls() as calls:
        alc.oneshot(model, recipe=recipe, **oneshot_kwargs(result.original.vocab))
    assert calls[0] > 0, "the group hooks stood for the expert Linears' hooks (autocal.linear_calls)"
    groups = autocal.shared_input_groups(model)
    experts = [model.get_submodule(lin.path) for lin in alc.expert_linears(model)]
    assert len(groups) == 2 and len(experts) == 2 * 8 * 3
    assert sum(observed.get(m, 0) for m in experts) == CALIBRATION[0] * 2 * (8 + 1)
    for group in groups:
        first, *rest = (model.get_submodule(path) for path in group)
        assert observed[first] == CALIBRATION[0] and not any(m in observed for m in rest)
    for path, scales in result.scales.items():
        assert {"weight_scale", "input_scale"} <= set(scales)
        for name, scale in scales.items():
            assert torch.equal(scale, getattr(model.get_submodule(path), name)), (path, name)
    with torch.no_grad():
        logits = model(input_ids=tokens(HELD_OUT, 1, result.original.vocab)).logits
    assert torch.equal(logits, result.quantized)


def awq_recipe():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.awq import AWQModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=GROUP_SIZE)
    return AWQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                       ignore=["lm_head"])


@pytest.fixture
def awq_on_cpu():
    """LLM Compressor 0.14's AWQ pins its cached activations (``IntermediatesCache.pin_memory``) so that they
    copy to an accelerator without blocking, and pinning needs one. It is a transfer speed-up only, so on a
    machine without an accelerator it is left out here."""
    from llmcompressor.pipelines.cache import IntermediatesCache

    with mock.patch.object(IntermediatesCache, "pin_memory", lambda self, *args, **kwargs: None):
        yield


@pytest.mark.parametrize("name", MODELS)
def test_awq_calibrates_every_expert_as_llmcompressor_own_path_does(name, workdir, awq_on_cpu):
    """AWQ replays the parent module of the Linears it balances by parameter name (the experts container,
    for Mixtral and GPT-OSS): every module autocal generates declares the original's parameters. By default the
    result is LLM Compressor's own path's; with the opt-in ``propagate_routed=True`` too, within rounding."""
    from llmcompressor import oneshot

    source = original(name, workdir)
    held_out = tokens(HELD_OUT, 1, source.vocab)
    ours = load(source)
    coverage = alc.oneshot(ours, recipe=awq_recipe(), **oneshot_kwargs(source.vocab))
    assert coverage.ok, str(coverage)
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION_TOKENS}, "every expert Linear saw every token"
    assert all({"weight_scale", "weight_zero_point"} <= set(lc.qparams) for lc in coverage.linears)
    fast = load(source)  # the opt-in routed-only propagation passes
    alc.oneshot(fast, recipe=awq_recipe(), propagate_routed=True, **oneshot_kwargs(source.vocab))
    theirs = load(source)
    oneshot(model=theirs, recipe=awq_recipe(), **oneshot_kwargs(source.vocab))
    with torch.no_grad():
        logits, our_logits, fast_logits = (m(input_ids=held_out).logits for m in (theirs, ours, fast))
    assert rel(our_logits, logits) <= SIDE_BY_SIDE_TOL
    assert rel(fast_logits, logits) <= SIDE_BY_SIDE_TOL  # AWQ's result holds within rounding here
    assert_same_expert_scales(ours, theirs)


def both_paths(name: str, make_recipe, workdir: Path):
    """Fixture ``name`` through autocal's ``oneshot`` and through LLM Compressor's own, each with a recipe of its
    own from ``make_recipe``: ``(source, ours, our coverage, theirs)``."""
    from llmcompressor import oneshot

    source = original(name, workdir)
    ours = load(source)
    coverage = alc.oneshot(ours, recipe=make_recipe(), **oneshot_kwargs(source.vocab))
    theirs = load(source)
    oneshot(model=theirs, recipe=make_recipe(), **oneshot_kwargs(source.vocab))
    return source, ours, coverage, theirs


@pytest.mark.parametrize("name", MODELS)
def test_smoothquant_calibrates_every_expert_as_llmcompressor_own_path_does(name, workdir):
    """SmoothQuant (then W8A8): the smoothed norms and the logits equal LLM Compressor's own path's, and every
    expert Linear saw every token."""
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

    def smoothquant():
        return [SmoothQuantModifier(smoothing_strength=0.8),
                QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])]

    source, ours, coverage, theirs = both_paths(name, smoothquant, workdir)
    assert coverage.ok, str(coverage)
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION_TOKENS}, "every expert Linear saw every token"
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():
        assert rel(ours(input_ids=held_out).logits, theirs(input_ids=held_out).logits) <= QUANTIZED_ACTIVATIONS_TOL
    norms = {n: p for n, p in theirs.named_parameters() if "norm" in n}
    smoothed = [n for n, p in load(source).named_parameters() if n in norms and not torch.equal(p, norms[n])]
    assert smoothed, "SmoothQuant changed no norm: the comparison would not test it"
    for n, p in ours.named_parameters():
        if n in smoothed:
            torch.testing.assert_close(p, norms[n], rtol=1e-6, atol=0)


def pruning_recipe(method: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    modifier = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[method]
    return modifier(sparsity=0.5, targets=["Linear"], ignore=["lm_head"])


# DeepSeek-V3 is left out: LLM Compressor's SparseGPT fails on its attention on its own path too (a 4-D input
# to accumulate_hessian), and Wanda is tested on the same models as SparseGPT.
@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
@pytest.mark.parametrize("name", [m for m in MODELS if m != "deepseek_v3"])
def test_pruning_sees_every_expert_as_llmcompressor_own_path_does(name, method, workdir):
    """SparseGPT and Wanda prune from the inputs each Linear saw. A recipe that quantizes nothing leaves no
    quantization scheme, and the coverage check asked every expert Linear for one until now."""
    source, ours, coverage, theirs = both_paths(name, lambda: pruning_recipe(method), workdir)
    assert coverage.ok, str(coverage)
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION_TOKENS}, "every expert Linear saw every token"
    assert {lc.scheme for lc in coverage.linears} == {None}
    for lc in coverage.linears:
        weight = ours.get_submodule(lc.path).weight
        assert (weight == 0).float().mean() >= 0.5, f"{lc.path} was not pruned"
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():
        assert rel(ours(input_ids=held_out).logits, theirs(input_ids=held_out).logits) <= SIDE_BY_SIDE_TOL


def rotation_recipe(method: str):
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    rotation = QuIPModifier(transform_type="random-hadamard", ignore=["lm_head"]) if method == "quip" else \
        SpinQuantModifier(rotations=["R1", "R2"], transform_type="random-hadamard")
    return [rotation, recipe("w4a16")]  # GPTQ: calibrated on the rotated Linears' inputs


# SpinQuant leaves DeepSeek-V3 out: its default mappings name q_proj, k_proj and v_proj, which DeepSeek-V3's
# attention does not have, and LLM Compressor stops on its own path too.
@pytest.mark.parametrize("name,method", [(m, "quip") for m in MODELS]
                         + [(m, "spinquant") for m in MODELS if m != "deepseek_v3"])
def test_rotations_then_quantization_as_llmcompressor_own_path(name, method, workdir):
    """QuIP and SpinQuant rotate the weights (the expert Linears' among them), then GPTQ quantizes them: the
    logits and scales equal LLM Compressor's own path's, and every expert Linear saw every token."""
    source, ours, coverage, theirs = both_paths(name, lambda: rotation_recipe(method), workdir)
    assert coverage.ok, str(coverage)
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION_TOKENS}, "every expert Linear saw every token"
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():
        assert rel(ours(input_ids=held_out).logits, theirs(input_ids=held_out).logits) <= SIDE_BY_SIDE_TOL
    assert_same_expert_scales(ours, theirs)


def autoround_recipe():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.autoround import AutoRoundModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=GROUP_SIZE)
    return AutoRoundModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                             ignore=["lm_head"], iters=4)


@pytest.mark.parametrize("name", MODELS)
def test_autoround_calibrates_every_expert_as_well_as_llmcompressor_own_path(name, workdir):
    """AutoRound (W4A16, 4 tuning steps per block). Its Linear wrappers call the Linears' pre-hooks as
    ``hook(module, args)``, and its symmetric scales carry a sign; autocal's coverage took neither until now.

    AutoRound's sign-based tuning turns rounding differences into different results. autocal's calibration
    forward equals the original within rounding, as LLM Compressor's does, so the two paths are compared by
    their error against the unquantized model, not by their scales. Measured: equal on Qwen3-MoE, and errors
    within 0.005 of each other on the others.
    """
    source, ours, coverage, theirs = both_paths(name, autoround_recipe, workdir)
    assert coverage.ok, str(coverage)
    # AutoRound's tuning passes run while LLM Compressor's hooks are live, so they are counted too, in each
    # block and in each of its expert Linears alike
    assert all(lc.tokens == lc.block_tokens >= CALIBRATION_TOKENS for lc in coverage.linears)
    assert any((ours.get_submodule(lc.path).weight_scale < 0).any() for lc in coverage.linears), \
        "no negative scale: the test would not show that they are accepted"
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():  # AutoRound leaves the weights in bfloat16
        reference, ours_logits, their_logits = (m.float()(input_ids=held_out).logits
                                                 for m in (load(source), ours, theirs))
    assert abs(rel(ours_logits, reference) - rel(their_logits, reference)) <= 0.05


def test_coverage_flags_starved_and_broken_experts(workdir):
    source = original("qwen3_moe", workdir)
    model = load(source)
    alc.prepare(model)
    coverage = alc.oneshot(model, recipe=recipe("fp8"), calibrate_all_experts=False, check=False,
                           **oneshot_kwargs(source.vocab))
    starved = [lc for lc in coverage.linears if lc.tokens < CALIBRATION_TOKENS]
    assert starved and not coverage.ok
    assert any("of the 128 tokens its block received" in p for p in coverage.problems())
    with pytest.raises(alc.CoverageError):
        coverage.check()
    # with calibrate_all_experts=False the same routing-only counts are accepted
    report = alc.coverage(model)
    assert report.ok and all(lc.tokens is None for lc in report.linears)
    first, signed, zero = (lin.path for lin in alc.expert_linears(model)[:3])
    module = model.get_submodule(first)
    module.weight_scale.data.fill_(float("nan"))
    del module.input_scale
    model.get_submodule(signed).weight_scale.data.neg_()  # a negative scale is valid (AutoRound's carry a sign)
    model.get_submodule(zero).weight_scale.data.zero_()
    problems = alc.coverage(model).problems()
    assert any(first in p and "NaN/inf" in p for p in problems)
    assert any(first in p and "missing quantization parameters ['input_scale']" in p for p in problems)
    assert not any(signed in p for p in problems)
    assert any(zero in p and "a scale of 0 in ['weight_scale']" in p for p in problems)


def test_check_state_dict_rejects_bad_layouts():
    model = zoo.build_model("qwen3_moe")
    alc.prepare(model)
    layout = alc.checkpoint_layout(model)
    views = alc._revert(model, model.state_dict())  # unpacked experts are views of the packed weights
    with pytest.raises(alc.CheckpointLayoutError, match="share storage"):
        alc.check_state_dict(views, layout)
    good = alc.unshare(views)
    alc.check_state_dict(good, layout)
    packed = dict(good, **{"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(8, 64, 64)})
    with pytest.raises(alc.CheckpointLayoutError, match="packed or unknown tensor"):
        alc.check_state_dict(packed, layout)
    missing = {k: v for k, v in good.items() if not k.startswith("model.layers.1.mlp.experts.3.up_proj.")}
    with pytest.raises(alc.CheckpointLayoutError, match="no weight for expert Linear model.layers.1.mlp.experts.3"):
        alc.check_state_dict(missing, layout)
    extra = dict(good, **{"model.layers.0.mlp.experts.8.gate_proj.weight": torch.zeros(32, 64)})
    with pytest.raises(alc.CheckpointLayoutError, match="expert index 8 >= 8"):
        alc.check_state_dict(extra, layout)


def test_save_fails_before_writing(workdir, monkeypatch):
    model = zoo.build_model("qwen3_moe")
    alc.prepare(model)
    layout = alc.checkpoint_layout(model)
    layout.experts["model.layers.0.mlp.experts.0.w9"] = "model.layers.0.mlp.experts.0.w9"
    monkeypatch.setattr(alc.checkpoint, "checkpoint_layout", lambda m: layout)  # where save_pretrained looks it up
    target = workdir / "never-written"
    with pytest.raises(alc.CheckpointLayoutError, match="w9"):
        alc.save_pretrained(model, target, save_compressed=False)
    assert not target.exists() or not any(target.iterdir())


@pytest.mark.parametrize("save", ["autocal", "plain"])
def test_unpacked_views_saved_with_their_own_storage(save, workdir):
    """GPT-OSS interleaves gate and up columns: their views overlap in memory, and transformers' own save raised
    on them. After ``prepare`` the model's own ``save_pretrained`` gives them their own storage too."""
    model = zoo.build_model("gpt_oss")
    alc.prepare(model)
    target = workdir / f"gpt-oss-dense-{save}"
    if save == "plain":
        model.save_pretrained(target)
    else:
        alc.save_pretrained(model, target, save_compressed=False)
    state = alc.load_saved_state_dict(target)
    for lin in alc.expert_linears(model):
        module = model.get_submodule(lin.path)
        assert torch.equal(state[f"{lin.path}.weight"], module.weight)
        assert torch.equal(state[f"{lin.path}.bias"], module.bias)


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_plain_save_pretrained_after_prepare_writes_the_checked_checkpoint(name, workdir):
    """The habit of LLM Compressor users: ``prepare``, LLM Compressor's ``oneshot``, then the model's own
    ``model.save_pretrained(dir, save_compressed=True)``. ``oneshot`` wraps that method to compress first; ``prepare``
    made the method it wraps the checked save, so the layout is checked before anything is written. Until then
    GPT-OSS raised transformers' RuntimeError about shared tensors (its expert biases are views)."""
    from llmcompressor import oneshot

    source = original(name, workdir)
    model = load(source)
    alc.prepare(model)
    oneshot(model=model, recipe=recipe("w4a16"), **oneshot_kwargs(source.vocab))
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():
        quantized = model(input_ids=held_out).logits
    target = workdir / f"plain-{name}"
    model.save_pretrained(target, save_compressed=True)
    saved = alc.load_saved_state_dict(target)
    prefixes = {k.rsplit(".", 1)[0] for k in saved if ".experts." in k}
    assert prefixes == expected_expert_prefixes(source)
    assert all(f"{prefix}.weight_packed" in saved for prefix in prefixes)
    _, written = alc._state_dict_to_write(model, alc.checkpoint_layout(model))  # the model is compressed in memory
    alc.verify_saved(target, written)
    if name == "gpt_oss":
        return  # its checkpoints store experts packed: transformers has no loader for per-expert keys
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel(reloaded(input_ids=held_out).logits, quantized) <= RELOAD_TOL


def test_linearization_conflict_is_detected():
    model = zoo.build_model("qwen3_moe")
    alc.prepare(model)
    path, block = alc.calibration_blocks(model)[0]
    block.add_module("stale_experts", block.restore().experts)  # a packed container left inside a converted block
    with pytest.raises(alc.LinearizationConflict, match="stale_experts"):
        alc.check_linearization(model)


def test_blocks_autocal_leaves_are_handed_to_llmcompressor(workdir):
    """A block autocal cannot convert (here: its build raises, for the second layer only) is left to LLM
    Compressor's own linearization by ``prepare`` (``strict=False``, the default there), with a warning naming it;
    ``oneshot`` then calibrates autocal's block and LLM Compressor's linearized one: every expert Linear of both
    layers gets its FP8 input scale, and each layer's scales are those of the path that calibrated it alone."""
    from llmcompressor import oneshot

    from autocal import errors
    from autocal.api import Converter

    source = original("qwen3_moe", workdir)
    left = "model.layers.1.mlp"
    build = Converter.build

    def refuse_second_layer(self, block, config, call=None, twin=None):
        if block is refused:
            raise errors.AutocalError(errors.UNSUPPORTED_DISPATCH, "simulated: no rule converts this block")
        return build(self, block, config, call, twin)

    model = load(source)
    refused = model.get_submodule(left)
    with mock.patch.object(Converter, "build", refuse_second_layer), \
            pytest.warns(UserWarning, match=rf"LLM Compressor's own MoE linearization handles .*{left}"):
        preparation = alc.prepare(model)
    assert preparation.blocks == ["model.layers.0.mlp"]
    assert preparation.linearized_by_llmcompressor == [f"{left}.experts"]
    assert [u.path for u in autocal.unconverted(model)] == [left]
    alc.oneshot(model, recipe=recipe("fp8"), **oneshot_kwargs(source.vocab))

    own = load(source)  # LLM Compressor's own path on the whole model: layer 1's reference
    oneshot(model=own, recipe=recipe("fp8"), **oneshot_kwargs(source.vocab))
    by_autocal = {lin.path for lin in alc.expert_linears(model)}
    assert len(by_autocal) == 8 * 3 and all(p.startswith("model.layers.0.") for p in by_autocal)
    handed = [(n, m) for n, m in model.named_modules() if n.startswith(f"{left}.experts.")
              and isinstance(m, torch.nn.Linear)]
    assert len(handed) == 8 * 3, "LLM Compressor linearized the block autocal left: 8 experts x 3 Linears"
    for path, linear in handed:
        torch.testing.assert_close(linear.input_scale, own.get_submodule(path).input_scale, rtol=1e-6, atol=0)
        torch.testing.assert_close(linear.weight_scale, own.get_submodule(path).weight_scale, rtol=1e-6, atol=0)
    for path in by_autocal:
        assert torch.isfinite(model.get_submodule(path).input_scale).all(), path


def test_gathered_weights_are_calibrated_checked_and_saved_per_expert(workdir):
    """Remote-code style blocks that gather packed ``[E, out, in]`` weights per token (gpt-fast's pattern, the
    ``gathered`` rule): every expert's Linear of each of the three gathered weights is listed, calibrated on every
    token and saved as its own tensors. ``expert_linears`` listed the first weight's Linears only, and
    ``save_pretrained`` refused the checkpoint (the second and third weights' Linears were 'not one of the expert
    Linears'). Their gates (nn.Linear) stay unquantized: the recipe given to LLM Compressor was a copy keeping the
    ignore list it had resolved before autocal added the gates."""
    from autocal.testing.patterns import GatheredMoE

    source = original("qwen3_moe", workdir)
    model = load(source)
    hidden = model.config.hidden_size
    torch.manual_seed(0)
    for layer in model.model.layers:
        layer.mlp = GatheredMoE(experts=4, hidden=hidden, width=2 * hidden)
    held_out = tokens(HELD_OUT, 1, source.vocab)
    with torch.no_grad():
        before = model(input_ids=held_out).logits
    alc.prepare(model)
    coverage = alc.oneshot(model, recipe=recipe("fp8"), **oneshot_kwargs(source.vocab))
    layers = len(model.model.layers)
    assert len(coverage.linears) == layers * 4 * 3, str(coverage)
    assert {lc.tokens for lc in coverage.linears} == {CALIBRATION[0] * CALIBRATION[1]}
    gates = [layer.mlp.gate for layer in model.model.layers]
    assert not any(hasattr(gate, "weight_scale") for gate in gates), "the detected gates stay unquantized"
    with torch.no_grad():
        after = model(input_ids=held_out).logits
    assert rel(after, before) <= MODEL_TOL["fp8"]
    saved = workdir / "gathered-fp8"
    alc.save_pretrained(model, saved)
    keys = alc.load_saved_state_dict(saved)
    for weight in ("w1", "w2", "w3"):
        assert {f"model.layers.0.mlp.cond_ffn.{weight}_experts.{e}.weight" for e in range(4)} <= set(keys), weight


def _fits_a_decoder_layer(name: str) -> bool:
    """Does corpus block ``name`` stand in for a decoder layer's MLP: one ``[batch, seq, hidden]`` tensor in, one
    of that shape out (not a tuple, no second input)?"""
    from autocal.testing.corpus import ENTRIES

    entry = ENTRIES[name]
    if entry.seq_first or entry.blocks != ("",):
        return False
    args, kwargs = entry.inputs(batch=1, seq=3)
    if len(args) + len(kwargs) != 1:
        return False
    with torch.no_grad():
        out = entry.build()(*args, **kwargs)
    return isinstance(out, torch.Tensor) and out.shape == (args or tuple(kwargs.values()))[0].shape


def _corpus_blocks() -> list[str]:
    from autocal.testing.corpus import ENTRIES

    return [name for name in ENTRIES if _fits_a_decoder_layer(name)]


@pytest.fixture(scope="module")
def hidden16_model(workdir) -> Path:
    """A tiny Qwen3-MoE checkpoint of the corpus' hidden size, whose MLPs the test replaces by corpus blocks."""
    from transformers import Qwen3MoeConfig

    from autocal.testing.corpus import HIDDEN

    path = workdir / "qwen3-moe-hidden16"
    if not path.exists():
        config = Qwen3MoeConfig(vocab_size=64, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=8,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                num_experts=4, num_experts_per_tok=2)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        word_tokenizer(64).save_pretrained(path)
    return path


@pytest.mark.parametrize("name", _corpus_blocks())
def test_corpus_blocks_go_through_oneshot_and_save(name, hidden16_model, workdir):
    """Every corpus block that fits a decoder layer's MLP (MoE code written outside transformers), in a model
    loaded from disk: after ``prepare``, with calibration off, the model's output is bitwise the original's; ``oneshot`` (static FP8) gives
    every expert Linear of every block its scales on every calibration token (``check``), with quantization
    disabled the model is still the original (within rounding), and ``save_pretrained`` writes the per-expert checkpoint and reloads it
    bitwise. The layout check refused experts holding a tensor beside their Linears (gating_multiplier) and
    experts named in a ModuleDict (switch_top1)."""
    from compressed_tensors.quantization import disable_quantization

    from autocal.testing.corpus import ENTRIES
    from autocal.verify import compare_outputs

    model = AutoModelForCausalLM.from_pretrained(hidden16_model, dtype=torch.float32).eval()
    for layer in model.model.layers:
        layer.mlp = ENTRIES[name].build()
    held_out = tokens((1, 12), 1, 64)
    with torch.no_grad():
        before = model(input_ids=held_out).logits
    alc.prepare(model)
    alc.set_calibration(model, False)
    with torch.no_grad():
        assert torch.equal(model(input_ids=held_out).logits, before)
    coverage = alc.oneshot(model, recipe=recipe("fp8"), dataset=calibration_dataset(64),
                           num_calibration_samples=CALIBRATION[0], max_seq_length=CALIBRATION[1],
                           shuffle_calibration_samples=False)
    assert coverage.linears and {lc.tokens for lc in coverage.linears} == {CALIBRATION[0] * CALIBRATION[1]}
    model.apply(disable_quantization)  # Linears no longer plain: autocal computes what the block's ops did
    with torch.no_grad():
        assert compare_outputs(before, model(input_ids=held_out).logits)[2], "within rounding"
    alc.save_pretrained(model, workdir / f"corpus-{name}")


@pytest.mark.parametrize("name,gates", [
    ("qwen2_moe", ["model.layers.0.mlp.gate", "model.layers.0.mlp.shared_expert_gate"]),
    ("jamba", ["model.layers.0.feed_forward.router"]),
])
def test_gates_come_from_detection(name, gates):
    model = zoo.build_model(name)
    autocal.convert(model)
    assert alc.gate_modules(model)[: len(gates)] == gates


def test_oneshot_needs_a_model_loaded_from_disk():
    model = zoo.build_model("qwen3_moe")
    with pytest.raises(ValueError, match="name_or_path"):
        alc.oneshot(model, recipe=recipe("fp8"))


def test_core_never_imports_llmcompressor():
    code = ("import sys, autocal, autocal.integrations.llmcompressor\n"
            "from autocal.testing import zoo\n"
            "autocal.convert(zoo.build_model('qwen3_moe'))\n"
            "assert not any(m.split('.')[0] in ('llmcompressor', 'compressed_tensors') for m in sys.modules), "
            "sorted(m for m in sys.modules if 'compress' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


class _MLPRouterMoE(torch.nn.Module):
    """A router that is an MLP (Linear, GELU, Linear), softmax over the top-k logits, a where loop."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.GELU(),
                                          torch.nn.Linear(2 * HIDDEN, EXPERTS))
        self.experts = torch.nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        logits, ids = self.router(t).topk(TOP_K, dim=-1)
        return _loop_experts(t, logits.softmax(-1), ids, self.experts).view_as(x)


class _DownOnlyExpert(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.down_proj = torch.nn.Linear(INTER, HIDDEN, bias=False)

    def forward(self, x, up):
        return self.down_proj(torch.nn.functional.silu(self.gate_proj(x)) * up)


class _SharedUpMoE(torch.nn.Module):
    """One up projection every expert shares (computed once on the block), each expert's own gate and down."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.up_proj = torch.nn.Linear(HIDDEN, INTER, bias=False)
        self.experts = torch.nn.ModuleList(_DownOnlyExpert() for _ in range(EXPERTS))

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        up = self.up_proj(t)
        weights, ids = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out[token] += weights[token, slot, None] * expert(t[token], up[token])
        return out.view_as(x)


def test_gates_are_whole_routers_and_scalar_shared_gates_only():
    """``gate_modules`` (what ``oneshot`` leaves unquantized) holds every Linear of an MLP router, not only the
    one computing the logits; a Linear the experts share that is no gate (an up projection wider than one output
    per expert) is quantized like any other."""
    mlp = autocal.convert(torch.nn.Sequential(init_normal(_MLPRouterMoE(), 0)))
    assert alc.gate_modules(mlp) == ["0.router", "0.router.0", "0.router.2"]
    shared = autocal.convert(torch.nn.Sequential(init_normal(_SharedUpMoE(), 0)))
    assert shared[0].structure.shared_modules == ["up_proj"]
    assert alc.gate_modules(shared) == ["0.gate"]


def test_linears_of_their_own_are_batched_as_llmcompressor_batches_them_on_each_device():
    """The Linears in no group go to ``GPTQModifier``'s own path in batches of one shape under ``BATCH_BYTES``:
    on a CPU under 16, which LLM Compressor factorizes one Hessian at a time (as its "auto" quantizes there: one
    by one), on a GPU as many as ``BATCH_BYTES`` holds, which it factorizes batched (as its own "auto" batches
    there; benchmarks/gptq_batches.py: 0.87x the time of batches of 15 for DeepSeek-V3's down projections)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    from autocal.integrations.llmcompressor import gptq

    modifier = recipe("w4a16", gptq.SharedHessianGPTQModifier)
    modifier.batched_quantization = "auto"
    linears = [torch.nn.Linear(64, 32, bias=False) for _ in range(40)]
    on_gpu = set(map(id, linears[:20]))
    batches = []
    with mock.patch.object(GPTQModifier, "compress_module_list",
                           lambda self, modules: batches.append((self.batched_quantization, len(modules)))), \
            mock.patch.object(gptq, "_on_cuda", lambda module: id(module) in on_gpu):
        modifier.compress_module_list(linears)
    assert sorted(batches) == sorted([(15, 20), (gptq.BATCH_BYTES // (3 * (64 * 64 + 32 * 64) * 4), 20)])
    assert modifier.batched_quantization == "auto"
