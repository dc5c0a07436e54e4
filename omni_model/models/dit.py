"""Token2Wav DiT: codec codes + speaker + noisy mel + time -> mel velocity (HF 4.57.6 ``Qwen2_5OmniToken2WavDiTModel``).

Input per mel frame: [noisy mel (mel), ECAPA-TDNN(ref_mel) (enc_dim), codec embedding of code frame // repeats
(emb_dim), speaker vector (enc_emb_dim)] -> Linear to ``hidden``. Then ``num_hidden_layers`` AdaLN-Zero blocks
(shift/scale/gate for attention and MLP from the time embedding), a final AdaLN (scale, shift) and a Linear back
to ``mel``. Attention: RoPE (theta 1e4, interleaved pairs (2i, 2i+1)) on head 0 only (HF: "due to training
process"), and a block mask of ``block_size`` frames where layer l's query block i sees key blocks
i - back_l .. i + ahead_l, computed by ``omni_kernels.sliding_block_attention`` (never a T x T mask).

Everything but the noisy mel and the time is fixed for an utterance, so :meth:`DiT.conditioning` computes the
speaker/code part of the input projection once (ECAPA included) and each of the 36 ODE passes only adds the
projection of the noisy mel. Guidance packs the conditional and the unconditional branch (code 0, zero speaker
vector, zero reference mel) as 2 sequences of one call (``cu_seqlens``); positions and block indices restart
at 0 in every sequence, so a streaming chunk is simply a shorter sequence.

Shapes: codes (B, N) int; noisy mel (B, L = repeats * N, mel); velocity (S, L, mel), S = 2B with guidance, else B.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni_kernels import sliding_block_attention
from omni_kernels.apply_tmrope import rope_inv_freq
from omni_model.layers.backend import get_backend
from omni_model.layers.mlp import MergedLinear
from omni_model.models.ecapa import ECAPATDNN

TIME_FREQ_DIM = 256  # sinusoidal time features (HF DiTTimestepEmbedding freq_embed_dim)
TIME_SCALE = 1000.0  # t in [0, 1] is scaled by 1000 before the sinusoid
NORM_EPS = 1e-6
ROPE_THETA = 10000.0  # HF fixes the DiT's RoPE base in code (Qwen2_5OmniDiTRotaryEmbedding), not in the config


def check_codes(codes: torch.Tensor, num_embeds: int) -> None:
    """ValueError naming ``codes`` and the offending values unless every code lies in [0, num_embeds).

    Runs on the host (one device sync for CUDA codes) so that a bad code never reaches the embedding gather,
    where it would be a device-side assert that kills the CUDA context.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"codes must be an int32/int64 tensor, got {getattr(codes, 'dtype', type(codes).__name__)}")
    if codes.numel() == 0:
        raise ValueError("codes is empty: Token2Wav needs at least one code")
    host = codes.detach().cpu()
    bad = (host < 0) | (host >= num_embeds)
    if bool(bad.any()):
        values = torch.unique(host[bad])
        shown = ", ".join(str(v) for v in values[:16].tolist()) + (", ..." if len(values) > 16 else "")
        raise ValueError(f"codes must lie in [0, {num_embeds}) (the DiT code table), got {int(bad.sum())} "
                         f"out-of-range code(s): {shown}")


def rotate_pairs_(x: torch.Tensor, rot: torch.Tensor) -> None:
    """Rotates interleaved pairs (2i, 2i+1) of x (S, L, n, D) in place by rot = cos + i sin (L, D // 2) complex64.

    fp32: the pairs are complex numbers already (one in-place complex multiply over the strided view); other
    dtypes rotate in fp32 and round once.
    """
    pairs = x.unflatten(-1, (-1, 2))
    if x.dtype == torch.float32:
        torch.view_as_complex(pairs).mul_(rot[:, None])
        return
    even, odd = pairs[..., 0].float(), pairs[..., 1].float()
    cos, sin = rot.real[:, None], rot.imag[:, None]
    new_even, new_odd = even * cos - odd * sin, odd * cos + even * sin  # both before writing: even/odd are views
    pairs[..., 0] = new_even
    pairs[..., 1] = new_odd


class TimestepEmbedding(nn.Module):
    """t (S,) in [0, 1] -> (S, hidden): sinusoid of 1000 t (sin half, then cos half), Linear, SiLU, Linear."""

    def __init__(self, hidden: int):
        super().__init__()
        self.time_mlp = nn.ModuleList([nn.Linear(TIME_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden)])

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = TIME_FREQ_DIM // 2
        freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        angles = TIME_SCALE * t.float().unsqueeze(1) * freqs.unsqueeze(0)
        h = torch.cat((angles.sin(), angles.cos()), dim=-1).to(self.time_mlp[0].weight.dtype)
        for layer in self.time_mlp:
            h = layer(h)
        return h


class CodecEmbedding(nn.Module):
    """Code table with ``num_embeds + 1`` rows (HF's size); each code covers ``repeats`` mel frames."""

    def __init__(self, num_embeds: int, dim: int, repeats: int):
        super().__init__()
        self.repeats = repeats
        self.codec_embed = nn.Embedding(num_embeds + 1, dim)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return torch.repeat_interleave(self.codec_embed(codes), self.repeats, dim=1)


class InputEmbedding(nn.Module):
    """``proj``: Linear over [mel, ECAPA(ref_mel), code embedding, speaker vector]; ``spk_encoder``: ECAPA."""

    def __init__(self, cfg):
        super().__init__()
        self.mel_dim = cfg.mel_dim
        self.proj = nn.Linear(cfg.mel_dim + cfg.enc_dim + cfg.emb_dim + cfg.enc_emb_dim, cfg.hidden_size)
        self.spk_encoder = ECAPATDNN(cfg)

    def static(self, voice: torch.Tensor, code_embed: torch.Tensor, speaker: torch.Tensor) -> torch.Tensor:
        """The part of ``proj`` that does not depend on the noisy mel, bias included: (S, L, hidden), from the ECAPA
        output ``voice`` (S, enc_dim), the code embedding (S, L, emb_dim) and the speaker vector (S, enc_emb_dim)."""
        length = code_embed.shape[1]
        feats = torch.cat((voice.unsqueeze(1).expand(-1, length, -1), code_embed,
                           speaker.unsqueeze(1).expand(-1, length, -1)), dim=-1)
        return F.linear(feats, self.proj.weight[:, self.mel_dim:], self.proj.bias)

    def forward(self, x: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        """x (B, L, mel), shared by the S = k * B rows of ``static`` (k branches of B rows) -> (S, L, hidden)."""
        h = F.linear(x, self.proj.weight[:, :self.mel_dim])
        return (static.unflatten(0, (-1, h.shape[0])) + h).flatten(0, 1)


class AdaLayerNormZero(nn.Module):
    """``linear(silu(t_emb))`` -> ``chunks`` modulation vectors, each (S | 1, 1, hidden)."""

    def __init__(self, hidden: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(hidden, chunks * hidden)

    def forward(self, t_emb: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(F.silu(t_emb)).unsqueeze(1).chunk(self.chunks, dim=-1)


def _modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=NORM_EPS) * (1 + scale) + shift


class DiTAttention(nn.Module):
    def __init__(self, cfg, look_back: int, look_ahead: int):
        super().__init__()
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.block_size, self.look_back, self.look_ahead = cfg.block_size, look_back, look_ahead
        inner = self.heads * self.head_dim
        # One matmul for q, k, v: the checkpoint's to_q / to_k / to_v (omni_model.weights.FUSED_SHARDS).
        self.to_qkv = MergedLinear(cfg.hidden_size, [inner] * 3, bias=True)
        self.to_out = nn.ModuleList([nn.Linear(inner, cfg.hidden_size)])

    def forward(self, x: torch.Tensor, rot: torch.Tensor, cu_seqlens: torch.Tensor, allow_tf32: bool) -> torch.Tensor:
        seqs, length, _ = x.shape
        qkv = self.to_qkv(x).view(seqs * length, 3, self.heads, self.head_dim)
        q, k, v = qkv.unbind(1)  # (S * L, H, D) views with a contiguous last dim
        # RoPE on head 0 of q and k only (HF: "due to training process, only first head is applied with RoPE").
        rotate_pairs_(qkv[:, :2, 0].unflatten(0, (seqs, length)), rot)
        out = sliding_block_attention(q, k, v, block_size=self.block_size, look_back=self.look_back,
                                      look_ahead=self.look_ahead, cu_seqlens=cu_seqlens, allow_tf32=allow_tf32,
                                      backend=get_backend())
        return self.to_out[0](out.reshape(seqs, length, -1))


class DiTBlock(nn.Module):
    """AdaLN-Zero block: x += g_a * attn(mod(x)); x += g_m * mlp(mod(x)); MLP: Linear, GELU(tanh), Linear."""

    def __init__(self, cfg, look_back: int, look_ahead: int):
        super().__init__()
        self.attn_norm = AdaLayerNormZero(cfg.hidden_size, 6)
        self.attn = DiTAttention(cfg, look_back, look_ahead)
        inner = int(cfg.hidden_size * cfg.ff_mult)
        # HF layout ff.ff.{0: Linear, 1: GELU, 2: Dropout, 3: Linear}; Identity keeps the checkpoint's indices.
        self.ff = nn.Module()
        self.ff.ff = nn.ModuleList([nn.Linear(cfg.hidden_size, inner), nn.GELU(approximate="tanh"), nn.Identity(),
                                    nn.Linear(inner, cfg.hidden_size)])

    def forward(self, x, t_emb, rot, cu_seqlens, allow_tf32: bool):
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.attn_norm(t_emb)
        x = x + gate_a * self.attn(_modulate(x, scale_a, shift_a), rot, cu_seqlens, allow_tf32)
        h = _modulate(x, scale_m, shift_m)
        for layer in self.ff.ff:
            h = layer(h)
        return x + gate_m * h


class DiT(nn.Module):
    """``cfg``: the DiT config (HF field names: hidden_size, num_hidden_layers, ..., enc_*)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.allow_tf32 = False  # TF32 inside sliding_block_attention for fp32 inputs (Token2Wav precision "tf32")
        self.num_embeds, self.repeats = cfg.num_embeds, cfg.repeats
        self.time_embed = TimestepEmbedding(cfg.hidden_size)
        self.text_embed = CodecEmbedding(cfg.num_embeds, cfg.emb_dim, cfg.repeats)
        self.input_embed = InputEmbedding(cfg)
        # RoPE frequencies 1 / 1e4^(2i/D) (HF fixes the base at 1e4 in code and saves them with the weights as
        # rotary_embed.inv_freq; Token2Wav.load_weights checks that tensor against this one).
        self.rotary_embed = nn.Module()
        inv_freq = rope_inv_freq(cfg.head_dim, ROPE_THETA, torch.get_default_device()).clone()
        self.rotary_embed.register_buffer("inv_freq", inv_freq, persistent=False)
        # (look_back, look_ahead) in blocks per layer: 7B (1, 0) in layers 0 and 20, (0, 1) in 10, (0, 0) elsewhere.
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg, *cfg.block_window(i))
                                                for i in range(cfg.num_hidden_layers))
        self.norm_out = AdaLayerNormZero(cfg.hidden_size, 2)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.mel_dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.weight.dtype

    def voice(self, ref_mel: torch.Tensor, *, guidance: bool = True) -> torch.Tensor:
        """ECAPA-TDNN of the reference mel (B, T_ref, mel) -> (S, enc_dim); with guidance the B rows of a zero
        reference (the unconditional branch) follow. Fixed per speaker: compute once, pass to :meth:`conditioning`."""
        ref_mel = ref_mel.to(self.dtype)
        if guidance:
            ref_mel = torch.cat([ref_mel, torch.zeros_like(ref_mel)])
        return self.input_embed.spk_encoder(ref_mel)

    def conditioning(self, codes: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor | None = None, *,
                     voice: torch.Tensor | None = None, guidance: bool = True) -> torch.Tensor:
        """The time-independent input of the DiT: (S, repeats * N, hidden), S = 2B with guidance (the B
        conditional rows, then the B unconditional ones: code 0, zero speaker vector, zero reference mel).

        codes (B, N) int in [0, num_embeds) (checked by the callers, on the host: :func:`check_codes`; a whole
        utterance or a streaming window); cond (B, enc_emb_dim) speaker vector; either ref_mel (B, T_ref, mel) or its
        :meth:`voice` (S, enc_dim), computed with the same ``guidance``.
        """
        if (ref_mel is None) == (voice is None):
            raise ValueError("pass exactly one of ref_mel and voice")
        if voice is None:
            voice = self.voice(ref_mel, guidance=guidance)
        cond, codes = cond.to(self.dtype), codes.long()
        if guidance:
            codes = torch.cat([codes, torch.zeros_like(codes)])
            cond = torch.cat([cond, torch.zeros_like(cond)])
        if voice.shape[0] != codes.shape[0]:
            raise ValueError(f"voice has {voice.shape[0]} rows, expected {codes.shape[0]} (guidance={guidance})")
        return self.input_embed.static(voice.to(self.dtype), self.text_embed(codes), cond)

    def rope(self, positions: torch.Tensor) -> torch.Tensor:
        """cos + i sin (T, D // 2) complex64 of positions (T,) (every sequence and chunk restarts at 0); the angles,
        cos and sin in fp32 as HF computes them."""
        angles = positions.float().unsqueeze(1) * self.rotary_embed.inv_freq.unsqueeze(0)
        return torch.complex(angles.cos(), angles.sin())

    @staticmethod
    def packed_layout(lengths: list[int], branches: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Host index math of sequences packed along the length: (positions (T,) int64 restarting at 0 in every
        sequence, cu_seqlens (branches * len(lengths) + 1,) int32 over the S = ``branches`` rows of T frames)."""
        positions = torch.cat([torch.arange(n) for n in lengths])
        total, starts = sum(lengths), [0]
        for n in lengths:
            starts.append(starts[-1] + n)
        cu = [b * total + a for b in range(branches) for a in starts[:-1]] + [branches * total]
        return positions, torch.tensor(cu, dtype=torch.int32)

    def forward(self, x: torch.Tensor, t: torch.Tensor, static: torch.Tensor,
                layout: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """Velocity (S, L, mel) of the noisy mel x (B, L, mel) at time t (0-d or (1,)), given ``static`` from
        :meth:`conditioning` (S, L, hidden) with S = B (no guidance) or 2B (x shared by both branches).

        ``layout``: None for S sequences of L frames each; or several sequences packed along L (B = 1: a batch of
        streaming windows of different lengths), given as (rot (L, D // 2) complex64 from :meth:`rope` of the
        packed positions, cu_seqlens over the S * L frames) from :meth:`packed_layout`: positions and the DiT
        blocks restart in every sequence.
        """
        seqs, length, _ = static.shape
        h = self.input_embed(x.to(self.dtype), static)
        t_emb = self.time_embed(t.reshape(-1)[:1])
        if layout is None:
            rot = self.rope(torch.arange(length, device=h.device))
            cu_seqlens = torch.arange(seqs + 1, device=h.device, dtype=torch.int32) * length
        else:
            rot, cu_seqlens = layout
        for block in self.transformer_blocks:
            h = block(h, t_emb, rot, cu_seqlens, self.allow_tf32)
        scale, shift = self.norm_out(t_emb)
        return self.proj_out(_modulate(h, scale, shift))
