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
from typing import TYPE_CHECKING

import torch
from torch import nn

from omni_model.config import OmniConfig
from omni_model.loader import random_speakers

if TYPE_CHECKING:
    from transformers import PreTrainedModel, Qwen2_5OmniConfig

__all__ = ["build_hf_model", "build_tiny_hf_checkpoint", "hf_config", "randomize_weights_", "save_tiny_processor",
           "load_tiny_processor"]

NOISE = 0.1  # std of biases, log-scales and the deviation of norm scales from 1
# Extra gains by module-name prefix. BigVGAN sums three residual branches per AMP block, 3 blocks per stage and
# 6 stages: at unit gain the waveform grows ~1.7x a stage and 90% of it ends clamped at +-1, where errors vanish.
# These keep the vocoder's output std near 0.2 (a few % clamped).
GAINS = {
    "token2wav.code2wav_bigvgan_model.resblocks.": 0.3,
    "token2wav.code2wav_bigvgan_model.conv_post": 0.3,
}


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
    speakers = random_speakers(config, seed=seed)
    torch.save(speakers, out / "spk_dict.pt")
    model.speaker_map = {name: dict(entry) for name, entry in speakers.items()}
    return out, model


# Tiny tokenizer: ids 1-8 are the tiny config's media / role ids (docs/model.md), 9-12 the chat markers, then one id
# per character; 85 ids in all, inside the tiny thinker vocab of 99.
TINY_SPECIAL = {"<|endoftext|>": 0, "<|AUDIO|>": 1, "<|IMAGE|>": 2, "<|VIDEO|>": 3, "<|audio_bos|>": 4,
                "<|audio_eos|>": 5, "<|vision_bos|>": 7, "<|vision_eos|>": 8, "<|im_start|>": 9, "<|im_end|>": 10}
TINY_WORDS = {"user": 6, "system": 11, "assistant": 12}  # "user" is the thinker's user_token_id
TINY_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 \n.,!?'-:"
# Qwen2.5-Omni's chat template, reduced to what the processor needs: one placeholder per media item.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c['type'] == 'image' %}<|vision_bos|><|IMAGE|><|vision_eos|>"
    "{% elif c['type'] == 'video' %}<|vision_bos|><|VIDEO|><|vision_eos|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def save_tiny_processor(path: str | os.PathLike, config: OmniConfig | None = None) -> Path:
    """Writes the files ``Qwen2_5OmniProcessor.from_pretrained`` (HF 4.57.6) reads into ``path``, offline: a
    character-level tokenizer (``tokenizer.json`` + ``tokenizer_config.json``, Qwen2TokenizerFast with the media
    tokens as ``extra_special_tokens``: the processor reads ``tokenizer.audio_token`` etc.), one
    ``preprocessor_config.json`` holding both the WhisperFeatureExtractor (``num_mel_bins`` of ``config``) and the
    Qwen2VLImageProcessor keys (as the published checkpoints do), ``video_preprocessor_config.json`` and
    ``chat_template.jinja``.

    The files are written one by one rather than through the processor's ``save_pretrained``: building the
    processor needs a video processor, which in transformers 4.57.6 needs torchvision; loading it back does too.
    """
    import json

    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast, Qwen2VLImageProcessor, WhisperFeatureExtractor

    config = OmniConfig.preset("tiny") if config is None else config
    th = config.thinker_config
    vision = th.vision_config
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = {**TINY_SPECIAL, **TINY_WORDS}
    for c in TINY_CHARS:
        vocab[c] = len(vocab)
    vocab["<unk>"] = len(vocab)
    if len(vocab) > th.text_config.vocab_size:
        raise ValueError(f"the tiny tokenizer needs {len(vocab)} ids; the thinker has {th.text_config.vocab_size}")
    ids = {"<|AUDIO|>": th.audio_token_id, "<|IMAGE|>": th.image_token_id, "<|VIDEO|>": th.video_token_id,
           "<|audio_bos|>": th.audio_start_token_id, "<|audio_eos|>": th.audio_end_token_id,
           "<|vision_bos|>": th.vision_start_token_id, "<|vision_eos|>": th.vision_end_token_id,
           "user": th.user_token_id}
    wrong = {t: (vocab[t], i) for t, i in ids.items() if vocab[t] != i}
    if wrong:
        raise ValueError(f"the tiny tokenizer's ids do not match the config (ours, config's): {wrong}")
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # characters join without spaces
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL])
    tok.add_tokens([AddedToken(t, normalized=False) for t in TINY_WORDS])
    tokenizer = Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"audio_token": "<|AUDIO|>", "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>",
                              "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                              "vision_bos_token": "<|vision_bos|>", "vision_eos_token": "<|vision_eos|>"},
    )
    tokenizer.save_pretrained(out)
    side = vision.patch_size * vision.spatial_merge_size
    image_kwargs = dict(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
                        temporal_patch_size=vision.temporal_patch_size,
                        min_pixels=(2 * side) ** 2, max_pixels=(4 * side) ** 2)  # 4 to 16 image tokens
    features = WhisperFeatureExtractor(feature_size=th.audio_config.num_mel_bins).to_dict()
    image = Qwen2VLImageProcessor(**image_kwargs).to_dict()
    (out / "preprocessor_config.json").write_text(json.dumps({**features, **image}, indent=2))
    video = {**image_kwargs, "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2_5OmniProcessor"}
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    (out / "chat_template.jinja").write_text(TINY_CHAT_TEMPLATE)
    return out


def load_tiny_processor(path: str | os.PathLike):
    """``Qwen2_5OmniProcessor.from_pretrained(path)`` (HF 4.57.6) less its video processor, which transformers builds
    only with torchvision: a plain ``BaseVideoProcessor`` stands in, and the processor reads nothing of it but
    ``merge_size`` when no video is given. Tokenizer, feature extractor, image processor and chat template come from
    ``path`` (e.g. :func:`save_tiny_processor`'s files). For tests on machines without torchvision."""
    from transformers import AutoTokenizer, Qwen2_5OmniProcessor, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.processing_utils import ProcessorMixin
    from transformers.video_processing_utils import BaseVideoProcessor

    path = Path(path)
    processor = ProcessorMixin.__new__(Qwen2_5OmniProcessor)
    check = ProcessorMixin.check_argument_for_proper_class
    try:  # the dummy AutoVideoProcessor class would refuse the stand-in
        ProcessorMixin.check_argument_for_proper_class = lambda self, name, arg: None
        processor.__init__(Qwen2VLImageProcessor.from_pretrained(path), BaseVideoProcessor(merge_size=2),
                           WhisperFeatureExtractor.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                           chat_template=(path / "chat_template.jinja").read_text())
    finally:
        ProcessorMixin.check_argument_for_proper_class = check
    return processor
