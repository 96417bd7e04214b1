"""The mask handling of :class:`~automl_compress.attention.UnfusedMultiheadAttention`.

The steps of ``F.multi_head_attention_forward`` that check, pad and merge ``attn_mask`` and
``key_padding_mask`` (and hint whether a mask is causal), written as in PyTorch so the unfused
module stays bit-identical to the slow path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_hint(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                 need_weights: bool, is_causal: bool) -> tuple[torch.Tensor | None, bool]:
    """The masks after the ``is_causal`` hint.

    The mask is dropped where scaled_dot_product_attention applies the causal mask itself, and the
    hint is cleared once the mask is merged with a padding mask (no longer causal).
    """
    if is_causal and attn_mask is None:
        raise RuntimeError(
            "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
            "module method `generate_square_subsequent_mask` to create this mask."
        )
    if is_causal and key_padding_mask is None and not need_weights:
        return None, is_causal
    if key_padding_mask is not None:
        is_causal = False  # the merged mask below is no longer causal
    return attn_mask, is_causal


def checked_attn_mask(attn_mask: torch.Tensor, tgt_len: int, src_len: int,
                       bsz_heads: int) -> torch.Tensor:
    """A 2-D (L, S) mask as (1, L, S), a 3-D (N·heads, L, S) one as it is; anything else raises."""
    if attn_mask.dim() == 2:
        if attn_mask.shape != (tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                f"{(tgt_len, src_len)}."
            )
        return attn_mask.unsqueeze(0)
    if attn_mask.dim() == 3:
        if attn_mask.shape != (bsz_heads, tgt_len, src_len):
            raise RuntimeError(
                f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                f"{(bsz_heads, tgt_len, src_len)}."
            )
        return attn_mask
    raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")


def pad_masks(attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Both masks with one more key position (unmasked) for an appended key."""
    if attn_mask is not None:
        attn_mask = F.pad(attn_mask, (0, 1))
    if key_padding_mask is not None:
        key_padding_mask = F.pad(key_padding_mask, (0, 1))
    return attn_mask, key_padding_mask


def append_zero(x: torch.Tensor) -> torch.Tensor:
    """(N·heads, S, head_dim) keys or values with a zero one appended (``add_zero_attn``)."""
    return torch.cat([x, x.new_zeros((x.shape[0], 1, x.shape[2]))], dim=1)


def merge_padding(key_padding_mask: torch.Tensor, attn_mask: torch.Tensor | None, bsz: int,
                   src_len: int, num_heads: int) -> torch.Tensor:
    """The (N, S) padding mask per head, (N·heads, 1, S), added to ``attn_mask``."""
    if key_padding_mask.shape != (bsz, src_len):
        raise RuntimeError(
            f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
            f"{key_padding_mask.shape}"
        )
    key_padding_mask = (
        key_padding_mask.view(bsz, 1, 1, src_len)
        .expand(-1, num_heads, -1, -1)
        .reshape(bsz * num_heads, 1, src_len)
    )
    return key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
