"""Prov-GigaPath slide encoder: a LongNet transformer over the tile embeddings of a whole slide (Xu et al. 2024,
Methods: slide encoder (LongNet)).

Architecture of the released ``gigapath_slide_enc12l768d`` (Xu et al., Nature 2024, Methods "LongNet"):
tile embedding (1,536) -> Linear -> E, plus a fixed 2-D sin-cos position of the tile's 256-px cell; a CLS
token (position row 0) is prepended; L pre-norm layers of dilated self-attention (with a LayerNorm before the
output projection, "sub-LN") and a GELU feed-forward network with a LayerNorm inside ("sub-LN"); a final
encoder LayerNorm; the output ``norm`` LayerNorm (eps 1e-6). Module and parameter names equal the released
``slide_encoder.pth`` keys, so its state dict loads strictly.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint

from gigapath_core.errors import ConfigError
from gigapath_core.kinds import PluginParams, SlideEncoder

from .dilated_attention import DilatedSelfAttention, attention_flops
from .kernels import BACKENDS
from .position import coords_to_cells, position_embedding

#: dilation ratios of the released model (Xu et al. 2024, Methods: slide encoder (LongNet))
DEFAULT_DILATED_RATIOS = (1, 2, 4, 8, 16)
#: FFN token chunk used in inference (exact: the FFN is token-wise) to bound transient memory
FFN_CHUNK_TOKENS = 16384


def reference_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256, n: int = 5) -> list[int]:
    """Segment lengths of the released model: ``n`` values log-spaced from 1,024 to (max_wsi_size/tile_size)^2.

    With the defaults: [1024, 5792, 32768, 185363, 1048576] (Xu et al. 2024, Methods: slide encoder (LongNet)).
    """
    max_seq_len = (max_wsi_size // tile_size) ** 2
    exps = np.linspace(np.log2(1024), int(np.log2(max_seq_len)), n)
    return [int(v) for v in np.power(2, exps).astype(np.int64)]


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) per sample, as the reference's (timm's ``drop_path``): in training,
    zero a sample's residual branch with probability p and scale the kept ones by 1 / (1 - p).
    (Written here rather than imported from timm to keep the slide encoder's import ~200 MB lighter.)"""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p:.3f}"


class PatchEmbed(nn.Module):
    """Tile embedding -> model width: ``proj`` Linear(in_chans, E) (checkpoint key ``patch_embed.proj``)."""

    def __init__(self, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_chans, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class FeedForward(nn.Module):
    """fc1 -> GELU (exact, evaluated in float32 as the reference) -> ffn_layernorm -> fc2 -> dropout."""

    def __init__(self, embed_dim: int, ffn_dim: int, dropout: float, layernorm_eps: float):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, embed_dim)
        self.ffn_layernorm = nn.LayerNorm(ffn_dim, eps=layernorm_eps)
        self.dropout = nn.Dropout(dropout)

    def _core(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled():
            h = F.gelu(h.float()).type_as(h)
        else:  # in place on fc1's output (or its float32 copy): the same kernel, one buffer fewer
            h = torch.ops.aten.gelu_(h.float()).type_as(h)
        return self.fc2(self.ffn_layernorm(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.shape[1] * x.shape[0] <= FFN_CHUNK_TOKENS:
            return self.dropout(self._core(x))
        flat = x.reshape(-1, x.shape[-1])
        out = torch.empty_like(flat)
        for i in range(0, flat.shape[0], FFN_CHUNK_TOKENS):
            out[i:i + FFN_CHUNK_TOKENS] = self._core(flat[i:i + FFN_CHUNK_TOKENS])
        return self.dropout(out.view_as(x))


class EncoderLayer(nn.Module):
    """Pre-norm LongNet layer: x + DropPath(Dropout(attn(LN(x)))), then x + DropPath(FFN(LN(x)))."""

    def __init__(self, embed_dim: int, num_heads: int, ffn_dim: int, segment_lengths: Sequence[int],
                 dilated_ratios: Sequence[int], dropout: float, drop_path: float, layernorm_eps: float,
                 segment_padding: str, backend: str):
        super().__init__()
        self.self_attn = DilatedSelfAttention(embed_dim, num_heads, segment_lengths, dilated_ratios, layernorm_eps,
                                              segment_padding, backend)
        self.self_attn_layer_norm = nn.LayerNorm(embed_dim, eps=layernorm_eps)
        self.dropout = nn.Dropout(dropout)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.ffn = FeedForward(embed_dim, ffn_dim, dropout, layernorm_eps)
        self.final_layer_norm = nn.LayerNorm(embed_dim, eps=layernorm_eps)

    def forward(self, x: torch.Tensor, lengths: Sequence[int] | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.dropout(self.self_attn(self.self_attn_layer_norm(x), lengths)))
        return x + self.drop_path(self.ffn(self.final_layer_norm(x)))


class Encoder(nn.Module):
    """Input dropout, ``layers``, final ``layer_norm`` (checkpoint prefix ``encoder.``)."""

    def __init__(self, depth: int, embed_dim: int, num_heads: int, ffn_dim: int, segment_lengths: Sequence[int],
                 dilated_ratios: Sequence[int], dropout: float, drop_path_rate: float, layernorm_eps: float,
                 segment_padding: str, backend: str, checkpoint_activations: bool):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        rates = np.linspace(0, drop_path_rate, depth) if depth > 1 else [0.0]
        self.layers = nn.ModuleList(
            EncoderLayer(embed_dim, num_heads, ffn_dim, segment_lengths, dilated_ratios, dropout, float(rates[i]),
                         layernorm_eps, segment_padding, backend)
            for i in range(depth)
        )
        self.layer_norm = nn.LayerNorm(embed_dim, eps=layernorm_eps)
        self.checkpoint_activations = checkpoint_activations

    def forward(self, x: torch.Tensor, lengths: Sequence[int] | None = None, all_layers: bool = False,
                on_layer: Callable[[int, int], None] | None = None) -> list[torch.Tensor]:
        """x (B, L, E) -> [final output after ``layer_norm``], or with ``all_layers`` the input and each layer's
        output (depth + 1 tensors, none through ``layer_norm``), as the reference's ``encoder_states``."""
        x = self.dropout(x)
        states = [x] if all_layers else []
        for i, layer in enumerate(self.layers):
            if self.checkpoint_activations and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, lengths, use_reentrant=False)
            else:
                x = layer(x, lengths)
            if all_layers:
                states.append(x)
            if on_layer:
                on_layer(i + 1, len(self.layers))
        return states if all_layers else [self.layer_norm(x)]


class LongNetSlideEncoder(SlideEncoder):
    """Prov-GigaPath LongNet slide encoder (dilated attention over all tiles; checkpoint-compatible)."""

    name = "longnet"
    #: Prov-GigaPath's own name for Din (``slide_encoder.pth`` and its timm-style constructor), kept for
    #: checkpoint and config compatibility
    input_width_param = "in_chans"

    class Params(PluginParams):
        in_chans: int = Field(1536, ge=1, description="width of the tile embeddings (Din)")
        embed_dim: int = Field(768, ge=4, description="model width E (768 released; 1024, 1536 variants)")
        depth: int = Field(12, ge=1, description="number of LongNet layers")
        num_heads: int = Field(16, ge=1, description="attention heads")
        mlp_ratio: float = Field(4.0, gt=0, description="FFN width / E")
        segment_lengths: list[int] | None = Field(
            None, description="segment length per branch; None = the released rule from max_wsi_size and tile_size "
                              "([1024, 5792, 32768, 185363, 1048576])")
        dilated_ratios: list[int] = Field(list(DEFAULT_DILATED_RATIOS), min_length=1,
                                          description="dilation ratio per branch")
        tile_size: int = Field(256, ge=1, description="grid px per position cell (tiles of 256 px at 0.5 um/px)")
        slide_ngrids: int = Field(1000, ge=1, description="position grid side, in cells")
        max_wsi_size: int = Field(262144, ge=1024, description="grid px; sets the default segment lengths")
        global_pool: bool = Field(False, description="slide embedding = norm(mean of tile tokens) instead of CLS")
        all_layer_embed: bool = Field(False, description="return the input and every layer's embedding (depth+1, B, E)")
        dropout: float = Field(0.25, ge=0, lt=1, description="dropout in training (released: 0.25)")
        drop_path_rate: float = Field(0.1, ge=0, lt=1, description="max stochastic depth, linear over layers")
        segment_padding: Literal["reference", "masked"] = Field(
            "reference", description="'reference': zero-padding keys of the last segment take part in the softmax "
                                     "(as the released weights were trained); 'masked': they do not")
        attention_backend: Literal["auto", "fused", "math", "flash_attn"] = Field(
            "auto", description="attention kernel: fused PyTorch kernels, plain PyTorch ('math'), or flash-attn")
        checkpoint_activations: bool = Field(False, description="recompute layers in backward (saves memory)")

        @model_validator(mode="after")
        def _check(self):
            if self.embed_dim % self.num_heads:
                raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
            if self.embed_dim % 4:
                raise ValueError(f"embed_dim {self.embed_dim} must be divisible by 4 (2-D sin-cos position)")
            if self.segment_lengths is not None and len(self.segment_lengths) != len(self.dilated_ratios):
                raise ValueError("segment_lengths and dilated_ratios need one entry per branch each")
            if any(v < 1 for v in (self.segment_lengths or []) + self.dilated_ratios):
                raise ValueError("segment lengths and dilation ratios must be >= 1")
            return self

    def __init__(self, in_chans: int = 1536, embed_dim: int = 768, depth: int = 12, num_heads: int = 16,
                 mlp_ratio: float = 4.0, segment_lengths: Sequence[int] | None = None,
                 dilated_ratios: Sequence[int] = DEFAULT_DILATED_RATIOS, tile_size: int = 256, slide_ngrids: int = 1000,
                 max_wsi_size: int = 262144, global_pool: bool = False, all_layer_embed: bool = False,
                 dropout: float = 0.25, drop_path_rate: float = 0.1, segment_padding: str = "reference",
                 attention_backend: str = "auto", checkpoint_activations: bool = False):
        super().__init__()
        if attention_backend not in BACKENDS:
            raise ConfigError("slide_encoder.params.attention_backend", f"valid: {', '.join(BACKENDS)}")
        if segment_padding not in ("reference", "masked"):
            raise ConfigError("slide_encoder.params.segment_padding", "valid: reference, masked")
        self.in_dim, self.embed_dim, self.depth = in_chans, embed_dim, depth
        self.tile_size, self.slide_ngrids = tile_size, slide_ngrids
        self.global_pool, self.all_layer_embed = global_pool, all_layer_embed
        self.segment_lengths = list(segment_lengths) if segment_lengths else reference_segment_lengths(
            max_wsi_size, tile_size, len(dilated_ratios))
        self.dilated_ratios = list(dilated_ratios)
        # parameters in the released checkpoint's order: cls_token, patch_embed, encoder, norm
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.patch_embed = PatchEmbed(in_chans, embed_dim)
        self.encoder = Encoder(depth, embed_dim, num_heads, int(embed_dim * mlp_ratio), self.segment_lengths,
                               self.dilated_ratios, dropout, drop_path_rate, 1e-5, segment_padding,
                               attention_backend, checkpoint_activations)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random initialisation of the reference: xavier-uniform Linear weights, zero biases, unit LayerNorms,
        CLS token ~ N(0, 0.02^2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.cls_token, std=0.02)

    def forward_flops(self, n_tiles: int, batch: int = 1) -> int:
        """Floating-point operations of one inference forward of ``batch`` slides of ``n_tiles`` tiles each (no
        padding): every matrix product (a multiply-add counting 2; tile projection, q/k/v/output projections,
        FFN, dilated attention as :func:`.dilated_attention.attention_flops`), not the element-wise work. Equals
        ``torch.utils.flop_counter.FlopCounterMode``'s count with ``attention_backend="math"`` (int, exact)."""
        layer = self.encoder.layers[0]
        attn, E, L = layer.self_attn, self.embed_dim, n_tiles + 1
        F_ = layer.ffn.fc1.out_features
        linear = 2 * batch * L * (4 * E * E + 2 * E * F_)  # q, k, v, out; fc1, fc2
        dilated = attention_flops(L, attn.segment_lengths, attn.dilated_ratios, attn.num_heads, attn.head_dim, batch,
                                  attn.segment_padding)
        return 2 * batch * n_tiles * self.in_dim * E + self.depth * (linear + dilated)

    # ------------------------------------------------------------------------------------------- forward
    def embed_tokens(self, tile_embeds: torch.Tensor, coords: torch.Tensor, padding_mask: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, list[int] | None, torch.Tensor | None]:
        """Encoder input: CLS + projected tiles + positions, with each slide's valid tiles moved to the front.

        Returns:
            x (B, 1 + N, E); lengths (per slide 1 + its number of valid tiles, or None without padding);
            order (B, N) int64 original tile index of each position (None without padding).
        Raises:
            ConfigError: wrong shapes, or a coordinate outside the position grid (see :func:`coords_to_cells`).
        """
        if tile_embeds.dim() != 3 or tile_embeds.shape[-1] != self.in_dim:
            raise ConfigError("tile_embeds", f"expected (B, N, {self.in_dim}), got {tuple(tile_embeds.shape)}")
        B, N, _ = tile_embeds.shape
        if coords.shape[:2] != (B, N):
            raise ConfigError("coords", f"expected ({B}, {N}, 2) to match tile_embeds, got {tuple(coords.shape)}")
        lengths = order = None
        if padding_mask is not None:
            padding_mask = padding_mask.to(device=tile_embeds.device, dtype=torch.bool)
            if padding_mask.shape != (B, N):
                raise ConfigError("padding_mask", f"expected ({B}, {N}) bool, got {tuple(padding_mask.shape)}")
            if bool(padding_mask.any()):
                order = torch.sort(padding_mask.to(torch.uint8), dim=1, stable=True).indices  # valid first
                tile_embeds = torch.gather(tile_embeds, 1, order[..., None].expand(-1, -1, tile_embeds.shape[-1]))
                coords = torch.gather(coords, 1, order[..., None].expand(-1, -1, 2))
                padding_mask = torch.gather(padding_mask, 1, order)
                lengths = [1 + int(n) for n in (~padding_mask).sum(1)]
            else:
                padding_mask = None
        cells = coords_to_cells(coords, self.tile_size, self.slide_ngrids, padding_mask)
        weight = self.patch_embed.proj.weight
        if not torch.is_autocast_enabled(tile_embeds.device.type):
            tile_embeds = tile_embeds.to(weight.dtype)
        x = self.patch_embed(tile_embeds.to(weight.device))
        x = x + position_embedding(cells.to(x.device), self.embed_dim, self.slide_ngrids, x.dtype)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0)
        cls = self.cls_token.to(x.dtype).expand(B, -1, -1)  # CLS position row is all zeros
        return torch.cat([cls, x], dim=1), lengths, order

    def forward_features(self, tile_embeds: torch.Tensor, coords: torch.Tensor,
                         padding_mask: torch.Tensor | None = None, all_layers: bool = False,
                         on_layer: Callable[[int, int], None] | None = None):
        """Token states: ``[final]`` (after ``encoder.layer_norm``) or, with ``all_layers``, depth + 1 states.

        Returns:
            (states, lengths, order): states are (B, 1 + N, E) with CLS at 0 and each slide's valid tiles first
            (see :meth:`embed_tokens`); positions past ``lengths[b]`` are padding and hold no meaning.
        """
        x, lengths, order = self.embed_tokens(tile_embeds, coords, padding_mask)
        return self.encoder(x, lengths, all_layers, on_layer), lengths, order

    def _pool(self, h: torch.Tensor, lengths: list[int] | None, global_pool: bool) -> torch.Tensor:
        if not global_pool:
            return self.norm(h[:, 0])
        if lengths is None:
            return self.norm(h[:, 1:].mean(dim=1))
        keep = torch.zeros(h.shape[:2], dtype=h.dtype, device=h.device)
        for b, n in enumerate(lengths):
            keep[b, 1:n] = 1.0
        pooled = (h * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        return self.norm(pooled)

    def forward(self, tile_embeds: torch.Tensor, coords: torch.Tensor, padding_mask: torch.Tensor | None = None,
                return_tile_tokens: bool = False, *, all_layer_embed: bool | None = None,
                global_pool: bool | None = None, on_layer: Callable[[int, int], None] | None = None):
        """Encode slides.

        Args:
            tile_embeds: (B, N, Din) tile embeddings, float; the order matters (the reference does not sort:
                pass tiles in the tiler's row-major order, as stored in ``tile_embeddings.h5``).
            coords: (B, N, 2) grid px (x, y) at 0.5 µm/px of each tile's top-left corner (Xu et al. 2024, Methods:
            Preprocessing WSIs); cell
                ``(floor(x/256), floor(y/256))`` must lie in the 1000 x 1000 grid.
            padding_mask: (B, N) bool, True at padding (batched slides of different N). Each slide is then
                encoded exactly as it would be alone (its valid tiles, in order); padding never acts as a key.
            return_tile_tokens: also return contextual tile embeddings (B, N, E): ``norm`` of the final encoder
                output for each tile (zeros at padding), the inputs of ABMIL heads (Xu et al. 2024, Methods: mutation
                prediction, cancer subtyping).
            all_layer_embed: override of the constructor's: return (depth + 1, B, E), the input embedding and
                every layer output, each pooled and passed through ``norm`` (not the final encoder LayerNorm).
            global_pool: override of the constructor's: mean of tile tokens then ``norm``, instead of the CLS.
            on_layer: progress callback ``(layers_done, depth)``.
        Returns:
            (B, E) slide embeddings, or (depth + 1, B, E) with ``all_layer_embed``; with ``return_tile_tokens``
            a tuple (that, (B, N, E)). Dtype: the model's (or the autocast dtype).
        Raises:
            ConfigError: wrong shapes or coordinates outside the grid (the message names the tile).
        """
        all_layer_embed = self.all_layer_embed if all_layer_embed is None else all_layer_embed
        global_pool = self.global_pool if global_pool is None else global_pool
        states, lengths, order = self.forward_features(tile_embeds, coords, padding_mask, all_layer_embed, on_layer)
        pooled = [self._pool(h, lengths, global_pool) for h in states]
        out = torch.stack(pooled) if all_layer_embed else pooled[0]
        if not return_tile_tokens:
            return out
        final = states[-1] if not all_layer_embed else self.encoder.layer_norm(states[-1])
        tokens = self.norm(final[:, 1:])
        if lengths is not None:
            valid = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < (
                torch.tensor(lengths, device=tokens.device)[:, None] - 1)
            tokens = tokens * valid[..., None].to(tokens.dtype)
            tokens = torch.zeros_like(tokens).scatter(1, order[..., None].expand_as(tokens), tokens)
        return out, tokens


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["LongNetSlideEncoder", "reference_segment_lengths", "count_parameters"]
