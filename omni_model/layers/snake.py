"""Anti-aliased SnakeBeta activation of BigVGAN (HF 4.57.6 ``TorchActivation1d(SnakeBeta)``).

x (B, C, T) -> 2x upsample (zero-stuffing + Kaiser-windowed sinc low-pass, 12 taps, replicate padding) ->
SnakeBeta y + sin^2(exp(alpha) y) / (exp(beta) + 1e-9), per channel -> low-pass and 2x downsample -> (B, C, T).
The whole chain is one ``omni_kernels.anti_aliased_snake`` call (the 2T intermediate never goes to memory in
the fused kernels). ``alpha`` and ``beta`` are stored as logarithms, as in the checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from omni_kernels import anti_aliased_snake
from omni_kernels.anti_aliased_snake import kaiser_sinc_filter
from omni_model.layers.backend import get_backend

RATIO = 2  # up- and down-sampling factor
TAPS = 12  # filter length of both resamplers (HF up_kernel_size = down_kernel_size = 12)


class SnakeBetaParams(nn.Module):
    """Per-channel log-scale ``alpha`` (frequency) and ``beta`` (magnitude), (C,) each."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))


class AntiAliasedSnakeBeta(nn.Module):
    """Per-channel SnakeBeta between a 2x anti-aliased upsample and downsample: (B, C, T) -> (B, C, T).

    The parameters sit in ``act`` because HF wraps SnakeBeta in ``TorchActivation1d.act``: the checkpoint names
    are ``...act.alpha`` / ``...act.beta``.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.act = SnakeBetaParams(channels)
        # Both resamplers use the same low-pass at a quarter of the upsampled rate (cutoff 0.5 / 2, width 0.6 / 2).
        lowpass = kaiser_sinc_filter(0.5 / RATIO, 0.6 / RATIO, TAPS)
        self.register_buffer("up_filter", lowpass.clone(), persistent=False)
        self.register_buffer("down_filter", lowpass.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return anti_aliased_snake(x, self.act.alpha, self.act.beta, self.up_filter, self.down_filter,
                                  backend=get_backend())
