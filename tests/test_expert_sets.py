"""Blocks with several expert sets, each list of experts with a router of its own (``detect/expert_sets.py``).

Each expert must see, with calibration on, every token that reaches its set's
routing decision, and no other: the tokens of its modality (``token_type_ids``,
an ``is_image`` mask, a position split). A set whose rows a routing decision
picks, or a token reaching no set, is refused rather than taken as a smaller
calibration target.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import autocal
from autocal.detect.facts import Facts
from autocal.detect.container import detect_recorded_block
from autocal.errors import AutocalError
from autocal.synthesize.container import RecordedBlockMoE
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.patterns import PATTERNS, SwiGLU
from autocal.trace.inputs import BlockCall
from autocal.verify import verify


class KindSetsMoE(nn.Module):
    """One expert set per token kind (``kinds`` in ``0 .. sets - 1``: ``router{s}``, ``experts{s}``), as remote code
    writes a text and an image set; a kind with no set is routed nowhere."""

    def __init__(self, sets: int = 2, experts: int = 3, k: int = 2) -> None:
        super().__init__()
        self.k, self.sets = k, sets
        for s in range(sets):
            self.add_module(f"router{s}", nn.Linear(16, experts, bias=False))
            self.add_module(f"experts{s}", nn.ModuleList(SwiGLU() for _ in range(experts)))

    def forward(self, x, kinds):
        flat, kinds = x.reshape(-1, x.shape[-1]), kinds.reshape(-1)
        out = torch.zeros_like(flat)
        for s in range(self.sets):
            rows = (kinds == s).nonzero()[:, 0]
            part = flat[rows]
            weights, index = getattr(self, f"router{s}")(part).softmax(-1).topk(self.k, dim=-1)
            for e, expert in enumerate(getattr(self, f"experts{s}")):
                token, slot = torch.where(index == e)
                out[rows[token]] += weights[token, slot, None] * expert(part[token])
        return out.view_as(x)


class ScoreChosenSetsMoE(KindSetsMoE):
    """A two-level gate written like the modality blocks: the *set* is chosen by a score (an outer argmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.outer = nn.Linear(16, 2, bias=False)

    def forward(self, x):
        return super().forward(x, self.outer(x).argmax(-1))


def _x(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(seed))


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


def test_each_expert_sees_every_token_of_its_set_and_no_other():
    block = _seeded(KindSetsMoE)
    kinds = torch.tensor([[0, 1, 1, 0, 1], [1, 1, 0, 1, 1]])
    module = autocal.synthesize(block, example_inputs={"x": _x(2, 5), "kinds": kinds})
    x, other = _x(3, 4, seed=1), torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [0, 1, 0, 0]])
    linears = expert_linears(module)
    with torch.no_grad(), count_rows(linears) as rows:
        out = module(x, other)
    assert torch.equal(out, block(x, other))
    text, image = int((other == 0).sum()), int((other == 1).sum())
    assert {n for p, n in rows.items() if p.startswith("experts0.")} == {text}
    assert {n for p, n in rows.items() if p.startswith("experts1.")} == {image}
    assert module.tokens_due((x, other), {}) == [text] * 3 + [image] * 3
    assert list(module.state_dict()) == list(block.state_dict()), "checkpoint names are the block's own"


def test_verify_counts_each_expert_against_its_own_set(monkeypatch):
    """The generalised coverage check is no formality: experts left short of their set's tokens fail it."""
    block = _seeded(KindSetsMoE)
    kinds = torch.tensor([[0, 1, 1, 0, 1]])
    module = autocal.synthesize(block, example_inputs={"x": _x(1, 5), "kinds": kinds})
    assert verify(block, module, (_x(1, 5, seed=2),), {"kinds": kinds}).experts_covered == 6
    monkeypatch.setattr(RecordedBlockMoE, "run_unrouted", lambda self, bound, seen: None)
    with pytest.raises(AutocalError, match="reaching their expert set"):
        verify(block, module, (_x(1, 5, seed=2),), {"kinds": kinds})


def test_a_set_chosen_by_scores_is_no_expert_set():
    """The outer argmax of a two-level gate picks each set's rows: taking the sets' rows as the target would hide
    that an expert never sees the tokens routed to the other set. The recorded-block rule refuses, and so
    ``synthesize`` does."""
    block = _seeded(ScoreChosenSetsMoE)
    verdict = detect_recorded_block(Facts(block, BlockCall((_x(2, 8),), {})))
    assert not verdict and "picked by a routing decision (argmax)" in str(verdict)
    with pytest.raises(AutocalError):
        autocal.synthesize(block, example_inputs={"x": _x(2, 8)})


def test_a_token_reaching_no_set_is_refused_at_detection_and_in_calibration():
    block = _seeded(lambda: KindSetsMoE(sets=2))
    with_none = torch.tensor([[0, 1, 2, 0, 1]])  # kind 2 has no set: that token is routed nowhere
    verdict = detect_recorded_block(Facts(block, BlockCall((_x(1, 5),), {"kinds": with_none})))
    assert not verdict and "do not take every token" in str(verdict)
    module = autocal.synthesize(block, example_inputs={"x": _x(1, 5), "kinds": torch.tensor([[0, 1, 1, 0, 1]])})
    with torch.no_grad(), pytest.raises(AutocalError, match="reached no set"):
        module(_x(1, 5, seed=3), with_none)


def test_synthesize_alone_says_to_pass_example_inputs():
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(_seeded(KindSetsMoE))
    assert caught.value.kind == "trace-failed"
    assert "autocal.synthesize(block, example_inputs=" in str(caught.value) and "kinds" in str(caught.value)


def test_example_inputs_must_fit_the_forward():
    with pytest.raises(AutocalError) as caught:
        autocal.synthesize(_seeded(KindSetsMoE), example_inputs={"hidden": _x(1, 5)})
    assert caught.value.kind == "bad-input"


def _reach(name: str, inputs: tuple) -> dict[str, int]:
    """The tokens reaching each set of a catalogue pattern, from its inputs (by the set's path)."""
    x = inputs[0]
    if name == "modality_mask":
        image = int(inputs[1].sum())
        return {"text_experts": x.shape[0] * x.shape[1] - image, "vision_experts": image}
    vision = x.shape[0] * min(x.shape[1], 3)  # PrefixSplitMoE's prefix: 3 positions
    return {"vision_experts": vision, "text_experts": x.shape[0] * x.shape[1] - vision}


@pytest.mark.parametrize("name", ["modality_mask", "prefix_split"])
def test_catalogue_expert_sets_on_other_inputs(name):
    """The catalogue's expert-set patterns, converted on their example and run on other inputs (one token too)."""
    pattern = PATTERNS[name]
    block = pattern.make()
    names = list(inspect.signature(block.forward).parameters)
    module = autocal.synthesize(block, example_inputs=dict(zip(names, pattern.example())))
    for seed, cut in ((1, None), (2, 1)):
        inputs = tuple(t[:, :cut] if cut else t for t in pattern.example(seed))
        linears = expert_linears(module)
        with torch.no_grad():
            expected = block(*inputs)
            module.calibrate_all_experts = False
            off = module(*inputs)
            module.calibrate_all_experts = True
            with count_rows(linears) as rows:
                on = module(*inputs)
        assert torch.equal(off, expected) and torch.allclose(on, expected, rtol=1e-5, atol=1e-6)
        assert expected.abs().max() > 0
        reach = _reach(name, inputs)
        assert rows == {path: reach[path.split(".")[0]] for path in linears}
