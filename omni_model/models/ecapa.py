"""ECAPA-TDNN speaker encoder of the Token2Wav DiT: reference mel (B, T, mel) -> speaker vector (B, enc_dim).

Desplanques et al. 2020 (arXiv 2005.07143), as Qwen2.5-Omni uses it (HF 4.57.6 ``ECAPA_TimeDelayNet``): a TDNN,
SE-Res2Net blocks, multi-layer feature aggregation, attentive statistics pooling and a 1x1 conv. Every conv is
"same"-padded with reflection. The DiT runs it once per utterance and branch (the reference mel of the speaker,
and zeros for the unconditional branch): it does not depend on the noisy mel or the time step.

Parameter names mirror the checkpoint under ``token2wav.code2wav_dit_model.input_embed.spk_encoder.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Conv1d:
    # "same" length with reflected borders, as the ECAPA reference (SpeechBrain) pads.
    return nn.Conv1d(cin, cout, kernel, dilation=dilation, padding="same", padding_mode="reflect")


class TDNNBlock(nn.Module):
    """Conv1d + ReLU (weights ``conv.*``)."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int):
        super().__init__()
        self.conv = _conv(cin, cout, kernel, dilation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv(x))


class Res2NetBlock(nn.Module):
    """Splits channels into ``scale`` groups; group i > 0 goes through a TDNN after adding group i-1's output."""

    def __init__(self, channels: int, scale: int, kernel: int, dilation: int):
        super().__init__()
        self.scale = scale
        width = channels // scale
        self.blocks = nn.ModuleList(TDNNBlock(width, width, kernel, dilation) for _ in range(scale - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(x, self.scale, dim=1)
        outs = [parts[0]]
        for i in range(1, self.scale):
            # Group 1 sees only its own input; later groups add the previous group's output (hierarchical).
            y = parts[i] if i == 1 else parts[i] + outs[-1]
            outs.append(self.blocks[i - 1](y))
        return torch.cat(outs, dim=1)


class SEBlock(nn.Module):
    """Squeeze-excitation: channel gates from the time average."""

    def __init__(self, channels: int, se_channels: int):
        super().__init__()
        self.conv1 = _conv(channels, se_channels)
        self.conv2 = _conv(se_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv2(F.relu(self.conv1(x.mean(dim=2, keepdim=True)))))
        return x * gate


class SERes2NetBlock(nn.Module):
    """TDNN (1x1) -> Res2Net -> TDNN (1x1) -> SE, with a residual connection."""

    def __init__(self, cin: int, cout: int, scale: int, se_channels: int, kernel: int, dilation: int):
        super().__init__()
        self.tdnn1 = TDNNBlock(cin, cout, 1, 1)
        self.res2net_block = Res2NetBlock(cout, scale, kernel, dilation)
        self.tdnn2 = TDNNBlock(cout, cout, 1, 1)
        self.se_block = SEBlock(cout, se_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.se_block(self.tdnn2(self.res2net_block(self.tdnn1(x)))) + x


def _weighted_stats(x: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of x (B, C, T) over time with weights w (B, 1|C, T) that sum to 1."""
    mean = (w * x).sum(dim=2)
    std = torch.sqrt((w * (x - mean.unsqueeze(2)).pow(2)).sum(dim=2).clamp(eps))
    return mean, std


class AttentiveStatsPool(nn.Module):
    """Attentive statistics pooling: (B, C, T) -> (B, 2C, 1), attention over time per channel."""

    eps = 1e-12

    def __init__(self, channels: int, attention_channels: int):
        super().__init__()
        self.tdnn = TDNNBlock(3 * channels, attention_channels, 1, 1)
        self.conv = _conv(attention_channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[-1]
        # Global context: uniform weights 1/T (HF: a full-length mask divided by its sum), then mean/std
        # appended to every frame before the attention TDNN.
        uniform = torch.full((x.shape[0], 1, length), 1.0 / length, dtype=x.dtype, device=x.device)
        mean, std = _weighted_stats(x, uniform, self.eps)
        context = torch.cat([x, mean.unsqueeze(2).expand(-1, -1, length), std.unsqueeze(2).expand(-1, -1, length)], 1)
        attn = torch.softmax(self.conv(torch.tanh(self.tdnn(context))), dim=2)
        mean, std = _weighted_stats(x, attn, self.eps)
        return torch.cat([mean, std], dim=1).unsqueeze(2)


class ECAPATDNN(nn.Module):
    """Speaker encoder. ``cfg`` holds the DiT config's ``mel_dim``, ``enc_*`` fields (HF names)."""

    def __init__(self, cfg):
        super().__init__()
        ch, ks, dil = list(cfg.enc_channels), list(cfg.enc_kernel_sizes), list(cfg.enc_dilations)
        if not len(ch) == len(ks) == len(dil):
            raise ValueError("enc_channels, enc_kernel_sizes and enc_dilations must have the same length")
        self.blocks = nn.ModuleList([TDNNBlock(cfg.mel_dim, ch[0], ks[0], dil[0])])
        for i in range(1, len(ch) - 1):
            self.blocks.append(SERes2NetBlock(ch[i - 1], ch[i], cfg.enc_res2net_scale, cfg.enc_se_channels,
                                              ks[i], dil[i]))
        self.mfa = TDNNBlock(ch[-1], ch[-1], ks[-1], dil[-1])
        self.asp = AttentiveStatsPool(ch[-1], cfg.enc_attention_channels)
        self.fc = _conv(2 * ch[-1], cfg.enc_dim)

    def forward(self, ref_mel: torch.Tensor) -> torch.Tensor:
        """ref_mel (B, T, mel) -> (B, enc_dim)."""
        x = ref_mel.transpose(1, 2)
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        # Multi-layer feature aggregation over the SE-Res2Net outputs (the first TDNN's output is not used).
        x = self.mfa(torch.cat(feats[1:], dim=1))
        return self.fc(self.asp(x)).squeeze(-1)
