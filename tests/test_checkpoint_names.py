"""``prepare`` on every MoE architecture of the installed transformers, and the expert keys it will save.

For each tiny zoo model, the original's own ``save_pretrained`` writes the reference checkpoint. After
``prepare``, the checkpoint autocal will write (``checkpoint_layout``, what the checked save verifies) must
hold every expert weight the original stored as a tensor of its own under the original's key, with the same
bytes; where a model's conversion cannot be followed, ``prepare`` must say so in a warning naming the key.
Experts stored packed by the original are unpacked under autocal's names (as LLM Compressor's own
calibration modules name them) and are not compared here.

Runs where LLM Compressor is installed (transformers 5.17.0, the version its release supports).
"""

from __future__ import annotations

import warnings

import pytest

pytest.importorskip("llmcompressor")

import torch  # noqa: E402

from autocal.integrations import llmcompressor as alc  # noqa: E402
from autocal.integrations.llmcompressor import naming  # noqa: E402
from autocal.testing import zoo  # noqa: E402


def _original_expert_weights(model: torch.nn.Module, saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original checkpoint's tensors that are one expert Linear's weight of the prepared model (by value)."""
    weights = [model.get_submodule(linear.path).weight.detach() for linear in alc.expert_linears(model)]
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for weight in weights:
        by_shape.setdefault(tuple(weight.shape), []).append(weight)
    return {key: tensor for key, tensor in saved.items()
            if any(torch.equal(tensor, w) for w in by_shape.get(tuple(tensor.shape), []))}


@pytest.mark.parametrize("name", zoo.moe_architectures())
def test_prepare_saves_experts_under_the_original_checkpoints_keys(name, tmp_path):
    model = zoo.build_model(name)
    model.save_pretrained(tmp_path / "original")
    original = alc.load_saved_state_dict(tmp_path / "original")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alc.prepare(model)
    warned = " ".join(str(w.message) for w in caught if "cannot rename these experts" in str(w.message))
    _, written = alc._state_dict_to_write(model, alc.checkpoint_layout(model))
    kept = _original_expert_weights(model, original)
    for key in kept.keys() & written.keys():
        assert torch.equal(written[key].to(kept[key].dtype), kept[key]), key
    moved = sorted(kept.keys() - written.keys())
    assert not moved or any(key in warned for key in moved), f"not saved under the original's keys: {moved[:3]}"


@pytest.mark.parametrize("name", ["mixtral", "minimax"])
def test_names_learnt_from_the_first_experts_are_those_of_all(name, monkeypatch):
    """``checkpoint_names`` reverts only the first experts of a packed container (its conversion copies
    what it splits); reverting every expert gives the same names."""
    model = zoo.build_model(name)
    alc.prepare(model)
    sampled = naming.checkpoint_names(model)
    monkeypatch.setattr(naming, "SAMPLED_EXPERTS", 10**9)
    assert naming.checkpoint_names(model) == sampled != {}
