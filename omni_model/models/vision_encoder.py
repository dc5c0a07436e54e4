"""The Thinker's vision encoder (Qwen2.5-VL ViT, HF ``Qwen2_5OmniVisionEncoder``).

Patches (N, C * tp * p * p), in the processor's order (per image/video: frame, then 2x2 merge groups row-major,
then the 4 patches of a group) -> patch embed (the Conv3d is a Linear over the flattened patch) -> reorder the
merge groups into window order -> blocks (window attention inside windows of ``window_size`` px, or inside whole
temporal slices in the ``fullatt_block_indexes`` blocks; 2-D rotary) -> merger (RMSNorm, 2x2 -> Linear, GELU,
Linear) -> original order restored -> (N / merge**2, out_hidden_size).

All index math (rotary positions, window order, segment offsets) runs on the host from the grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni_model.layers.attention import VisionAttention
from omni_model.layers.mlp import GatedMLP
from omni_model.layers.norm import RMSNorm
from omni_model.layers.rotary import vision_rotary_angles


@dataclass
class VisionLayout:
    """Host-side index tensors of one vision forward pass (N patches, M = N / merge**2 merged tokens)."""

    pos_hw: torch.Tensor  # (N, 2) patch row, column, in the processor's patch order
    window_index: torch.Tensor  # (M,) merged token taken at each window-order slot
    cu_window_seqlens: torch.Tensor  # (W + 1,) int32 patch offsets of the non-empty windows
    cu_frame_seqlens: torch.Tensor  # (S + 1,) int32 patch offsets of the temporal slices
    max_window: int
    max_frame: int


def vision_layout(grids: list[tuple[int, int, int]], merge: int, window_merged: int) -> VisionLayout:
    """Index math for ``grids`` [(t, h, w) in patches]; ``window_merged``: window side in merged tokens."""
    unit = merge * merge
    pos, order, win_lens, frame_lens = [], [], [], []
    offset = 0
    for t, h, w in grids:
        hm, wm = h // merge, w // merge
        # Rotary ids of each patch: the patches of a 2x2 group are consecutive (processor order).
        p = torch.arange(h * w)
        j, i = p % merge, (p // merge) % merge
        wb, hb = (p // unit) % wm, p // (unit * wm)
        pos.append(torch.stack([hb * merge + i, wb * merge + j], dim=-1).repeat(t, 1))
        # Window order of the merged tokens: frame, window row, window column, then row-major inside the window.
        u = torch.arange(t * hm * wm)
        tt, r, c = u // (hm * wm), (u // wm) % hm, u % wm
        nwh, nww = -(-hm // window_merged), -(-wm // window_merged)
        window = (tt * nwh + r // window_merged) * nww + c // window_merged
        key = window * window_merged**2 + (r % window_merged) * window_merged + c % window_merged
        order.append(torch.argsort(key) + offset)
        counts = torch.bincount(window, minlength=t * nwh * nww)
        win_lens.append(counts[counts > 0] * unit)
        frame_lens.append(torch.full((t,), h * w, dtype=torch.int64))
        offset += t * hm * wm

    def cumulative(lens: list[torch.Tensor]) -> torch.Tensor:
        lens_all = torch.cat(lens)
        return F.pad(torch.cumsum(lens_all, 0), (1, 0)).to(torch.int32)

    wl, fl = torch.cat(win_lens), torch.cat(frame_lens)
    return VisionLayout(
        pos_hw=torch.cat(pos),
        window_index=torch.cat(order),
        cu_window_seqlens=cumulative(win_lens),
        cu_frame_seqlens=cumulative(frame_lens),
        max_window=int(wl.max()),
        max_frame=int(fl.max()),
    )


class VisionBlock(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, bias=True, act=cfg.hidden_act)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int, angles: torch.Tensor):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_seqlen, angles)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        # The checkpoint's Conv3d (hidden, C, tp, p, p) with stride = kernel is this Linear, weight viewed flat.
        conv = (cfg.hidden_size, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Linear(conv[1] * conv[2] * conv[3] * conv[4], conv[0], bias=False)
        self.proj.checkpoint_shapes = {"weight": conv}  # read by omni_model.weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class PatchMerger(nn.Module):
    def __init__(self, cfg) -> None:
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.ln_q = RMSNorm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(self.width, self.width), nn.GELU(), nn.Linear(self.width,
                                                                                         cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.width))


class VisionEncoder(nn.Module):
    """Parameter names follow the checkpoint's ``thinker.visual.*``."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.merge = cfg.spatial_merge_size
        self.window_merged = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.full_attention = set(cfg.fullatt_block_indexes)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList([VisionBlock(cfg) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg)

    def forward(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels (N, C * tp * p * p), grids [(t, h, w)] -> (N / merge**2, out_hidden_size)."""
        device = pixels.device
        layout = vision_layout(grids, self.merge, self.window_merged)
        unit = self.merge**2
        n = pixels.shape[0]
        window_index = layout.window_index.to(device)
        x = self.patch_embed(pixels.to(self.patch_embed.proj.weight.dtype))
        x = x.view(n // unit, unit, -1)[window_index].view(n, -1)
        angles = vision_rotary_angles(layout.pos_hw.to(device), self.head_dim)
        angles = angles.view(n // unit, unit, -1)[window_index].view(n, -1)
        # Windows never cross a temporal slice, so the per-slice segments stay contiguous in window order.
        windows = (layout.cu_window_seqlens.to(device), layout.max_window)
        frames = (layout.cu_frame_seqlens.to(device), layout.max_frame)
        for i, block in enumerate(self.blocks):
            cu, max_len = frames if i in self.full_attention else windows
            x = block(x, cu, max_len, angles)
        x = self.merger(x)
        restore = torch.empty_like(window_index)
        restore[window_index] = torch.arange(len(window_index), device=device)
        return x[restore]
