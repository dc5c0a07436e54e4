"""The Thinker: audio and vision encoders feeding a Qwen2 decoder with TMRoPE (HF
``Qwen2_5OmniThinkerForConditionalGeneration``); parameter names follow the checkpoint's ``thinker.*``.

The decoder (:class:`ThinkerTextModel`, ``thinker.model.*``) works on packed tokens (T, hidden) with 3-D
positions (3, T) over a paged KV cache; the step's metadata comes from :mod:`omni_model.layers.context`, so
the same forward serves prefill (``is_prefill``) and decode. :class:`Thinker` adds the encoders, the scatter of
their features into the media token positions, and ``lm_head``.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_model.layers.attention import DecoderAttention, PagedAttention
from omni_model.layers.mlp import GatedMLP
from omni_model.layers.norm import RMSNorm
from omni_model.models.audio_encoder import AudioEncoder
from omni_model.models.vision_encoder import VisionEncoder


class DecoderLayer(nn.Module):
    """Pre-norm Qwen2 block: RMSNorm, TMRoPE attention, RMSNorm, SwiGLU (fused gate/up)."""

    def __init__(self, cfg, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = DecoderAttention(
            cfg.hidden_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
            mrope_section=cfg.mrope_section,
            rope_theta=cfg.rope_theta,
            layer_index=layer_index,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act)

    def forward(self, x: torch.Tensor, positions: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous block's output before its residual add (the embeddings for the first block, with
        ``residual=None``); returns this block's MLP output and the residual stream before it (HF's
        ``x = x + attn(norm(x)); x = x + mlp(norm(x))``, with each add fused into the norm after it)."""
        h, residual = self.input_layernorm.add_forward(x, residual)
        h, residual = self.post_attention_layernorm.add_forward(self.self_attn(h, positions), residual)
        return self.mlp(h), residual


class ThinkerTextModel(nn.Module):
    """``thinker.model``: embeddings, decoder layers, final norm. The engine's runner drives it directly."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.hidden_size = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """embeds (T, hidden), positions (3, T) -> final normed hidden states (T, hidden).

        Runs inside an :func:`~omni_model.layers.context.attention_context` (prefill: T packed new tokens;
        decode: one token per sequence).
        """
        x, residual = embeds, None
        for layer in self.layers:
            x, residual = layer(x, positions, residual)
        return self.norm.add_forward(x, residual)[0]

    def paged_attention_layers(self) -> list[PagedAttention]:
        """The paged attention of every decoder layer, in order (a KV cache is sized from them)."""
        return [layer.self_attn.attn for layer in self.layers]


class Thinker(nn.Module):
    """``thinker``: ``audio_tower``, ``visual``, ``model``, ``lm_head``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        text = cfg.text_config
        self.audio_tower = AudioEncoder(cfg.audio_config)
        self.visual = VisionEncoder(cfg.vision_config)
        self.model = ThinkerTextModel(text)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., hidden) -> logits (..., vocab) float32."""
        return self.lm_head(hidden).float()

    def embed_prompt(
        self,
        ids: torch.Tensor,
        *,
        audio: tuple[torch.Tensor, list[int]] | None = None,
        images: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None,
        videos: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None,
    ) -> torch.Tensor:
        """Token embeddings of packed ids (T,) with the encoders' features in the media token positions.

        audio: (features (B_a, mel, F), mel lengths); images / videos: (patches (N, C*tp*p*p), grids [(t, h, w)]).
        Features fill their token positions in order (HF's masked_scatter); the counts were checked by the caller.
        The media tensors go to the device and dtype of the embeddings first (the processor hands out fp32 on CPU).
        """
        embeds = self.model.embed_tokens(ids)
        cfg = self.config
        for media, token_id, encoder in (
            (audio, cfg.audio_token_id, self.audio_tower),
            (images, cfg.image_token_id, self.visual),
            (videos, cfg.video_token_id, self.visual),
        ):
            if media is None:
                continue
            features = encoder(media[0].to(device=embeds.device, dtype=embeds.dtype), media[1]).to(embeds.dtype)
            where = (ids == token_id).nonzero().squeeze(1)
            if where.numel() != features.shape[0]:  # the caller validates; this guards direct use
                raise ValueError(f"{where.numel()} tokens with id {token_id} but {features.shape[0]} feature rows")
            embeds = embeds.index_copy(0, where, features)
        return embeds
