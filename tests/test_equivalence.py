"""Property tests: the synthesized calibration module reproduces the original toy block.

Tolerances. With calibration off and no hook on the expert Linears, the
output is bitwise the original's: each expert's matmuls run on the packed
storage the Linears view, exactly as the original ran them. With calibration
on (hooks attached, as a quantizer does), each Linear runs on its own, and BLAS
may round a matmul split in two differently: the output is then within
``autocal.verify.TOLERANCES`` (max|diff| <= atol + rtol * max|out|; float32:
rtol 1e-5, atol 1e-6; bfloat16: rtol 1.6e-2, atol 1e-2).
"""

import functools
import warnings

import pytest
import torch
from hypothesis import example, given, note
from hypothesis import strategies as st

import autocal
from autocal.synthesize.slots import RoutedSlots
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.strategies import token_counts, toy_configs
from autocal.testing.toy_moe import KINDS, ToyMoEConfig, example_hidden_states, main_output, make_toy_block
from autocal.verify import compare_outputs

SPARSE = [k for k in KINDS if k != "scores_on_inputs"]  # experts see only their routed tokens


@given(config=toy_configs(), tokens=token_counts(), seed=st.integers(0, 2**16))
@example(config=ToyMoEConfig(kind="concat", num_experts=4, top_k=4), tokens=5, seed=0)
@example(config=ToyMoEConfig(kind="concat", num_experts=8, top_k=1), tokens=1, seed=0)
@example(config=ToyMoEConfig(kind="grouped_sigmoid_bias", num_experts=8, top_k=2, n_group=4, topk_group=2),
         tokens=7, seed=3)
@example(config=ToyMoEConfig(kind="interleaved", dtype=torch.bfloat16), tokens=9, seed=1)
@example(config=ToyMoEConfig(kind="modulelist_loop", num_experts=8, top_k=1), tokens=1, seed=0)
@example(config=ToyMoEConfig(kind="scores_on_inputs", num_experts=4, top_k=4), tokens=3, seed=0)
def test_calibration_module_matches_original(config, tokens, seed):
    note(f"repro: make_toy_block({config!r}, seed={seed}); example_hidden_states(config, seq={tokens}, seed={seed + 1})")
    block = make_toy_block(config, seed=seed)
    x = example_hidden_states(config, seq=tokens, seed=seed + 1)
    with torch.no_grad():
        expected = block(x)
    assert main_output(expected).abs().max() > 0, "degenerate setup: the original outputs zeros"

    module = autocal.synthesize(block)
    module.calibrate_all_experts = False
    with torch.no_grad():
        off = module(x)
    diff, bitwise, _ = compare_outputs(expected, off)
    note(f"calibration off: max |diff| {diff}")
    assert bitwise

    module.calibrate_all_experts = True
    linears = expert_linears(module)
    with torch.no_grad(), count_rows(linears) as rows:
        on = module(x)
    assert compare_outputs(expected, on)[2], "calibration on must stay within rounding of the original"
    assert linears and all(n == tokens for n in rows.values()), rows


@given(config=toy_configs(), tokens=token_counts(), seed=st.integers(0, 2**16))
@example(config=ToyMoEConfig(kind="scores_on_inputs", num_experts=4, top_k=1), tokens=3, seed=0)
@example(config=ToyMoEConfig(kind="concat", num_experts=4, top_k=2), tokens=5, seed=0)
def test_experts_whose_weights_moved_still_see_every_token_once(config, tokens, seed):
    """As offloading leaves them: each expert Linear's weight a new tensor (moved to the device it runs on).

    Values computed unobserved (the zero rows of a dense layout, the grouped
    run's one-time check) must still not reach the Linears' hooks, though the
    packed storage no longer holds what the Linears use. Not verified, as a
    model's later blocks are not (``convert`` verifies the first of each class),
    so the grouped run's check comes after the move.
    """
    block = make_toy_block(config, seed=seed)
    x = example_hidden_states(config, seq=tokens, seed=seed + 1)
    with torch.no_grad():
        expected = block(x)
    module = autocal.synthesize(block, verify=False)
    linears = expert_linears(module)
    for linear in linears.values():
        linear.weight = torch.nn.Parameter(linear.weight.detach().clone(), requires_grad=False)
        if linear.bias is not None:
            linear.bias = torch.nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    with torch.no_grad(), count_rows(linears) as rows:
        on = module(x)
    assert compare_outputs(expected, on)[2], "calibration on must stay within rounding of the original"
    assert linears and all(n == tokens for n in rows.values()), rows


@given(config=toy_configs(kinds=SPARSE, dtypes=[torch.float32]), seed=st.integers(0, 2**16))
def test_calibration_off_experts_see_only_routed_tokens(config, seed):
    block = make_toy_block(config, seed=seed)
    x = example_hidden_states(config, seq=6, seed=seed)
    module = autocal.synthesize(block, calibrate_all_experts=False)
    experts = dict(enumerate(module.expert_modules()))
    with torch.no_grad(), count_rows(experts) as rows:
        module(x)
    assert sum(rows.values()) == 6 * config.top_k


@given(config=toy_configs(kinds=["concat", "interleaved", "grouped_sigmoid_bias"]), tokens=token_counts(),
       chunk=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_token_chunks_bound_calibration_calls_with_the_same_output(config, tokens, chunk, seed):
    block = make_toy_block(config, seed=seed)
    x = example_hidden_states(config, seq=tokens, seed=seed + 1)
    module = autocal.synthesize(block)
    module.calibrate_all_experts = False
    with torch.no_grad():
        off = module(x)
    module.calibrate_all_experts = True
    module.calibration_chunk_size = chunk
    calls: dict[int, list[int]] = {}
    hooks = [e.register_forward_pre_hook(lambda m, a, i=i: calls.setdefault(i, []).append(a[0].shape[0]))
             for i, e in enumerate(module.expert_modules())]
    with torch.no_grad():
        chunked = module(x)
    for hook in hooks:
        hook.remove()
    assert compare_outputs(off, chunked)[1], "chunked calibration must give the calibration-off output bitwise"
    for expert, sizes in calls.items():
        assert sum(sizes) >= tokens  # every token reached every expert
        routed = sizes[0] if sum(sizes) - sizes[0] == tokens - sizes[0] else 0
        assert all(size <= chunk for size in sizes[1 if routed else 0:]), (expert, sizes, chunk)


@given(config=toy_configs(kinds=SPARSE), tokens=token_counts(), group=st.integers(1, 8), span=st.integers(1, 8),
       seed=st.integers(0, 2**16))
def test_experts_run_in_groups_as_they_run_one_by_one(config, tokens, group, span, seed):
    """The grouped calibration forward (synthesize/grouped.py), ``group`` experts at a time, against one at a time.

    Experts that run alone (a group of one) are combined ``span`` at a time.
    """
    block = make_toy_block(config, seed=seed)
    x = example_hidden_states(config, seq=tokens, seed=seed + 1)
    module = autocal.synthesize(block)
    container = module.experts_container
    if not hasattr(container, "_grouped"):
        return  # block-level rewrites run the original dispatch: nothing grouped
    seen: dict[int, list[torch.Tensor]] = {}

    def observe(linear, args):
        seen.setdefault(id(linear), []).append(args[0].clone())

    hooks = [linear.register_forward_pre_hook(observe) for linear in expert_linears(module).values()]
    container.group_elements[True] = group * x.shape[:-1].numel() * container._widest
    container.combine_elements[True] = span * x.shape[:-1].numel() * container.output_features
    with torch.no_grad():
        grouped = module(x)
        note(f"grouped path usable: {container._grouped.usable}")
        grouped_inputs, seen = seen, {}
        container._grouped.usable = False
        one_by_one = module(x)
    for hook in hooks:
        hook.remove()
    assert compare_outputs(one_by_one, grouped)[2]
    assert grouped_inputs.keys() == seen.keys()
    for linear, inputs in seen.items():  # every Linear saw the same rows, within rounding of its inputs
        assert len(inputs) == len(grouped_inputs[linear]) == 1
        assert compare_outputs(inputs[0], grouped_inputs[linear][0])[2]


def test_a_hook_on_an_expert_module_runs_experts_one_by_one():
    config = ToyMoEConfig(num_experts=4, top_k=2)
    module = autocal.synthesize(make_toy_block(config))
    calls = []
    for expert in module.expert_modules():
        expert.register_forward_hook(lambda m, a, out: calls.append(m))
    with torch.no_grad(), pytest.warns(UserWarning, match="expert 0 .* has a forward hook"):
        module(example_hidden_states(config, seq=5))
    assert sorted(map(id, calls)) == sorted(map(id, module.expert_modules())), "each expert module called once"
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per container
        module(example_hidden_states(config, seq=5))


def _run_with_expert_forwards(replace, calls: list) -> tuple[torch.Tensor, torch.Tensor, dict, list, int]:
    """A toy block's calibration output with each expert's forward replaced by ``replace(expert)`` (measured
    after one call, which may check the grouped run against the experts' own forwards), the output with
    grouping off, the rows each expert Linear saw, the warnings, and how many ``calls`` the measured run made."""
    config = ToyMoEConfig(num_experts=6, top_k=2)
    module = autocal.synthesize(make_toy_block(config, seed=3))
    x = example_hidden_states(config, seq=7, seed=4)
    for expert in module.expert_modules():
        expert.forward = replace(expert)
    with torch.no_grad(), warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        module(x)
    calls.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, count_rows(expert_linears(module)) as rows:
        warnings.simplefilter("always")
        out = module(x)
    measured_calls = len(calls)
    module.experts_container._grouped.usable = False
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one_by_one = module(x)
    return out, one_by_one, rows, [str(w.message) for w in [*first, *caught]], measured_calls


def test_experts_wrapped_for_offloading_still_run_in_groups():
    """A ``functools.wraps`` wrapper of the expert's own forward (offloading, as compressed-tensors and accelerate
    install on every module) does not stop the grouped run; the expert Linears are called, not the wrapper."""
    calls = []

    def offload_like(expert):
        own = expert.forward

        @functools.wraps(own)
        def forward(*args, **kwargs):
            calls.append(expert)
            return own(*args, **kwargs)
        return forward

    out, one_by_one, rows, said, wrapper_calls = _run_with_expert_forwards(offload_like, calls)
    assert not said and wrapper_calls == 0, "grouped: no warning, the experts' wrappers not called"
    assert set(rows.values()) == {7}, "every expert Linear saw every token once"
    assert compare_outputs(one_by_one, out)[2]
    assert calls, "one by one, each expert's (wrapped) forward ran"


def test_convert_can_call_each_expert_module_on_its_own():
    """``group_experts=False`` (benchmarks/oneshot.py's one-by-one method): each expert's forward runs, under an
    offloading wrapper too, without a warning; every Linear still sees every token once, the output as grouped."""
    config = ToyMoEConfig(num_experts=6, top_k=2)
    block = make_toy_block(config, seed=3)
    x = example_hidden_states(config, seq=7, seed=4)
    with torch.no_grad():
        expected = block(x)
    outputs, calls = {}, []
    for group_experts in (True, False):
        model = autocal.convert(torch.nn.Sequential(make_toy_block(config, seed=3)), group_experts=group_experts)
        for expert in model[0].expert_modules():
            own = expert.forward
            expert.forward = functools.wraps(own)(lambda *a, own=own, expert=expert, **k: (calls.append(expert),
                                                                                           own(*a, **k))[1])
        calls.clear()
        with torch.no_grad(), warnings.catch_warnings(), count_rows(expert_linears(model[0])) as rows:
            warnings.simplefilter("error")
            outputs[group_experts] = model(x)
        assert set(rows.values()) == {7}, "every expert Linear saw every token once"
        called = sorted(map(id, calls))
        assert called == (sorted(map(id, model[0].expert_modules())) if not group_experts else [])
    assert compare_outputs(expected, outputs[False])[2] and compare_outputs(outputs[True], outputs[False])[2]


def test_an_expert_forward_set_back_to_its_own_still_runs_in_groups():
    """Removing offloading sets the class's forward, bound, on the instance; another expert's is not its own."""
    calls = []
    own_bound = lambda expert: type(expert).forward.__get__(expert)  # noqa: E731
    out, one_by_one, rows, said, _ = _run_with_expert_forwards(own_bound, calls)
    assert not said and set(rows.values()) == {7}
    assert compare_outputs(one_by_one, out)[2]
    others = {}
    out, one_by_one, rows, said, _ = _run_with_expert_forwards(
        lambda expert: others.setdefault("first", type(expert).forward.__get__(expert)), calls)
    assert len(said) == 1 and "not by a wrapper of its own forward" in said[0]


def test_an_expert_forward_replaced_otherwise_runs_experts_one_by_one():
    calls = []

    def replaced(expert):
        own = expert.forward

        def forward(*args, **kwargs):  # not a functools.wraps wrapper: may do anything
            calls.append(expert)
            return own(*args, **kwargs)
        return forward

    out, one_by_one, rows, said, replaced_calls = _run_with_expert_forwards(replaced, calls)
    assert len(said) == 1 and "not by a wrapper of its own forward" in said[0], "said once, when first met"
    assert replaced_calls >= 6, "each expert's replaced forward ran"
    assert set(rows.values()) == {7}
    assert compare_outputs(one_by_one, out)[2]


@given(tokens=st.integers(1, 9), k=st.integers(1, 4), experts=st.integers(1, 9), size=st.integers(1, 9),
       dtype=st.sampled_from([torch.int64, torch.int32]), firsts_given=st.booleans(), seed=st.integers(0, 2**16))
def test_routed_slots_are_every_slot_of_the_group_sorted(tokens, k, experts, size, dtype, firsts_given, seed):
    """Sentinels (-1, ``experts`` and above) fall in no group; a token routed twice to one expert keeps both slots."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(-1, experts + 2, (tokens, k), generator=generator).to(dtype)
    weights = torch.rand(tokens, k, generator=generator)
    firsts = torch.arange(0, experts + size, size, dtype=dtype).clamp(max=experts) if firsts_given else None
    slots = RoutedSlots(index, weights, experts, size, firsts)
    for number, start in enumerate(range(0, experts, size)):
        expected = sorted(((int(index[t, s]) - start) * tokens + t, t, float(weights[t, s]))
                          for t in range(tokens) for s in range(k) if start <= index[t, s] < min(start + size, experts))
        row, token, weight = slots.group(number)
        found = list(zip(row.tolist(), token.tolist(), weight.squeeze(-1).tolist()))
        assert sorted(found) == expected
        assert found == sorted(found, key=lambda slot: slot[0]), "by expert, then token: rows of [G * T, H]"


class _ScaledExperts(torch.nn.Module):
    """Packed experts whose every expert multiplies its output by a weight of the container itself."""

    def __init__(self, experts: int, hidden: int, width: int) -> None:
        super().__init__()
        self.num_experts = experts
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, 2 * width, hidden) * 0.2)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, width) * 0.2)
        self.post_scale = torch.nn.Parameter(torch.rand(hidden) + 0.5)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        mask = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
        for expert in range(self.num_experts):
            slot, token = torch.where(mask[expert])
            gate, up = torch.nn.functional.linear(hidden_states[token], self.gate_up_proj[expert]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, self.down_proj[expert]) * self.post_scale
            out.index_add_(0, token, y * top_k_weights[token, slot, None])
        return out


class _ScaledBlock(torch.nn.Module):
    def __init__(self, experts: int = 6, hidden: int = 16, width: int = 8, k: int = 2) -> None:
        super().__init__()
        self.k = k
        self.gate = torch.nn.Linear(hidden, experts, bias=False)
        self.experts = _ScaledExperts(experts, hidden, width)

    def forward(self, x):
        rows = x.reshape(-1, x.shape[-1])
        weights, index = self.gate(rows).softmax(-1).topk(self.k, dim=-1)
        return self.experts(rows, index, weights / weights.sum(-1, keepdim=True)).reshape(x.shape)


def test_experts_reading_a_weight_of_their_container_run_in_groups():
    """Found on a zoo model (a norm of the experts container applied in each expert): the grouped
    run read the container's weight once per expert, failed, and the calibration forward raised."""
    torch.manual_seed(0)
    block = _ScaledBlock()
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        expected = block(x)
    module = autocal.synthesize(block)
    module.calibrate_all_experts = True
    linears = expert_linears(module)
    with torch.no_grad(), count_rows(linears) as rows:
        on = module(x)
    assert compare_outputs(expected, on)[2]
    assert set(rows.values()) == {14}
    assert module.experts_container._grouped.usable, "the container's weight is shared by the group, not per expert"


def test_verification_runs_the_calibration_forward_users_run():
    """Verification counts coverage without hooking the expert modules (a hook there turns the grouped run
    off), so the grouped run is what it checks against the original."""
    config = ToyMoEConfig(kind="concat", num_experts=6, top_k=2)
    module = autocal.synthesize(make_toy_block(config))
    assert module.experts_container._grouped.usable is True


def test_per_expert_ops_after_the_down_projection_belong_to_the_expert():
    """Ergo: the experts norm each expert's output with the expert's own scale before the weighted sum. That
    norm is part of each expert: the block converts at the experts level, bitwise with calibration off, and
    every expert Linear sees every token with calibration on."""
    config = ToyMoEConfig(kind="post_norm", num_experts=8, top_k=3)
    block = make_toy_block(config)
    x = example_hidden_states(config, seq=13)
    structure = autocal.explain(block, verify=False).blocks[0].structure
    assert structure["level"] == "experts"
    assert "norm_weight" in structure["experts"]["computation"], structure["experts"]["computation"]
    module = autocal.synthesize(block)
    module.calibrate_all_experts = False
    with torch.no_grad():
        expected, off = block(x), module(x)
    assert compare_outputs(expected, off)[1]
    module.calibrate_all_experts = True
    linears = expert_linears(module)
    with torch.no_grad(), count_rows(linears) as rows:
        on = module(x)
    assert compare_outputs(expected, on)[2] and all(n == 13 for n in rows.values()), rows


def test_an_expert_cut_short_fails_detection_even_without_verification(monkeypatch):
    """Detection records the experts' output; a template that does not reproduce it makes the experts rule
    refuse the block there, so ``verify=False`` cannot let it through (here the per-expert norm is cut off, as
    autocal once did): a later rule of the table, which does not cut the experts out, converts it."""
    from autocal.detect import experts as detect_experts

    monkeypatch.setattr(detect_experts, "route_tail", lambda *args: (None, []))
    block = make_toy_block(ToyMoEConfig(kind="post_norm", num_experts=8, top_k=2))
    report = autocal.explain(block, verify=False).blocks[0]
    experts = next(v for v in report.rules if v["rule"] == "experts")
    assert not experts["matched"] and "does not reproduce" in experts["reason"], experts
    assert report.rule != "experts", report.rule
