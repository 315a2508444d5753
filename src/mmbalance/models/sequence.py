"""Sequence encoders with masking: ``seq_transformer`` and ``gru``.

Input per sample ``(L, d)``: ``L`` time steps of ``d`` features, padded to the dataset's fixed
length (the batch contract needs tensors). Which steps are real is read from the input itself,
by the option ``mask``:

* ``nonzero`` (default): a step is padding when all its features are exactly 0. This is the
  convention of the MulT-style pickles (CMU-MOSI / MOSEI, IEMOCAP: sequences zero-padded to a
  fixed length, no lengths stored) and of :mod:`mmbalance.data.sentiment`, which keeps padding
  rows at exactly 0 (also when it standardises features). An absent modality (its input is
  zeros, see ``MultimodalModel.absent_policy``) is therefore an *empty* sequence.
* ``channel``: the last input channel is a validity flag (1 = real step, 0 = padding) and is
  not a feature (``d - 1`` features are encoded).
* ``none``: every step is real.

Before encoding, the real steps of each sample are moved to the front in their original order
(padding may sit anywhere, e.g. at the start as in MulT's aligned data) and the batch is cut to
its longest sequence, so positions count real steps only and padding costs nothing. An empty
sequence encodes to the zero vector (finite, constant), so "absent" is a fixed feature.

``seq_transformer``: linear projection to ``hidden``, sinusoidal positions, ``layers``
pre-norm Transformer encoder layers with the padding masked out of attention, a final
LayerNorm, then pooling over the real steps (``mean``; ``last`` = the final real step, MulT's
``last_hs``; ``first`` = the first step, what BalanceBenchmark's ``transformer_encoder.py``
returns). ``gru``: a (bi)GRU over the packed real steps, pooled by its final hidden state
(``last``) or the mean of its outputs (``mean``). Neither has batch statistics (no BatchNorm),
so several processes need no synchronisation beyond the gradients.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from torch import Tensor, nn

from ..options import Interval
from ..registry import ConfigError
from .encoders import register_encoder

__all__ = ["step_mask", "compact_steps", "sinusoidal_positions", "masked_pool", "SeqTransformerEncoder",
           "GRUEncoder"]

MaskMode = Literal["nonzero", "channel", "none"]


def step_mask(x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """Split ``x`` (B, L, d) into features and a validity mask (B, L) by ``mode``.

    >>> x = torch.tensor([[[1., 0.], [0., 0.], [0., 2.]]])
    >>> step_mask(x, "nonzero")[1].tolist()
    [[True, False, True]]
    >>> feats, m = step_mask(torch.tensor([[[3., 1.], [4., 0.]]]), "channel")
    >>> feats.tolist(), m.tolist()
    ([[[3.0], [4.0]]], [[True, False]])
    """
    if mode == "channel":
        return x[..., :-1], x[..., -1] > 0.5
    if mode == "none":
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return x, (x != 0).any(dim=-1)


def compact_steps(x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Move the real steps of each sample to the front (stable), cut to the longest sequence.

    Returns ``(x', mask', lengths)`` with ``x'`` of shape (B, max(1, max length), d), padding
    rows zeroed, and ``mask'[b, t] = t < lengths[b]``.

    >>> x = torch.tensor([[[0.], [5.], [0.], [7.]]])
    >>> xc, mc, n = compact_steps(x, x[..., 0] != 0)
    >>> xc[..., 0].tolist(), mc.tolist(), n.tolist()
    ([[5.0, 7.0]], [[True, True]], [2])
    """
    lengths = mask.sum(dim=1)
    keep = max(1, int(lengths.max())) if mask.numel() else 1
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :keep]
    x = torch.gather(x, 1, order.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    new_mask = torch.arange(keep, device=x.device).unsqueeze(0) < lengths.unsqueeze(1)
    return x * new_mask.unsqueeze(-1).to(x.dtype), new_mask, lengths


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None,
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """The Transformer's sinusoidal position table (length, dim): sin on even, cos on odd
    channels, wavelengths 2 pi .. 10000 * 2 pi (Vaswani et al. 2017)."""
    pos = torch.arange(length, device=device, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table.to(dtype)


def masked_pool(h: Tensor, mask: Tensor, lengths: Tensor, how: str) -> Tensor:
    """Pool (B, L, D) over the real steps of compacted sequences; empty sequences give zeros."""
    m = mask.unsqueeze(-1).to(h.dtype)
    if how == "mean":
        return (h * m).sum(dim=1) / lengths.clamp(min=1).unsqueeze(-1).to(h.dtype)
    idx = (lengths - 1).clamp(min=0) if how == "last" else torch.zeros_like(lengths)
    out = h[torch.arange(h.shape[0], device=h.device), idx]
    return out * (lengths > 0).unsqueeze(-1).to(h.dtype)


def _check_input(name: str, input_shape: tuple, mask: str) -> int:
    if len(input_shape) != 2:
        raise ConfigError(f"encoder '{name}' expects a sequence (steps, features) per sample, got shape "
                          f"{tuple(input_shape)}; use mlp for feature vectors")
    d = int(input_shape[1]) - (1 if mask == "channel" else 0)
    if d < 1:
        raise ConfigError(f"encoder '{name}' with mask 'channel' needs at least one feature besides the mask "
                          f"channel, got shape {tuple(input_shape)}")
    return d


class SeqTransformerEncoder(nn.Module):
    """Masked Transformer encoder over (B, L, d) sequences, pooled to (B, hidden)."""

    def __init__(self, in_dim: int, hidden: int = 128, heads: int = 4, layers: int = 2, ff: int = 256,
                 dropout: float = 0.1, pool: str = "mean", mask: str = "nonzero", positional: bool = True):
        super().__init__()
        self.mask_mode, self.pool, self.positional = mask, pool, positional
        self.proj = nn.Linear(in_dim, hidden)
        layer = nn.TransformerEncoderLayer(hidden, heads, ff, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden)
        self.out_dim = hidden

    def forward(self, x: Tensor) -> Tensor:
        feats, valid = step_mask(x, self.mask_mode)
        feats, valid, lengths = compact_steps(feats, valid)
        h = self.proj(feats)
        if self.positional:
            h = h + sinusoidal_positions(h.shape[1], h.shape[2], h.device, h.dtype)
        # an empty sequence would mask every key (NaN attention): let it attend its zero rows;
        # its pooled output is zero whatever it computes
        pad = ~valid & (lengths > 0).unsqueeze(1)
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        return masked_pool(h, valid, lengths, self.pool)


class GRUEncoder(nn.Module):
    """(Bi)GRU over the packed real steps of (B, L, d) sequences."""

    def __init__(self, in_dim: int, hidden: int = 128, layers: int = 1, bidirectional: bool = False,
                 dropout: float = 0.0, pool: str = "last", mask: str = "nonzero"):
        super().__init__()
        self.mask_mode, self.pool = mask, pool
        self.gru = nn.GRU(in_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                          dropout=dropout if layers > 1 else 0.0)
        self.dirs = 2 if bidirectional else 1
        self.out_dim = hidden * self.dirs

    def forward(self, x: Tensor) -> Tensor:
        feats, valid = step_mask(x, self.mask_mode)
        feats, valid, lengths = compact_steps(feats, valid)
        packed = nn.utils.rnn.pack_padded_sequence(feats, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, h_n = self.gru(packed)
        nonempty = (lengths > 0).unsqueeze(-1).to(feats.dtype)
        if self.pool == "last":  # the last layer's final state, both directions
            h = torch.cat(list(h_n[-self.dirs:]), dim=-1)
            return h * nonempty
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=feats.shape[1])
        return masked_pool(out, valid, lengths, "mean")


PosInt = Annotated[int, Interval(1, None)]
Dropout = Annotated[float, Interval(0, 1, closed="left")]


@register_encoder("seq_transformer", summary="masked Transformer encoder over (steps, features) sequences, pooled over real steps")
def seq_transformer(input_shape: tuple, hidden: PosInt = 128, heads: PosInt = 4, layers: PosInt = 2, ff: PosInt = 256,
                    dropout: Dropout = 0.1, pool: Literal["mean", "last", "first"] = "mean",
                    mask: MaskMode = "nonzero", positional: bool = True) -> nn.Module:
    """Transformer over a padded sequence (steps, features); ``out_dim = hidden``.

    Options:
        hidden: model width (the projection of each step, and the output size).
        heads: attention heads; must divide hidden.
        layers: number of pre-norm Transformer encoder layers.
        ff: width of each layer's feed-forward block.
        dropout: dropout inside the layers.
        pool: how the real steps become one vector: mean, last (MulT), first (BalanceBenchmark).
        mask: which steps are padding: nonzero (all-zero rows), channel (last channel is 1/0), none.
        positional: add sinusoidal positions (counted over real steps).

    BalanceBenchmark's MOSEI encoder is close to ``hidden=1024, heads=4, layers=2, ff=512,
    pool=first`` (post-norm, no masking, no positions there).
    """
    if hidden % heads:
        raise ConfigError(f"encoder 'seq_transformer': heads ({heads}) must divide hidden ({hidden})")
    d = _check_input("seq_transformer", input_shape, mask)
    return SeqTransformerEncoder(d, hidden, heads, layers, ff, dropout, pool, mask, positional)


@register_encoder("gru", summary="masked (bi)GRU over (steps, features) sequences, final state or mean over real steps")
def gru(input_shape: tuple, hidden: PosInt = 128, layers: PosInt = 1, bidirectional: bool = False,
        dropout: Dropout = 0.0, pool: Literal["last", "mean"] = "last", mask: MaskMode = "nonzero") -> nn.Module:
    """GRU over a padded sequence (steps, features); ``out_dim = hidden`` (x2 if bidirectional).

    Options:
        hidden: hidden size per direction.
        layers: stacked GRU layers.
        bidirectional: also run backwards and concatenate both final states.
        dropout: dropout between stacked layers (ignored with one layer).
        pool: last (final hidden state of the real steps) or mean (mean output over real steps).
        mask: which steps are padding: nonzero (all-zero rows), channel (last channel is 1/0), none.
    """
    d = _check_input("gru", input_shape, mask)
    return GRUEncoder(d, hidden, layers, bidirectional, dropout, pool, mask)
