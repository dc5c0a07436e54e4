"""Token2Wav: talker codes -> mel (DiT + flow matching) -> 24 kHz waveform (BigVGAN).

HF 4.57.6 ``Qwen2_5OmniToken2WavModel``: ``sample`` draws ``torch.randn([1, 30000, mel])`` on the CPU, keeps the
first ``repeats * N`` frames, integrates the flow-matching ODE (10 sway-scheduled time points, RK4 3/8, guidance
0.5: 36 DiT passes at batch 2) and the vocoder turns the mel into samples.

Precision (``precision=``): ``"fp32"`` (default) is HF's arithmetic, with TF32 switched off for matmuls and cuDNN
convolutions while Token2Wav runs; ``"tf32"`` keeps fp32 weights and activations but lets matmuls and convs use
TF32 tensor cores; ``"bf16"`` stores the weights and runs the DiT and the vocoder in bfloat16 (the ODE state,
the guidance combination, RoPE angles and the mel normalisation stay fp32). ``benchmarks/bench_token2wav.py``
measures mel and waveform SNR of tf32 and bf16 against fp32.

Weights: ``load_weights`` takes the checkpoint's ``token2wav.code2wav_dit_model.*`` and
``token2wav.code2wav_bigvgan_model.*`` tensors (the ``token2wav.`` prefix is optional; other parts' tensors are
ignored); names are ours except the DiT's fused q/k/v (``omni_model.weights.FUSED_SHARDS``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from omni_model.layers.flow_matching import GUIDANCE_EPS, guided, integrate, sway_time_points
from omni_model.models.bigvgan import BigVGAN
from omni_model.models.dit import DiT, check_codes
from omni_model.weights import load_module

PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16}
HF_NOISE_FRAMES = 30000  # HF 4.57.6 draws torch.randn([1, 30000, mel]) and slices it
PREFIX = "token2wav."
# HF saves the DiT's RoPE frequencies with the weights; ours are computed from the config, and a checkpoint's copy
# (optional) must agree with them.
INV_FREQ_KEY = PREFIX + "code2wav_dit_model.rotary_embed.inv_freq"


def _tf32_flags(values: tuple[bool, bool] | None = None) -> tuple[bool, bool]:
    """Reads (and with ``values`` sets) TF32 for CUDA matmuls and cuDNN convolutions; returns the old values.

    The legacy ``allow_tf32`` flags work on every torch we support; where a process already switched to the
    ``fp32_precision`` API (torch >= 2.9 then refuses to mix the two), that API is used instead."""
    with warnings.catch_warnings():  # newer torch deprecates the legacy flags
        warnings.simplefilter("ignore")
        try:
            old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            if values is not None:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = values
        except RuntimeError:
            matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
            old = matmul.fp32_precision == "tf32", conv.fp32_precision == "tf32"
            if values is not None:
                matmul.fp32_precision, conv.fp32_precision = ("tf32" if v else "ieee" for v in values)
    return old


@contextlib.contextmanager
def tf32_enabled(enabled: bool) -> Iterator[None]:
    """TF32 on (or off) for CUDA matmuls and cuDNN convolutions in the body; both flags restored afterwards."""
    saved = _tf32_flags((enabled, enabled))
    try:
        yield
    finally:
        _tf32_flags(saved)


class Token2Wav(nn.Module):
    """Codes -> waveform. ``cfg``: the token2wav config (``cfg.dit``, ``cfg.bigvgan``)."""

    def __init__(self, cfg, *, precision: str = "fp32"):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        self.code2wav_dit_model = DiT(cfg.dit)
        self.code2wav_bigvgan_model = BigVGAN(cfg.bigvgan)
        # Only parameters change dtype: RoPE frequencies and resampling filters stay fp32 buffers.
        for p in self.parameters():
            p.data = p.data.to(PRECISIONS[precision])
        self.dit.allow_tf32 = precision == "tf32"
        self.eval()

    @property
    def dit(self) -> DiT:
        return self.code2wav_dit_model

    @property
    def vocoder(self) -> BigVGAN:
        return self.code2wav_bigvgan_model

    @property
    def device(self) -> torch.device:
        return self.dit.proj_out.weight.device

    def math_mode(self) -> contextlib.AbstractContextManager:
        """The TF32 setting of this precision (wrap direct DiT / vocoder calls, e.g. when streaming, in it)."""
        return tf32_enabled(self.precision == "tf32")

    @torch.no_grad()
    def load_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copies the checkpoint tensors in (cast to this precision); a missing, unexpected or mis-shaped tensor
        raises one error naming all of them."""
        if not any(k.startswith(PREFIX) for k in state_dict):
            state_dict = {PREFIX + k: v for k, v in state_dict.items()}
        state = {k: v for k, v in state_dict.items() if k.startswith(PREFIX) and k != INV_FREQ_KEY}
        inv_freq = state_dict.get(INV_FREQ_KEY)
        ours = self.dit.rotary_embed.inv_freq
        if inv_freq is not None and (inv_freq.shape != ours.shape or not torch.allclose(inv_freq.float().cpu(),
                                                                                        ours.cpu())):
            raise ValueError(f"{INV_FREQ_KEY}: the checkpoint's RoPE frequencies differ from 1 / 1e4^(2i/head_dim)")
        load_module(self, state, PREFIX, what="token2wav")

    def _noise(self, noise: torch.Tensor | None, generator: torch.Generator | None, batch: int,
               length: int) -> torch.Tensor:
        mel_dim = self.dit.cfg.mel_dim
        if noise is None:
            # HF's draw: a CPU randn of 30000 frames, sliced (so the same seed gives HF's noise).
            noise = torch.randn([batch, max(HF_NOISE_FRAMES, length), mel_dim], generator=generator)
        if noise.dim() != 3 or noise.shape[0] != batch or noise.shape[2] != mel_dim or noise.shape[1] < length:
            raise ValueError(f"noise must have shape ({batch}, >= {length}, {mel_dim}) for {length // self.dit.repeats}"
                             f" codes, got {tuple(noise.shape)}")
        return noise[:, :length].to(device=self.device, dtype=torch.float32)

    @torch.no_grad()
    def mel(self, codes: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor, noise: torch.Tensor | None = None,
            *, generator: torch.Generator | None = None, num_steps: int = 10, guidance_scale: float = 0.5,
            sway_coefficient: float | None = -1.0) -> torch.Tensor:
        """codes (B, N) int, cond (B, enc_emb_dim), ref_mel (B, T_ref, mel), noise (B, >= repeats * N, mel) or
        drawn from ``generator`` as HF does -> mel (B, mel, repeats * N) float32."""
        check_codes(codes, self.dit.num_embeds)  # before any device work
        if codes.dim() != 2:
            raise ValueError(f"codes must have shape (B, N), got {tuple(codes.shape)}")
        batch, length = codes.shape[0], codes.shape[1] * self.dit.repeats
        if cond.dim() != 2 or cond.shape != (batch, self.dit.cfg.enc_emb_dim):
            raise ValueError(f"cond must have shape ({batch}, {self.dit.cfg.enc_emb_dim}), got {tuple(cond.shape)}")
        if ref_mel.dim() != 3 or ref_mel.shape[0] != batch or ref_mel.shape[2] != self.dit.cfg.mel_dim:
            raise ValueError(f"ref_mel must have shape ({batch}, T, {self.dit.cfg.mel_dim}), "
                             f"got {tuple(ref_mel.shape)}")
        x0 = self._noise(noise, generator, batch, length)
        guide = guidance_scale >= GUIDANCE_EPS
        device = self.device
        with self.math_mode():
            static = self.dit.conditioning(codes.to(device), cond.to(device), ref_mel.to(device), guidance=guide)

            def velocity(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
                v = self.dit(x, t, static).float()
                return guided(v[:batch], v[batch:], guidance_scale) if guide else v

            x = integrate(velocity, x0, sway_time_points(num_steps, sway_coefficient, device))
        return x.transpose(1, 2)

    @torch.no_grad()
    def vocode(self, mel: torch.Tensor) -> torch.Tensor:
        """mel (B, mel, T) -> waveform (B, T * hop) float32 in [-1, 1]; any T (a chunk works the same way)."""
        with self.math_mode():
            return self.vocoder(mel.to(self.device)).float()

    @torch.no_grad()
    def forward(self, codes: torch.Tensor, cond: torch.Tensor, ref_mel: torch.Tensor,
                noise: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """codes (B, N) -> waveform (B, repeats * N * hop) float32; keywords as :meth:`mel`."""
        return self.vocode(self.mel(codes, cond, ref_mel, noise, **kwargs))
