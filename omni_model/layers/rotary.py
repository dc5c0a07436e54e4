"""Rotary helpers in plain torch for the encoders (the Thinker and Talker rotate through ``apply_tmrope``).

Vision (Qwen2.5-VL ViT): rotate-half layout over the whole head, pairs (d, d + D/2); the first quarter of the
frequencies turns with the patch row, the second with the patch column (dims 0..D/4-1 and D/2..3D/4-1 by row).
Angles and the rotation are computed in fp32 and the result cast back (HF ``apply_rotary_pos_emb_vision``).
"""

from __future__ import annotations

import torch

from omni_kernels.apply_tmrope import rope_inv_freq


def vision_rotary_angles(pos_hw: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Angles of the 2-D vision rotary: pos_hw (N, 2) (row, column) -> (N, head_dim // 2) fp32."""
    inv = rope_inv_freq(head_dim // 2, theta, pos_hw.device)
    pos = pos_hw.to(torch.float32)
    return torch.cat([pos[:, :1] * inv, pos[:, 1:2] * inv], dim=-1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotates x (T, H, D) by angles (T, D // 2) in the rotate-half layout; fp32 math, result in x's dtype."""
    emb = torch.cat((angles, angles), dim=-1).float()[:, None, :]
    x32 = x.float()
    return (x32 * emb.cos() + rotate_half(x32) * emb.sin()).to(x.dtype)
