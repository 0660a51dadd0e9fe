"""Replaying a recorded dispatch on inputs of another shape: views merge the dimensions the recorded ones merged."""

from __future__ import annotations

import math

import torch
from hypothesis import given
from hypothesis import strategies as st

from autocal.trace.replay import regrouped

_sizes = st.integers(1, 7)


@given(recorded=st.tuples(_sizes, _sizes), new=st.tuples(_sizes, _sizes), width=st.integers(2, 9))
def test_a_flattening_view_flattens_any_leading_sizes(recorded, new, width):
    """``x.view(s * b, h)`` recorded on ``[s, b, h]`` views any ``[s', b', h]`` as ``[s' * b', h]``."""
    sizes = regrouped((*recorded, width), (math.prod(recorded), width), (*new, width))
    x = torch.randn(*new, width)
    assert torch.equal(x.view(sizes), x.reshape(-1, width))


@given(recorded=st.tuples(st.integers(2, 7), st.integers(2, 7)), width=st.integers(2, 9))
def test_a_view_splitting_a_dimension_is_only_replayed_on_that_dimension_unchanged(recorded, width):
    """A view that split the recorded tokens into ``[s, b]`` cannot know the new split: None (the recorded sizes
    stay) unless the tokens are as many as before."""
    before, after = (math.prod(recorded), width), (*recorded, width)
    assert regrouped(before, after, before) == after
    assert regrouped(before, after, (math.prod(recorded) + 1, width)) is None


def test_a_mask_sized_by_a_number_autocal_cannot_follow_is_refused_naming_its_line():
    """A mask made from a number autocal cannot tie to the inputs' sizes (``torch.ones(2 * T)[::2]``) is refused,
    naming the line that made it and what to write instead; ``torch.ones(T)`` itself converts (corpus
    ``optional_mask_ones``)."""
    import inspect

    import pytest

    import autocal
    from autocal.errors import AutocalError
    from autocal.testing.corpus import OptionalMaskMoE, init_normal

    class TwiceMaskMoE(OptionalMaskMoE):
        def forward(self, x, padding_mask=None):
            t = x.reshape(-1, x.shape[-1])
            if padding_mask is None:
                padding_mask = torch.ones(2 * t.shape[0], dtype=t.dtype)[::2]
            return super().forward(t * padding_mask.reshape(-1, 1)).reshape(x.shape)

    line = inspect.getsourcelines(TwiceMaskMoE.forward)[1] + 3
    with pytest.raises(AutocalError) as raised:
        autocal.synthesize(init_normal(TwiceMaskMoE(), 0))
    assert raised.value.kind == "unsupported-dispatch"
    assert f"`ones` at {__file__}:{line}" in raised.value.explanation and "ones_like" in raised.value.explanation


def test_numbers_that_spell_no_shape_stay():
    """Only the arguments spelling the made tensor's shape follow the inputs: ``torch.ones(n, 1)``, ``torch.full((n,),
    v)``, ``t.new_ones(n)``; a fill value or data equal to a size of the inputs stays."""
    from autocal.trace.replay import _made_for

    resized = {10: 3, 2: 1}
    t = torch.zeros(())
    assert _made_for([10, 2], torch.ones(10, 2), resized) == [3, 1]
    assert _made_for([(10,), 10], torch.full((10,), 10), resized) == [(3,), 10]
    assert _made_for([t, 10], torch.ones(10), resized) == [t, 3]
    assert _made_for([[10, 2]], torch.tensor([10, 2]), resized) == [[10, 2]]
    assert _made_for([0, 10, 2], torch.arange(0, 10, 2), resized) == [0, 10, 2]
