"""The block's own expert weights contracted inline with rows it copies tokens into (autocal/detect/inline.py,
autocal/trace/rows.py).

With calibration off the output is the original's bitwise; on, within rounding, every expert Linear given each
token once, the tokens a capacity drops still dropped. Rows that are not copies of token rows, and ops between the
contractions that mix rows, are refused saying so.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import autocal
from autocal.errors import AutocalError
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import ENTRIES, HIDDEN
from autocal.trace.rows import row_tokens
from autocal.verify import compare_outputs

_INLINE = ("index_add_capacity", "ranked_buffer")


def _calibrated(block, x):
    """``(original output, output with calibration off, on, rows each expert Linear saw with calibration on)``."""
    module = autocal.synthesize(block)
    with torch.no_grad():
        expected = block(x)
        module.calibrate_all_experts = False
        off = module(x)
        module.calibrate_all_experts = True
        linears = expert_linears(module)
        with count_rows(linears) as rows:
            on = module(x)
    return expected, off, on, rows


@pytest.mark.parametrize("name", _INLINE)
@settings(max_examples=6, deadline=None)
@given(batch=st.integers(1, 3), seq=st.integers(1, 17), seed=st.integers(0, 2**16))
@example(batch=2, seq=17, seed=0)
def test_every_expert_sees_every_token_and_the_output_stays(name, batch, seq, seed):
    block = ENTRIES[name].build(seed % 5)
    x = torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))
    expected, off, on, rows = _calibrated(block, x)
    assert torch.equal(off, expected)
    assert compare_outputs(expected, on)[2]
    assert rows and set(rows.values()) == {batch * seq}


def test_dropped_tokens_stay_dropped_in_bfloat16():
    """17 tokens on 6 experts of capacity 6: some choices are dropped; bfloat16 rows are matched by their bits."""
    block = ENTRIES["index_add_capacity"].build(1).to(torch.bfloat16)
    x = torch.randn(1, 17, HIDDEN, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        logits = block.wg(x.reshape(-1, HIDDEN))
    counts = torch.bincount(logits.topk(2, dim=-1).indices.reshape(-1), minlength=6)
    assert counts.max() > 6, "the input must make the capacity drop a choice"
    expected, off, on, rows = _calibrated(block, x)
    assert torch.equal(off, expected)
    assert compare_outputs(expected, on)[2]
    assert set(rows.values()) == {17}


class _ScaledRowsMoE(torch.nn.Module):
    """The Llama 4 reference written inline: sigmoid of the top-k scores, every token repeated for every expert and
    scaled by its score (zero where not chosen), bmm with the block's own weights, summed over the experts."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Parameter(torch.randn(HIDDEN, 4) / 4)
        self.w1 = torch.nn.Parameter(torch.randn(4, HIDDEN, 8) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(4, 8, HIDDEN) / 3)

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        top, chosen = torch.topk(t @ self.router, 2, dim=-1)
        scores = torch.sigmoid(torch.full((t.shape[0], 4), float("-inf")).scatter(1, chosen, top))
        rows = (t.repeat(4, 1) * scores.T.reshape(-1, 1)).view(4, -1, HIDDEN)
        return torch.bmm(F.silu(torch.bmm(rows, self.w1)), self.w2).sum(0).view_as(x)


class _MixedRowsMoE(torch.nn.Module):
    """Rows copied into ``[E, T, H]`` at (expert, rank), but each expert's hidden rows centred on their mean between
    the two contractions: a row's output depends on the other rows of its expert."""

    def __init__(self):
        super().__init__()
        self.router = torch.nn.Linear(HIDDEN, 4, bias=False)
        self.w1 = torch.nn.Parameter(torch.randn(4, HIDDEN, 8) / 4)
        self.w2 = torch.nn.Parameter(torch.randn(4, 8, HIDDEN) / 3)

    def forward(self, x):
        t = x.reshape(-1, HIDDEN)
        weights, chosen = self.router(t).softmax(-1).topk(2, dim=-1)
        hits = F.one_hot(chosen, 4)
        ranks = ((torch.cumsum(hits.reshape(-1, 4), dim=0) - 1).reshape(hits.shape) * hits).sum(-1)
        rows = torch.zeros(4, t.shape[0], HIDDEN)
        for j in range(2):
            rows[chosen[:, j], ranks[:, j]] = t
        h = torch.bmm(rows, self.w1)
        out = torch.bmm(h - h.mean(dim=1, keepdim=True), self.w2)
        return sum(out[chosen[:, j], ranks[:, j]] * weights[:, j:j + 1] for j in range(2)).view_as(x)


@pytest.mark.parametrize("make, reason", [
    (_ScaledRowsMoE, "not each a copy of one of its input's rows or zeros"),
    (_MixedRowsMoE, "do not compute each row on its own"),
])
def test_rows_that_are_not_token_copies_or_are_mixed_are_refused_saying_so(make, reason):
    torch.manual_seed(0)
    with pytest.raises(AutocalError) as raised:
        autocal.synthesize(make().eval())
    assert raised.value.kind == "unsupported-dispatch"
    assert reason in str(raised.value)


@settings(max_examples=20, deadline=None)
@given(tokens=st.integers(1, 9), experts=st.integers(1, 4), slots=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_each_row_is_matched_to_a_token_with_the_same_values(tokens, experts, slots, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 5, generator=generator)
    x[tokens // 2] = x[0]  # a repeated token: either number is right, the values are the same
    picked = torch.randint(-1, tokens, (experts, slots), generator=generator)
    rows = torch.where((picked >= 0)[..., None], x[picked.clamp(min=0)], 0)
    found = row_tokens(rows, x)
    assert found.shape == (experts, slots)
    assert torch.equal(torch.where((found > 0)[..., None], x[(found - 1).clamp(min=0)], 0), rows)
    assert row_tokens(rows + (picked >= 0)[..., None] * 1e-3, x) is None or not (picked >= 0).any()
