"""``OmniModel``: the public entry point, built from a checkpoint directory or a config.

Parts are declared in one table, :data:`PARTS` (checkpoint prefix -> module builder); each new part is one line
there. ``generate`` and ``stream`` go through the model's :class:`~omni_model.engine.engine.OmniEngine` (``engine``,
made on first use), so concurrent calls from several threads batch together. ``thinker_logits`` runs the Thinker
once over a prompt batch on a KV cache made for the call: the inputs are checked on the host first
(:func:`omni_model.inputs.prepare_thinker_prompt`: every inconsistency is a ValueError before any encoder runs),
padding is dropped (the batch is packed varlen) and the encoders' features fill their token positions.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from omni_model import generation
from omni_model.config import OmniConfig
from omni_model.engine.config import EngineConfig
from omni_model.engine.engine import OmniEngine
from omni_model.engine.runner import DecoderRunner, RunnerConfig
from omni_model.inputs import prepare_thinker_prompt
from omni_model.layers.backend import normalize_backend, use_backend
from omni_model.loader import CheckpointError, checkpoint_files, load_speakers, load_state_dict, random_speakers
from omni_model.models.talker import Talker
from omni_model.models.thinker import Thinker
from omni_model.models.token2wav import Token2Wav
from omni_model.weights import load_module

# The transient cache of ``thinker_logits``: tokens per block (any size works; the engine's is EngineConfig's).
LOGITS_BLOCK_SIZE = 16


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


class OmniModel(nn.Module):
    """Qwen2.5-Omni: ``thinker`` (text + encoders); ``talker`` and ``token2wav`` attach through :data:`PARTS`."""

    def __init__(self, config: OmniConfig, parts: dict[str, nn.Module | None], *, backend: str | None = "auto",
                 engine_config: EngineConfig | None = None):
        super().__init__()
        self.config = config
        self.backend = normalize_backend(backend)
        for name in PARTS:
            setattr(self, name, parts.get(name))
        self.speakers: dict[str, dict] = {}  # name -> {"cond", "ref_mel", "bos_token"} (spk_dict.pt)
        self.eos_token_ids: tuple[int, ...] | None = None  # generation_config.json's; None: the config's
        if engine_config is not None and not isinstance(engine_config, EngineConfig):
            raise TypeError(f"engine_config must be an EngineConfig, got {type(engine_config).__name__}")
        self.engine_config = engine_config
        # One device owner at a time: the engine's steps and thinker_logits take this lock.
        self.device_lock = threading.RLock()
        self._engine: OmniEngine | None = None

    # ---------------------------------------------------------------------------------- generation

    @property
    def engine(self) -> OmniEngine:
        """The model's :class:`~omni_model.engine.engine.OmniEngine` (made on first use: caches allocated, CUDA
        graphs captured). ``generate``, ``stream`` and every thread go through it."""
        with self.device_lock:
            if self._engine is None:
                self._engine = OmniEngine(self, self.engine_config, lock=self.device_lock)
            return self._engine

    def generate(self, **kwargs) -> generation.GenerateOutput:
        """Text ids, codes and 24 kHz audio for a prompt batch; every row is an engine request (see
        :mod:`omni_model.generation`). Keyword arguments: the processor's outputs and the options of
        :class:`~omni_model.inputs.GenerationConfig`."""
        return generation.generate(self, **kwargs)

    def stream(self, **kwargs) -> Iterator[generation.StreamEvent]:
        """Like :meth:`generate`, yielding :class:`~omni_model.generation.StreamEvent` s as text and audio come (the
        audio in chunks before the text is done; ``first_chunk_codes`` sets the first chunk's size)."""
        return generation.stream(self, **kwargs)

    # ---------------------------------------------------------------------------------- construction

    @staticmethod
    def _wanted(enable_audio_output: bool) -> list[str]:
        return [n for n, p in PARTS.items() if p.build is not None and (enable_audio_output or not p.audio_output)]

    @classmethod
    def _build(cls, config: OmniConfig, names: list[str], device: torch.device, dtype: torch.dtype,
               backend: str | None, engine_config: EngineConfig | None) -> OmniModel:
        parts = {}
        for n in names:
            part = PARTS[n]
            if part.own_precision:
                with torch.device(device):
                    parts[n] = part.build(config)
            else:
                with torch.device("meta"):
                    module = part.build(config)
                parts[n] = module.to_empty(device=device).to(dtype)
        return cls(config, parts, backend=backend, engine_config=engine_config)

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
        engine_config: EngineConfig | None = None,
    ) -> OmniModel:
        """Random weights, deterministic for a seed on a given device: N(0, initializer_range) for matrices and
        embeddings, ones for norm scales, zeros for biases (HF's init rule), so activations stay O(1). Token2Wav
        keeps torch's default initialisation (fp32). Random speakers stand in for ``spk_dict.pt``."""
        device = torch.device(device)
        torch.manual_seed(seed)
        model = cls._build(config, cls._wanted(enable_audio_output), device, dtype, backend, engine_config)
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
        engine_config: EngineConfig | None = None,
    ) -> OmniModel:
        """Reads ``config.json`` and the tensors of the parts built (see :data:`PARTS`: the audio-output parts with
        ``enable_audio_output=False`` are not read at all), ``spk_dict.pt`` when the model speaks, and the stop ids
        of ``generation_config.json`` when present. A tensor outside every part's prefix, or a missing,
        unexpected or mis-shaped one inside a part read, is a :class:`~omni_model.loader.CheckpointError` (a
        ValueError) naming it."""
        config = OmniConfig.from_pretrained(path)
        device = torch.device(device)
        names = cls._wanted(enable_audio_output)
        known = tuple(p.prefix for p in PARTS.values())
        stray = sorted(k for k in checkpoint_files(path) if not k.startswith(known))
        if stray:
            raise CheckpointError(f"checkpoint {path}: {len(stray)} tensor(s) outside every known part "
                                  f"({', '.join(known)}): {', '.join(stray)}", unexpected=stray)
        model = cls._build(config, names, device, dtype, backend, engine_config)
        state = load_state_dict(path, prefixes=[PARTS[n].prefix for n in names], device=device)
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
        None (HF then falls back to 1-D positions, which is wrong for image and video prompts). Runs on a KV cache
        made for the call (the engine's is untouched), between engine steps.
        """
        prompt = prepare_thinker_prompt(
            self.config.thinker_config, input_ids, attention_mask, input_features, feature_attention_mask,
            pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, video_second_per_grid,
            use_audio_in_video,
        )
        device = self.thinker.lm_head.weight.device
        with self.device_lock, use_backend(self.backend):
            embeds = self.thinker.embed_prompt(prompt.ids.to(device), audio=prompt.audio, images=prompt.images,
                                               videos=prompt.videos)
            blocks = sum(-(-n // LOGITS_BLOCK_SIZE) for n in prompt.seq_lens)
            runner = DecoderRunner(self.thinker.model,
                                   RunnerConfig(num_blocks=blocks, block_size=LOGITS_BLOCK_SIZE,
                                                max_model_len=max(prompt.seq_lens), cuda_graphs=False,
                                                enable_prefix_caching=False),
                                   dtype=embeds.dtype, device=device)
            seqs = [runner.allocate(n) for n in prompt.seq_lens]
            hidden = runner.prefill(seqs, embeds, prompt.positions.to(device))
            return prompt.unpack(self.thinker.compute_logits(hidden))
