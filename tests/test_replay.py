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
