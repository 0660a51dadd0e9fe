"""Experts split over parallel lists, one per projection (``autocal/detect/parallel.py``, the rule of last resort).

Expert ``e`` is ``w1[e]``, ``w3[e]`` and ``w2[e]`` (reference inference code), or ``A[e]`` and ``B[e]`` (LoRA-style
experts). Converted, the block's output is the original's (bitwise with calibration off), every Linear of every
expert sees every token with calibration on, and ``explain`` names the lists. Lists that the recording does not show
indexed together stay several expert sets, refused as before.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import autocal
from autocal.errors import AutocalError
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import PerProjectionListsMoE
from autocal.testing.toy_moe import main_output
from autocal.verify import compare_outputs


class PerProjectionMoE(PerProjectionListsMoE):
    """The corpus block (one ``ModuleList`` per projection, a loop over experts gathering each one's rows), its
    sizes given and its lists declared in ``order``."""

    def __init__(self, hidden: int = 16, inner: int = 32, experts: int = 4, k: int = 2,
                 order: tuple[str, ...] = ("w1", "w3", "w2")) -> None:
        nn.Module.__init__(self)
        self.k = k
        self.gate = nn.Linear(hidden, experts, bias=False)
        shapes = {"w1": (hidden, inner), "w3": (hidden, inner), "w2": (inner, hidden)}
        for name in order:
            self.add_module(name, nn.ModuleList(nn.Linear(*shapes[name], bias=False) for _ in range(experts)))


class GatheredTwiceMoE(PerProjectionMoE):
    """The rows gathered once per projection (``w1[e](x[t])``, ``w3[e](x[t])``): equal rows, not one tensor."""

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.gate(flat).softmax(-1).topk(self.k, -1)
        out = torch.zeros_like(flat)
        for e in range(len(self.w1)):
            token, slot = torch.where(index == e)
            out[token] += weights[token, slot, None] * self.w2[e](F.silu(self.w1[e](flat[token])) * self.w3[e](
                flat[token]))
        return out.view_as(x)


class LowRankExpertsMoE(nn.Module):
    """LoRA-style experts: ``A[e]`` down to rank ``rank``, ``B[e]`` back up, in two lists."""

    def __init__(self, hidden: int = 16, rank: int = 4, experts: int = 5, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(hidden, rank, bias=False) for _ in range(experts))
        self.lora_B = nn.ModuleList(nn.Linear(rank, hidden, bias=False) for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        weights, index = self.router(flat).softmax(-1).topk(self.k, -1)
        out = torch.zeros_like(flat)
        for e in range(len(self.lora_A)):
            token, slot = torch.where(index == e)
            out[token] += weights[token, slot, None] * self.lora_B[e](self.lora_A[e](flat[token]))
        return flat.new_zeros(()) + out.view_as(x)


class ProjectedSumMoE(PerProjectionMoE):
    """Experts in one list, and beside it a list of as many Linears each run on the sum of every expert's output:
    no part of any expert (a second set of modules, not parallel to the experts)."""

    def __init__(self) -> None:
        super().__init__(order=("w1", "w3", "w2"))
        self.post = nn.ModuleList(nn.Linear(16, 16, bias=False) for _ in range(4))

    def forward(self, x):
        out = super().forward(x)
        return sum(post(out) for post in self.post)


def _x(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, 16, generator=torch.Generator().manual_seed(seed))


def _seeded(make):
    torch.manual_seed(0)
    return make().eval()


BLOCKS = {
    "per_projection": PerProjectionMoE,
    "down_declared_first": lambda: PerProjectionMoE(order=("w2", "w3", "w1")),
    "top_k_of_all": lambda: PerProjectionMoE(k=4),
    "gathered_twice": GatheredTwiceMoE,
    "lora": LowRankExpertsMoE,
}


@pytest.mark.parametrize("name", list(BLOCKS))
@pytest.mark.parametrize("shape", [(1, 1), (2, 5), (1, 9)])
def test_every_linear_of_every_expert_sees_every_token_and_the_output_is_the_originals(name, shape):
    original = _seeded(BLOCKS[name])
    model = autocal.convert(nn.Sequential(_seeded(BLOCKS[name])))
    module, x = model[0], _x(*shape)
    tokens = x.numel() // x.shape[-1]
    assert module.structure.level == "last-resort"
    with torch.no_grad():
        expected = main_output(original(x))
        module.calibrate_all_experts = False
        assert torch.equal(main_output(module(x)), expected)
        module.calibrate_all_experts = True
        linears = expert_linears(model)
        with count_rows(linears) as rows:
            on = main_output(module(x))
    assert expected.abs().max() > 0
    assert compare_outputs(expected, on)[2]
    router = module.structure.router.module_path
    every = [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and n != router]
    assert sorted(linears) == sorted(f"0.{n}" for n in every)
    assert rows == {name: tokens for name in linears}, rows


def test_explain_names_the_lists_parallel_to_the_experts():
    report = autocal.explain(nn.Sequential(_seeded(PerProjectionMoE)))
    text = str(report)
    assert report.successful(), text
    assert "last-resort" in text and "parallel lists=w3, w2" in text


def test_the_checkpoint_keys_stay_the_originals():
    original = _seeded(PerProjectionMoE)
    model = autocal.convert(nn.Sequential(_seeded(PerProjectionMoE)))
    keys = list(model.state_dict())
    assert keys == [f"0.{k}" for k in original.state_dict()]
    assert "0.w1.0.weight" in keys and "0.w2.3.weight" in keys


def test_a_same_length_list_run_on_every_experts_sum_is_no_part_of_an_expert():
    with pytest.raises(AutocalError) as caught:
        autocal.convert(nn.Sequential(_seeded(ProjectedSumMoE)))
    assert "several expert sets" in str(caught.value)
