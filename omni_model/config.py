"""Qwen2.5-Omni configuration: one frozen dataclass per part, read from and written to the checkpoint's
``config.json`` layout (what ``transformers==4.57.6``'s ``Qwen2_5OmniConfig.to_dict()`` / ``save_pretrained``
writes), plus the presets ``qwen2.5-omni-7b``, ``qwen2.5-omni-3b`` and ``tiny``.

Field names follow the attribute names HF's model code reads (``d_model``, ``num_heads``, ``n_window``, ...), so a
reader can check a field against the reference line by line; the few places where ``config.json`` spells a
field differently are mapped here and nowhere else:

* ``audio_token_id`` / ``image_token_id`` / ``video_token_id`` are ``*_token_index`` in the JSON (HF's
  ``attribute_map`` gives the config objects both names);
* ``mrope_section`` lives in ``rope_scaling["mrope_section"]``;
* the Token2Wav sub-configs are ``dit`` / ``bigvgan`` here, ``dit_config`` / ``bigvgan_config`` in the JSON;
* Qwen's published ``dit_config`` also carries the pre-release names ``dim`` / ``depth`` / ``heads``, which
  HF 4.57.6 ignores; they are read only when the HF name is absent.

Every dataclass default equals HF 4.57.6's default for that field (tested), so a key missing from a
``config.json`` means what it means to HF. Two exceptions, where HF has no usable default: the Thinker's
``vision_start_token_id`` / ``vision_end_token_id`` (not HF ``__init__`` arguments: HF's ``get_rope_index``
fails without them) and the Talker's ``mrope_section`` (HF's default ``rope_scaling=None`` fails in attention);
both default to the published checkpoints' values.

Derived quantities are properties; invariants are checked in ``__post_init__`` and raise ``ValueError`` naming
the class and the fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

__all__ = [
    "AudioConfig",
    "BigVGANConfig",
    "DiTConfig",
    "OmniConfig",
    "PRESETS",
    "SAMPLE_RATE",
    "TalkerConfig",
    "TextConfig",
    "ThinkerConfig",
    "Token2WavConfig",
    "VisionConfig",
]

# Output sample rate of the vocoder: 100 mel frames per second (the DiT's rate) x the BigVGAN hop of 240.
SAMPLE_RATE = 24_000


def _check(ok: bool, owner: object, message: str) -> None:
    if not ok:
        raise ValueError(f"{type(owner).__name__}: {message}")


def _freeze(value: Any) -> Any:
    """JSON lists -> tuples (recursively), so configs are hashable and immutable."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """Tuples -> lists (recursively), the JSON form."""
    if isinstance(value, (list, tuple)):
        return [_thaw(v) for v in value]
    return value


def _check_positive(owner: object, *names: str) -> None:
    for name in names:
        value = getattr(owner, name)
        _check(isinstance(value, int) and not isinstance(value, bool) and value > 0, owner,
               f"{name} must be a positive int, got {value!r}")


def _check_ids(owner: object, names: tuple[str, ...], limit: int, limit_name: str) -> None:
    for name in names:
        value = getattr(owner, name)
        _check(isinstance(value, int) and 0 <= value < limit, owner,
               f"{name}={value!r} must be a token id in [0, {limit_name}={limit})")


@dataclass(frozen=True)
class _Section:
    """Shared JSON plumbing: ``_JSON_NAMES`` maps a field to its ``config.json`` key where they differ."""

    _JSON_NAMES: ClassVar[dict[str, str]] = {}

    @classmethod
    def _json_kwargs(cls, d: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor arguments for the fields present in ``d`` (JSON names; our own names accepted too)."""
        kwargs = {}
        for f in dataclasses.fields(cls):
            key = cls._JSON_NAMES.get(f.name, f.name)
            for candidate in (key, f.name):  # HF writes `key`; its attribute_map also accepts ours
                if candidate in d:
                    kwargs[f.name] = _freeze(d[candidate])
                    break
        return kwargs

    @classmethod
    def _from_json(cls, d: Mapping[str, Any] | None) -> Any:
        return cls(**cls._json_kwargs(d or {}))

    def _to_json(self) -> dict[str, Any]:
        return {self._JSON_NAMES.get(f.name, f.name): _thaw(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _mrope_from_rope_scaling(owner: type, rope_scaling: Any, default: tuple[int, ...]) -> tuple[int, ...]:
    """``rope_scaling`` -> ``mrope_section``; anything but HF's "default" rotary is refused, not silently run."""
    if rope_scaling is None:
        return default
    if not isinstance(rope_scaling, Mapping):
        raise ValueError(f"{owner.__name__}: rope_scaling must be a dict, got {rope_scaling!r}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind != "default":
        raise ValueError(f"{owner.__name__}: rope_scaling type {kind!r} is not supported (only 'default' TMRoPE)")
    if "mrope_section" not in rope_scaling:
        raise ValueError(f"{owner.__name__}: rope_scaling has no 'mrope_section': {dict(rope_scaling)!r}")
    return _freeze(rope_scaling["mrope_section"])


def _refuse_sliding_window(owner: type, d: Mapping[str, Any]) -> None:
    # HF would switch layers >= max_window_layers to sliding-window attention; no published checkpoint does.
    if d.get("use_sliding_window", False):
        raise ValueError(f"{owner.__name__}: use_sliding_window=True is not supported")


def _check_decoder(owner: Any) -> None:
    """Invariants shared by the two Qwen2 decoders (Thinker LM, Talker)."""
    _check_positive(owner, "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    _check(owner.num_attention_heads % owner.num_key_value_heads == 0, owner,
           f"num_attention_heads={owner.num_attention_heads} must be divisible by "
           f"num_key_value_heads={owner.num_key_value_heads}")
    head_dim = owner.head_dim
    _check(head_dim > 0 and head_dim % 2 == 0, owner, f"head_dim={head_dim} must be even (rotate-half pairs)")
    sections = owner.mrope_section
    _check(len(sections) == 3 and all(isinstance(s, int) and s >= 0 for s in sections), owner,
           f"mrope_section must be 3 non-negative ints (temporal, height, width), got {sections!r}")
    _check(sum(sections) == head_dim // 2, owner,
           f"sum(mrope_section)={sum(sections)} must equal head_dim // 2 = {head_dim // 2} ({list(sections)})")
    _check(owner.rms_norm_eps > 0 and owner.rope_theta > 0, owner, "rms_norm_eps and rope_theta must be > 0")


# ----------------------------------------------------------------------------------------------- Thinker


class _Decoder:
    """What the two decoder configs (the Thinker LM's and the Talker's) share: the attention sizes (from
    ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``) and the JSON form of ``mrope_section`` (HF keeps it
    in ``rope_scaling``; a sliding window is refused). Listed before ``_Section`` among the bases."""

    @classmethod
    def _from_json(cls, d: Mapping[str, Any] | None):
        d = dict(d or {})
        _refuse_sliding_window(cls, d)
        d["mrope_section"] = _mrope_from_rope_scaling(cls, d.pop("rope_scaling", None), cls.mrope_section)
        return super()._from_json(d)

    def _to_json(self) -> dict[str, Any]:
        d = super()._to_json()
        d["rope_scaling"] = {"mrope_section": list(d.pop("mrope_section")), "rope_type": "default",
                             "type": "default"}
        return d

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


@dataclass(frozen=True)
class TextConfig(_Decoder, _Section):
    """Thinker language model: a Qwen2 decoder with TMRoPE (HF ``Qwen2_5OmniTextConfig``)."""

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, ...] = (16, 24, 24)  # JSON: rope_scaling["mrope_section"]
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_attention_heads == 0, self,
               f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}")
        _check_decoder(self)

    @property
    def head_dim(self) -> int:
        # HF reads getattr(config, "head_dim", hidden // heads); the text config has no head_dim field.
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def _from_json(cls, d: Mapping[str, Any] | None) -> TextConfig:
        d = dict(d or {})
        hidden, heads = d.get("hidden_size", cls.hidden_size), d.get("num_attention_heads", cls.num_attention_heads)
        if d.get("head_dim") is not None and heads and d["head_dim"] != hidden // heads:
            raise ValueError(f"TextConfig: head_dim={d['head_dim']} != hidden_size // num_attention_heads = "
                             f"{hidden // heads} is not supported")
        return super()._from_json(d)


@dataclass(frozen=True)
class VisionConfig(_Section):
    """Thinker vision encoder: the Qwen2.5-VL ViT (HF ``Qwen2_5OmniVisionEncoderConfig``).

    Note HF's defaults ``hidden_size=3584`` / ``out_hidden_size=3584``: the published ViT width is 1280.
    """

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _check_positive(self, "depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                        "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size")
        _check(self.hidden_size % self.num_heads == 0, self,
               f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        # 2-D rotary: head_dim/2 angles, half by patch row and half by column, each in rotate-half pairs.
        _check(self.head_dim % 4 == 0, self, f"head_dim={self.head_dim} must be divisible by 4 (2-D rotary)")
        unit = self.spatial_merge_size * self.patch_size
        _check(self.window_size % unit == 0, self,
               f"window_size={self.window_size} must be a multiple of spatial_merge_size * patch_size = {unit}")
        idx = self.fullatt_block_indexes
        _check(all(isinstance(i, int) and 0 <= i < self.depth for i in idx) and len(set(idx)) == len(idx), self,
               f"fullatt_block_indexes={list(idx)} must be distinct block indices in [0, depth={self.depth})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch (pixel_values' last dim): C * temporal_patch * patch * patch."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        """Patches merged into one LM token."""
        return self.spatial_merge_size**2

    @property
    def merged_hidden_size(self) -> int:
        """Width entering the patch merger's MLP (hidden_size x merge_unit)."""
        return self.hidden_size * self.merge_unit

    @property
    def window_merged(self) -> int:
        """Merged tokens per side of an attention window (112 px / 14 px / 2 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size


@dataclass(frozen=True)
class AudioConfig(_Section):
    """Thinker audio encoder: Whisper-style, attention inside 2 s chunks (HF ``Qwen2_5OmniAudioEncoderConfig``)."""

    num_mel_bins: int = 128
    encoder_layers: int = 32
    encoder_attention_heads: int = 20
    encoder_ffn_dim: int = 5120
    d_model: int = 1280
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    n_window: int = 100
    output_dim: int = 3584
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _check_positive(self, "num_mel_bins", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                        "d_model", "max_source_positions", "n_window", "output_dim")
        _check(self.d_model % self.encoder_attention_heads == 0, self,
               f"d_model={self.d_model} must be divisible by encoder_attention_heads={self.encoder_attention_heads}")
        # Positions restart in every chunk; a chunk of 2 * n_window mel frames is n_window frames after conv2.
        _check(self.max_source_positions >= self.n_window, self,
               f"max_source_positions={self.max_source_positions} must be >= n_window={self.n_window}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        return self.encoder_layers

    @property
    def chunk_mel_frames(self) -> int:
        """Mel frames per attention chunk (2 * n_window = 200 = 2 s at 100 frames/s)."""
        return 2 * self.n_window


@dataclass(frozen=True)
class ThinkerConfig(_Section):
    """The Thinker: LM + encoders + the special token ids of the prompt (HF ``Qwen2_5OmniThinkerConfig``)."""

    text_config: TextConfig = field(default_factory=TextConfig)
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    audio_config: AudioConfig = field(default_factory=AudioConfig)
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    # Not HF __init__ arguments (HF has no default and fails without them); the published values.
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    user_token_id: int = 872
    position_id_per_seconds: int = 25
    seconds_per_chunk: int | float = 2
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None

    _JSON_NAMES: ClassVar[dict[str, str]] = {
        "audio_token_id": "audio_token_index",
        "image_token_id": "image_token_index",
        "video_token_id": "video_token_index",
    }
    _SPECIAL: ClassVar[tuple[str, ...]] = ("audio_token_id", "image_token_id", "video_token_id",
                                           "audio_start_token_id", "audio_end_token_id", "vision_start_token_id",
                                           "vision_end_token_id")

    def __post_init__(self) -> None:
        text = self.text_config
        _check(self.vision_config.out_hidden_size == text.hidden_size, self,
               f"vision_config.out_hidden_size={self.vision_config.out_hidden_size} must equal "
               f"text_config.hidden_size={text.hidden_size}")
        _check(self.audio_config.output_dim == text.hidden_size, self,
               f"audio_config.output_dim={self.audio_config.output_dim} must equal "
               f"text_config.hidden_size={text.hidden_size}")
        _check_ids(self, self._SPECIAL, text.vocab_size, "text_config.vocab_size")
        ids = [getattr(self, n) for n in self._SPECIAL]
        _check(len(set(ids)) == len(ids), self,
               "special token ids must be distinct: " + ", ".join(f"{n}={getattr(self, n)}" for n in self._SPECIAL))
        _check_positive(self, "position_id_per_seconds")
        _check(self.seconds_per_chunk > 0, self, f"seconds_per_chunk={self.seconds_per_chunk} must be > 0")

    @property
    def tokens_per_second(self) -> int:
        """Temporal position ids per second of media (25: one id per 40 ms)."""
        return self.position_id_per_seconds

    @property
    def chunk_positions(self) -> int:
        """Temporal ids per audio/video interleaving chunk (use_audio_in_video): 25 * 2 = 50."""
        return int(self.position_id_per_seconds * self.seconds_per_chunk)

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """The eos ids HF's ``GenerationConfig.from_model_config`` takes: the Thinker's own, else the LM's."""
        ids = self.eos_token_id if self.eos_token_id is not None else self.text_config.eos_token_id
        if ids is None:
            return ()
        return (ids,) if isinstance(ids, int) else tuple(ids)

    @classmethod
    def _from_json(cls, d: Mapping[str, Any] | None) -> ThinkerConfig:
        d = dict(d or {})
        kwargs = cls._json_kwargs(d)
        kwargs.update(text_config=TextConfig._from_json(d.get("text_config")),
                      vision_config=VisionConfig._from_json(d.get("vision_config")),
                      audio_config=AudioConfig._from_json(d.get("audio_config")))
        return cls(**kwargs)

    def _to_json(self) -> dict[str, Any]:
        d = super()._to_json()
        for name in ("text_config", "vision_config", "audio_config"):
            d[name] = getattr(self, name)._to_json()
        return d


# ----------------------------------------------------------------------------------------------- Talker


@dataclass(frozen=True)
class TalkerConfig(_Decoder, _Section):
    """The Talker: a Qwen2 decoder over codec ids, fed from the Thinker (HF ``Qwen2_5OmniTalkerConfig``).

    Unlike the Thinker LM, ``head_dim`` is explicit (7B: 12 heads x 128 on a 896-wide residual stream) and
    ``embed_tokens`` live in the Thinker's width (``embedding_size``).
    """

    vocab_size: int = 8448
    embedding_size: int = 3584
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    # JSON: rope_scaling["mrope_section"]. HF's default rope_scaling=None is unusable; this is the 7B's.
    mrope_section: tuple[int, ...] = (16, 24, 24)
    tts_text_start_token_id: int = 151860
    tts_text_end_token_id: int = 151861
    tts_text_pad_token_id: int = 151859
    tts_codec_start_token_id: int = 8293
    tts_codec_end_token_id: int = 8294
    tts_codec_pad_token_id: int = 8292
    tts_codec_mask_token_id: int = 8296
    # Thinker-vocabulary ids: the talker computes TMRoPE over the Thinker's prompt ids.
    audio_token_id: int = 151646
    image_token_id: int = 151655
    video_token_id: int = 151656
    audio_start_token_id: int = 151647
    audio_end_token_id: int = 151648
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    position_id_per_seconds: int = 25
    seconds_per_chunk: int | float = 2
    spatial_merge_size: int = 2
    initializer_range: float = 0.02

    _JSON_NAMES: ClassVar[dict[str, str]] = ThinkerConfig._JSON_NAMES
    _CODEC: ClassVar[tuple[str, ...]] = ("tts_codec_start_token_id", "tts_codec_end_token_id",
                                         "tts_codec_pad_token_id", "tts_codec_mask_token_id")

    def __post_init__(self) -> None:
        _check_decoder(self)
        _check_positive(self, "embedding_size", "head_dim", "spatial_merge_size", "position_id_per_seconds")
        _check_ids(self, self._CODEC, self.vocab_size, "vocab_size")
        _check(len({getattr(self, n) for n in self._CODEC}) == len(self._CODEC), self,
               "codec special ids must be distinct: " + ", ".join(f"{n}={getattr(self, n)}" for n in self._CODEC))
        _check(self.seconds_per_chunk > 0, self, f"seconds_per_chunk={self.seconds_per_chunk} must be > 0")

    @property
    def stop_token_ids(self) -> tuple[int, int]:
        """Codec ids that end an utterance (HF's generate passes eos_token_id=[8292, 8294]: pad and end)."""
        return (self.tts_codec_pad_token_id, self.tts_codec_end_token_id)



# ----------------------------------------------------------------------------------------------- Token2Wav


@dataclass(frozen=True)
class DiTConfig(_Section):
    """Token2Wav flow-matching DiT with its ECAPA-TDNN speaker encoder (HF ``Qwen2_5OmniDiTConfig``)."""

    hidden_size: int = 1024
    num_hidden_layers: int = 22
    num_attention_heads: int = 16
    head_dim: int = 64
    ff_mult: int | float = 2
    emb_dim: int = 512
    # HF 4.57.6 never reads rope_theta: Qwen2_5OmniDiTRotaryEmbedding uses base 10000 whatever it says.
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    block_size: int = 24
    look_ahead_layers: tuple[int, ...] = (10,)
    look_backward_layers: tuple[int, ...] = (0, 20)
    repeats: int = 2
    num_embeds: int = 8193
    mel_dim: int = 80
    enc_emb_dim: int = 192
    enc_dim: int = 128
    enc_channels: tuple[int, ...] = (256, 256, 256, 256, 768)
    enc_kernel_sizes: tuple[int, ...] = (5, 3, 3, 3, 1)
    enc_dilations: tuple[int, ...] = (1, 2, 3, 4, 1)
    enc_attention_channels: int = 64
    enc_res2net_scale: int = 2
    enc_se_channels: int = 64

    # Pre-release names in Qwen's published dit_config; HF 4.57.6 ignores them (its defaults equal them).
    _LEGACY_NAMES: ClassVar[dict[str, str]] = {"hidden_size": "dim", "num_hidden_layers": "depth",
                                               "num_attention_heads": "heads"}

    def __post_init__(self) -> None:
        _check_positive(self, "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "emb_dim",
                        "block_size", "repeats", "num_embeds", "mel_dim", "enc_emb_dim", "enc_dim",
                        "enc_attention_channels", "enc_res2net_scale", "enc_se_channels")
        _check(self.head_dim % 2 == 0, self, f"head_dim={self.head_dim} must be even (interleaved rotary pairs)")
        _check(self.ff_mult > 0, self, f"ff_mult={self.ff_mult} must be > 0")
        for name in ("look_ahead_layers", "look_backward_layers"):
            idx = getattr(self, name)
            _check(all(isinstance(i, int) and 0 <= i < self.num_hidden_layers for i in idx), self,
                   f"{name}={list(idx)} must be layer indices in [0, num_hidden_layers={self.num_hidden_layers})")
        n = len(self.enc_channels)
        _check(n >= 2 and len(self.enc_kernel_sizes) == n and len(self.enc_dilations) == n, self,
               f"enc_channels, enc_kernel_sizes and enc_dilations must have the same length >= 2, got "
               f"{list(self.enc_channels)}, {list(self.enc_kernel_sizes)}, {list(self.enc_dilations)}")
        # Res2Net splits each SE-Res2Net block's channels into enc_res2net_scale groups.
        _check(all(c % self.enc_res2net_scale == 0 for c in self.enc_channels[1:-1]), self,
               f"enc_channels[1:-1]={list(self.enc_channels[1:-1])} must be divisible by "
               f"enc_res2net_scale={self.enc_res2net_scale}")

    @property
    def inner_dim(self) -> int:
        """Attention width: heads x head_dim (need not equal hidden_size)."""
        return self.num_attention_heads * self.head_dim

    @property
    def ff_inner_dim(self) -> int:
        return int(self.hidden_size * self.ff_mult)

    @property
    def input_dim(self) -> int:
        """Width of the input projection: [noisy mel, ECAPA(ref mel), code embedding, speaker vector]."""
        return self.mel_dim + self.enc_dim + self.emb_dim + self.enc_emb_dim

    @property
    def code_table_size(self) -> int:
        """Rows of the codec embedding (num_embeds + 1): codes must be < this."""
        return self.num_embeds + 1

    def block_window(self, layer: int) -> tuple[int, int]:
        """(look_back, look_ahead) in blocks for one layer's block-sliding attention."""
        return int(layer in self.look_backward_layers), int(layer in self.look_ahead_layers)

    @classmethod
    def _from_json(cls, d: Mapping[str, Any] | None) -> DiTConfig:
        d = dict(d or {})
        for name, legacy in cls._LEGACY_NAMES.items():
            if name not in d and legacy in d:
                d[name] = d[legacy]
        return super()._from_json(d)


@dataclass(frozen=True)
class BigVGANConfig(_Section):
    """Token2Wav vocoder: mel -> 24 kHz waveform (HF ``Qwen2_5OmniBigVGANConfig``)."""

    mel_dim: int = 80
    upsample_initial_channel: int = 1536
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    upsample_rates: tuple[int, ...] = (5, 3, 2, 2, 2, 2)
    upsample_kernel_sizes: tuple[int, ...] = (11, 7, 4, 4, 4, 4)

    def __post_init__(self) -> None:
        _check_positive(self, "mel_dim", "upsample_initial_channel")
        _check(len(self.upsample_rates) == len(self.upsample_kernel_sizes) > 0, self,
               f"upsample_rates={list(self.upsample_rates)} and upsample_kernel_sizes="
               f"{list(self.upsample_kernel_sizes)} must have the same non-zero length")
        _check(len(self.resblock_kernel_sizes) == len(self.resblock_dilation_sizes) > 0, self,
               f"resblock_kernel_sizes={list(self.resblock_kernel_sizes)} and resblock_dilation_sizes="
               f"{_thaw(self.resblock_dilation_sizes)} must have the same non-zero length")
        # padding (k - s) // 2 gives exactly s x the frames only when k - s is even and non-negative.
        for s, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            _check(s > 0 and k >= s and (k - s) % 2 == 0, self,
                   f"upsample kernel {k} with rate {s}: need kernel >= rate and kernel - rate even")
        _check(self.out_channels > 0, self,
               f"upsample_initial_channel={self.upsample_initial_channel} halves {self.num_upsamples} times to 0")

    @property
    def num_upsamples(self) -> int:
        return len(self.upsample_rates)

    @property
    def hop_length(self) -> int:
        """Waveform samples per mel frame (5 * 3 * 2 * 2 * 2 * 2 = 240)."""
        return math.prod(self.upsample_rates)

    @property
    def out_channels(self) -> int:
        """Channels after the last upsample (into conv_post)."""
        return self.upsample_initial_channel >> self.num_upsamples


@dataclass(frozen=True)
class Token2WavConfig(_Section):
    """Codes -> waveform: the DiT (codes -> mel) and BigVGAN (mel -> wave) (HF ``Qwen2_5OmniToken2WavConfig``)."""

    dit: DiTConfig = field(default_factory=DiTConfig)
    bigvgan: BigVGANConfig = field(default_factory=BigVGANConfig)

    def __post_init__(self) -> None:
        _check(self.dit.mel_dim == self.bigvgan.mel_dim, self,
               f"dit.mel_dim={self.dit.mel_dim} must equal bigvgan.mel_dim={self.bigvgan.mel_dim}")

    @property
    def dit_config(self) -> DiTConfig:
        """HF's name for :attr:`dit`."""
        return self.dit

    @property
    def bigvgan_config(self) -> BigVGANConfig:
        """HF's name for :attr:`bigvgan`."""
        return self.bigvgan

    @property
    def samples_per_code(self) -> int:
        """Waveform samples per codec code (2 mel frames x 240 = 480 at 24 kHz)."""
        return self.dit.repeats * self.bigvgan.hop_length

    @classmethod
    def _from_json(cls, d: Mapping[str, Any] | None) -> Token2WavConfig:
        d = dict(d or {})
        return cls(dit=DiTConfig._from_json(d.get("dit_config")),
                   bigvgan=BigVGANConfig._from_json(d.get("bigvgan_config")))

    def _to_json(self) -> dict[str, Any]:
        return {"dit_config": self.dit._to_json(), "bigvgan_config": self.bigvgan._to_json()}


# ----------------------------------------------------------------------------------------------- Omni


@dataclass(frozen=True)
class OmniConfig(_Section):
    """The whole model (HF ``Qwen2_5OmniConfig``): Thinker, Talker, Token2Wav and whether audio output is on.

    The Thinker-Talker contracts (talker embedding width, shared TMRoPE token ids, tts text ids inside the
    Thinker vocabulary) are checked only with ``enable_audio_output``: a Thinker-only checkpoint may carry a
    default Talker section that was never meant to run.
    """

    thinker_config: ThinkerConfig = field(default_factory=ThinkerConfig)
    talker_config: TalkerConfig = field(default_factory=TalkerConfig)
    token2wav_config: Token2WavConfig = field(default_factory=Token2WavConfig)
    enable_audio_output: bool = True

    def __post_init__(self) -> None:
        if not self.enable_audio_output:
            return
        th, tk = self.thinker_config, self.talker_config
        text = th.text_config
        _check(tk.embedding_size == text.hidden_size, self,
               f"talker_config.embedding_size={tk.embedding_size} must equal the Thinker's "
               f"text_config.hidden_size={text.hidden_size}")
        _check_ids(tk, ("tts_text_start_token_id", "tts_text_end_token_id", "tts_text_pad_token_id"),
                   text.vocab_size, "thinker text_config.vocab_size")
        shared = ThinkerConfig._SPECIAL + ("position_id_per_seconds", "seconds_per_chunk")
        differ = [f"{n}: thinker {getattr(th, n)} vs talker {getattr(tk, n)}" for n in shared
                  if getattr(th, n) != getattr(tk, n)]
        if tk.spatial_merge_size != th.vision_config.spatial_merge_size:
            differ.append(f"spatial_merge_size: vision {th.vision_config.spatial_merge_size} vs talker "
                          f"{tk.spatial_merge_size}")
        _check(not differ, self, "the Talker's TMRoPE inputs must match the Thinker's: " + "; ".join(differ))

    # ------------------------------------------------------------------------------------ JSON

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OmniConfig:
        """Reads the checkpoint's ``config.json`` layout (``thinker_config``, ``talker_config``,
        ``token2wav_config``, ``enable_audio_output``); keys it does not know are ignored and missing ones take
        HF 4.57.6's defaults."""
        if not isinstance(d, Mapping):
            raise TypeError(f"OmniConfig.from_dict expects a dict, got {type(d).__name__}")
        return cls(thinker_config=ThinkerConfig._from_json(d.get("thinker_config")),
                   talker_config=TalkerConfig._from_json(d.get("talker_config")),
                   token2wav_config=Token2WavConfig._from_json(d.get("token2wav_config")),
                   enable_audio_output=bool(d.get("enable_audio_output", True)))

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` layout; ``transformers.Qwen2_5OmniConfig(**cfg.to_dict())`` is the same model."""
        return {
            "architectures": ["Qwen2_5OmniForConditionalGeneration"],
            "model_type": "qwen2_5_omni",
            "enable_audio_output": self.enable_audio_output,
            "thinker_config": self.thinker_config._to_json(),
            "talker_config": self.talker_config._to_json(),
            "token2wav_config": self.token2wav_config._to_json(),
        }

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OmniConfig:
        """Reads ``path/config.json`` (``path`` may also be the JSON file itself)."""
        file = os.fspath(path)
        if os.path.isdir(file):
            file = os.path.join(file, "config.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no config.json: {file} does not exist")
        try:
            with open(file, encoding="utf-8") as fh:
                d = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file} is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def save_pretrained(self, path: str | os.PathLike) -> str:
        """Writes ``path/config.json``; returns the file name."""
        os.makedirs(path, exist_ok=True)
        file = os.path.join(os.fspath(path), "config.json")
        with open(file, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
        return file

    @classmethod
    def preset(cls, name: str) -> OmniConfig:
        """``"qwen2.5-omni-7b"``, ``"qwen2.5-omni-3b"`` (the published configs) or ``"tiny"`` (docs/model.md's
        CPU-sized model). Also accepts ``"Qwen/Qwen2.5-Omni-7B"`` spelled as on the Hub."""
        key = name.strip().lower().removeprefix("qwen/")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}")
        return PRESETS[key]()


# ----------------------------------------------------------------------------------------------- presets


def _published(*, vocab: int, hidden: int, ffn: int, layers: int, heads: int, kv_heads: int,
               talker: TalkerConfig) -> OmniConfig:
    """The published Qwen2.5-Omni layout at one LM size (encoders and Token2Wav are the same at 7B and 3B)."""
    text = TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, bos_token_id=151643,
                      eos_token_id=151645, pad_token_id=151643)
    thinker = ThinkerConfig(
        text_config=text,
        vision_config=VisionConfig(hidden_size=1280, out_hidden_size=hidden),
        audio_config=AudioConfig(output_dim=hidden),
        # Thinker-level ids of the published config.json (<|im_start|>, <|im_end|>, <|endoftext|>).
        bos_token_id=151644, eos_token_id=151645, pad_token_id=151643,
    )
    return OmniConfig(thinker_config=thinker, talker_config=talker, token2wav_config=Token2WavConfig())


def _qwen25_omni_7b() -> OmniConfig:
    talker = TalkerConfig(embedding_size=3584, hidden_size=896, intermediate_size=18944, num_hidden_layers=24,
                          num_attention_heads=12, num_key_value_heads=4, head_dim=128, mrope_section=(16, 24, 24))
    return _published(vocab=152064, hidden=3584, ffn=18944, layers=28, heads=28, kv_heads=4, talker=talker)


def _qwen25_omni_3b() -> OmniConfig:
    # The 3B Talker is Qwen2.5-0.5B shaped (14 heads x 64, 2 KV heads, SwiGLU 4864); head_dim 64 -> mrope [16, 16, 0].
    talker = TalkerConfig(embedding_size=2048, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, head_dim=64, mrope_section=(16, 16, 0))
    return _published(vocab=151936, hidden=2048, ffn=11008, layers=36, heads=16, kv_heads=2, talker=talker)


def _tiny() -> OmniConfig:
    """docs/model.md, "The tiny configuration"; what it leaves open takes HF's default (marked "open" below)."""
    ids = dict(audio_token_id=1, image_token_id=2, video_token_id=3, audio_start_token_id=4, audio_end_token_id=5,
               vision_start_token_id=7, vision_end_token_id=8)
    thinker = ThinkerConfig(
        text_config=TextConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, mrope_section=(1, 1, 2)),
        vision_config=VisionConfig(depth=2, hidden_size=32, num_heads=4, intermediate_size=24, out_hidden_size=32,
                                   spatial_merge_size=2, window_size=112, fullatt_block_indexes=(1,)),
        audio_config=AudioConfig(d_model=32, encoder_attention_heads=4, encoder_layers=2, encoder_ffn_dim=32,
                                 num_mel_bins=20, n_window=100, output_dim=32),
        user_token_id=6,
        **ids,
    )
    talker = TalkerConfig(
        vocab_size=99, embedding_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, head_dim=8,
        num_key_value_heads=1, mrope_section=(1, 1, 2),
        intermediate_size=32,  # not fixed by docs/model.md (HF's default 18944 is absurd at width 16): 2 x hidden
        tts_codec_pad_token_id=92, tts_codec_start_token_id=93, tts_codec_end_token_id=94,
        tts_codec_mask_token_id=96, tts_text_pad_token_id=89, tts_text_start_token_id=90, tts_text_end_token_id=91,
        **ids,
    )
    dit = DiTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, head_dim=8, emb_dim=32,
                    block_size=24, look_ahead_layers=(1,), look_backward_layers=(0, 2), num_embeds=99, mel_dim=10,
                    enc_channels=(32, 32, 32, 32, 96), enc_dim=16, enc_emb_dim=16)
    bigvgan = BigVGANConfig(mel_dim=10, upsample_initial_channel=128)
    return OmniConfig(thinker_config=thinker, talker_config=talker,
                      token2wav_config=Token2WavConfig(dit=dit, bigvgan=bigvgan))


PRESETS = {
    "qwen2.5-omni-7b": _qwen25_omni_7b,
    "qwen2.5-omni-3b": _qwen25_omni_3b,
    "tiny": _tiny,
}
