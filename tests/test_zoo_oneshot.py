"""LLM Compressor's ``oneshot`` through autocal on every MoE architecture of the installed transformers.

Each tiny zoo model is saved with a word tokenizer and loaded back as users load it (``from_pretrained`` of its
own class); ``autocal_lc.oneshot`` then quantizes it to static FP8 (every expert Linear observed on every
calibration token: it raises ``CoverageError`` otherwise), the checked save writes it and reads every tensor
back, and the quantized model's logits stay near the original's. ``tests/test_llmcompressor.py`` compares
four architectures with LLM Compressor's own path in depth; this file runs the whole zoo through the same steps.

Runs where LLM Compressor is installed (transformers 5.17.0).
"""

from __future__ import annotations

import pytest

pytest.importorskip("llmcompressor")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from llmcompressor.modifiers.quantization import QuantizationModifier  # noqa: E402
from test_llmcompressor import MODEL_TOL, rel, word_tokenizer  # noqa: E402

from autocal.integrations import llmcompressor as alc  # noqa: E402
from autocal.testing import zoo  # noqa: E402

CALIBRATION = (2, 8)  # sequences, tokens
INCUMBENT_FAILS_TOO = "LLM Compressor's own path (moe_calibrate_all_experts) fails here too: "
KNOWN_FAILURES = {
    "doge": "transformers 5.17: the model's own forward fails (a tuple passed to dropout)",
    "vitpose_backbone": "a vision backbone: no vocabulary, no text to calibrate on",
    "nllb-moe": "an encoder-decoder: oneshot's text samples give it no decoder inputs",
    "qwen3_omni_moe": "LLM Compressor asks for the thinker submodule (oneshot(model.thinker, ...))",
    "minimax_m3_vl": INCUMBENT_FAILS_TOO + "its sequential pipeline cannot trace the model",
    "switch_transformers": INCUMBENT_FAILS_TOO + "its sequential pipeline cannot trace the model",
    "inkling_mm_model": INCUMBENT_FAILS_TOO + "transformers cannot revert its conversions of the compressed keys",
    "step3p7": INCUMBENT_FAILS_TOO + "transformers cannot revert its conversions of the compressed keys",
    "diffusion_gemma": INCUMBENT_FAILS_TOO.replace("fails", "ends with zero weight scales") +
                       "its encoder and decoder share layers, compressed twice",
    "gemma4": INCUMBENT_FAILS_TOO.replace("fails", "gives NaN logits") + "the quantized per_layer_model_projection "
              "(no expert) reads memory nothing wrote (NaN where fresh memory is filled, as here)",
}
TEXT_ONLY = {"ernie4_5_vl_moe": "vision_moe"}


@pytest.fixture(autouse=True)
def uninitialized_memory_is_nan():
    """Deterministic algorithms fill memory from ``torch.empty`` with NaN: a value nobody wrote shows in the logits
    instead of passing as whatever the allocator left there (and the result no longer depends on what ran before
    in the process: AutoRound turns the mode on for good)."""
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(before[0], warn_only=before[1])  # experts that text calibration data cannot reach, by design


def _params():
    for name in zoo.moe_architectures():
        marks = [pytest.mark.xfail(reason=KNOWN_FAILURES[name], strict=True)] if name in KNOWN_FAILURES else []
        yield pytest.param(name, marks=marks, id=name)


def _saved_and_loaded(name: str, path) -> tuple[torch.nn.Module, int]:
    built = zoo.build_model(name)
    vocab = built.config.get_text_config().vocab_size
    built.save_pretrained(path)
    word_tokenizer(vocab).save_pretrained(path)
    return type(built).from_pretrained(path, dtype=torch.float32).eval(), vocab


def _oneshot(model: torch.nn.Module, vocab: int):
    ids = torch.randint(2, vocab, CALIBRATION, generator=torch.Generator().manual_seed(0))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = QuantizationModifier(targets="Linear", scheme="FP8", ignore=["lm_head"])
    return alc.oneshot(model, recipe=recipe, dataset=dataset, processor=word_tokenizer(vocab),
                       num_calibration_samples=CALIBRATION[0], max_seq_length=CALIBRATION[1],
                       shuffle_calibration_samples=False)


@pytest.mark.parametrize("name", _params())
def test_oneshot_and_checked_save(name, tmp_path):
    model, vocab = _saved_and_loaded(name, tmp_path / "original")
    held_out = torch.randint(2, vocab, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(input_ids=held_out).logits
    if name in TEXT_ONLY:
        with pytest.raises(alc.CoverageError) as raised:
            _oneshot(model, vocab)
        problems = [line for line in str(raised.value).splitlines() if line.strip().startswith("- ")]
        assert problems and all(TEXT_ONLY[name] in line for line in problems), problems
        return
    _oneshot(model, vocab)
    assert all(hasattr(model.get_submodule(linear.path), "input_scale") for linear in alc.expert_linears(model))
    with torch.no_grad():
        assert rel(model(input_ids=held_out).logits, reference) <= MODEL_TOL["fp8"]
    saved = alc.save_pretrained(model, tmp_path / "quantized")  # verify=True: every tensor read back
    assert saved.expert_keys > 0
