"""BigVGAN vocoder of Qwen2.5-Omni: mel (B, mel, T) natural-log amplitudes -> waveform (B, T * prod(rates)).

HF 4.57.6 ``Qwen2_5OmniToken2WavBigVGANModel``: the mel is turned into dB and normalised to [-1, 1] over a
115 dB range inside the vocoder; conv_pre (k7); per upsample stage a ConvTranspose1d (padding (k - s) // 2)
followed by the mean of ``len(resblock_kernel_sizes)`` AMP blocks; anti-aliased SnakeBeta; conv_post (k7, no
bias); clamp to [-1, 1] (no tanh). 7B: 80 mel, 1536 channels, rates 5,3,2,2,2,2 = 240 samples per frame.

The vocoder is length-agnostic (every layer is a convolution): the streaming engineer can call it on a mel chunk
with context frames on both sides and cut the samples of the context away (240 per frame at 7B shapes).

Parameter names are the checkpoint's under ``token2wav.code2wav_bigvgan_model.`` (the resampling filters are
not saved: they follow from the fixed Kaiser-sinc design).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from omni_model.layers.snake import AntiAliasedSnakeBeta

# The vocoder's dB range and reference level (HF ``process_mel_spectrogram``: amplitude_to_db(exp(mel), -115) - 20,
# then normalize_spectrogram(max 1, min_db -115)).
MIN_DB = -115.0
REF_DB = 20.0


_FLOORS: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _floor(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """HF's amplitude floor exp(-115 / 20 * ln 10) as a 0-d tensor, made on the first call per dtype and device (a
    host-to-device copy, which a CUDA graph capture must not contain: the capture's warm-up makes it)."""
    floor = _FLOORS.get((dtype, device))
    if floor is None:
        floor = torch.exp(torch.tensor(MIN_DB / 20.0 * math.log(10.0), dtype=dtype, device=device))
        _FLOORS[(dtype, device)] = floor
    return floor


def normalize_mel(mel: torch.Tensor) -> torch.Tensor:
    """Natural-log amplitude mel -> [-1, 1]: 20 log10(max(exp(mel), 10^(-115/20))) - 20, mapped from [-115, 0] dB."""
    floor = _floor(mel.dtype, mel.device)
    db = 20 * torch.log10(torch.clamp(torch.exp(mel), min=floor)) - REF_DB
    return torch.clamp(2.0 * ((db - MIN_DB) / -MIN_DB) - 1.0, -1.0, 1.0)


def _same_padding(kernel: int, dilation: int) -> int:
    return (kernel * dilation - dilation) // 2


class AMPBlock(nn.Module):
    """Three residual units: x += conv2(act(conv1(act(x)))) with dilations ``dilations`` in conv1, 1 in conv2."""

    def __init__(self, channels: int, kernel: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=_same_padding(kernel, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=_same_padding(kernel, 1)) for _ in dilations
        )
        # Checkpoint order: activations[2i] before convs1[i], activations[2i + 1] before convs2[i].
        self.activations = nn.ModuleList(AntiAliasedSnakeBeta(channels) for _ in range(2 * len(dilations)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (conv1, conv2) in enumerate(zip(self.convs1, self.convs2)):
            y = conv1(self.activations[2 * i](x))
            x = x + conv2(self.activations[2 * i + 1](y))
        return x


class BigVGAN(nn.Module):
    """``cfg``: the BigVGAN config (``mel_dim``, ``upsample_initial_channel``, ``resblock_kernel_sizes``,
    ``resblock_dilation_sizes``, ``upsample_rates``, ``upsample_kernel_sizes``)."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg.upsample_initial_channel
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        self.hop = math.prod(cfg.upsample_rates)
        self.conv_pre = nn.Conv1d(cfg.mel_dim, width, 7, padding=3)
        # One-element lists: the checkpoint names are ups.{i}.0.*.
        self.ups = nn.ModuleList(
            nn.ModuleList([nn.ConvTranspose1d(width >> i, width >> (i + 1), k, s, padding=(k - s) // 2)])
            for i, (s, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes))
        )
        self.resblocks = nn.ModuleList(
            AMPBlock(width >> (i + 1), k, tuple(d))
            for i in range(len(cfg.upsample_rates))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)
        )
        out_ch = width >> len(cfg.upsample_rates)
        self.activation_post = AntiAliasedSnakeBeta(out_ch)
        self.conv_post = nn.Conv1d(out_ch, 1, 7, padding=3, bias=False)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, mel, T) -> waveform (B, T * hop) in [-1, 1], in the module's dtype."""
        x = self.conv_pre(normalize_mel(mel.float()).to(self.conv_pre.weight.dtype))
        for i, (up,) in enumerate(self.ups):
            x = up(x)
            blocks = self.resblocks[i * self.num_kernels:(i + 1) * self.num_kernels]
            # HF: sum(...) / num_kernels (the sum starts from 0, which adds exactly).
            acc = blocks[0](x)
            for block in blocks[1:]:
                acc = acc + block(x)
            x = acc / self.num_kernels
        x = self.conv_post(self.activation_post(x))
        return torch.clamp(x, -1.0, 1.0).squeeze(1)
