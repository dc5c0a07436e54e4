"""Reference models from HF transformers 4.57.6, for parity tests: our configs as HF configs, HF models with
random weights large enough for numerical errors to show, and a tiny checkpoint written by HF itself.

transformers is a test dependency, not a runtime one: it is imported inside the functions here, and nothing
in ``omni_model`` imports this module at import time.

Weights: HF initialises linear weights with N(0, 0.02), which on the tiny model makes every activation nearly
zero and hides mistakes (a wrong rotary, a missing bias) under the tolerance. Here every matrix is drawn with
std ``weight_scale / sqrt(fan_in)`` (so activations keep unit scale through the layers, about 0.18 at width 32),
embeddings with std ``weight_scale``, norm scales as 1 + N(0, 0.1), and biases and the SnakeBeta log-scales as
N(0, 0.1): every tensor matters, nothing explodes (tested: no NaN/inf, unsaturated audio).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from omni_model.config import OmniConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Qwen2_5OmniConfig

__all__ = ["build_hf_model", "build_tiny_hf_checkpoint", "hf_config", "randomize_weights_", "tiny_speakers"]

NOISE = 0.1  # std of biases, log-scales and the deviation of norm scales from 1
# Extra gains by module-name prefix. BigVGAN sums three residual branches per AMP block, 3 blocks per stage and
# 6 stages: at unit gain the waveform grows ~1.7x a stage and 90% of it ends clamped at +-1, where errors vanish.
# These keep the vocoder's output std near 0.2 (a few % clamped).
GAINS = {
    "token2wav.code2wav_bigvgan_model.resblocks.": 0.3,
    "token2wav.code2wav_bigvgan_model.conv_post": 0.3,
}
SPEAKERS = ("Chelsie", "Ethan")


def hf_config(config: OmniConfig) -> Qwen2_5OmniConfig:
    """Our config as ``transformers.Qwen2_5OmniConfig`` (through the ``config.json`` layout)."""
    from transformers import Qwen2_5OmniConfig

    return Qwen2_5OmniConfig(**config.to_dict())


def _fan_in(module: nn.Module, weight: torch.Tensor) -> int:
    if isinstance(module, nn.ConvTranspose1d):
        # weight (in, out / groups, k): each output sample sums in * k / stride taps.
        return max(1, weight.shape[0] * weight.shape[2] // module.stride[0])
    if isinstance(module, nn.Embedding):
        return 1  # a lookup, not a sum
    return weight[0].numel()  # Linear (in,), Conv (in / groups, *kernel)


@torch.no_grad()
def randomize_weights_(model: nn.Module, *, seed: int = 0, weight_scale: float = 1.0) -> nn.Module:
    """Redraws every parameter of ``model`` in place (see the module docstring), deterministically for ``seed``
    (a private generator: the global RNG is untouched). Buffers are left as the model computed them."""
    gen = torch.Generator().manual_seed(seed)

    def normal(p: torch.Tensor, std: float, mean: float = 0.0) -> None:
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std + mean)

    for module_name, module in model.named_modules():  # fixed order -> same draws for the same architecture
        gain = weight_scale * next((g for prefix, g in GAINS.items() if module_name.startswith(prefix)), 1.0)
        for name, p in module.named_parameters(recurse=False):
            if name == "weight" and p.dim() >= 2:
                normal(p, gain / math.sqrt(_fan_in(module, p)))
            elif name == "weight":  # RMSNorm / LayerNorm scales
                normal(p, NOISE, mean=1.0)
            else:  # biases, SnakeBeta alpha/beta (log-scale: 0 means 1)
                normal(p, NOISE)
    return model


def tiny_speakers(config: OmniConfig, *, seed: int = 0, ref_frames: int = 300) -> dict[str, dict[str, Any]]:
    """``spk_dict.pt`` contents for ``config``: per speaker ``cond`` (1, enc_emb_dim), ``ref_mel``
    (1, ref_frames, mel_dim) and ``bos_token`` (REFERENCE.md: 90 = the tiny tts_text_start id), as HF 4.57.6's
    ``generate`` reads them (``cond`` must be 2-D there)."""
    dit = config.token2wav_config.dit
    gen = torch.Generator().manual_seed(seed + 1)
    bos = config.talker_config.tts_text_start_token_id
    return {
        name: {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
            # A log-mel-like level: natural-log amplitudes around -5 (quiet speech), spread of 2.
            "ref_mel": torch.randn(1, ref_frames, dit.mel_dim, generator=gen) * 2.0 - 5.0,
            "bos_token": bos,
        }
        for name in SPEAKERS
    }


def build_hf_model(config: OmniConfig | None = None, *, seed: int = 0, weight_scale: float = 1.0,
                   attn_implementation: str | None = None) -> PreTrainedModel:
    """``Qwen2_5OmniForConditionalGeneration`` (HF 4.57.6) for ``config`` (default: the tiny preset), fp32, eval,
    with :func:`randomize_weights_` weights."""
    from transformers import Qwen2_5OmniForConditionalGeneration

    config = OmniConfig.preset("tiny") if config is None else config
    hf_cfg = hf_config(config)
    if attn_implementation is not None:
        hf_cfg._attn_implementation = attn_implementation
    model = Qwen2_5OmniForConditionalGeneration(hf_cfg).float()
    return randomize_weights_(model, seed=seed, weight_scale=weight_scale).eval()


def build_tiny_hf_checkpoint(path: str | os.PathLike, *, seed: int = 0, weight_scale: float = 1.0,
                             max_shard_size: int | str = "1MB",
                             config: OmniConfig | None = None) -> tuple[Path, PreTrainedModel]:
    """Writes a checkpoint directory the way the published ones are laid out, with HF's own ``save_pretrained``:
    ``config.json``, ``model-0000x-of-0000N.safetensors`` + ``model.safetensors.index.json`` (``max_shard_size``
    small enough for several shards: the tiny model is about 4 MB) and ``spk_dict.pt`` ("Chelsie", "Ethan").

    Returns (path, model): the in-memory HF model with exactly the saved weights and its speakers loaded, so a
    test can run HF and ours on the same weights without reading the directory back.
    """
    config = OmniConfig.preset("tiny") if config is None else config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model = build_hf_model(config, seed=seed, weight_scale=weight_scale)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=max_shard_size)
    speakers = tiny_speakers(config, seed=seed)
    torch.save(speakers, out / "spk_dict.pt")
    model.speaker_map = {name: dict(entry) for name, entry in speakers.items()}
    return out, model
