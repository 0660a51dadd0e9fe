"""The corpus (autocal/testing/corpus.py): MoE blocks in the styles of public code outside transformers.

First the corpus itself: each block's output equals a dense reference written
here (every expert on every token, combined with the routing weights the block
would use; each token with at most k non-zero weights). Then autocal on each:
``synthesize`` (calibration off bitwise, on within ``autocal.verify``
tolerances, every expert Linear seeing every token: for the modality entry,
every token of its modality, as its ``reach`` says), ``convert`` of a model
holding the block, with and without example inputs, ``convert`` of a model that
also holds a block autocal converts, and ``explain`` reporting the true k. An
entry whose forward needs more than hidden states gets example inputs in every
check, ``synthesize`` included.

What autocal fails today is listed in ``KNOWN_FAILURES`` (strict xfails): an
entry that starts passing fails the suite, and the table is updated.
``python scripts/corpus_report.py`` prints the same measurement as a table.
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

from autocal.errors import AutocalError
from autocal.testing.corpus import (
    ENTRIES,
    TOP_K,
    VariadicMoELayer,
    check_convert,
    check_explain_k,
    check_mixed,
    equivalent,
    synthesize_example,
)

# (entry, check) -> (exception expected today, reason). Checks: reference (the corpus itself, never here),
# synthesize, tokens (synthesize on drawn token counts), convert, convert_example, mixed, explain_k.
KNOWN_FAILURES: dict[tuple[str, str], tuple[type[BaseException], str]] = {}  # none today


def _checked(name: str, check: str, run) -> None:
    """Run a check; an AutocalError of another kind than ``KNOWN_FAILURES`` says fails the test, not an xfail."""
    try:
        run()
    except AutocalError as error:
        expected = KNOWN_FAILURES.get((name, check), (None, ""))[1]
        if expected and not expected.startswith(f"{error.kind}:"):
            raise AssertionError(f"KNOWN_FAILURES says {expected!r}; raised [{error.kind}]") from error
        raise


def _params(check: str) -> list:
    marks = {name: [pytest.mark.xfail(strict=True, raises=KNOWN_FAILURES[name, check][0],
                                      reason=KNOWN_FAILURES[name, check][1])]
             for name in ENTRIES if (name, check) in KNOWN_FAILURES}
    return [pytest.param(name, marks=marks.get(name, ()), id=name) for name in ENTRIES]


# ---------------------------------------------------------------------------------------------------------------
# Dense references: (output, gates [tokens, experts]), every expert run on every token
# ---------------------------------------------------------------------------------------------------------------


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def _dense(t, gates, experts):
    return sum(gates[:, e, None] * expert(t) for e, expert in enumerate(experts))


def _top(scores, k=2):
    """The top-k positions of each row, as a boolean mask."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter(1, scores.topk(k, dim=-1).indices, True)


def _softmax_of_top(logits, k=2):
    """Softmax over each row's k largest logits (top-k, then softmax over the k)."""
    return logits.masked_fill(~_top(logits, k), float("-inf")).softmax(dim=-1)


def _top_probs(logits, k=2, renormalize=True):
    """Softmax over all logits, the top k kept (renormalized to sum to 1)."""
    probs = logits.softmax(dim=-1)
    gates = torch.where(_top(probs, k), probs, 0)
    return gates / gates.sum(-1, keepdim=True) if renormalize else gates


def _swiglu(t, w_gate, w_up, w_down):
    return (F.silu(t @ w_gate) * (t @ w_up)) @ w_down


def _ref_deepseek(m, x):
    t = _flat(x)
    scores = torch.sigmoid(t @ m.gate.weight.T)
    gates = torch.where(_top(scores + m.gate.bias), scores, 0)
    gates = gates / gates.sum(-1, keepdim=True) * m.gate.route_scale
    return (_dense(t, gates, m.experts) + m.shared_experts(t)).view_as(x), gates


def _ref_softmax_of_top(m, x):  # mixtral_reference, param_matmul_experts, conv1d_experts
    t = _flat(x)
    gates = _softmax_of_top(t @ m.gate.weight.T)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_top_probs(router, experts, renormalize=True):
    def reference(m, x):
        t = _flat(x)
        gates = _top_probs(t @ router(m).weight.T, renormalize=renormalize)
        return _dense(t, gates, experts(m)).view_as(x), gates
    return reference


def _ref_packed_einsum(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.gate.weight.T + m.gate.bias)

    def expert(e):
        def run(rows):
            h = rows @ m.mlp1_weight[e].T + m.mlp1_bias[e]
            gate, up = h[:, 0::2].clamp(max=m.limit), h[:, 1::2].clamp(min=-m.limit, max=m.limit)
            return (gate * torch.sigmoid(m.alpha * gate) * (up + 1)) @ m.mlp2_weight[e].T + m.mlp2_bias[e]
        return run
    return _dense(t, gates, [expert(e) for e in range(gates.shape[1])]).view_as(x), gates


def _ref_grouped_mm(m, x):
    t = _flat(x)
    scores = torch.sigmoid(t @ m.router.weight.T)
    gates = torch.where(_top(scores + m.expert_bias), scores, 0)
    gates = gates / gates.sum(-1, keepdim=True) * m.route_scale
    w = m.experts
    experts = [functools.partial(_swiglu, w_gate=w.w1[e], w_up=w.w3[e], w_down=w.w2[e]) for e in range(len(w.w1))]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_fused_grouped(m, x):
    t = _flat(x)
    scores = torch.sigmoid(t @ m.router.gate.weight.T)
    gates = torch.where(_top(scores), scores, 0)
    gates = gates / gates.sum(-1, keepdim=True)
    w = m.experts
    experts = [functools.partial(_swiglu, w_gate=w.w1[e].T, w_up=w.w3[e].T, w_down=w.w2[e].T) for e in range(len(w.w1))]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_detached(m, x):
    t = _flat(x)
    logits = t @ m.router.weight.T
    scores = torch.where(_top(logits), torch.sigmoid(logits), 0)
    return sum(expert(t * scores[:, e, None]) for e, expert in enumerate(m.experts)).view_as(x), scores


def _ref_gshard(m, x):
    """Per sequence: first choices take expert slots in token order, then second choices; a choice past the
    expert's capacity is dropped."""
    outputs, all_gates = [], []
    n, e = x.shape[1], m.num_experts
    capacity = max(min(n, int(n * m.capacity_factor / e)), m.min_capacity)
    for seq in x:
        probs = (seq @ m.w_gating).softmax(-1)
        first = probs.argmax(-1)
        second = probs.scatter(1, first[:, None], -1.0).argmax(-1)
        p1, p2 = probs.gather(1, first[:, None])[:, 0], probs.gather(1, second[:, None])[:, 0]
        gates = torch.zeros_like(probs)
        taken = [0] * e
        for token in range(n):
            if taken[first[token]] < capacity:
                gates[token, first[token]] = p1[token] / (p1[token] + p2[token] + m.eps)
                taken[first[token]] += 1
        second_taken = list(taken)
        for token in range(n):
            if second_taken[second[token]] < capacity:
                gates[token, second[token]] = p2[token] / (p1[token] + p2[token] + m.eps)
            second_taken[second[token]] += 1
        experts = [functools.partial(lambda rows, i: F.gelu(rows @ m.experts.w1[i]) @ m.experts.w2[i], i=i)
                   for i in range(e)]
        outputs.append(_dense(seq, gates, experts))
        all_gates.append(gates)
    return torch.stack(outputs), torch.cat(all_gates)


def _ref_hierarchical(m, x):
    t = _flat(x)
    outer = (t @ m.outer_gate.weight.T).softmax(-1)
    group = outer.argmax(-1)
    inner = torch.einsum("th,ghe->tge", t, m.inner_gates)[torch.arange(len(t)), group].softmax(-1)
    inner_gates = torch.where(_top(inner), inner, 0) * outer.max(-1).values[:, None]
    gates = torch.zeros(len(t), m.groups, m.per_group)
    gates[torch.arange(len(t)), group] = inner_gates
    gates = gates.reshape(len(t), -1)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_decode_gather(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T)
    experts = [functools.partial(_swiglu, w_gate=m.w1[e].T, w_up=m.w3[e].T, w_down=m.w2[e].T)
               for e in range(m.num_experts)]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_post_norm(m, x):
    t = _flat(x)
    logits = t @ m.gate.weight.T
    gates = _top_probs(logits)
    w = m.experts

    def expert(e):
        def run(rows):
            gate, up = (rows @ w.gate_up_proj[e].T).chunk(2, dim=-1)
            h = (F.silu(gate) * up) @ w.down_proj[e].T
            return h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + w.eps) * w.post_norm_weight[e]
        return run
    return (_dense(t, gates, [expert(e) for e in range(w.num_experts)]).view_as(x), logits), gates


def _ref_zero_identity(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T, renormalize=False)
    real = list(m.experts)[:-2]  # then a zero expert and an identity expert
    return _dense(t, gates, [*real, torch.zeros_like, lambda rows: rows]).view_as(x), gates


def _ref_modality(m, x, token_type_ids):
    t, types = _flat(x), token_type_ids.reshape(-1)
    gates = torch.cat([_top_probs(t @ m.text_router.weight.T), _top_probs(t @ m.image_router.weight.T)], dim=-1)
    half = gates.shape[1] // 2
    gates[types == 1, :half] = 0
    gates[types == 0, half:] = 0
    return _dense(t, gates, [*m.text_experts, *m.image_experts]).view_as(x), gates


def _ref_expert_id(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T)

    def expert(e):
        def run(rows):
            h = F.silu(rows @ m.gate_proj.weight[e].T + m.gate_proj.bias[e]) * (
                rows @ m.up_proj.weight[e].T + m.up_proj.bias[e])
            return h @ m.down_proj.weight[e].T + m.down_proj.bias[e]
        return run
    return _dense(t, gates, [expert(e) for e in range(m.num_experts)]).view_as(x), gates


def _ref_megatron(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.router.weight.T)
    experts_count = m.experts.num_local_experts
    w1 = m.experts.weight1.reshape(experts_count, t.shape[1], -1)  # [E, H, 2I], the flat storage reinterpreted
    w2 = m.experts.weight2.reshape(experts_count, -1, t.shape[1])  # [E, I, H]
    half = w1.shape[-1] // 2
    experts = [functools.partial(_swiglu, w_gate=w1[e, :, :half], w_up=w1[e, :, half:], w_down=w2[e])
               for e in range(experts_count)]
    return (_dense(t, gates, experts).view_as(x), None), gates


def _ref_sparsemixer(m, x):
    t = _flat(x)
    scores = t @ m.gate.weight.T
    gates = torch.zeros_like(scores)
    for token, row in enumerate(scores):
        remaining = row.clone()
        for _ in range(2):
            winner = int(remaining.argmax())
            near = (remaining[winner] - row) / row.abs().clamp(min=remaining[winner].abs()) <= 2 * m.eps
            kept = remaining.masked_fill(~near, float("-inf"))
            gates[token, winner] = kept.softmax(-1)[winner]
            remaining[winner] = float("-inf")
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_packed_loop(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T)
    half = m.gate_up.shape[1] // 2
    experts = [functools.partial(_swiglu, w_gate=m.gate_up[e, :half].T, w_up=m.gate_up[e, half:].T,
                                 w_down=m.down[e].T) for e in range(m.num_experts)]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_swiglu_views(w_gate, w_up, w_down, count):
    """SwiGLU experts of weights stored ``[E, I, H]`` (gate, up) and ``[E, I, H]`` (down, used as ``x @ w``)."""
    return [functools.partial(_swiglu, w_gate=w_gate[e].T, w_up=w_up[e].T, w_down=w_down[e]) for e in range(count)]


def _ref_host_counts(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)
    return (_dense(t, gates, m.experts) + m.shared_experts(t)).view_as(x), gates


def _ref_fused(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T)
    half = m.w13.shape[1] // 2
    experts = [functools.partial(_swiglu, w_gate=m.w13[e, :half].T, w_up=m.w13[e, half:].T, w_down=m.w2[e].T)
               for e in range(m.w13.shape[0])]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_side_by_side(router, weights, renormalize):
    def reference(m, x):
        t = _flat(x)
        gates = _top_probs(t @ router(m).weight.T, renormalize=renormalize)
        count = gates.shape[1]
        w = weights(m)
        return _dense(t, gates, _ref_swiglu_views(*(p.view(count, -1, t.shape[1]) for p in (w.w1, w.v1, w.w2)),
                                                  count)).view_as(x), gates
    return reference


def _ref_top1(router):
    def reference(m, x):
        t = _flat(x)
        probs = (t @ router(m).weight.T).softmax(-1)
        gates = torch.where(_top(probs, 1), probs, 0)
        experts = list(m.experts.values()) if isinstance(m.experts, torch.nn.ModuleDict) else list(m.experts)
        return _dense(t, gates, experts).view_as(x), gates
    return reference


def _ref_softmax_of_top_of(router, experts):
    def reference(m, x):
        t = _flat(x)
        gates = _softmax_of_top(t @ router(m).weight.T)
        return _dense(t, gates, experts(m)).view_as(x), gates
    return reference


def _ref_legacy_mixtral(m, x):
    t = _flat(x)
    logits = t @ m.gate.weight.T
    gates = _top_probs(logits, renormalize=False)
    shared = torch.sigmoid(t @ m.shared_expert_gate.weight.T) * m.shared_expert(t)
    return ((_dense(t, gates, m.experts) + shared).view_as(x), logits), gates


def _ref_group_limited(m, x):
    t = _flat(x)
    gate = m.gate
    scores = torch.sigmoid(t @ gate.weight.T)
    biased = scores + gate.bias
    groups = biased.view(len(t), gate.groups, -1)
    best = groups.topk(2, dim=-1).values.sum(-1).topk(gate.kept_groups, dim=-1).indices
    allowed = torch.zeros(len(t), gate.groups, dtype=torch.bool).scatter(1, best, True)
    allowed = allowed.repeat_interleave(groups.shape[-1], dim=1)
    gates = torch.where(_top(biased.masked_fill(~allowed, float("-inf"))), scores, 0)
    gates = gates / gates.sum(-1, keepdim=True)
    return (_dense(t, gates, m.experts) + m.shared_experts(t)).view_as(x), gates


def _ref_noisy_gate(m, x):  # also sparse_dispatcher's: a raw [H, E] gate, softmax of the top-k
    t = _flat(x)
    gates = _softmax_of_top(t @ m.w_gate)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_dense_then_gather(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T, renormalize=False)
    experts = [lambda rows, e=e: F.gelu(rows @ m.w1[e]) @ m.w2[e] for e in range(m.w1.shape[0])]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_host_token_lists(m, x):
    t = _flat(x)
    probs = (t @ m.router.layer.weight.T).softmax(-1)
    gates = torch.where(_top(probs), probs, 0)
    gates = gates / gates.sum(-1, keepdim=True)
    count = gates.shape[1]
    w = m.experts.mlp
    experts = _ref_swiglu_views(*(p.view(count, -1, t.shape[1]) for p in (w.w1, w.v1, w.w2)), count)
    return (_dense(t, gates, experts).view_as(x), probs), gates


def _ref_layer(layer, h):
    h = h + layer.mixer(layer.input_norm(h))
    out, gates = _ref_packed_loop(layer.moe, layer.post_norm(h))
    return h + out, gates


def _ref_layers(layers):
    def reference(m, x):
        gates = []
        for layer in layers(m):
            x, g = _ref_layer(layer, x)
            gates.append(g)
        return x, torch.cat(gates)
    return reference


def _ref_modulelist_model(m, x):
    h, gates = _ref_layers(lambda model: model.layers)(m, x)
    return m.norm(h), gates


def _ref_prenorm(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T, renormalize=False)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_tensor_parallel(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T)

    def expert(e):
        return lambda rows: F.linear(F.gelu(F.linear(rows, e.linear_fc1.weight) + e.linear_fc1.bias),
                                     e.linear_fc2.weight, e.linear_fc2.bias)
    return _dense(t, gates, [expert(e) for e in m.local_experts]).view_as(x), gates


def _ref_in_place(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)
    return _dense(t, gates, [lambda rows, e=e: e(rows * TOP_K) / TOP_K for e in m.experts]).view_as(x), gates


def _ref_flat_mask(m, x):
    t = _flat(x)
    probs = (t @ m.wg.weight.T).softmax(-1)
    gates = _top_probs(t @ m.wg.weight.T)
    aux = gates.shape[1] * (probs.mean(0) * F.one_hot(probs.argmax(-1), gates.shape[1]).float().mean(0)).sum()
    return (_dense(t, gates, m.experts).view_as(x), aux), gates


def _ref_variadic(m, x):
    t = _flat(x)
    probs = (t.float() @ m.moe_layer.gate.wg.weight.T).softmax(-1)
    gates = torch.where(_top(probs, 1), probs, 0)
    chosen = (gates != 0).float()
    aux = gates.shape[1] * (probs.mean(0) * chosen.mean(0)).sum()
    out = _dense(t, gates, m.moe_layer.experts.local_experts).view_as(x)
    return (out, aux, chosen.sum(0).long()), gates


def _ref_seq_first_aux(m, x):
    t = _flat(x)
    probs = (t @ m.router.weight.T).softmax(-1)
    gates = _top_probs(t @ m.router.weight.T)
    aux = gates.shape[1] * ((gates != 0).float().mean(0) * probs.mean(0)).sum()
    return (_dense(t, gates, m.experts).view_as(x), aux), gates


def _ref_engine(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)
    w13, w2 = m.experts.w13_weight, m.experts.w2_weight
    half = w13.shape[1] // 2
    experts = [functools.partial(_swiglu, w_gate=w13[e, :half].T, w_up=w13[e, half:].T, w_down=w2[e].T)
               for e in range(w13.shape[0])]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_split_per_expert(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.layer.weight.T)
    count = gates.shape[1]
    w1, v1, w2 = (p.view(count, -1, t.shape[1]) for p in (m.experts.w1, m.experts.v1, m.experts.w2))
    experts = [lambda rows, e=e: (F.gelu(rows @ w1[e].T, approximate="tanh") * (rows @ v1[e].T)) @ w2[e]
               for e in range(count)]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_plain_layers(m, x):
    gates = []
    for layer in m.layers:
        out, g = _ref_softmax_of_top(layer, x)
        x = x + out
        gates.append(g)
    return x, torch.cat(gates)


def _ref_detached_scaled_inputs(m, x):
    t = _flat(x)
    logits = t @ m.router_weight
    gates = torch.where(_top(logits), torch.sigmoid(logits), 0)
    w = m.experts
    experts = [functools.partial(_swiglu, w_gate=w.w1[e], w_up=w.w3[e], w_down=w.w2[e]) for e in range(len(w.w1))]
    out = m.shared_expert(t) + sum(expert(t * gates[:, e, None]) for e, expert in enumerate(experts))
    return out.view_as(x), gates


def _ref_refactor(m, x):  # the refactor_* blocks: packed [E, 2I, H] / [E, H, I] SwiGLU experts, a shared expert
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)
    w, inter = m.experts, m.experts.down_proj.shape[-1]
    experts = [functools.partial(_swiglu, w_gate=w.gate_up_proj[e, :inter].T, w_up=w.gate_up_proj[e, inter:].T,
                                 w_down=w.down_proj[e].T) for e in range(gates.shape[1])]
    return (_dense(t, gates, experts) + m.shared_expert(t)).view_as(x), gates


def _ref_route_rows(m, x):  # refactor_route_rows: each chosen expert on its token scaled by the gate, unweighted
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)
    w, inter = m.experts, m.experts.down_proj.shape[-1]
    out = sum((gates[:, e, None] != 0) * _swiglu(t * gates[:, e, None], w_gate=w.gate_up_proj[e, :inter].T,
                                                  w_up=w.gate_up_proj[e, inter:].T, w_down=w.down_proj[e].T)
              for e in range(gates.shape[1]))
    return (out + m.shared_expert(t)).view_as(x), gates


def _ref_raw_router(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router, renormalize=False)
    experts = [lambda r, e=e: F.gelu(r @ m.w_up[e].T) @ m.w_down[e].T for e in range(m.w_up.shape[0])]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_argmax_top2(m, x):
    """First choices take slots in token order, second choices after every first one; past the capacity a choice
    is dropped, and the kept gates are renormalised."""
    t = _flat(x)
    probs = (t @ m.gate.wg.weight.T).softmax(-1)
    first = probs.argmax(-1)
    second = probs.scatter(1, first[:, None], -1.0).argmax(-1)
    capacity, experts = max(math.ceil(2 * t.shape[0] / probs.shape[1]), 4), probs.shape[1]
    kept = torch.zeros_like(probs)
    taken = [0] * experts
    for choice in (first, second):
        for token, e in enumerate(choice.tolist()):
            if taken[e] < capacity:
                kept[token, e] = probs[token, e]
            taken[e] += 1
    gates = kept / kept.sum(-1, keepdim=True).clamp(min=torch.finfo(kept.dtype).eps)
    return _dense(t, gates, m.experts.deepspeed_experts).view_as(x), gates


def _ref_expert_size_split(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.router.weight.T)

    def expert(e):
        def run(rows):
            h, g = (rows @ m.input_linear.weight[e].T).chunk(2, dim=-1)
            return (F.silu(h) * g) @ m.output_linear.weight[e].T
        return run
    return (_dense(t, gates, [expert(e) for e in range(gates.shape[1])]) + m.bias).view_as(x), gates


def _ref_scored_sorted(m, x):
    t = _flat(x)
    scores = torch.sigmoid(t @ m.router.gate.weight.T)
    gates = torch.where(_top(scores), scores, 0)
    w = m.experts
    experts = [functools.partial(_swiglu, w_gate=w.w1[e], w_up=w.w3[e], w_down=w.w2[e]) for e in range(len(w.w1))]
    out = m.shared_expert(t) + sum(expert(t * gates[:, e, None]) for e, expert in enumerate(experts))
    return out.view_as(x), gates


def _ref_lora(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T, renormalize=False)
    return (m.base(t) + _dense(t, gates, m.experts)).view_as(x), gates


def _ref_weights_handed_in(m, x):
    t = _flat(x)
    scores = torch.sigmoid(t @ m.gate.weight.T)
    gates = torch.where(_top(scores), scores, 0)
    return sum(expert(t, gates[:, e, None]) for e, expert in enumerate(m.experts)).view_as(x), gates


def _ref_dense_own_weights(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)

    def expert(e):
        def run(rows):
            gate, up = (rows @ m.w13[e].T).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ m.w2[e].T
        return run
    return _dense(t, gates, [expert(e) for e in range(gates.shape[1])]).view_as(x), gates


def _ref_index_add_capacity(m, x):
    """Each expert takes the first choices in token order, then the second ones, up to the capacity; the other
    choices are dropped (their gates zero, the kept ones not renormalised)."""
    t = _flat(x)
    probs = (t @ m.wg.weight.T).softmax(-1)
    chosen = probs.topk(2, dim=-1).indices
    capacity = math.ceil(2 * t.shape[0] / probs.shape[1])
    gates, taken = torch.zeros_like(probs), [0] * probs.shape[1]
    for j in range(2):
        for token, e in enumerate(chosen[:, j].tolist()):
            if taken[e] < capacity:
                gates[token, e] = probs[token, e]
            taken[e] += 1

    def expert(e):
        return lambda rows: F.relu(rows @ m.fc1_w[e] + m.fc1_b[e]) @ m.fc2_w[e] + m.fc2_b[e]
    return _dense(t, gates, [expert(e) for e in range(probs.shape[1])]).view_as(x), gates


def _ref_ranked_buffer(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.router.weight.T)

    def expert(e):
        return lambda rows: F.gelu(rows @ m.c_fc[e]) @ m.c_proj[e]
    return _dense(t, gates, [expert(e) for e in range(gates.shape[1])]).view_as(x), gates

def _ref_any_mask(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.router.linear.weight.T + m.router.linear.bias)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_gather_permute(m, x):
    t = _flat(x)
    scores = torch.sigmoid(t @ m.router.weight.T)
    gates = torch.where(_top(scores + m.router.expert_bias), scores, 0)
    gates = gates / gates.sum(-1, keepdim=True)
    return (_dense(t, gates, m.experts.local_experts).view_as(x), None), gates


def _ref_index_copy_bmm(m, x):
    t = _flat(x)
    gates = _softmax_of_top(m.gate(t))
    first, second = m.experts.htoh4, m.experts.h4toh

    def expert(e):
        return lambda rows: F.linear(F.gelu(F.linear(rows, first.weight[e], first.bias[e])), second.weight[e],
                                     second.bias[e])
    return _dense(t, gates, [expert(e) for e in range(gates.shape[1])]).view_as(x), gates


def _ref_binned_dropless(m, x):
    t = _flat(x)
    gates = _top_probs(m.router.w_score(t), renormalize=False)
    w = m.experts
    experts = [functools.partial(_swiglu, w_gate=w.w1[e], w_up=w.w3[e], w_down=w.w2[e]) for e in range(len(w.w1))]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_hidden_scaled(m, x):
    t = _flat(x)
    gates = _top_probs(m.gate(t), renormalize=False)

    def expert(e):
        def run(rows):
            gate, up = (rows @ m.experts.gate_up_proj[e].T).chunk(2, dim=-1)
            return (F.silu(gate) * up) @ m.experts.down_proj[e].T
        return run
    return _dense(t, gates, [expert(e) for e in range(gates.shape[1])]).view_as(x), gates


def _ref_lookup_table(m, x):
    t = _flat(x)
    gates = _top_probs(m.gate(t), renormalize=False)

    def expert(e):
        return lambda rows: F.gelu(rows @ m.w_in[e].T) @ m.w_out[e].T
    return _dense(t, gates, [expert(e) for e in range(gates.shape[1])]).view_as(x), gates


def _ref_grouped_capacity(m, x):
    """Per sequence (a group), each expert takes the first choices in token order, then the second ones, up to
    ceil(2 * S / E); the other choices are dropped (their gates zero)."""
    probs = m.router(x.float()).softmax(-1)
    top, chosen = probs.topk(2, dim=-1)
    capacity, experts = math.ceil(2 * x.shape[1] / probs.shape[-1]), probs.shape[-1]
    gates = torch.zeros_like(probs)
    for g in range(x.shape[0]):
        taken = [0] * experts
        for j in range(2):
            for s in range(x.shape[1]):
                e = int(chosen[g, s, j])
                if taken[e] < capacity:
                    gates[g, s, e] = top[g, s, j]
                taken[e] += 1
    t, gates = _flat(x), gates.reshape(-1, experts)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_embedding_tables(m, x):
    t = _flat(x)
    gates = _top_probs(m.gate(t), renormalize=False)
    count, width = gates.shape[1], t.shape[1]
    w_in, w_out = m.w_in.weight.view(count, -1, width), m.w_out.weight.view(count, width, -1)
    return _dense(t, gates, [lambda rows, e=e: F.gelu(rows @ w_in[e].T) @ w_out[e].T for e in range(count)]).view_as(
        x), gates


def _ref_quantizable(m, x):
    t = _flat(x)
    gates = _top_probs(m.gate(t))
    w = m.cond_ffn
    return _dense(t, gates, _ref_swiglu_views(w.w1, w.w3, w.w2.transpose(1, 2), gates.shape[1])).view_as(x), gates


def _ref_matmul_capacity(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate_weight.T, renormalize=False)
    w = m.experts
    return _dense(t, gates, _ref_swiglu_views(w.wi_gate.transpose(1, 2), w.wi_up.transpose(1, 2), w.wo,
                                              gates.shape[1])).view_as(x), gates


def _ref_sinkhorn(m, x):
    t = _flat(x)
    logits = m.router(t)
    cost = logits.exp()
    rows, cols = torch.ones(cost.shape[0]), torch.ones(cost.shape[1])
    for _ in range(10_000):  # column scales that stop moving (by less than 1e-4 on average)
        rows = 1 / (cost.shape[0] * ((cols * cost).sum(1) + 1e-8))
        updated = 1 / (cost.shape[1] * ((rows[:, None] * cost).sum(0) + 1e-8))
        moved, cols = (updated - cols).abs().mean(), updated
        if moved <= 1e-4:
            break
    gates = torch.where(_top(cols * cost * rows[:, None]), logits.sigmoid(), 0)
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_shared_down(m, x):
    t = _flat(x)
    gates = _top_probs(m.gate(t), renormalize=False)
    return m.down_proj(_dense(t, gates, m.experts)).view_as(x), gates


def _ref_centroids(m, x):
    t = _flat(x)
    gates = _softmax_of_top(-torch.cdist(t, m.centroids))
    return _dense(t, gates, m.experts).view_as(x), gates


def _ref_slot_capacity(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T, renormalize=False)
    experts = [lambda rows, e=e: F.gelu(rows @ m.wi[e]) @ m.wo[e] for e in range(gates.shape[1])]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_binned_scatter(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.router.weight.T)
    w1, w2 = m.w1.view(gates.shape[1], -1, t.shape[1]), m.w2.view(gates.shape[1], -1, t.shape[1])
    experts = [lambda rows, e=e: F.gelu(rows @ w1[e].T, approximate="tanh") @ w2[e] for e in range(gates.shape[1])]
    return _dense(t, gates, experts).view_as(x), gates


def _ref_host_list_rows(m, x):
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T)
    return (_dense(t, gates, m.experts) + m.residual_mlp(t)).view_as(x), gates


def _ref_banks_below_router(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.router.weight.T)

    def expert(e):
        def run(rows):
            up, gate = (rows @ m.experts.fc1.weight[e]).chunk(2, dim=-1)
            return (up * F.silu(gate)) @ m.experts.fc2.weight[e]
        return run
    return (_dense(t, gates, [expert(e) for e in range(gates.shape[1])]) + m.shared_experts(t)).view_as(x), gates


def _ref_padding_mask(m, x, attention_mask):
    """The gates as chosen (k per token, padded positions too), the output of the padding-zeroed ones."""
    t = _flat(x)
    gates = _top_probs(t @ m.gate.weight.T, renormalize=False)
    return _dense(t, gates * attention_mask.reshape(-1, 1), m.experts).view_as(x), gates


def _ref_listed(m, x):
    t = _flat(x)
    gates = _softmax_of_top(t @ m.gate.proj.weight.T)
    w = m.dispatcher.experts
    experts = [functools.partial(_swiglu, w_gate=w.gate_weights[e].T, w_up=w.up_weights[e].T,
                                 w_down=w.down_weights[e].T) for e in range(len(w.gate_weights))]
    return _dense(t, gates, experts).view_as(x), gates


REFERENCES = {
    "deepseek_reference": _ref_deepseek,
    "mixtral_reference": _ref_softmax_of_top,
    "per_projection_lists": _ref_top_probs(lambda m: m.gate, lambda m: [
        functools.partial(_swiglu, w_gate=m.w1[e].weight.T, w_up=m.w3[e].weight.T, w_down=m.w2[e].weight.T)
        for e in range(len(m.w1))]),
    "gating_multiplier": _ref_top_probs(lambda m: m.router, lambda m: m.experts),
    "nested_experts": _ref_top_probs(lambda m: m.router, lambda m: m.experts.experts),
    "packed_einsum_swiglu": _ref_packed_einsum,
    "sorted_split": _ref_top_probs(lambda m: m.router, lambda m: m.experts.mlps),
    "optional_mask_ones": _ref_top_probs(lambda m: m.router, lambda m: m.experts.mlps),
    "sorted_grouped_mm": _ref_grouped_mm,
    "fused_grouped_mm": _ref_fused_grouped,
    "aligned_grouped_mm": _ref_fused_grouped,
    "detached_score_dense": _ref_detached,
    "gshard_top2": _ref_gshard,
    "hierarchical": _ref_hierarchical,
    "decode_branch": _ref_top_probs(lambda m: m.gate, lambda m: m.experts),
    "decode_gather": _ref_decode_gather,
    "expert_post_norm": _ref_post_norm,
    "zero_identity_experts": _ref_zero_identity,
    "tuple_experts": _ref_top_probs(lambda m: m.router, lambda m: [lambda t, e=e: e(t)[0] for e in m.experts],
                                    renormalize=False),
    "modality_experts": _ref_modality,
    "expert_id_linears": _ref_expert_id,
    "megatron_grouped": _ref_megatron,
    "sparsemixer": _ref_sparsemixer,
    "param_matmul_experts": _ref_softmax_of_top,
    "conv1d_experts": _ref_softmax_of_top,
    "packed_loop": _ref_packed_loop,
    "decoder_layer": _ref_layer,
    "sequential_layers": _ref_layers(lambda m: list(m)),
    "modulelist_model": _ref_modulelist_model,
    "host_counts": _ref_host_counts,
    "repeated_rows": _ref_top_probs(lambda m: m.gate, lambda m: m.experts),
    "fused_reference": _ref_fused,
    "side_by_side": _ref_side_by_side(lambda m: m.router, lambda m: m, renormalize=True),
    "switch_top1": _ref_top1(lambda m: m.classifier),
    "capacity_top1": _ref_top1(lambda m: m.wg),
    "legacy_mixtral": _ref_legacy_mixtral,
    "group_limited": _ref_group_limited,
    "dropless_experts": _ref_side_by_side(lambda m: m.router.layer, lambda m: m.experts, renormalize=False),
    "noisy_gate": _ref_noisy_gate,
    "conv1d_transposed": _ref_softmax_of_top,
    "dense_then_gather": _ref_dense_then_gather,
    "host_token_lists": _ref_host_token_lists,
    "sort_slice": _ref_softmax_of_top_of(lambda m: m.wg, lambda m: m.ffn),
    "prenorm_experts": _ref_prenorm,
    "seq_first_aux": _ref_seq_first_aux,
    "engine_fused_layer": _ref_engine,
    "refactor_router_reordered": _ref_refactor,
    "refactor_experts_normalise": _ref_refactor,
    "refactor_routing_map": _ref_refactor,
    "refactor_gathered_routes": _ref_refactor,
    "refactor_masked_dense": _ref_refactor,
    "refactor_route_rows": _ref_route_rows,
    "refactor_sorted_route_rows": _ref_refactor,
    "refactor_masked_inputs": _ref_refactor,
    "refactor_padded_loop": _ref_refactor,
    "refactor_transposed_cast": _ref_refactor,
    "split_per_expert": _ref_split_per_expert,
    "plain_layers": _ref_plain_layers,
    "detached_scaled_inputs": _ref_detached_scaled_inputs,
    "stacked_then_topk": _ref_top_probs(lambda m: m.w_gate, lambda m: m.experts),
    "keyword_experts": _ref_top_probs(lambda m: m.gate, lambda m: m.experts, renormalize=False),
    "raw_router_own_weights": _ref_raw_router,
    "argmax_top2_capacity": _ref_argmax_top2,
    "expert_size_split": _ref_expert_size_split,
    "scored_sorted_rows": _ref_scored_sorted,
    "sparse_dispatcher": _ref_noisy_gate,
    "any_mask_tutorial": _ref_any_mask,
    "lora_experts": _ref_lora,
    "weights_handed_in": _ref_weights_handed_in,
    "dense_own_weights": _ref_dense_own_weights,
    "index_add_capacity": _ref_index_add_capacity,
    "ranked_buffer": _ref_ranked_buffer,
    "gather_permute": _ref_gather_permute,
    "index_copy_bmm": _ref_index_copy_bmm,
    "grouped_capacity": _ref_grouped_capacity,
    "chunked_routing": _ref_top_probs(lambda m: m.gate, lambda m: m.experts),
    "binned_dropless": _ref_binned_dropless,
    "dense_buffer": _ref_top_probs(lambda m: m.gate, lambda m: m.experts, renormalize=False),
    "present_experts": _ref_top_probs(lambda m: m.gate, lambda m: m.experts, renormalize=False),
    "hidden_scaled": _ref_hidden_scaled,
    "lookup_table_weights": _ref_lookup_table,
    "one_rank_parallel": _ref_top_probs(lambda m: m.gate, lambda m: m.experts, renormalize=False),
    "centroid_router": _ref_centroids,
    "chunked_experts": _ref_host_token_lists,
    "embedding_tables": _ref_embedding_tables,
    "quantizable_sorted": _ref_quantizable,
    "matmul_capacity": _ref_matmul_capacity,
    "sinkhorn_router": _ref_sinkhorn,
    "shared_down": _ref_shared_down,
    "variadic_forward": _ref_variadic,
    "tensor_parallel_linears": _ref_tensor_parallel,
    "flat_mask_mm": _ref_flat_mask,
    "per_token_loop": _ref_softmax_of_top_of(lambda m: m.gate, lambda m: m.experts),
    "in_place_scaled_input": _ref_in_place,
    "slot_capacity": _ref_slot_capacity,
    "binned_scatter": _ref_binned_scatter,
    "sorted_copies": _ref_top_probs(lambda m: m.gate, lambda m: m.experts, renormalize=False),
    "flattened_one_hot": _ref_softmax_of_top_of(lambda m: m.gate, lambda m: m.experts),
    "host_list_rows": _ref_host_list_rows,
    "histc_counts": _ref_expert_size_split,
    "banks_below_router": _ref_banks_below_router,
    "in_place_bias": _ref_packed_einsum,
    "sliced_banks": _ref_grouped_mm,
    "padding_mask": _ref_padding_mask,
    "mixed_experts": _ref_top_probs(lambda m: m.gate, lambda m: m.experts, renormalize=False),
    "parameter_list_experts": _ref_listed,
}


def test_every_entry_has_a_reference():
    assert REFERENCES.keys() == ENTRIES.keys()
    assert len(ENTRIES) >= 18


# tokens past an expert's capacity are dropped
_DROPPING = ("gshard_top2", "argmax_top2_capacity", "index_add_capacity", "grouped_capacity")
_shapes = st.tuples(st.integers(1, 2), st.integers(1, 9))


@pytest.mark.parametrize("name", list(ENTRIES))
@settings(max_examples=8)
@given(shape=_shapes, seed=st.integers(0, 2**16))
@example(shape=(1, 1), seed=0)
@example(shape=(2, 9), seed=1)
def test_block_equals_its_dense_reference(name, shape, seed):
    """The corpus itself: a top-k MoE whose output is its dense reference's, each token with at most k experts."""
    entry = ENTRIES[name]
    block = entry.build(seed=seed % 7)
    args, kwargs = entry.inputs(*shape, seed=seed)
    with torch.no_grad():
        out = block(*[a.clone() for a in args], **kwargs)  # a copy: a block may scale its input in place
        expected, gates = REFERENCES[name](block, *args, **kwargs)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    chosen = (gates != 0).sum(-1)
    assert chosen.max() <= entry.top_k, chosen
    assert name in _DROPPING or chosen.min() == entry.top_k, chosen
    assert gates.shape[-1] == entry.num_experts
    assert (out[0] if isinstance(out, tuple) else out).abs().max() > 0


# ---------------------------------------------------------------------------------------------------------------
# autocal on the corpus
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _synthesized(name: str):
    """``(original, calibration module)`` of the entry's (first) block, or the exception synthesize raised."""
    import autocal

    entry = ENTRIES[name]
    path = entry.blocks[0]
    try:
        return entry.build(0).get_submodule(path), autocal.synthesize(entry.build(0).get_submodule(path),
                                                                      example_inputs=synthesize_example(entry))
    except Exception as error:  # raised again by each test, as the xfail table expects
        return error


def _synthesized_or_raise(name: str):
    found = _synthesized(name)
    if isinstance(found, Exception):
        raise found
    return found


@pytest.mark.parametrize("name", _params("synthesize"))
def test_synthesize(name):
    def run():
        original, module = _synthesized_or_raise(name)
        for batch, seq in ((1, 1), (2, 5), (1, 9)):
            equivalent(original, module, *ENTRIES[name].inputs(batch, seq, seed=seq), ENTRIES[name].reach)
    _checked(name, "synthesize", run)


@pytest.mark.parametrize("name", _params("tokens"))
@settings(max_examples=6)
@given(shape=_shapes, seed=st.integers(0, 2**16))
@example(shape=(1, 1), seed=0)
def test_synthesized_module_on_any_token_count(name, shape, seed):
    def run():
        original, module = _synthesized_or_raise(name)
        equivalent(original, module, *ENTRIES[name].inputs(*shape, seed=seed), ENTRIES[name].reach)
    _checked(name, "tokens", run)


@pytest.mark.parametrize("name", _params("convert"))
def test_convert(name):
    _checked(name, "convert", lambda: check_convert(ENTRIES[name]))


@pytest.mark.parametrize("name", _params("convert_example"))
def test_convert_with_example_inputs(name):
    _checked(name, "convert_example", lambda: check_convert(ENTRIES[name], with_example=True))


@pytest.mark.parametrize("name", _params("mixed"))
def test_convert_beside_a_convertible_block(name):
    _checked(name, "mixed", lambda: check_mixed(ENTRIES[name]))


@pytest.mark.parametrize("name", _params("explain_k"))
def test_explain_reports_k(name):
    _checked(name, "explain_k", lambda: check_explain_k(ENTRIES[name]))


def test_known_failures_name_entries_and_checks():
    checks = {"synthesize", "tokens", "convert", "convert_example", "mixed", "explain_k"}
    assert {name for name, _ in KNOWN_FAILURES} <= ENTRIES.keys()
    assert {check for _, check in KNOWN_FAILURES} <= checks


class _SecondInputRead(VariadicMoELayer):
    """``VariadicMoELayer`` as training frameworks write it: ``inputs[1]`` read whether given or not."""

    def forward(self, *inputs):
        return super().forward(inputs[0], inputs[1])


def test_a_forward_taking_args_gets_a_none_beside_the_hidden_states():
    """No example inputs: a block whose ``*inputs`` forward reads a second input is run with None there."""
    import copy

    import autocal

    block = ENTRIES["variadic_forward"].build(0).moe_layer
    block.__class__ = _SecondInputRead
    model = torch.nn.ModuleDict({"block": block})
    original = copy.deepcopy(block)
    autocal.convert(model)
    assert isinstance(model["block"], autocal.MoECalibrationModule)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    equivalent(original, model["block"], (x, None), {})


def test_a_block_scaling_its_input_in_place_calibrates_on_the_inputs_as_given():
    """``x *= k`` inside the forward: every expert sees each token once, scaled once (not again by the real
    forward's scaling of the caller's tensor)."""
    import autocal
    from autocal.testing.corpus import Holder

    model = Holder(ENTRIES["in_place_scaled_input"].build(0))
    autocal.convert(model)
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    seen = {e: [] for e in range(len(model.block.experts))}
    handles = [expert.w1.register_forward_pre_hook(lambda _, args, e=e: seen[e].append(args[0].reshape(-1, 16)))
               for e, expert in enumerate(model.block.experts)]
    with torch.no_grad():
        model(x.clone())
    for handle in handles:
        handle.remove()
    for rows in seen.values():
        rows = torch.cat(rows)
        assert rows.shape[0] == 10
        torch.testing.assert_close(rows.sum(0), TOP_K * x.reshape(-1, 16).sum(0))
