"""``OmniModel``: the public entry point (CONTRACT.md), built from a checkpoint directory or a config.

Parts are declared in one table, :data:`PARTS` (checkpoint prefix -> module builder). A part whose builder is
None is not implemented yet: its tensors are never read (and so never reported as unexpected) and its
attribute stays None. Each new part is one line there.

``thinker_logits`` runs the Thinker once over a prompt batch: the inputs are checked on the host first
(:func:`prepare_thinker_prompt`; every inconsistency is a ValueError before any encoder runs), padding is
dropped (the batch is packed varlen), the encoders' features fill their token positions, and the decoder runs
over a transient paged KV cache (:func:`transient_prefill`, the small stand-in for the engine).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from omni_model.config import OmniConfig
from omni_model.engine.kv_cache import KVCache
from omni_model.layers.backend import normalize_backend, use_backend
from omni_model.layers.context import attention_context, consecutive_block_tables, prefill_metadata
from omni_model.layers.quant_linear import init_random_int4_, quantize_decoder_
from omni_model.loader import CheckpointError, checkpoint_files, load_speakers, load_state_dict
from omni_model.models.audio_encoder import audio_token_lengths
from omni_model.models.talker import Talker
from omni_model.models.thinker import Thinker, ThinkerTextModel
from omni_model.models.token2wav import Token2Wav
from omni_model.quant import QuantConfig, read_quantization_config
from omni_model.rope_index import config_kwargs as rope_config_kwargs
from omni_model.rope_index import get_rope_index
from omni_model.weights import load_module


@dataclass(frozen=True)
class Part:
    """One top-level part of the checkpoint: its key prefix and how to build it (None: not implemented yet)."""

    prefix: str
    build: Callable[[OmniConfig], nn.Module] | None
    audio_output: bool  # only needed when the model speaks (skipped with enable_audio_output=False)
    # Keeps its own precision (Token2Wav runs in fp32 by default, as HF does) instead of the model's dtype; it is
    # built on the device directly, so its computed buffers (RoPE frequencies, resampling filters) are real.
    own_precision: bool = False


PARTS: dict[str, Part] = {
    "thinker": Part("thinker.", lambda cfg: Thinker(cfg.thinker_config), audio_output=False),
    "talker": Part("talker.", lambda cfg: Talker(cfg.talker_config), audio_output=True),
    "token2wav": Part("token2wav.", lambda cfg: Token2Wav(cfg.token2wav_config), audio_output=True,
                      own_precision=True),
}


def random_speakers(config: OmniConfig, *, seed: int = 0, ref_frames: int = 300) -> dict[str, dict]:
    """Stand-ins for ``spk_dict.pt`` of a random-weight model: Chelsie and Ethan with random conditioning. Their
    bos ids are the published ones (151872, 151870) where the vocabulary has them, else the tts text start id."""
    dit = config.token2wav_config.dit
    vocab = config.thinker_config.text_config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, bos in (("Chelsie", 151872), ("Ethan", 151870)):
        out[name] = {
            "cond": torch.randn(1, dit.enc_emb_dim, generator=gen),
            "ref_mel": torch.randn(1, ref_frames, dit.mel_dim, generator=gen) * 0.5 - 4.0,
            "bos_token": bos if bos < vocab else config.talker_config.tts_text_start_token_id,
        }
    return out


def _generation_eos(path: str | os.PathLike) -> tuple[int, ...] | None:
    import json

    file = os.path.join(path, "generation_config.json")
    if not os.path.exists(file):
        return None
    with open(file) as f:
        ids = json.load(f).get("eos_token_id")
    if ids is None:
        return None
    return (ids,) if isinstance(ids, int) else tuple(ids)


# ------------------------------------------------------------------------------------------- prompt checks


@dataclass
class ThinkerPrompt:
    """A checked prompt batch, packed without padding (T real tokens, B rows of length L)."""

    real: torch.Tensor  # (B, L) bool: the tokens kept (attention_mask == 1)
    ids: torch.Tensor  # (T,) int64 packed token ids
    positions: torch.Tensor  # (3, T) int64 TMRoPE ids
    seq_lens: list[int]  # real tokens per row
    rope_deltas: torch.Tensor  # (B, 1) int64: max position + 1 - real length (decode ids are len + delta)
    audio: tuple[torch.Tensor, list[int]] | None  # (input_features (B_a, mel, F), mel lengths)
    images: tuple[torch.Tensor, list[tuple[int, int, int]]] | None  # (pixel_values, grids)
    videos: tuple[torch.Tensor, list[tuple[int, int, int]]] | None

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """(T, ...) -> (B, L, ...), zeros at the padded positions."""
        out = packed.new_zeros((*self.real.shape, *packed.shape[1:]))
        out[self.real.to(packed.device)] = packed
        return out


def _grids(pixel_name: str, grid_name: str, grid, pixels, *, merge: int, patch_dim: int) -> list[tuple[int, int, int]]:
    """Checks a (pixels, grid_thw) pair; returns the grids as int triples."""
    if (grid is None) != (pixels is None):
        given, missing = (pixel_name, grid_name) if grid is None else (grid_name, pixel_name)
        raise ValueError(f"{given} was given without {missing}")
    if grid is None:
        return []
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.is_floating_point():
        raise ValueError(f"{grid_name} must be an integer tensor of shape (N, 3), got {tuple(grid.shape)}")
    grids = [tuple(int(v) for v in row) for row in grid.tolist()]
    for i, (t, h, w) in enumerate(grids):
        if t < 1 or h < 1 or w < 1:
            raise ValueError(f"{grid_name}[{i}] = {(t, h, w)}: every entry must be positive")
        if h % merge or w % merge:
            raise ValueError(f"{grid_name}[{i}] = {(t, h, w)}: height and width must be divisible by the "
                             f"spatial merge size {merge}")
    patches = sum(t * h * w for t, h, w in grids)
    if pixels.dim() != 2 or pixels.shape[0] != patches or pixels.shape[1] != patch_dim:
        raise ValueError(f"{pixel_name} must have shape ({patches}, {patch_dim}) for {grid_name} {grids}, "
                         f"got {tuple(pixels.shape)}")
    return grids


def _audio_lengths(features, mask, *, mel_bins: int) -> list[int]:
    if features is None:
        if mask is not None:
            raise ValueError("feature_attention_mask was given without input_features")
        return []
    if features.dim() != 3 or features.shape[1] != mel_bins:
        raise ValueError(f"input_features must have shape (num_audios, {mel_bins}, frames), "
                         f"got {tuple(features.shape)}")
    num, frames = features.shape[0], features.shape[2]
    if mask is None:
        lens = [frames] * num
    else:
        if tuple(mask.shape) != (num, frames):
            raise ValueError(f"feature_attention_mask must have shape {(num, frames)} to match input_features "
                             f"{tuple(features.shape)}, got {tuple(mask.shape)}")
        m = mask.long().cpu()
        if ((m != 0) & (m != 1)).any():
            raise ValueError("feature_attention_mask must hold only 0 and 1")
        lens_t = m.sum(-1)
        prefix = torch.arange(frames)[None, :] < lens_t[:, None]
        if not torch.equal(prefix, m.bool()):
            bad = (prefix != m.bool()).any(-1).nonzero().flatten().tolist()
            raise ValueError(f"feature_attention_mask rows {bad} are not a run of ones followed by zeros: the "
                             "audio lengths disagree with the mask")
        lens = lens_t.tolist()
    short = [i for i, n in enumerate(lens) if n < 3]
    if short:
        raise ValueError(f"audios {short} have fewer than 3 mel frames (lengths {[lens[i] for i in short]}): "
                         "they would give no audio token")
    return lens


def _check_count(what: str, tokens: int, expected: int, source: str) -> None:
    if tokens != expected:
        raise ValueError(f"{what}: the prompt has {tokens} tokens but {source} gives {expected}")


def prepare_thinker_prompt(
    cfg,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    input_features: torch.Tensor | None = None,
    feature_attention_mask: torch.Tensor | None = None,
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    pixel_values_videos: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    video_second_per_grid=None,
    use_audio_in_video: bool = False,
) -> ThinkerPrompt:
    """Checks the processor outputs against each other and ``cfg`` (the thinker config) and packs the batch.

    Raises ValueError, before any encoder work, for: malformed ids or masks; media token counts that do not
    match the features or grids; grids not divisible by the merge size; audio lengths that disagree with the
    mask; prompts whose TMRoPE positions exceed ``max_position_embeddings``.
    """
    text, vision = cfg.text_config, cfg.vision_config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError("input_ids must be an integer tensor of shape (B, L)")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must not be empty, got shape {tuple(input_ids.shape)}")
    ids_cpu = input_ids.long().cpu()
    if attention_mask is None:
        mask = torch.ones_like(ids_cpu)
    else:
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        mask = attention_mask.long().cpu()
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("attention_mask must hold only 0 and 1")
    real = mask.bool()
    seq_lens = real.sum(-1).tolist()
    if min(seq_lens) == 0:
        raise ValueError(f"rows {[i for i, n in enumerate(seq_lens) if n == 0]} of attention_mask have no token")
    ids = ids_cpu[real]
    if int(ids.min()) < 0 or int(ids.max()) >= text.vocab_size:
        raise ValueError(f"input_ids must lie in [0, {text.vocab_size}), got min {int(ids.min())}, "
                         f"max {int(ids.max())}")

    # Media: every feature tensor against its grid / mask, then against the prompt's tokens.
    merge = vision.spatial_merge_size
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    images = _grids("pixel_values", "image_grid_thw", image_grid_thw, pixel_values, merge=merge, patch_dim=patch_dim)
    videos = _grids("pixel_values_videos", "video_grid_thw", video_grid_thw, pixel_values_videos, merge=merge,
                    patch_dim=patch_dim)
    mel_lens = _audio_lengths(input_features, feature_attention_mask, mel_bins=cfg.audio_config.num_mel_bins)
    count = {name: int((ids == tok).sum()) for name, tok in (
        ("audio", cfg.audio_token_id), ("image", cfg.image_token_id), ("video", cfg.video_token_id),
        ("audio_start", cfg.audio_start_token_id), ("vision_start", cfg.vision_start_token_id))}
    for name, tok in (("audio", cfg.audio_token_id), ("image", cfg.image_token_id), ("video", cfg.video_token_id)):
        padded = int((ids_cpu[~real] == tok).sum())
        if padded:
            raise ValueError(f"{padded} {name} tokens sit at padded positions (attention_mask == 0)")
    audio_tokens = audio_token_lengths(torch.tensor(mel_lens, dtype=torch.int64)).tolist()
    _check_count("audio tokens", count["audio"], sum(audio_tokens), f"input_features (lengths {mel_lens})")
    _check_count("image tokens", count["image"], sum(t * h * w for t, h, w in images) // merge**2,
                 f"image_grid_thw {images}")
    _check_count("video tokens", count["video"], sum(t * h * w for t, h, w in videos) // merge**2,
                 f"video_grid_thw {videos}")
    _check_count("audio_start tokens", count["audio_start"], len(mel_lens), "the number of audios")
    _check_count("vision_start tokens", count["vision_start"], len(images) + len(videos),
                 "the number of images and videos")
    if use_audio_in_video and len(mel_lens) < len(videos):
        raise ValueError(f"use_audio_in_video needs an audio per video: {len(videos)} videos, {len(mel_lens)} audios")
    seconds = None
    if videos:
        if video_second_per_grid is None:
            raise ValueError("video_second_per_grid is required with pixel_values_videos")
        seconds = torch.as_tensor(video_second_per_grid, dtype=torch.float32).flatten()
        if seconds.numel() != len(videos):
            raise ValueError(f"video_second_per_grid must have one entry per video ({len(videos)}), "
                             f"got {seconds.numel()}")

    # Positions (host index math), then the limit: never start work on a prompt the rotary table cannot hold.
    position_ids, deltas = get_rope_index(
        ids_cpu,
        image_grid_thw=torch.tensor(images, dtype=torch.int64) if images else None,
        video_grid_thw=torch.tensor(videos, dtype=torch.int64) if videos else None,
        attention_mask=mask,
        use_audio_in_video=use_audio_in_video,
        audio_seqlens=torch.tensor(mel_lens, dtype=torch.int64) if mel_lens else None,
        second_per_grids=seconds,
        **rope_config_kwargs(cfg, merge),
    )
    positions = position_ids[:, real]
    limit = text.max_position_embeddings
    top = int(positions.max())
    if top >= limit:
        raise ValueError(f"the prompt needs position ids up to {top}, beyond max_position_embeddings {limit} "
                         f"(rows of {max(seq_lens)} tokens); shorten it or lower the video/audio resolution")

    device = input_ids.device
    return ThinkerPrompt(
        real=real,
        ids=ids.to(device),
        positions=positions.to(device),
        seq_lens=seq_lens,
        rope_deltas=deltas.long(),
        audio=(input_features, mel_lens) if mel_lens else None,
        images=(pixel_values, images) if images else None,
        videos=(pixel_values_videos, videos) if videos else None,
    )


# ------------------------------------------------------------------------------------------- transient cache


def transient_prefill(
    decoder: ThinkerTextModel, embeds: torch.Tensor, positions: torch.Tensor, seq_lens: list[int],
    page_size: int = 16,
) -> torch.Tensor:
    """Prefills packed sequences over a KV cache made for this call only (each sequence gets consecutive blocks)
    and dropped afterwards; returns the final normed hidden states (T, hidden). The engine replaces this."""
    layers = decoder.paged_attention_layers()
    tables, num_blocks = consecutive_block_tables(seq_lens, page_size, device=embeds.device)
    cache = KVCache(layers, num_blocks=num_blocks, block_size=page_size, dtype=embeds.dtype, device=embeds.device)
    try:
        with attention_context(prefill_metadata(seq_lens, tables, page_size)):
            return decoder(embeds, positions)
    finally:
        cache.release()


# ------------------------------------------------------------------------------------------- the model


@dataclass
class ThinkerPromptStates:
    """What the Talker needs of a prompt: per packed real token (T), the Thinker's final normed hidden state and
    its input embedding (media positions hold the encoder features), with the prompt they came from."""

    hidden_states: torch.Tensor  # (T, hidden)
    inputs_embeds: torch.Tensor  # (T, hidden)
    prompt: ThinkerPrompt


class OmniModel(nn.Module):
    """Qwen2.5-Omni: ``thinker`` (text + encoders); ``talker`` and ``token2wav`` attach through :data:`PARTS`."""

    def __init__(self, config: OmniConfig, parts: dict[str, nn.Module | None], *, backend: str | None = "auto"):
        super().__init__()
        self.config = config
        self.backend = normalize_backend(backend)
        for name in PARTS:
            setattr(self, name, parts.get(name))
        self.speakers: dict[str, dict] = {}  # name -> {"cond", "ref_mel", "bos_token"} (spk_dict.pt)
        self.quantization: QuantConfig | None = None  # int4 Thinker decoder (config.json's quantization_config)
        self.eos_token_ids: tuple[int, ...] | None = None  # generation_config.json's; None: the config's

    # ---------------------------------------------------------------------------------- generation

    def generate(self, **kwargs):
        """Text ids, codes and 24 kHz audio for a prompt batch (CONTRACT.md); see :mod:`omni_model.pipeline`."""
        from omni_model.pipeline import generate

        return generate(self, **kwargs)

    def stream(self, **kwargs):
        """Like :meth:`generate`, yielding :class:`~omni_model.pipeline.StreamEvent` s as text and audio come."""
        from omni_model.pipeline import stream

        return stream(self, **kwargs)

    # ---------------------------------------------------------------------------------- construction

    @staticmethod
    def _wanted(enable_audio_output: bool) -> list[str]:
        return [n for n, p in PARTS.items() if p.build is not None and (enable_audio_output or not p.audio_output)]

    @classmethod
    def _build(cls, config: OmniConfig, names: list[str], device: torch.device, dtype: torch.dtype,
               backend: str | None, quantization: QuantConfig | None = None) -> OmniModel:
        parts = {}
        for n in names:
            part = PARTS[n]
            if part.own_precision:
                with torch.device(device):
                    parts[n] = part.build(config)
            else:
                with torch.device("meta"):
                    module = part.build(config)
                if quantization is not None and n == "thinker":  # int4 linears in the decoder (omni_model.quant)
                    quantize_decoder_(module.model, quantization)
                parts[n] = module.to_empty(device=device).to(dtype)
        model = cls(config, parts, backend=backend)
        model.quantization = quantization
        return model

    @classmethod
    def from_config(
        cls,
        config: OmniConfig,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = "auto",
        seed: int = 0,
        enable_audio_output: bool = True,
        quantization: QuantConfig | None = None,
    ) -> OmniModel:
        """Random weights, deterministic for a seed on a given device: N(0, initializer_range) for matrices and
        embeddings, ones for norm scales, zeros for biases (HF's init rule), so activations stay O(1). Token2Wav
        keeps torch's default initialisation (fp32). Random speakers stand in for ``spk_dict.pt``. With
        ``quantization``, the Thinker decoder's linears are random int4 (of the same standard deviation)."""
        device = torch.device(device)
        torch.manual_seed(seed)
        if quantization is not None:
            quantization.check_model(config.thinker_config.text_config)
        model = cls._build(config, cls._wanted(enable_audio_output), device, dtype, backend, quantization)
        std = getattr(config.thinker_config, "initializer_range", 0.02)
        gen = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith(PARTS["token2wav"].prefix):
                    continue
                if p.dim() == 1:
                    p.fill_(1.0 if name.endswith("weight") else 0.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32) * std)
            init_random_int4_(model, std=std, generator=gen)
        model._init_buffers()
        if model.token2wav is not None:
            model.speakers = random_speakers(config, seed=seed)
        return model.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        *,
        device: torch.device | str = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        backend: str | None = "auto",
        enable_audio_output: bool = True,
    ) -> OmniModel:
        """Reads ``config.json`` and the tensors of the parts built (see :data:`PARTS`: the audio-output parts with
        ``enable_audio_output=False`` are not read at all), ``spk_dict.pt`` when the model speaks, and the stop ids
        of ``generation_config.json`` when present. A tensor outside every part's prefix, or a missing,
        unexpected or mis-shaped one inside a part read, is a :class:`~omni_model.loader.CheckpointError` (a
        ValueError) naming it. An int4 checkpoint (``quantization_config``: AWQ GEMM or GPTQ v1, see
        :mod:`omni_model.quant`) gets an int4 Thinker decoder; an unsupported layout is a ValueError naming the
        field and its value, raised before any weight is read."""
        config = OmniConfig.from_pretrained(path)
        quantization = read_quantization_config(path)
        if quantization is not None:
            quantization.check_model(config.thinker_config.text_config)
        device = torch.device(device)
        names = cls._wanted(enable_audio_output)
        known = tuple(p.prefix for p in PARTS.values())
        stray = sorted(k for k in checkpoint_files(path) if not k.startswith(known))
        if stray:
            raise CheckpointError(f"checkpoint {path}: {len(stray)} tensor(s) outside every known part "
                                  f"({', '.join(known)}): {', '.join(stray)}", unexpected=stray)
        model = cls._build(config, names, device, dtype, backend, quantization)
        # Read on the host and copied in tensor by tensor: the device holds the model once, never a second copy of
        # the checkpoint (an int4 7B fits a 24 GB card; the int4 linears are repacked on the device one at a time).
        state = load_state_dict(path, prefixes=[PARTS[n].prefix for n in names], device="cpu")
        with torch.no_grad():
            for n in names:
                part = getattr(model, n)
                if hasattr(part, "load_weights"):
                    part.load_weights(state)
                else:
                    load_module(part, state, PARTS[n].prefix, what=n)
        model._init_buffers()
        if model.token2wav is not None and os.path.exists(os.path.join(path, "spk_dict.pt")):
            dit = config.token2wav_config.dit
            model.speakers = load_speakers(path, cond_dim=dit.enc_emb_dim, mel_dim=dit.mel_dim)
        model.eos_token_ids = _generation_eos(path)
        return model.eval()

    def _init_buffers(self) -> None:
        """Recomputes non-persistent buffers (they are not in the checkpoint and were left empty on meta)."""
        for module in self.modules():
            init = getattr(module, "init_buffers", None)
            if init is not None:
                init()

    # ---------------------------------------------------------------------------------- thinker

    def _thinker_forward(self, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, ThinkerPrompt]:
        prompt = prepare_thinker_prompt(self.config.thinker_config, **inputs)
        device = self.thinker.lm_head.weight.device
        embeds = self.thinker.embed_prompt(prompt.ids.to(device), audio=prompt.audio, images=prompt.images,
                                           videos=prompt.videos)
        hidden = transient_prefill(self.thinker.model, embeds, prompt.positions.to(device), prompt.seq_lens)
        return hidden, embeds, prompt

    @torch.inference_mode()
    def thinker_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        input_features: torch.Tensor | None = None,
        feature_attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
        video_second_per_grid=None,
        use_audio_in_video: bool = False,
    ) -> torch.Tensor:
        """Thinker logits of a prompt batch (the HF processor's outputs): (B, L, vocab) float32.

        Padded positions (attention_mask == 0) are not computed and hold 0; real tokens match HF's logits.
        Positions are TMRoPE ids from :func:`omni_model.rope_index.get_rope_index`, also when attention_mask is
        None (HF then falls back to 1-D positions, which is wrong for image and video prompts).
        """
        inputs = dict(
            input_ids=input_ids, attention_mask=attention_mask, input_features=input_features,
            feature_attention_mask=feature_attention_mask, pixel_values=pixel_values, image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            video_second_per_grid=video_second_per_grid, use_audio_in_video=use_audio_in_video,
        )
        with use_backend(self.backend):
            hidden, _, prompt = self._thinker_forward(inputs)
            return prompt.unpack(self.thinker.compute_logits(hidden))

    @torch.inference_mode()
    def thinker_prompt_states(self, **inputs) -> ThinkerPromptStates:
        """Same arguments as :meth:`thinker_logits`; returns the packed final hidden states and input embeddings
        of the prompt (what the Talker's inputs are built from)."""
        with use_backend(self.backend):
            hidden, embeds, prompt = self._thinker_forward(inputs)
        return ThinkerPromptStates(hidden_states=hidden, inputs_embeds=embeds, prompt=prompt)
