"""The example inputs autocal makes for a transformers model when it is given none (trace/model_inputs.py)."""

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import autocal
from autocal.numerics import compare_outputs
from autocal.testing import zoo
from autocal.testing.assertions import count_rows, expert_linears
from autocal.testing.corpus import ENTRIES, EXPERTS, HIDDEN as CORPUS_HIDDEN, TOP_K, SwiGLUExpert, init_normal
from autocal.trace import model_inputs
from autocal.testing.toy_moe import ToyMoEConfig, make_toy_block


def test_token_ids_avoid_every_special_token_and_the_mask_follows_the_signature():
    model = zoo.build_model("qwen3_vl_moe", device="meta")
    candidates, forward = model_inputs.model_example(model)
    full = candidates[0]
    special = model_inputs._special_token_ids(model.config)
    assert forward is model and special  # image / video placeholders are special ids
    assert not set(full["input_ids"].flatten().tolist()) & special
    assert torch.equal(full["attention_mask"], torch.ones_like(full["input_ids"]))
    assert torch.equal(full["mm_token_type_ids"], torch.zeros_like(full["input_ids"]))
    assert set(candidates[-1]) == {"input_ids"}  # the fallback: the main input alone


def test_an_expert_index_input_is_found_from_the_forward_signature():
    candidates, _ = model_inputs.model_example(zoo.build_model("vitpose_backbone"))
    assert set(candidates[0]) == {"pixel_values", "dataset_index"}
    assert candidates[0]["dataset_index"].tolist() == [0, 1]


def test_no_model_run_beyond_the_twin_budget_or_outside_transformers(monkeypatch):
    assert model_inputs.model_example(make_toy_block(ToyMoEConfig())) is None
    monkeypatch.setattr(model_inputs, "TWIN_BUDGET", 0)
    assert model_inputs.model_example(zoo.build_model("qwen3_moe", device="meta")) is None
    assert model_inputs.model_example(zoo.build_model("qwen3_moe")) is not None  # real weights: no twin needed


def test_a_block_that_needs_the_models_inputs_converts_without_any():
    """DeepSeek-V4's hash-routed layers take input_ids: analysed on the model's own call."""
    model = zoo.build_model("deepseek_v4")
    inputs = zoo.example_inputs(model)
    with torch.no_grad():
        expected = model(**inputs).logits
    autocal.convert(model)
    _set_calibration(model, False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


def _set_calibration(model, on: bool) -> None:
    for module in model.modules():
        if isinstance(module, autocal.MoECalibrationModule):
            module.calibrate_all_experts = on


# Whole models from outside transformers, converted with no example inputs: their MoE blocks take more than hidden
# states (token ids for hash routing, a padding mask), which only the model's own call gives them.

VOCAB, HIDDEN, EXPERTS = 24, 8, 4


def _gelu_experts() -> nn.ModuleList:
    return nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, 12), nn.GELU(), nn.Linear(12, HIDDEN)) for _ in range(EXPERTS))


class HashMoE(nn.Module):
    """Hash routing: each token's expert is its id modulo the number of experts, weighted by a sigmoid gate."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = _gelu_experts()

    def forward(self, hidden_states, input_ids):
        t = hidden_states.reshape(-1, HIDDEN)
        chosen = (input_ids.reshape(-1) % EXPERTS)[:, None]
        weight = torch.sigmoid(self.gate(t)).gather(1, chosen)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows = (chosen[:, 0] == e).nonzero().squeeze(-1)
            out[rows] = weight[rows] * expert(t[rows])
        return out.view(hidden_states.shape)


class PaddingMaskMoE(nn.Module):
    """fairseq style: a padding mask without a default; padded tokens go to no expert."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(HIDDEN, EXPERTS, bias=False)
        self.experts = _gelu_experts()

    def forward(self, hidden_states, padding_mask):
        t = hidden_states.reshape(-1, HIDDEN)
        keep = ~padding_mask.reshape(-1, 1)
        weights, chosen = self.gate(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where((chosen == e) & keep)
            out.index_add_(0, rows, weights[rows, slot, None] * expert(t[rows]))
        return out.view(hidden_states.shape)


class HashLM(nn.Module):
    """A research repo's language model: forward(input_ids), its hash layers handed the ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.layers = nn.ModuleList(HashMoE() for _ in range(2))
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h, input_ids)
        return self.head(h)


class StartPosLM(HashLM):
    """Reference inference code: forward(tokens, start_pos: int), positions counted from start_pos."""

    def __init__(self):
        super().__init__()
        self.positions = nn.Embedding(32, HIDDEN)

    def forward(self, tokens: torch.Tensor, start_pos: int):
        h = self.embed(tokens) + self.positions(torch.arange(start_pos, start_pos + tokens.shape[1]))
        for layer in self.layers:
            h = h + layer(h, tokens)
        return self.head(h)


class PaddedEncoder(nn.Module):
    """fairseq style encoder: forward(src_tokens, src_lengths), the padding mask made from the padding index."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(VOCAB, HIDDEN, padding_idx=1)
        self.layers = nn.ModuleList(PaddingMaskMoE() for _ in range(2))

    def forward(self, src_tokens, src_lengths):
        padding_mask = src_tokens.eq(self.embed_tokens.padding_idx)
        h = self.embed_tokens(src_tokens)
        for layer in self.layers:
            h = h + layer(h, padding_mask)
        return h


class LatentsModel(nn.Module):
    """A diffusion-style model: latents and class labels in (an embedding table it does not take token ids for)."""

    def __init__(self):
        super().__init__()
        self.labels = nn.Embedding(10, CORPUS_HIDDEN)
        self.proj = nn.Linear(4, CORPUS_HIDDEN)
        self.moe = ENTRIES["mixtral_reference"].make()
        self.out = nn.Linear(CORPUS_HIDDEN, 4)

    def forward(self, latents, labels):
        return self.out(self.moe(self.proj(latents) + self.labels(labels)[:, None]))


class RemoteConfig(PretrainedConfig):
    model_type = "autocal_test_remote_hash"

    def __init__(self, vocab_size=VOCAB, hidden_size=HIDDEN, **kwargs):
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        super().__init__(**kwargs)


class NamedTokensModel(PreTrainedModel):
    """Remote code whose forward names its token ids ``tokens`` (its main_input_name is left at input_ids)."""

    config_class = RemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HashMoE() for _ in range(2))
        self.post_init()

    def forward(self, tokens, attention_mask=None):
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer(h, tokens)
        return CausalLMOutputWithPast(logits=h)


class PositionsModel(NamedTokensModel):
    """Remote code whose forward takes position_ids without a default."""

    def __init__(self, config):
        super().__init__(config)
        self.positions = nn.Embedding(16, config.hidden_size)

    def forward(self, input_ids, position_ids):
        h = self.embed(input_ids) + self.positions(position_ids)
        for layer in self.layers:
            h = h + layer(h, input_ids)
        return CausalLMOutputWithPast(logits=h)


def _build(make, seed=0):
    torch.manual_seed(seed)
    return init_normal(make(), seed)


def _ids(seed=5):
    ids = torch.randint(2, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    ids[1, 5:] = 1  # padding, for the padded encoder
    return ids


WHOLE_MODELS = {
    "plain_hash": (HashLM, lambda: {"input_ids": _ids()}),
    "plain_start_pos": (StartPosLM, lambda: {"tokens": _ids(), "start_pos": 3}),
    "plain_padding_mask": (PaddedEncoder, lambda: {"src_tokens": _ids(), "src_lengths": torch.tensor([7, 5])}),
    "remote_named_tokens": (lambda: NamedTokensModel(RemoteConfig()), lambda: {"tokens": _ids()}),
    "remote_required_positions": (lambda: PositionsModel(RemoteConfig()),
                                  lambda: {"input_ids": _ids(), "position_ids": torch.arange(7).expand(2, -1)}),
}


@pytest.mark.parametrize("name", list(WHOLE_MODELS))
def test_a_whole_models_blocks_that_need_its_inputs_convert_without_any(name):
    """Each model's MoE blocks need the token ids or a mask the model makes from them: analysed on inputs autocal
    makes for the model (token ids for a module holding an embedding table; the forward's own parameter names for
    remote code), the model's output with calibration off is the original's bitwise, with calibration on within
    tolerance, and every expert Linear sees every token of its layer."""
    make, inputs = WHOLE_MODELS[name]
    inputs = inputs()
    with torch.no_grad():
        expected = _build(make)(**inputs)
    model = autocal.convert(_build(make))
    _set_calibration(model, False)
    with torch.no_grad():
        assert compare_outputs(expected, model(**inputs))[1], "calibration off: bitwise"
    _set_calibration(model, True)
    linears = expert_linears(model)
    with count_rows(linears) as rows, torch.no_grad():
        on = model(**inputs)
    assert compare_outputs(expected, on)[2], "calibration on: within tolerance"
    assert len(linears) == 2 * EXPERTS * 2 and set(rows.values()) == {_tokens(inputs)}


def _tokens(inputs: dict) -> int:
    return next(iter(inputs.values())).numel()


def test_a_module_whose_forward_takes_no_token_ids_is_analysed_block_by_block_without_a_word(recwarn):
    """Token ids are a guess for a module that is no transformers model: where they do not run it (latents in),
    its blocks get inputs made from their parameters and nothing is said (a transformers model is warned about)."""
    latents, labels = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 7])
    with torch.no_grad():
        expected = _build(LatentsModel)(latents, labels)
    model = autocal.convert(_build(LatentsModel))
    assert isinstance(model.moe, autocal.MoECalibrationModule)
    assert not [w for w in recwarn if "autocal" in str(w.message)]
    _set_calibration(model, False)
    with torch.no_grad():
        assert torch.equal(model(latents, labels), expected)


class TypedConfig(RemoteConfig):
    model_type = "autocal_test_remote_typed"

    def __init__(self, **kwargs):
        super().__init__(hidden_size=CORPUS_HIDDEN, **kwargs)


class TypedModel(PreTrainedModel):
    """Remote code of a multimodal model: text and image expert sets chosen by token_type_ids (zeros by default)."""

    config_class = TypedConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.moes = nn.ModuleList(ENTRIES["modality_experts"].make() for _ in range(2))
        self.post_init()

    def forward(self, input_ids, token_type_ids=None):
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.embed(input_ids)
        for moe in self.moes:
            h = h + moe(h, token_type_ids=types)
        return CausalLMOutputWithPast(logits=h)


def test_an_expert_set_the_made_up_inputs_never_reach_is_refused_pointing_to_example_inputs():
    """autocal makes text token types (zeros): the image experts are never called, and the refusal says the block
    was analysed on inputs autocal made up; the model's own inputs, image tokens among them, convert it."""
    with pytest.raises(autocal.AutocalError) as refused:
        autocal.convert(_build(lambda: TypedModel(TypedConfig())))
    assert refused.value.module_path == "moes.0" and "image_experts" in refused.value.explanation
    assert any("inputs autocal made up" in hint and "example_inputs" in hint for hint in refused.value.hints)
    inputs = {"input_ids": _ids(), "token_type_ids": (torch.arange(7) % 3 == 0).long().expand(2, -1)}
    with torch.no_grad():
        expected = _build(lambda: TypedModel(TypedConfig()))(**inputs).logits
    model = autocal.convert(_build(lambda: TypedModel(TypedConfig())), example_inputs=inputs)
    _set_calibration(model, False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)


class StarInputMoE(PaddingMaskMoE):
    """fairscale style: forward(*input), the hidden states the first positional input; experts given no rows are
    skipped (a branch symbolic tracing cannot follow)."""

    def forward(self, *input):
        t = input[0].reshape(-1, HIDDEN)
        weights, chosen = self.gate(t).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)
            if rows.numel():
                out.index_add_(0, rows, weights[rows, slot, None] * expert(t[rows]))
        return out.view(input[0].shape)


class StarInputLM(HashLM):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(StarInputMoE() for _ in range(2))

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def test_a_block_taking_star_args_converts():
    """fairscale's ``forward(*input)``: the inputs are named by their place, and the model converts without example
    inputs; calibration off is the original, on within tolerance (it was refused, with a hint to name them)."""
    inputs = {"input_ids": _ids()}
    with torch.no_grad():
        expected = _build(StarInputLM)(**inputs)
    model = autocal.convert(_build(StarInputLM))
    assert all(isinstance(layer, autocal.MoECalibrationModule) for layer in model.layers)
    for on in (False, True):
        _set_calibration(model, on)
        with torch.no_grad():
            out = model(**inputs)
        assert torch.equal(out, expected) if not on else compare_outputs(expected, out)[2]


def test_a_plain_model_on_the_meta_device_runs_the_token_ids_on_a_cpu_twin(monkeypatch):
    """Built on the meta device (structure only), the hash-routed layers convert as the real model's do; beyond the
    twin budget the model is not run."""
    real = autocal.convert(_build(HashLM))
    with torch.device("meta"):
        model = HashLM().eval()
    autocal.convert(model)
    converted = {p: type(m).__name__ for p, m in model.named_modules() if isinstance(m, autocal.MoECalibrationModule)}
    assert converted == {p: type(m).__name__ for p, m in real.named_modules()
                         if isinstance(m, autocal.MoECalibrationModule)} and set(converted) == {"layers.0", "layers.1"}
    with torch.device("meta"):
        unconverted = HashLM()
    assert model_inputs.token_example(unconverted) is not None
    monkeypatch.setattr(model_inputs, "TWIN_BUDGET", 0)
    assert model_inputs.token_example(unconverted) is None


class CachedLM(StartPosLM):
    """Reference inference code keeping its key cache as a buffer, written at start_pos on every call."""

    def __init__(self):
        super().__init__()
        self.register_buffer("cache", torch.zeros(2, 32, HIDDEN), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: int):
        h = self.embed(tokens)
        self.cache[: h.shape[0], start_pos: start_pos + h.shape[1]] = h
        return super().forward(tokens, start_pos)


def test_a_run_of_the_model_that_writes_its_buffers_is_told():
    """autocal runs the model once on inputs it makes; reference code that writes a cache buffer on every call then
    holds values the user never put there. convert says so, naming the buffer; the blocks still convert."""
    with pytest.warns(UserWarning, match=r"wrote into its buffers cache;"):
        model = autocal.convert(_build(CachedLM))
    assert all(isinstance(layer, autocal.MoECalibrationModule) for layer in model.layers)


class _HalfExpertsMoE(nn.Module):
    """bfloat16 experts behind a float32 router: the block takes float32 hidden states and casts each expert's
    rows."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Linear(CORPUS_HIDDEN, EXPERTS, bias=False)
        self.experts = nn.ModuleList(SwiGLUExpert() for _ in range(EXPERTS)).to(torch.bfloat16)

    def forward(self, x):
        t = x.reshape(-1, x.shape[-1])
        weights, ids = self.gate(t).softmax(-1).topk(TOP_K, dim=-1)
        out = torch.zeros_like(t)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(ids == e)
            out[token] += weights[token, slot, None] * expert(t[token].bfloat16()).float()
        return out.view_as(x)


def test_inputs_are_made_in_the_blocks_other_dtypes_when_the_experts_one_fails():
    """Made-up hidden states come in the experts' dtype first (bfloat16), which the float32 router refuses, then
    in the router's: the block converts without example inputs."""
    model = nn.Sequential(init_normal(_HalfExpertsMoE(), 0))
    x = torch.randn(1, 5, CORPUS_HIDDEN)
    with torch.no_grad():
        expected = model(x)
    autocal.convert(model)
    assert isinstance(model[0], autocal.MoECalibrationModule)
    with torch.no_grad(), count_rows(expert_linears(model)) as rows:
        assert compare_outputs(expected, model(x))[2]
    assert set(rows.values()) == {5}
