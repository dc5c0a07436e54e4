"""The Talker: a Qwen2 decoder that turns the Thinker's states into codec ids (HF
``Qwen2_5OmniTalkerForConditionalGeneration``); parameter names follow the checkpoint's ``talker.*``.

* ``model`` (``talker.model.*``): the codec embedding ``embed_tokens`` (vocab, E) in the Thinker's width E, the
  decoder layers (the Thinker's :class:`~omni_model.models.thinker.DecoderLayer`, with the talker config's heads,
  explicit head_dim, mrope_section and rope_theta) and the final RMSNorm, over a paged KV cache.
* ``thinker_to_talker_proj`` Linear(E, hidden, bias): applied to every summed input (E) before the decoder.
* ``codec_head`` Linear(hidden, vocab, no bias).

Inputs (REFERENCE.md "Talker inputs"; HF ``Qwen2_5OmniForConditionalGeneration.generate`` and the talker's
``forward``): the prompt is built by :meth:`Talker.prompt_embeds`, each decode step by :meth:`Talker.step_embeds`;
both are then projected by :meth:`Talker.project`. The engine (``omni_model.engine``) owns the order.
Positions: the prompt uses the TMRoPE ids of ``prompt ids + [speaker bos] + [first reply token]``
(:meth:`Talker.prompt_positions`), a decode step ``cache_len + delta`` on all three axes.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_model.layers.attention import PagedAttention
from omni_model.models.thinker import ThinkerTextModel
from omni_model.rope_index import config_kwargs, get_rope_index
from omni_model.weights import load_module


class TalkerModel(ThinkerTextModel):
    """``talker.model``: the Thinker's decoder stack with the codec embedding table in the Thinker's width.

    HF's ``Qwen2_5OmniTalkerModel`` builds ``embed_tokens`` as (vocab, embedding_size), not (vocab, hidden): the
    codes are embedded in the Thinker's space, summed with Thinker states and only then projected to ``hidden``.
    The decoder never reads ``embed_tokens`` itself (it takes projected embeddings).
    """

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.embedding_size)


class Talker(nn.Module):
    """``talker``: ``thinker_to_talker_proj``, ``model``, ``codec_head``. Shapes: E = embedding_size (Thinker width),
    hidden = the talker's width, T packed tokens, B sequences in a decode step, L prompt length."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.config = cfg
        self.hidden_size = cfg.hidden_size
        self.thinker_to_talker_proj = nn.Linear(cfg.embedding_size, cfg.hidden_size, bias=True)
        self.model = TalkerModel(cfg)
        self.codec_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def load_weights(self, state_dict: dict[str, torch.Tensor], prefix: str = "talker.") -> None:
        """Loads the tensors under ``prefix`` (fused qkv / gate_up from their checkpoint shards, by the table of
        :mod:`omni_model.weights`); one ValueError names every missing, unexpected or mis-shaped tensor."""
        load_module(self, state_dict, prefix, what="talker")

    def paged_attention_layers(self) -> list[PagedAttention]:
        """The paged attention of every decoder layer, in order (a KV cache is sized from them)."""
        return self.model.paged_attention_layers()

    # ------------------------------------------------------------------------------------------- inputs

    def embed_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """Codec ids (...,) -> their embeddings (..., E) (the table lives in the Thinker's width)."""
        return self.model.embed_tokens(ids)

    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """Summed inputs (T, E) -> decoder inputs (T, hidden) (``thinker_to_talker_proj``)."""
        return self.thinker_to_talker_proj(embeds)

    def prompt_embeds(
        self,
        thinker_embeds: torch.Tensor,
        thinker_hidden: torch.Tensor,
        media_mask: torch.Tensor | None,
        speaker_embed: torch.Tensor,
        first_reply: torch.Tensor,
    ) -> torch.Tensor:
        """The talker prompt before :meth:`project`: (L + 2, E).

        thinker_embeds (L, E): the Thinker's input embeddings of the prompt (encoder features at media positions);
        thinker_hidden (L, E): its final normed hidden states; media_mask (L,) bool (None: no media): the audio /
        image / video token positions, whose embedding HF zeroes (``embeds_to_talker.masked_scatter_`` with zeros in
        ``generate``) so that they carry the hidden state only; speaker_embed (E,): the Thinker's embedding of the
        speaker's ``bos_token``; first_reply (E,): hidden + embedding of the first reply token.
        HF's talker ``forward`` then adds the codec pad embedding to position L and the codec bos embedding to
        position L + 1 (``inputs_embeds[:, -2] += embed(pad)``, ``inputs_embeds[:, -1] += embed(bos)``).
        """
        if media_mask is not None:
            thinker_embeds = thinker_embeds.masked_fill(media_mask[:, None], 0)
        cfg = self.config
        table = self.model.embed_tokens.weight  # rows read by index: no id tensor to copy to the device
        codec = torch.stack([table[cfg.tts_codec_pad_token_id], table[cfg.tts_codec_start_token_id]])
        tail = torch.stack([speaker_embed, first_reply]) + codec
        return torch.cat([thinker_hidden + thinker_embeds, tail])

    def step_embeds(self, prev_codes: torch.Tensor, reply_elements: torch.Tensor) -> torch.Tensor:
        """A decode step's input before :meth:`project`: codec embedding of the previous code (B,) plus the step's
        reply element (B, E) (HF: ``embed_tokens(input_ids) + thinker_reply_part[:, :1]``) -> (B, E)."""
        return self.embed_codes(prev_codes) + reply_elements

    def prompt_positions(
        self,
        input_text_ids: torch.Tensor,
        *,
        image_grid_thw: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        use_audio_in_video: bool = False,
        audio_seqlens: torch.Tensor | None = None,
        second_per_grids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """TMRoPE ids of the talker prompt: input_text_ids (L + 2,) = prompt ids + [speaker bos] + [first reply
        token] -> (positions (3, L + 2) int64, delta) with decode ids ``cache_len + delta``.

        HF's talker runs its own ``get_rope_index`` on exactly these ids with the talker config's token ids.
        """
        cfg = self.config
        pos, delta = get_rope_index(
            input_text_ids[None],
            image_grid_thw,
            video_grid_thw,
            use_audio_in_video=use_audio_in_video,
            audio_seqlens=audio_seqlens,
            second_per_grids=second_per_grids,
            **config_kwargs(cfg, cfg.spatial_merge_size),
        )
        return pos[:, 0], int(delta[0, 0])

    # ------------------------------------------------------------------------------------------ decoder

    def forward(self, embeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Projected inputs (T, hidden), positions (3, T) -> final normed hidden states (T, hidden).

        Runs inside an :func:`~omni_model.layers.context.attention_context` set by the caller (prefill: packed new
        tokens of every sequence; decode: one token per sequence).
        """
        return self.model(embeds, positions)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (T, hidden) -> codec logits (T, vocab) float32 (HF casts ``codec_head``'s output to float)."""
        return self.codec_head(hidden).float()
