"""Sanity tests for the toy MoE blocks in ``autocal.testing.toy_moe`` (+ cross-checks against transformers)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from autocal.testing.toy_moe import (
    KINDS,
    TUPLE_RETURN_KINDS,
    ToyMoEConfig,
    example_hidden_states,
    main_output,
    make_toy_block,
)

DTYPES = (torch.float32, torch.bfloat16)


def _run(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return main_output(block(x))


def _check_output(out: torch.Tensor, x: torch.Tensor, config: ToyMoEConfig) -> None:
    assert out.shape == x.shape
    assert out.dtype == config.dtype
    assert torch.isfinite(out).all()
    out32 = out.float()
    assert out32.abs().max() > 1e-2  # not all (near-)zero
    assert out32.abs().max() < 100.0  # O(1) scale
    assert not torch.allclose(out32, x.float())  # not the identity
    flat = out32.reshape(-1, config.hidden_size)
    if flat.shape[0] > 1:
        assert (flat - flat[0]).abs().max() > 1e-3  # tokens are not all mapped to the same vector


def _zero_expert_(block: nn.Module, config: ToyMoEConfig, expert: int) -> None:
    """Zero every weight / bias of one routed expert (router and shared experts untouched)."""
    with torch.no_grad():
        if isinstance(getattr(block, "experts", None), nn.ModuleList):
            for p in block.experts[expert].parameters():
                p.zero_()
            return
        params = list(block.experts.parameters()) if hasattr(block, "experts") else []
        if not params or any(p.shape[0] != config.num_experts for p in params):  # weight banks, gathered weights
            params = [p for p in block.parameters() if p.dim() == 3]  # [E, a, b]; the router is 2-D
        assert params and all(p.shape[0] == config.num_experts for p in params)
        for p in params:
            p[expert].zero_()


def _influential_experts(config: ToyMoEConfig, x: torch.Tensor) -> set[int]:
    reference = _run(make_toy_block(config), x)
    influential = set()
    for e in range(config.num_experts):
        block = make_toy_block(config)
        _zero_expert_(block, config, e)
        if not torch.equal(_run(block, x), reference):
            influential.add(e)
    return influential


# --------------------------------------------------------------------------------------------------------------
# config / factory
# --------------------------------------------------------------------------------------------------------------


def test_kinds_and_tuple_kinds():
    assert len(KINDS) == len(set(KINDS)) == 15
    assert TUPLE_RETURN_KINDS <= set(KINDS)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kind="nope"),
        dict(top_k=5),
        dict(top_k=0),
        dict(hidden_size=0),
        dict(num_experts=6, n_group=4),
        dict(n_group=2, topk_group=3),
        dict(kind="grouped_sigmoid_bias", num_experts=4, n_group=4, topk_group=1, top_k=1),
        dict(kind="no_gate", num_experts=8, n_group=4, topk_group=1, top_k=3),
        dict(dtype=torch.int32),
        dict(dtype="float32"),
        dict(routed_scaling_factor=0.0),
        dict(shared_intermediate_size=0),
        dict(norm_topk_prob=1),
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        ToyMoEConfig(**kwargs)


def test_config_is_frozen():
    config = ToyMoEConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.top_k = 3  # type: ignore[misc]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_factory_dtype_eval_seed(kind, dtype):
    config = ToyMoEConfig(kind=kind, dtype=dtype)
    block = make_toy_block(config, seed=3)
    assert not block.training
    for name, p in block.named_parameters():
        assert p.dtype == dtype, name
        assert p.detach().float().abs().max() > 0, name  # every parameter (incl. biases) is nonzero
    for name, b in block.named_buffers():
        assert name.endswith("e_score_correction_bias")
        assert b.dtype == torch.float32  # kept in fp32 as transformers does
        assert b.abs().max() > 0
    again = make_toy_block(config, seed=3)
    other = make_toy_block(config, seed=4)
    sd, sd_again, sd_other = block.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd_other[k]) for k in sd)
    x = example_hidden_states(config, batch=2, seq=3, seed=1)
    assert x.shape == (2, 3, config.hidden_size) and x.dtype == dtype
    assert torch.equal(x, example_hidden_states(config, batch=2, seq=3, seed=1))


# --------------------------------------------------------------------------------------------------------------
# forward sanity for every kind
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,seq", [(1, 5), (2, 7), (1, 1), (3, 1)])
def test_forward_sanity(kind, dtype, batch, seq):
    config = ToyMoEConfig(kind=kind, dtype=dtype)
    block = make_toy_block(config)
    x = example_hidden_states(config, batch=batch, seq=seq)
    with torch.no_grad():
        raw = block(x)
    assert isinstance(raw, tuple) == (kind in TUPLE_RETURN_KINDS)
    if isinstance(raw, tuple):
        assert len(raw) == 2
        second = raw[1]
        num_tokens = batch * seq
        expected = (num_tokens, config.top_k) if kind == "interleaved" else (num_tokens, config.num_experts)
        assert second.shape == expected
        assert torch.isfinite(second).all()
    _check_output(main_output(raw), x, config)
    # deterministic
    assert torch.equal(_run(block, x), main_output(raw))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_top_k_equals_num_experts(kind, dtype):
    config = ToyMoEConfig(kind=kind, dtype=dtype, num_experts=4, top_k=4)
    x = example_hidden_states(config, batch=2, seq=3)
    _check_output(_run(make_toy_block(config), x), x, config)
    if dtype == torch.float32:
        # every expert contributes to every token
        assert _influential_experts(config, x[:, :1]) == set(range(4))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_experts_without_tokens(kind, dtype):
    # one token, top-1 of 8 experts: 7 experts receive no token
    config = ToyMoEConfig(kind=kind, dtype=dtype, num_experts=8, top_k=1, n_group=1, topk_group=1)
    x = example_hidden_states(config, batch=1, seq=1, seed=2)
    _check_output(_run(make_toy_block(config), x), x, config)
    assert len(_influential_experts(config, x)) == 1
    # a few tokens, top-2 of 8: at least 2 experts idle, only the used ones matter
    config = dataclasses.replace(config, top_k=2)
    x = example_hidden_states(config, batch=1, seq=3, seed=2)
    _check_output(_run(make_toy_block(config), x), x, config)
    assert 2 <= len(_influential_experts(config, x)) <= 6


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_close_to_fp32(kind):
    config32 = ToyMoEConfig(kind=kind, dtype=torch.float32)
    config16 = dataclasses.replace(config32, dtype=torch.bfloat16)
    x32 = example_hidden_states(config32, batch=2, seq=8)
    out32 = _run(make_toy_block(config32), x32)
    out16 = _run(make_toy_block(config16), x32.to(torch.bfloat16))
    assert out16.dtype == torch.bfloat16
    # bf16 rounding may flip a near-tie routing decision for a token; the bulk must agree
    per_token = (out16.float() - out32).abs().amax(dim=-1).flatten()
    assert (per_token < 0.1).float().mean() >= 0.8
    assert per_token.median() < 0.05


@pytest.mark.parametrize("kind", KINDS)
def test_hf_sentinel_flag_does_not_change_numerics(kind):
    config = ToyMoEConfig(kind=kind, hf_sentinel=True)
    x = example_hidden_states(config, batch=2, seq=4)
    a = _run(make_toy_block(config), x)
    b = _run(make_toy_block(dataclasses.replace(config, hf_sentinel=False)), x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", DTYPES)
def test_router_dtypes_follow_transformers(dtype):
    x = example_hidden_states(ToyMoEConfig(dtype=dtype), batch=1, seq=4).reshape(-1, 16)
    with torch.no_grad():
        # Qwen3 router: softmax in fp32, weights cast back to the logits dtype
        logits, weights, index = make_toy_block(ToyMoEConfig(dtype=dtype)).gate(x)
        assert logits.dtype == dtype and weights.dtype == dtype and index.dtype == torch.int64
        # DeepSeek-V3 router: everything in fp32
        logits, weights, _ = make_toy_block(ToyMoEConfig(kind="grouped_sigmoid_bias", dtype=dtype)).gate(x)
        assert logits.dtype == torch.float32 and weights.dtype == torch.float32
        # Llama4 router: scores in the model dtype
        scores, logits = make_toy_block(ToyMoEConfig(kind="scores_on_inputs", dtype=dtype)).router(x)
        assert scores.dtype == dtype and logits.dtype == dtype


@pytest.mark.parametrize("kind", ["grouped_sigmoid_bias", "no_gate"])
@pytest.mark.parametrize("norm", [True, False])
def test_grouped_router_restricts_groups(kind, norm):
    config = ToyMoEConfig(
        kind=kind, num_experts=8, top_k=2, n_group=4, topk_group=1, norm_topk_prob=norm, routed_scaling_factor=2.5
    )
    block = make_toy_block(config)
    x = example_hidden_states(config, batch=2, seq=6).reshape(-1, config.hidden_size)
    with torch.no_grad():
        logits, weights, index = block.gate(x)
    assert logits.shape == (12, 8) and weights.shape == index.shape == (12, 2)
    groups = index // 2
    assert (groups[:, 0] == groups[:, 1]).all()  # both picks come from the single allowed group
    assert groups.unique().numel() > 1  # ... which differs between tokens
    expected = torch.sigmoid(logits).gather(1, index)
    if norm:
        expected = expected / (expected.sum(-1, keepdim=True) + 1e-20)
    torch.testing.assert_close(weights, expected * 2.5)
    _check_output(_run(block, x.reshape(2, 6, -1)), x.reshape(2, 6, -1), config)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(KINDS),
    num_experts=st.sampled_from([2, 4, 6, 8]),
    data=st.data(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_random_configs(kind, num_experts, data, batch, seq, seed):
    top_k = data.draw(st.integers(1, num_experts))
    config = ToyMoEConfig(
        kind=kind,
        num_experts=num_experts,
        top_k=top_k,
        hidden_size=data.draw(st.sampled_from([4, 8, 16])),
        intermediate_size=data.draw(st.sampled_from([2, 6, 12])),
        shared_intermediate_size=data.draw(st.sampled_from([None, 5])),
        norm_topk_prob=data.draw(st.booleans()),
        hf_sentinel=data.draw(st.booleans()),
    )
    block = make_toy_block(config, seed=seed)
    x = example_hidden_states(config, batch=batch, seq=seq, seed=seed)
    out = _run(block, x)
    assert out.shape == x.shape and torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------------------------
# faithfulness: same weights in the real transformers 5.23 blocks give the same outputs
# --------------------------------------------------------------------------------------------------------------


def _real_block(kind: str, config: ToyMoEConfig) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    common = dict(hidden_size=config.hidden_size, num_experts_per_tok=config.top_k)
    if kind == "concat":
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = transformers.Qwen3MoeConfig(
            **common,
            moe_intermediate_size=config.intermediate_size,
            num_experts=config.num_experts,
            norm_topk_prob=config.norm_topk_prob,
            hidden_act="silu",
        )
        cls = Qwen3MoeSparseMoeBlock
    elif kind == "shared_sigmoid_gate":
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

        cfg = transformers.Qwen2MoeConfig(
            **common,
            moe_intermediate_size=config.intermediate_size,
            shared_expert_intermediate_size=config.shared_size,
            num_experts=config.num_experts,
            norm_topk_prob=config.norm_topk_prob,
            hidden_act="silu",
        )
        cls = Qwen2MoeSparseMoeBlock
    elif kind == "grouped_sigmoid_bias":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

        assert config.shared_size == config.intermediate_size
        cfg = transformers.DeepseekV3Config(
            **common,
            moe_intermediate_size=config.intermediate_size,
            n_routed_experts=config.num_experts,
            n_shared_experts=1,
            n_group=config.n_group,
            topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
            hidden_act="silu",
        )
        cls = DeepseekV3MoE
    elif kind == "no_gate":
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMoE

        cfg = transformers.NemotronHConfig(
            **common,
            moe_intermediate_size=config.intermediate_size,
            moe_shared_expert_intermediate_size=config.shared_size,
            n_routed_experts=config.num_experts,
            n_group=config.n_group,
            topk_group=config.topk_group,
            norm_topk_prob=config.norm_topk_prob,
            routed_scaling_factor=config.routed_scaling_factor,
            mlp_hidden_act="relu2",
        )
        cls = NemotronHMoE
    elif kind == "interleaved":
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

        cfg = transformers.GptOssConfig(
            **common,
            intermediate_size=config.intermediate_size,
            num_local_experts=config.num_experts,
            swiglu_limit=config.swiglu_limit,
        )
        cls = GptOssMLP
    elif kind == "scores_on_inputs":
        from transformers.models.llama4.modeling_llama4 import Llama4TextMoe

        assert config.shared_size == config.intermediate_size
        cfg = transformers.Llama4TextConfig(
            **common,
            intermediate_size=config.intermediate_size,
            num_local_experts=config.num_experts,
            hidden_act="silu",
        )
        cls = Llama4TextMoe
    else:  # pragma: no cover
        raise AssertionError(kind)
    cfg._experts_implementation = "eager"
    return cls(cfg)


def _cross_check(kind: str, config: ToyMoEConfig, *, batch: int = 2, seq: int = 6, atol: float = 1e-5) -> None:
    toy = make_toy_block(config)
    real = _real_block(kind, config).to(config.dtype).eval()
    real.load_state_dict(toy.state_dict(), strict=True)
    for name, buffer in real.named_buffers():  # transformers keeps e_score_correction_bias in fp32
        if name.endswith("e_score_correction_bias"):
            buffer.data = buffer.data.float()
            buffer.copy_(toy.get_buffer(name))
    x = example_hidden_states(config, batch=batch, seq=seq, seed=5)
    with torch.no_grad():
        toy_out, real_out = toy(x), real(x)
    if kind == "interleaved":  # both return (hidden, router_scores)
        torch.testing.assert_close(toy_out[1], real_out[1], atol=atol, rtol=0)
        toy_out, real_out = toy_out[0], real_out[0]
    elif kind == "scores_on_inputs":  # both return (hidden, router_logits); the real hidden is [T, H]
        torch.testing.assert_close(toy_out[1], real_out[1], atol=atol, rtol=0)
        toy_out, real_out = toy_out[0], real_out[0].reshape(x.shape)
    assert toy_out.dtype == real_out.dtype == config.dtype
    torch.testing.assert_close(toy_out, real_out, atol=atol, rtol=0)


@pytest.mark.parametrize("hf_sentinel", [True, False])
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_concat_matches_transformers_qwen3_moe(hf_sentinel, norm_topk_prob):
    config = ToyMoEConfig(kind="concat", hf_sentinel=hf_sentinel, norm_topk_prob=norm_topk_prob)
    _cross_check("concat", config)
    # single token / k == E / idle experts
    _cross_check("concat", config, batch=1, seq=1)
    _cross_check("concat", dataclasses.replace(config, top_k=4))
    _cross_check("concat", dataclasses.replace(config, num_experts=8, top_k=1), batch=1, seq=2)


@pytest.mark.parametrize(
    "kind,extra",
    [
        ("shared_sigmoid_gate", {}),
        ("grouped_sigmoid_bias", {}),
        ("grouped_sigmoid_bias", dict(num_experts=8, n_group=4, topk_group=2, routed_scaling_factor=2.5)),
        ("grouped_sigmoid_bias", dict(norm_topk_prob=False)),
        ("no_gate", {}),
        ("no_gate", dict(num_experts=8, n_group=2, topk_group=1, routed_scaling_factor=1.5)),
        ("interleaved", {}),
        ("interleaved", dict(top_k=4)),
        ("scores_on_inputs", {}),
        ("scores_on_inputs", dict(top_k=1)),
    ],
)
def test_other_kinds_match_transformers(kind, extra):
    _cross_check(kind, ToyMoEConfig(kind=kind, **extra))


@pytest.mark.parametrize("kind", ["concat", "shared_sigmoid_gate", "grouped_sigmoid_bias", "no_gate", "interleaved",
                                  "scores_on_inputs"])
def test_bf16_matches_transformers(kind):
    _cross_check(kind, ToyMoEConfig(kind=kind, dtype=torch.bfloat16), atol=1e-6)
