"""The Thinker's audio encoder (Whisper-large-v3 style, HF ``Qwen2_5OmniAudioEncoder``).

Mel frames (B, mel, F) with per-audio lengths -> 2 s chunks (``2 * n_window`` frames, the last one shorter) ->
conv1 + GELU, conv2 (stride 2) + GELU, each chunk zero-padded on its own -> sinusoidal positions restarting at 0
in every chunk -> all chunks packed (T, d) -> layers whose attention stays inside each chunk (``window_attention``
with the chunks as segments) -> per audio AvgPool(2), LayerNorm, Linear -> (sum of tokens, output_dim).
Tokens per audio: ((L - 1) // 2 + 1) // 2 (25 per second).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_model.layers.attention import AudioAttention
from omni_model.layers.mlp import activation


def conv_output_lengths(mel_lens: torch.Tensor) -> torch.Tensor:
    """Frames after conv2 (stride 2, padding 1): (L - 1) // 2 + 1."""
    return (mel_lens - 1) // 2 + 1


def audio_token_lengths(mel_lens: torch.Tensor) -> torch.Tensor:
    """Thinker tokens per audio after AvgPool(2): HF ``_get_feat_extract_output_lengths``."""
    return (conv_output_lengths(mel_lens) - 2) // 2 + 1


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's sinusoidal table (length, channels): [sin | cos], fp32 as HF ``SinusoidsPositionEmbedding``."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2).float())
    scaled = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled), torch.cos(scaled)], dim=1)


def chunk_layout(mel_lens: list[int], chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Host index math for the 2 s chunks: (audio of each chunk, first frame of each chunk, frames of each chunk).

    Every audio is cut into ceil(L / chunk) chunks of ``chunk`` frames, the last holding the rest (HF's "tail
    chunk", L % chunk, or a full chunk when that is 0).
    """
    lens = torch.tensor(mel_lens, dtype=torch.int64)
    counts = (lens + chunk - 1) // chunk
    audio = torch.repeat_interleave(torch.arange(len(lens)), counts)
    k = torch.arange(int(counts.sum())) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    start = k * chunk
    return audio, start, torch.minimum(lens[audio] - start, torch.tensor(chunk))


class AudioEncoderLayer(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.d_model
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.self_attn = AudioAttention(d, cfg.encoder_attention_heads)
        self.final_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, cfg.encoder_ffn_dim)
        self.fc2 = nn.Linear(cfg.encoder_ffn_dim, d)
        self.act = activation(cfg.activation_function)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x), cu_seqlens, max_seqlen)
        return x + self.fc2(self.act(self.fc1(self.final_layer_norm(x))))


class AudioEncoder(nn.Module):
    """Parameter names follow the checkpoint's ``thinker.audio_tower.*``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        d = cfg.d_model
        self.chunk_frames = 2 * cfg.n_window
        self.conv1 = nn.Conv1d(cfg.num_mel_bins, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.max_source_positions = cfg.max_source_positions
        self.register_buffer("positional_embedding", sinusoids(cfg.max_source_positions, d), persistent=False)
        # In the checkpoint but unused by the forward pass (HF 4.57.6 never reads it either).
        self.audio_bos_eos_token = nn.Embedding(2, cfg.output_dim)
        self.layers = nn.ModuleList([AudioEncoderLayer(cfg) for _ in range(cfg.encoder_layers)])
        self.ln_post = nn.LayerNorm(d)
        self.proj = nn.Linear(d, cfg.output_dim)

    def init_buffers(self) -> None:
        """Recomputes the (non-persistent, fp32) sinusoid table, e.g. after building on the meta device."""
        d = self.conv1.out_channels
        self.positional_embedding = sinusoids(self.max_source_positions, d).to(self.conv1.weight.device)

    def forward(self, features: torch.Tensor, mel_lens: list[int]) -> torch.Tensor:
        """features (B, mel, F), frames [0, mel_lens[b]) valid -> (sum of audio_token_lengths, output_dim)."""
        device = features.device
        audio, start, length = chunk_layout(mel_lens, self.chunk_frames)
        width = int(length.max())
        # Gather every chunk into a zero-padded batch (C, mel, width): each chunk is convolved on its own, with
        # zeros past its end, as HF's padded_and_mask_function does.
        col = torch.arange(width)
        valid = col[None, :] < length[:, None]
        frames = torch.where(valid, start[:, None] + col[None, :], 0)
        x = features.to(self.conv1.weight.dtype).transpose(1, 2)[audio.to(device)[:, None], frames.to(device)]
        valid = valid.to(device)
        x = x.masked_fill(~valid[..., None], 0).transpose(1, 2)
        x = F.gelu(self.conv1(x)) * valid[:, None, :].to(x.dtype)
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (C, width2, d)
        x = x + self.positional_embedding[: x.shape[1]].to(x.dtype)  # positions restart in every chunk
        chunk_out = conv_output_lengths(length)
        keep = (torch.arange(x.shape[1])[None, :] < chunk_out[:, None]).to(device)
        x = x[keep]  # (T, d) packed chunk by chunk, audio by audio
        cu = torch.zeros(len(chunk_out) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(chunk_out, 0)
        cu_seqlens, max_seqlen = cu.to(device), int(chunk_out.max())
        for layer in self.layers:
            x = layer(x, cu_seqlens, max_seqlen)
        # AvgPool1d(2, stride 2) per audio (an odd last frame is dropped), then LayerNorm and Linear.
        lens = conv_output_lengths(torch.tensor(mel_lens, dtype=torch.int64))
        pooled = lens // 2
        first = torch.repeat_interleave(torch.cumsum(lens, 0) - lens, pooled)
        k = torch.arange(int(pooled.sum())) - torch.repeat_interleave(torch.cumsum(pooled, 0) - pooled, pooled)
        idx = (first + 2 * k).to(device)
        x = (x[idx] + x[idx + 1]) / 2
        return self.proj(self.ln_post(x))
