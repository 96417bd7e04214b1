"""``nn.MultiheadAttention`` with its projections as real ``nn.Linear`` layers, and back.

``nn.MultiheadAttention`` keeps its in-projection as a bare Parameter (``in_proj_weight``, or
``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` when key and value have their own widths)
and calls ``out_proj`` functionally, so forward hooks never see any of them and nothing downstream
(capture, solvers, stitching, bias correction, export) could compress a third of a transformer
block's weights. :func:`unfuse_attention` returns a deep copy of a model in which every
``nn.MultiheadAttention`` is an :class:`UnfusedMultiheadAttention`: the same computation, with four
ordinary ``nn.Linear`` submodules ``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj``. Each
projection is then an ordinary layer named ``<attention>.q_proj`` etc.; the Hessian of q/k/v is the
attention input's, that of ``out_proj`` the attention output's. :func:`fuse_attention` maps a
(compressed) unfused model back to the user's own classes (fused ``in_proj_weight``), so its
``state_dict()`` loads into a fresh instance of the user's model.

Equivalence: :meth:`UnfusedMultiheadAttention.forward` follows the slow path of
``nn.MultiheadAttention.forward`` / ``F.multi_head_attention_forward`` operation by operation
(``batch_first`` both ways, unbatched inputs, boolean and float ``attn_mask`` /
``key_padding_mask``, ``is_causal``, ``need_weights`` / ``average_attn_weights``, ``add_bias_kv``,
``add_zero_attn``, dropout, ``bias=False``, ``kdim`` / ``vdim``); on CPU its outputs are
bit-identical to that slow path. The eval fast paths of ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` (fused native kernels, nested tensors)
read the fused parameters; the unfused module exposes ``in_proj_weight = in_proj_bias = None`` and
``_qkv_same_embed_dim = False`` (it has no fused in-projection), which sends the encoder layer down
its slow path, and the copies of every ``nn.TransformerEncoder`` get ``use_nested_tensor = False``.
The fast paths compute the same function in another order, so the dense model and its unfused copy
agree to float32 round-off (about 1e-6), exactly when the fast path is disabled.

The user's model is never modified: both directions work on deep copies.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import skip_init

from automl_compress.attention_masks import (
    append_zero,
    causal_hint,
    checked_attn_mask,
    merge_padding,
    pad_masks,
)
from automl_compress.errors import UnsupportedLayerError

if TYPE_CHECKING:  # zoo.registry imports this module
    from automl_compress.specs import Task

__all__ = [
    "UnfusedMultiheadAttention",
    "fuse_attention",
    "has_fused_attention",
    "unfuse_attention",
    "unfuse_task",
]

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

# marks a TransformerEncoder whose nested-tensor fast path was switched off by unfuse_attention
_NESTED_FLAG = "_automl_compress_use_nested_tensor"


class UnfusedMultiheadAttention(nn.Module):
    """An exact stand-in for one ``nn.MultiheadAttention`` with ``nn.Linear`` projections.

    Built from an existing module (its weights are copied; ``out_proj`` and ``bias_k`` /
    ``bias_v`` are copied too). The forward signature and results are those of
    ``nn.MultiheadAttention.forward``.

    Args:
        mha: the module to replace.

    Attributes:
        q_proj, k_proj, v_proj: (embed_dim, embed_dim / kdim / vdim) projections, the rows of
            ``in_proj_weight`` in q, k, v order (or the separate ``*_proj_weight``).
        out_proj: the output projection (the original ``out_proj`` module, copied).
        packed: the original held one fused ``in_proj_weight`` (``_qkv_same_embed_dim``).
    """

    # No fused in-projection exists here: the fast paths of TransformerEncoderLayer and
    # TransformerEncoder test these before reading the fused weights, and take the slow path.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        if not isinstance(mha, nn.MultiheadAttention):
            raise UnsupportedLayerError(
                f"UnfusedMultiheadAttention replaces nn.MultiheadAttention, found "
                f"{type(mha).__name__}"
            )
        self.embed_dim = mha.embed_dim
        self.kdim, self.vdim = mha.kdim, mha.vdim
        self.num_heads = mha.num_heads
        self.head_dim = mha.head_dim
        self.dropout = mha.dropout
        self.batch_first = mha.batch_first
        self.add_zero_attn = mha.add_zero_attn
        self.packed = bool(mha._qkv_same_embed_dim)
        E = self.embed_dim
        weight = mha.in_proj_weight if self.packed else None
        bias = mha.in_proj_bias
        factory = {"device": mha.out_proj.weight.device, "dtype": mha.out_proj.weight.dtype}
        with torch.no_grad():
            for i, (name, width) in enumerate((("q_proj", E), ("k_proj", self.kdim),
                                                ("v_proj", self.vdim))):
                # skip_init: no random initialisation (the global RNG is not consumed)
                lin = skip_init(nn.Linear, width, E, bias=bias is not None, **factory)
                w = weight[i * E : (i + 1) * E] if weight is not None else getattr(
                    mha, f"{name}_weight")
                lin.weight.copy_(w)
                lin.weight.requires_grad_(w.requires_grad)
                if bias is not None:
                    lin.bias.copy_(bias[i * E : (i + 1) * E])
                    lin.bias.requires_grad_(bias.requires_grad)
                setattr(self, name, lin)
        self.out_proj = copy.deepcopy(mha.out_proj)
        self.bias_k = copy.deepcopy(mha.bias_k)
        self.bias_v = copy.deepcopy(mha.bias_v)
        self.train(mha.training)

    def extra_repr(self) -> str:
        """The module's settings in its repr: sizes, ``batch_first`` and ``packed``."""
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"batch_first={self.batch_first}, packed={self.packed}")

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``nn.MultiheadAttention.forward`` (slow path), projections through the submodules."""
        if query.is_nested or key.is_nested or value.is_nested:
            raise UnsupportedLayerError(
                "UnfusedMultiheadAttention got a NestedTensor; expected padded tensors (the "
                "nested-tensor fast path of nn.TransformerEncoder is switched off by "
                "unfuse_attention; pass key_padding_mask instead)"
            )
        is_batched = query.dim() == 3
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask, mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
            target_type=query.dtype, check_other=False,
        )
        if self.batch_first and is_batched:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        return self._attend(query, key, value, key_padding_mask, need_weights, attn_mask,
                            average_attn_weights, is_causal)

    def _attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
        key_padding_mask: torch.Tensor | None, need_weights: bool,
        attn_mask: torch.Tensor | None, average_attn_weights: bool, is_causal: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` on sequence-first inputs (L, N, E) or (L, E)."""
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask,
                                        self.num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise UnsupportedLayerError(
                f"attention expects embedding width {self.embed_dim}, found {embed_dim}"
            )
        attn_mask, is_causal = causal_hint(attn_mask, key_padding_mask, need_weights, is_causal)
        # (L, N, E) each: the three projections, as ordinary Linear layers
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if attn_mask is not None:
            attn_mask = checked_attn_mask(attn_mask, tgt_len, key.shape[0], bsz * self.num_heads)
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask, key_padding_mask = pad_masks(attn_mask, key_padding_mask)
        q, k, v = (self._split_heads(x, bsz) for x in (q, k, v))  # (N·heads, L, head_dim)
        if self.add_zero_attn:
            k, v = append_zero(k), append_zero(v)
            attn_mask, key_padding_mask = pad_masks(attn_mask, key_padding_mask)
        if key_padding_mask is not None:
            attn_mask = merge_padding(key_padding_mask, attn_mask, bsz, k.shape[1],
                                       self.num_heads)
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights:
            out, weights = self._sdpa(q, k, v, attn_mask, dropout_p, is_causal, bsz), None
        else:  # causal_hint keeps the mask whenever the weights are asked for
            out, weights = self._with_weights(q, k, v, attn_mask, dropout_p, bsz,
                                              average_attn_weights)
        out = self.out_proj(out).view(tgt_len, bsz, -1)
        if not is_batched:
            return out.squeeze(1), None if weights is None else weights.squeeze(0)
        return (out.transpose(1, 0) if self.batch_first else out), weights

    def _split_heads(self, x: torch.Tensor, bsz: int) -> torch.Tensor:
        """(L, N, E) → (N·heads, L, head_dim)."""
        return x.view(x.shape[0], bsz * self.num_heads, self.head_dim).transpose(0, 1)

    def _with_weights(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      attn_mask: torch.Tensor | None, dropout_p: float, bsz: int,
                      average_attn_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention with its weights (explicit softmax).

        Gives the (L·N, E) input of ``out_proj`` and the (N, heads, L, S) weights, averaged over
        heads when ``average_attn_weights``.
        """
        B, Nt, E = q.shape
        q_scaled = q * math.sqrt(1.0 / float(E))
        if attn_mask is not None:
            weights = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(Nt * bsz, self.embed_dim)
        weights = weights.view(bsz, self.num_heads, Nt, k.shape[1])
        if average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              attn_mask: torch.Tensor | None, dropout_p: float, is_causal: bool,
              bsz: int) -> torch.Tensor:
        """Attention by ``F.scaled_dot_product_attention``: the (L·N, E) input of ``out_proj``."""
        tgt_len, src_len = q.shape[1], k.shape[1]
        if attn_mask is not None:
            if attn_mask.size(0) == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(bsz, self.num_heads, -1, src_len)
        q = q.view(bsz, self.num_heads, tgt_len, self.head_dim)
        k = k.view(bsz, self.num_heads, src_len, self.head_dim)
        v = v.view(bsz, self.num_heads, src_len, self.head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        return out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)

    def to_multihead_attention(self) -> nn.MultiheadAttention:
        """An ``nn.MultiheadAttention`` holding this module's (possibly compressed) weights."""
        w = self.out_proj.weight
        mha = skip_init(
            nn.MultiheadAttention, self.embed_dim, self.num_heads, dropout=self.dropout,
            bias=self.q_proj.bias is not None, add_bias_kv=self.bias_k is not None,
            add_zero_attn=self.add_zero_attn, kdim=self.kdim, vdim=self.vdim,
            batch_first=self.batch_first, device=w.device, dtype=w.dtype,
        )
        projs = (self.q_proj, self.k_proj, self.v_proj)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                mha.in_proj_weight.copy_(torch.cat([p.weight for p in projs]))
            else:
                for name, p in zip(("q", "k", "v"), projs, strict=True):
                    getattr(mha, f"{name}_proj_weight").copy_(p.weight)
            if mha.in_proj_bias is not None:
                mha.in_proj_bias.copy_(torch.cat([p.bias for p in projs]))
        for p in mha.parameters(recurse=False):
            p.requires_grad_(self.out_proj.weight.requires_grad)
        mha.out_proj = copy.deepcopy(self.out_proj)
        mha.bias_k = copy.deepcopy(self.bias_k)
        mha.bias_v = copy.deepcopy(self.bias_v)
        mha.train(self.training)
        return mha


def has_fused_attention(model: nn.Module) -> bool:
    """Whether the model holds any ``nn.MultiheadAttention``."""
    return any(isinstance(m, nn.MultiheadAttention) for m in model.modules())


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def unfuse_attention(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every ``nn.MultiheadAttention`` unfused.

    Returns ``model`` itself when it holds no ``nn.MultiheadAttention`` (nothing to change). The
    projections of attention ``A`` are then the Linear layers ``A.q_proj``, ``A.k_proj``,
    ``A.v_proj`` and ``A.out_proj``; every ``nn.TransformerEncoder`` of the copy has its
    nested-tensor fast path switched off (it reads the fused weights).
    """
    if not has_fused_attention(model):
        return model
    out = copy.deepcopy(model)
    if isinstance(out, nn.MultiheadAttention):
        return UnfusedMultiheadAttention(out)
    names = [n for n, m in out.named_modules() if isinstance(m, nn.MultiheadAttention)]
    for name in names:
        _replace(out, name, UnfusedMultiheadAttention(out.get_submodule(name)))
    for m in out.modules():
        if isinstance(m, nn.TransformerEncoder) and not hasattr(m, _NESTED_FLAG):
            setattr(m, _NESTED_FLAG, m.use_nested_tensor)
            m.use_nested_tensor = False
    return out


def fuse_attention(model: nn.Module) -> nn.Module:
    """The inverse of :func:`unfuse_attention`: a deep copy in the user's own module classes.

    Every :class:`UnfusedMultiheadAttention` becomes an ``nn.MultiheadAttention`` holding its
    current weights (``in_proj_weight`` = the q, k, v rows stacked, when the original was packed);
    ``nn.TransformerEncoder`` gets its nested-tensor setting back. Returns ``model`` itself when
    nothing is unfused.
    """
    if not any(isinstance(m, UnfusedMultiheadAttention) for m in model.modules()):
        return model
    out = copy.deepcopy(model)
    if isinstance(out, UnfusedMultiheadAttention):
        return out.to_multihead_attention()
    names = [n for n, m in out.named_modules() if isinstance(m, UnfusedMultiheadAttention)]
    for name in names:
        _replace(out, name, out.get_submodule(name).to_multihead_attention())
    for m in out.modules():
        if isinstance(m, nn.TransformerEncoder) and hasattr(m, _NESTED_FLAG):
            m.use_nested_tensor = getattr(m, _NESTED_FLAG)
            delattr(m, _NESTED_FLAG)
    return out


def unfuse_task(task: Task) -> Task:
    """The task with its model unfused (:func:`unfuse_attention`).

    The same task when the model holds no ``nn.MultiheadAttention``. The user's model object is not
    modified.
    """
    model = unfuse_attention(task.model)
    return task if model is task.model else dataclasses.replace(task, model=model)
