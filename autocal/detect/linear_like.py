"""Experts made of matmuls with their own weights, where the Linear is not ``nn.Linear``.

Tensor-parallel and inference code writes its own Linear class: a module
holding ``weight`` (and maybe ``bias``) whose forward is a linear map of its
input with that weight, in either orientation: ``F.linear`` with ``weight
[out, in]``, or ``weight [in, out]`` as language-model codebases store it
(``addmm(bias, x, weight)``, ``x @ weight``), through views and reshapes.
``linear_orientation`` reads which from the recorded forward: only products,
additions and shape changes of the input with the module's own parameters, and
an output bitwise ``F.linear``'s on a random input of 2 and of 3 dimensions (so
the ``nn.Linear`` standing in for it gives the original's output, bitwise).
Tensor-parallel Linears may also return a pair (``skip_bias_add``: the product
and the bias apart, the caller adding it, often fused with the activation; or
the biased product and None): ``linear_output`` reads which, and the
``SplitLinear`` standing in for such a module returns the same pair.

``as_linear`` gives an ``nn.Linear`` over the same storage (no copies): the
same parameter objects for ``[out, in]``; for ``[in, out]``, a weight that is
the transposed view of the original's, as packed experts stored ``[in, out]``
are unpacked (``synthesize/unpack.unpack_linear``). Calibration and quantizers
see real ``nn.Linear`` layers. A quantizer that writes into the Linear's weight
with ``copy_`` (LLM Compressor, through compressed-tensors'
``update_offload_parameter``, when the weight is not offloaded) writes the
original's storage through the view; one that replaces the weight's ``.data``
(or an offloaded copy) leaves the original module untouched, and only the
Linear holds the result. Either way a checkpoint written from the converted model
holds the Linear's weight: the same key, in ``nn.Linear``'s ``[out, in]``
layout, as for unpacked packed experts (it is a per-expert Linear checkpoint,
not one the original class loads; ``restore`` gives back the original modules).

``made_of_linears`` is what makes a module an expert: it has ``nn.Linear`` or
Linear-like submodules, and every other parameter is its own (a gating
multiplier beside its Linears), not another layer's; beside a router that
scores tokens by a matmul, a norm's too (an expert that normalises its input).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..trace.record import record
from .graph_utils import target_name

__all__ = ["linear_like", "linear_orientation", "linear_output", "linear_modules", "made_of_linears", "lookup_tables",
           "as_linear", "linear_views", "SplitLinear", "TENSOR", "BIAS_APART", "WITH_NONE"]

# What a Linear-like module returns: the product with the bias added, or a pair of the product and its bias apart
# (Megatron's ``skip_bias_add``), or a pair of the biased product and None.
TENSOR, BIAS_APART, WITH_NONE = "tensor", "bias apart", "with None"


# What a Linear class's forward may call beside its one product: shape changes of the input and output, the bias.
_PRODUCTS = {"linear", "matmul", "mm", "addmm"}
_ALLOWED = _PRODUCTS | {"view", "reshape", "flatten", "contiguous", "t", "add", "add_"}


def linear_like(module: nn.Module) -> bool:
    """Is ``module`` (not an ``nn.Linear``) a leaf whose forward is a Linear of its own weight (and bias)?"""
    return linear_orientation(module) is not None


def linear_orientation(module: nn.Module) -> str | None:
    """``"linear"`` (``weight [out, in]``), ``"matmul"`` (``weight [in, out]``), or None: no Linear-like leaf."""
    form = _form(module)
    return form[0] if form else None


def linear_output(module: nn.Module) -> str | None:
    """What a Linear-like leaf returns: ``TENSOR``, ``BIAS_APART`` or ``WITH_NONE`` (None: no Linear-like leaf)."""
    form = _form(module)
    return form[1] if form else None


def _form(module: nn.Module) -> tuple[str, str] | None:
    """``(orientation, output)`` of a Linear-like leaf, or None."""
    params = dict(module.named_parameters())
    weight = params.get("weight")
    if isinstance(module, nn.Linear) or next(module.children(), None) is not None or weight is None:
        return None
    if weight.dim() != 2 or set(params) - {"weight", "bias"}:
        return None
    bias = params.get("bias")
    if _calls_f_linear(module, weight, bias):
        return "linear", TENSOR
    for orientation, (out_features, in_features) in (("linear", weight.shape), ("matmul", weight.shape[::-1])):
        if bias is None or bias.shape == (out_features,):
            output = _computes_linear(module, orientation, in_features)
            if output is not None:
                return orientation, output
    return None


def _record(module: nn.Module, x: torch.Tensor):
    try:
        with torch.no_grad():
            return record(module, (x,))
    except Exception:  # a forward that does not take one [rows, in] input is no Linear
        return None


def _calls_f_linear(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Is the forward exactly ``F.linear(x, self.weight, self.bias)`` (read from the graph, any device)?"""
    if bias is not None and bias.shape != weight.shape[:1]:
        return False
    rec = _record(module, torch.zeros(2, weight.shape[1], dtype=weight.dtype, device=weight.device))
    if rec is None:
        return False
    calls = [n for n in rec.graph.nodes if n.op == "call_function"]
    if len(calls) != 1 or target_name(calls[0]) != "linear" or rec.graph.output_node().args[0] is not calls[0]:
        return False
    _, *operands = [getattr(a, "target", a) for a in (*calls[0].args, *calls[0].kwargs.values())]
    expected = [["weight", "bias"]] if bias is not None else [["weight"], ["weight", None]]
    return calls[0].args[0].op == "placeholder" and operands in expected


def _computes_linear(module: nn.Module, orientation: str, in_features: int) -> str | None:
    """Does the forward compute, with one product and shape changes, bitwise ``F.linear`` in ``orientation``?
    What it returns (``TENSOR``, ``BIAS_APART``, ``WITH_NONE``), or None where it does not.

    Bitwise, so that the ``nn.Linear`` standing in for the module (calibration off) gives the original's output.
    """
    weight = module.weight
    if weight.is_meta:
        return None  # no values to compare
    generator = torch.Generator().manual_seed(0)
    linear_weight = weight if orientation == "linear" else weight.t()
    outputs = set()
    for shape in ((3, in_features), (2, 3, in_features)):
        x = torch.randn(shape, generator=generator).to(device=weight.device, dtype=weight.dtype)
        rec = _record(module, x)
        if rec is None or not _one_product_of_own_weights(rec.graph):
            return None
        with torch.no_grad():
            outputs.add(_output_kind(module, module(x), x, linear_weight))
    return outputs.pop() if len(outputs) == 1 else None


def _output_kind(module: nn.Module, out, x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """``TENSOR``, ``BIAS_APART`` or ``WITH_NONE``: which of them ``out`` is, bitwise; None: none of them."""
    bias = getattr(module, "bias", None)
    if isinstance(out, torch.Tensor):
        return TENSOR if _bitwise_equal(out, F.linear(x, weight, bias)) else None
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], torch.Tensor)):
        return None
    if out[1] is None and _bitwise_equal(out[0], F.linear(x, weight, bias)):
        return WITH_NONE
    if bias is not None and out[1] is bias and _bitwise_equal(out[0], F.linear(x, weight)):
        return BIAS_APART
    return None


def _one_product_of_own_weights(graph) -> bool:
    """One product, shape changes and additions, reading no member but ``weight`` and ``bias`` (no buffer)."""
    calls = [target_name(n) for n in graph.nodes if n.op in ("call_function", "call_method")]
    reads = {n.target for n in graph.nodes if n.op == "get_attr"}
    return (all(name in _ALLOWED for name in calls) and sum(name in _PRODUCTS for name in calls) == 1
            and reads <= {"weight", "bias"})


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def linear_modules(module: nn.Module) -> list[str]:
    """Paths (in ``module``) of its ``nn.Linear`` and Linear-like submodules."""
    return [name for name, sub in module.named_modules() if isinstance(sub, nn.Linear) or linear_like(sub)]


def made_of_linears(module: nn.Module, norms: bool = False) -> bool:
    """Does ``module`` hold Linear(-like) submodules, and beside them only parameters of its own or, with
    ``norms``, of norms (an expert normalising its input or hidden state: leaves with 1-D parameters only)?

    A list of decoder layers is made of Linears and norms too: callers accept norms only beside a router that
    scores tokens by a matmul (``lookup_tables`` are no routers), never on their shapes alone.
    """
    paths = linear_modules(module)
    owned = {id(p) for path in paths for p in module.get_submodule(path).parameters()}
    owned |= {id(p) for p in module.parameters(recurse=False)}
    if norms:
        owned |= {id(p) for sub in module.modules() if _norm_leaf(sub) for p in sub.parameters()}
    return bool(paths) and all(id(p) in owned for p in module.parameters())


def lookup_tables(module: nn.Module) -> set[int]:
    """Ids of the embedding tables in ``module``: weights looked up by index, never multiplied with the tokens
    (a 2-layer encoder's ``[2, H]`` token-type table is shaped like a router for its 2 layers, and is none)."""
    return {id(m.weight) for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))}


def _norm_leaf(module: nn.Module) -> bool:
    """A leaf module whose parameters are all 1-D (a LayerNorm, an RMSNorm): it scales features, it maps none."""
    params = list(module.parameters())
    return next(module.children(), None) is None and bool(params) and all(p.dim() == 1 for p in params)


def linear_views(container: nn.Module, entries: list[nn.Module]) -> list[str]:
    """Paths (in ``container``) of the entries' Linear-like submodules, each to be seen as an ``nn.Linear``."""
    names = {id(m): n for n, m in container.named_modules()}
    inner = [path for path in linear_modules(entries[0]) if not isinstance(entries[0].get_submodule(path), nn.Linear)]
    return [f"{names[id(entry)]}.{path}".strip(".") for entry in entries for path in inner]


class SplitLinear(nn.Linear):
    """An ``nn.Linear`` returning a pair, as the tensor-parallel Linear it stands for does: ``(x Wᵀ, bias)`` with
    the bias apart (``output`` ``BIAS_APART``), or ``(x Wᵀ + bias, None)`` (``WITH_NONE``). Quantizers that
    target ``Linear`` match it (by class ancestry); the product is the weight's alone either way."""

    def __init__(self, in_features: int, out_features: int, output: str, **kwargs) -> None:
        super().__init__(in_features, out_features, **kwargs)
        self.output = output

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.output == BIAS_APART:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, returns={self.output}"


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` over ``module``'s own weight and bias: the same parameter objects for ``weight [out, in]``,
    a transposed view of it for ``weight [in, out]`` (no copy; see the module docstring for what a quantizer sees);
    a ``SplitLinear`` where the module returns a pair."""
    weight = module.weight
    orientation, output = _form(module)
    if orientation == "matmul":
        weight = nn.Parameter(weight.detach().t(), requires_grad=weight.requires_grad)
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta") if output == TENSOR else \
        SplitLinear(weight.shape[1], weight.shape[0], output, bias=False, device="meta")
    linear.weight = weight
    linear.register_parameter("bias", getattr(module, "bias", None))
    return linear
