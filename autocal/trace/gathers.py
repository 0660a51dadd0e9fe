"""Gathered expert weights at run time: what a gather of experts' entries is, and following it to its contraction.

A gather takes entries of an ``[E, …]`` weight along its first dimension by
expert indices, however it is spelt: ``W[idx]``, ``W[idx, ...]``,
``W[idx, :, :]``, ``W[e]`` for one expert, ``index_select(W, 0, idx)``,
``F.embedding(idx, W)``, and a piece of ``W`` split per expert
(``torch.chunk(W, E)[e]``, read as ``W.view(E, ...)[e]``). Detection (``detect/gathered.py``) also checks on the
recorded values that the op gave ``W[idx]``. The contraction that then applies
the gathered weights to features is any op of two tensors (``einsum`` with any
subscripts, ``matmul``, ``bmm``, ``F.linear``), possibly with a gathered bias
as a third (``F.linear(x, W[e], b[e])``); detection reads what it computes from
the recorded values, never from its name or subscripts.
"""

from __future__ import annotations

import math
import operator
from typing import Any, Callable

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

from .decompose import decomposition
from .record import flat_args, value

__all__ = ["BIAS", "SWAPPED", "entries_copy", "gathered_index", "reshaped_view", "same_entries", "split_pieces", "splits_as_views",
           "flat_gathers_as_gathers", "swapped_view",
           "GatherTracker", "slot_features", "slot_inputs", "per_slot"]

SWAPPED = {"linear": "matmul", "matmul": "linear"}  # an orientation, for each expert's matrix transposed
BIAS = "bias"  # the tracker's key of a gathered bias: it goes with its weight into the same contraction
_ITEM = ("getitem", "__getitem__")


def _expert_index(item: Any) -> torch.Tensor | int | None:
    """``item`` when it can index experts: an integer tensor (not a mask), or an int."""
    if isinstance(item, torch.Tensor):
        return None if item.is_floating_point() or item.is_complex() or item.dtype == torch.bool else item
    return item if isinstance(item, int) and not isinstance(item, bool) else None


def _whole(item: Any) -> bool:
    """An index entry that keeps a whole dimension (``...`` or ``:``)."""
    return item is Ellipsis or (isinstance(item, slice) and item == slice(None))


def gathered_index(func: Callable, args: tuple) -> tuple[torch.Tensor, torch.Tensor | int] | None:
    """``(weight, index)`` when ``func(*args)`` takes entries of ``weight`` along its first dimension.

    The index is an integer tensor (each token's or slot's expert) or an int (one
    expert's slice, in a loop over the experts); every other dimension is kept whole.
    """
    name = getattr(func, "__name__", "")
    if name in _ITEM and len(args) == 2 and isinstance(args[0], torch.Tensor):
        items = args[1] if isinstance(args[1], tuple) else (args[1],)
        index = _expert_index(items[0]) if items else None
        return (args[0], index) if index is not None and all(_whole(i) for i in items[1:]) else None
    if name == "embedding" and len(args) >= 2 and isinstance(args[1], torch.Tensor):
        index = _expert_index(args[0])
        return (args[1], index) if isinstance(index, torch.Tensor) else None
    if name == "index_select" and len(args) == 3 and isinstance(args[0], torch.Tensor) \
            and args[1] in (0, -args[0].dim()):
        index = _expert_index(args[2])
        return (args[0], index) if isinstance(index, torch.Tensor) else None
    return None


class GatherTracker(TorchFunctionMode):
    """Follows expert weights gathered from known parameters, through views, to the op that contracts them.

    ``params`` maps the identity of each tracked parameter to its key (``BIAS``:
    a bias that goes with a gathered weight into its contraction); a view of one
    (``weight1.view(E, H, -1)``) is tracked as the parameter. At an op of
    one gathered weight, its gathered biases and one other tensor (the features),
    ``contract(key, index, features, func, args, kwargs)`` is called (``index``
    the expert indices or number; ``entries``, parameters that are one expert's weight each, count as gathered
    wherever they are used); so it is at an op of one tracked parameter
    itself, or any view of all its entries, and one other tensor (``index``
    None: every expert's entries). What it
    returns replaces the op's result, None keeps the op.
    """

    def __init__(self, params: dict[int, object], contract: Callable,
                 entries: dict[int, tuple[object, int]] | None = None) -> None:
        super().__init__()
        self.params, self.contract = params, contract
        self.entries = entries or {}  # one expert's weight each, kept in a list: ``(key, expert)`` by identity
        self.marks: dict[int, tuple] = {}
        self.views: dict[int, tuple] = {}  # views of tracked parameters: (the view, kept alive; the key)
        self.wholes: dict[int, tuple] = {}  # other views of their entries (``w.transpose(0, 1)``), only contracted whole
        self.swapped: set[int] = set()  # wholes that are ``w.transpose(-2, -1)``: gathered by experts as well

    def _tracks(self, tensor: object) -> bool:
        """Is ``tensor`` a tracked parameter or a view of one?"""
        return isinstance(tensor, torch.Tensor) and any(id(tensor) in tracked
                                                        for tracked in (self.params, self.views, self.wholes))

    def _key(self, tensor: torch.Tensor) -> object:
        return self.params[id(tensor)] if id(tensor) in self.params else self.views.get(id(tensor), (None, None))[1]

    def _whole_key(self, tensor: torch.Tensor) -> object:
        return self.wholes[id(tensor)][1] if id(tensor) in self.wholes else self._key(tensor)

    def _mark_entries(self, args: tuple) -> None:
        """Each listed entry among ``args`` marked as its expert's gathered weight: a use of ``self.w[e]`` is a
        gather of expert ``e``'s entry, as ``w[e]`` of a packed weight is (``detect/listed.py``)."""
        for tensor in flat_args(args):
            if isinstance(tensor, torch.Tensor) and id(tensor) in self.entries:
                self.marks[id(tensor)] = (tensor, *self.entries[id(tensor)])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        decomposed = decomposition(func, args, kwargs)
        if decomposed is not None and any(self._tracks(a) for a in flat_args((*args, *kwargs.values()))):
            with self:  # each expert's slice, as recorded (``trace/decompose.py``)
                return decomposed()
        if self.entries:
            self._mark_entries((*args, *kwargs.values()))
        found = gathered_index(func, args)
        if found is not None and (id(found[0]) in self.params or id(found[0]) in self.views
                                  or id(found[0]) in self.swapped):
            out = func(*args, **kwargs)
            index = found[1]
            index = int(index) if isinstance(index, torch.Tensor) and index.dim() == 0 else index  # one expert
            self.marks[id(out)] = (out, self._whole_key(found[0]), index)
            return out
        tensors = [a for a in flat_args((*args, *kwargs.values())) if isinstance(a, torch.Tensor)]
        if len(tensors) == 1 and (id(tensors[0]) in self.params or id(tensors[0]) in self.views
                                  or id(tensors[0]) in self.wholes):
            out = func(*args, **kwargs)
            key = self._key(tensors[0]) if id(tensors[0]) not in self.wholes else self.wholes[id(tensors[0])][1]
            if id(tensors[0]) not in self.wholes and split_pieces(tensors[0], out):  # piece e: expert e's
                self.marks.update({id(piece): (piece, key, e) for e, piece in enumerate(out)})
                return out
            if reshaped_view(out, tensors[0]) and id(tensors[0]) not in self.wholes:
                self.views[id(out)] = (out, key)
            elif same_entries(out, tensors[0]):
                self.wholes[id(out)] = (out, key)
                if id(tensors[0]) not in self.wholes and swapped_view(out, tensors[0]):
                    self.swapped.add(id(out))
            elif entries_copy(out, tensors[0]) and id(tensors[0]) in self.swapped:  # ``w.transpose(1, 2).float()``
                self.wholes[id(out)] = (out, key)
                self.swapped.add(id(out))
            elif id(tensors[0]) not in self.wholes and entries_copy(out, tensors[0]):  # ``w.bfloat16()``
                self.views[id(out)] = (out, key)
            return out
        marked = [a for a in tensors if id(a) in self.marks]
        if len(marked) == 1 and len(tensors) == 1:  # a view of the gathered weights
            out = func(*args, **kwargs)
            if isinstance(out, torch.Tensor) and out.numel() == marked[0].numel():
                self.marks[id(out)] = (out, *self.marks[id(marked[0])][1:])
            return out
        whole = [a for a in tensors if self._whole_key(a) not in (None, BIAS)]
        if not marked and len(whole) == 1 and len(tensors) == 2:  # a parameter contracted whole: index None
            features = next(a for a in tensors if a is not whole[0])
            result = self.contract(self._whole_key(whole[0]), None, features, func, args, kwargs)
            if result is not None:
                return result
        weights = [a for a in marked if self.marks[id(a)][1] != BIAS]
        if len(weights) == 1 and len(tensors) - len(marked) == 1:
            for tensor in marked:
                _, key, index = self.marks.pop(id(tensor))
                if tensor is weights[0]:
                    found_key, found_index = key, index
            features = next(a for a in tensors if id(a) not in {id(m) for m in marked})
            result = self.contract(found_key, found_index, features, func, args, kwargs)
            if result is not None:
                return result
        return func(*args, **kwargs)


def split_pieces(weight: torch.Tensor, out: object) -> bool:
    """Is ``out`` ``weight`` split along its first dimension into two or more equal pieces, in order (``torch.chunk(
    w, E)``, ``w.split(I)``, ``w.unbind()``)? Piece ``e`` is then entry ``e`` of ``weight.view(len(out), *piece)``."""
    if not isinstance(out, (tuple, list)) or len(out) < 2 or not weight.is_contiguous():
        return False
    first = out[0]
    return all(isinstance(p, torch.Tensor) and p.shape == first.shape and p.dtype == weight.dtype
               and p.is_contiguous() and p.data_ptr() == weight.data_ptr() + e * p.numel() * p.element_size()
               for e, p in enumerate(out)) and len(out) * first.numel() == weight.numel()


def splits_as_views(graph: fx.Graph) -> None:
    """Rewrite, in a recording, each piece used of a weight split into equal pieces (``split_pieces``) as the
    entry of a view: ``torch.chunk(w, E)[e]`` becomes ``w.view(E, *piece)[e]``, the gather of expert ``e``. A piece
    that keeps a leading size-1 dimension (``w.view(E, I, H).chunk(E)[e]``, ``[1, I, H]``, as DBRX's older code
    splits its experts) becomes ``w.view(E, I, H)[e].unsqueeze(0)``: the gather of one expert's ``[I, H]`` matrix,
    then the piece's shape."""
    for node in list(graph.nodes):
        split = node.args[0] if node.target is operator.getitem and node.args and node.users else None
        if not isinstance(split, fx.Node) or not split.args or not isinstance(split.args[0], fx.Node):
            continue
        weight, pieces = value(split.args[0]), value(split)
        if not isinstance(weight, torch.Tensor) or not split_pieces(weight, pieces):
            continue
        piece = tuple(pieces[0].shape)
        kept = piece[1:] if len(piece) > 1 and piece[0] == 1 else piece  # a leading 1 of each piece: gather beneath
        with graph.inserting_before(node):
            view = graph.call_function(torch.Tensor.view, (split.args[0], (len(pieces), *kept)))
        view.meta.update(split.meta, value=weight.view(len(pieces), *kept))
        if kept == piece:
            node.args = (view, *node.args[1:])
            continue
        with graph.inserting_before(node):
            entry = graph.call_function(operator.getitem, (view, *node.args[1:]))
        entry.meta.update(node.meta, value=value(view)[node.args[1]])
        node.target, node.args, node.kwargs = torch.Tensor.unsqueeze, (entry, 0), {}


def flat_gathers_as_gathers(graph: fx.Graph) -> None:
    """Rewrite, in a recording, a gather of experts' flattened entries put back in shape as a gather of the
    experts' entries themselves: ``F.embedding(idx, W.view(E, -1)).view(*idx.shape, *W.shape[1:])`` (a lookup
    table of expert weights) becomes ``W[idx]``, checked on the recorded values; so does a lookup in a table of
    each expert's flattened matrices (an ``nn.Embedding`` of ``[E, a * b]``: ``table(idx).view(*idx.shape, a, b)``
    becomes ``table.weight.view(E, a, b)[idx]``)."""
    for node in list(graph.nodes):
        found = gathered_index(node.target, fx.node.map_arg(node.args, value)) if node.op == "call_function" else None
        flat = next((a for a in node.all_input_nodes if found and value(a) is found[0]), None)
        if flat is None or len(node.users) != 1:
            continue
        shaped = next(iter(node.users))
        weight, stored = _stored_matrices(flat, value(shaped), found) or (None, None)
        index = next((a for a in node.all_input_nodes if value(a) is found[1]), None)
        gathered = value(shaped)
        if not (index is not None and isinstance(stored, torch.Tensor) and stored.dim() >= 3
                and found[0].dim() == 2 and found[0].shape[0] == stored.shape[0] and reshaped_view(found[0], stored)
                and isinstance(gathered, torch.Tensor) and gathered.shape == (*found[1].shape, *stored.shape[1:])
                and torch.equal(gathered, stored[found[1]])):
            continue
        if weight is flat:  # the table itself holds each expert's matrix flattened: gathered from its view
            with graph.inserting_before(shaped):
                weight = graph.call_function(torch.Tensor.view, (flat, tuple(stored.shape)))
            weight.meta.update(flat.meta, value=stored)
            flat = None
        with graph.inserting_before(shaped):
            entries = graph.call_function(operator.getitem, (weight, index))
        entries.meta.update(shaped.meta, value=gathered)
        shaped.replace_all_uses_with(entries)
        graph.erase_node(shaped)
        graph.erase_node(node)
        if flat is not None and not flat.users:
            graph.erase_node(flat)


def _stored_matrices(flat: fx.Node, shaped: object, found: tuple) -> tuple[fx.Node, object] | None:
    """``(node, value)``: the ``[E, a, b]`` weight whose experts' matrices the flat ``[E, a * b]`` rows a gather
    took hold: the weight they view (``W.view(E, -1)``), or the rows themselves where they are a table of their
    own (an ``nn.Embedding``'s weight) whose gathered rows are put in that shape (``table(idx).view(*idx.shape, a,
    b)``), with the table's values in that shape. Checked by the caller."""
    if flat.all_input_nodes:
        return flat.all_input_nodes[0], value(flat.all_input_nodes[0])
    table, index = found
    if not (isinstance(shaped, torch.Tensor) and isinstance(index, torch.Tensor) and table.dim() == 2
            and shaped.dim() == index.dim() + 2 and shaped.shape[:index.dim()] == index.shape
            and min(shaped.shape[index.dim():]) >= 2):  # matrices: a gathered bias given a size-1 dimension is none
        return None
    return flat, table.view(table.shape[0], *shaped.shape[index.dim():])


def reshaped_view(out: object, weight: torch.Tensor) -> bool:
    """Is ``out`` ``weight`` in another shape, its entries in the same order (``view``, ``reshape``)?"""
    return (isinstance(out, torch.Tensor) and out.numel() == weight.numel() and out.is_contiguous()
            and weight.is_contiguous() and out.data_ptr() == weight.data_ptr() and out.dtype == weight.dtype)


def swapped_view(out: object, weight: torch.Tensor) -> bool:
    """Is ``out`` ``[E, a, b]`` ``weight`` with each expert's matrix transposed (``w.transpose(-2, -1)``, ``w.mT``),
    the experts still first? Gathering experts from it takes each expert's entries, applied the other way."""
    return (isinstance(out, torch.Tensor) and out.dim() == weight.dim() == 3 and same_entries(out, weight)
            and tuple(out.shape) == (weight.shape[0], weight.shape[2], weight.shape[1])
            and out.stride() == (weight.stride(0), weight.stride(2), weight.stride(1))
            and out.storage_offset() == weight.storage_offset())


def entries_copy(out: object, weight: torch.Tensor) -> bool:
    """Is ``out`` ``weight``'s entries in its shape, cast to another dtype, moved or copied (``w.bfloat16()``,
    ``w.to(x.dtype)``, ``w.float()``, ``w.contiguous()``, ``w.detach()``, ``w.to(device)``)? Checked on the values
    of its first and last entries along the first dimension (one expert's each, not a second copy of all): they
    equal ``weight``'s converted to its dtype and device. Such a copy of expert weights is attributed to the weights
    it copies; the experts' Linears then compute in the copy's dtype."""
    if not (isinstance(out, torch.Tensor) and out is not weight and out.shape == weight.shape and out.dim()
            and out.is_floating_point() and weight.is_floating_point()):
        return False
    return all(torch.equal(out[i], weight[i].to(dtype=out.dtype, device=out.device)) for i in {0, len(out) - 1})


def same_entries(out: object, weight: torch.Tensor) -> bool:
    """Is ``out`` a view of all of ``weight``'s entries in any order (``transpose``, ``permute``): its storage?"""
    return (isinstance(out, torch.Tensor) and out.numel() == weight.numel() and out.dtype == weight.dtype
            and out.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr())


def slot_features(features: torch.Tensor, slots: torch.Size) -> torch.Tensor | None:
    """``features`` as ``[*slots, in]``: one row per slot, or a token's row repeated over its slots.

    One row per slot may come in any shape of as many rows, slots in order: size-1 dimensions a batched matmul
    needs (``x[:, None] @ W[index]``), or the slots flattened for ``bmm`` (``[tokens * k, 1, in]``).
    """
    leading = tuple(features.shape[:-1])
    if math.prod(leading) == math.prod(slots) and leading != tuple(slots):
        return features.reshape(*slots, features.shape[-1])
    if leading == tuple(slots):
        return features
    if leading == tuple(slots[:len(leading)]):
        view = features.reshape(*leading, *[1] * (len(slots) - len(leading)), features.shape[-1])
        return view.expand(*slots, features.shape[-1])
    return None


def slot_inputs(orientation: str, features: torch.Tensor, slots: torch.Size, width: int) -> torch.Tensor | None:
    """Each slot's input to its expert's Linear, ``[*slots, in]``, from the contraction's other operand."""
    if orientation in ("linear", "matmul"):
        if features.dim() >= 2 and features.shape[-1] == 1 and features.shape[-2] == width != 1:
            features = features.squeeze(-1)  # column vectors, the weights first: bmm(W[index], x[..., None])
        return slot_features(features, slots)
    if orientation == "row":  # the features of each slot or of each token, in any layout of that size
        for leading in (tuple(slots), tuple(slots[:-1])):
            if features.numel() == math.prod(leading) * width:
                return slot_features(features.reshape(*leading, width), slots)
    if orientation == "slot-sum" and features.numel() == math.prod(slots):
        return features.reshape(*slots, 1)
    return None


def per_slot(orientation: str, inputs: torch.Tensor, gathered: torch.Tensor) -> torch.Tensor:
    """What the contraction computes from each slot's inputs and gathered weights (slot sums done)."""
    if orientation == "linear":
        return torch.einsum("...i,...oi->...o", inputs, gathered)
    if orientation == "matmul":
        return torch.einsum("...i,...io->...o", inputs, gathered)
    if orientation == "row":
        return (inputs * gathered).sum(-1, keepdim=True)
    return (inputs * gathered).sum(-2)
