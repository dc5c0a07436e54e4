"""From a conversation with decoded media to the engine's inputs, with the checkpoint's own chat template.

The processor of Qwen2.5-Omni renders the chat template (one placeholder token per media item: ``<|AUDIO|>``,
``<|IMAGE|>``, ``<|VIDEO|>``), tokenizes the text, and repeats each placeholder once per token its media gives the
model. :class:`PromptBuilder` does the same with the checkpoint's tokenizer and template and our own feature
extraction (:mod:`omni_model.processor`), without transformers' processor class (which, in transformers 4.57.6,
cannot be built without torchvision). The tests hold its output equal to transformers' processor.

The same conversation always gives the same ids and features, so the earlier turns of a conversation (their
audio and images included) give the next turn the same token prefix, which the engine's prefix cache reuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni_model.processor import (
    IMAGE_MEAN,
    IMAGE_STD,
    audio_token_count,
    image_patches,
    log_mel_features,
    video_patches,
)
from omni_model.serve.media import ImageRule, VideoRule


@dataclass
class Turn:
    """One message: its role and its parts, each ("text", str), ("audio", 16 kHz float32 samples), ("image",
    (H, W, 3) uint8 already resized by :func:`omni_model.serve.media.smart_resize`) or ("video", ((T, H, W, 3) uint8
    frames likewise resized, seconds per temporal patch))."""

    role: str
    parts: list[tuple[str, Any]]


def load_chat_template(path: Path, tokenizer) -> str:
    """The checkpoint's chat template: ``chat_template.jinja``, else ``chat_template.json`` (the processor's, as
    the published Qwen2.5-Omni checkpoints ship it), else the tokenizer's own."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        if template:
            return template
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise ValueError(f"{path} has no chat template (chat_template.jinja, chat_template.json or the tokenizer's)")


def load_image_rule(path: Path, *, file_name: str = "preprocessor_config.json", kind: type = ImageRule):
    """The image (or, with ``video_preprocessor_config.json`` and :class:`VideoRule`, video) processor's settings
    (both the ``min_pixels`` / ``max_pixels`` keys and the newer ``size: {shortest_edge, longest_edge}`` spelling);
    the defaults where the file is absent."""
    file = path / file_name
    if not file.is_file():
        return kind()
    cfg = json.loads(file.read_text())
    for key, ours in (("image_mean", IMAGE_MEAN), ("image_std", IMAGE_STD)):
        if key in cfg and not np.allclose(cfg[key], ours, atol=1e-6):
            raise ValueError(f"{file}: {key} {cfg[key]} differs from the CLIP values {ours} this server uses")
    size = cfg.get("size") or {}
    default = kind()
    return kind(
        patch_size=int(cfg.get("patch_size", default.patch_size)),
        merge_size=int(cfg.get("merge_size", default.merge_size)),
        temporal_patch_size=int(cfg.get("temporal_patch_size", default.temporal_patch_size)),
        min_pixels=int(cfg.get("min_pixels") or size.get("shortest_edge") or default.min_pixels),
        max_pixels=int(cfg.get("max_pixels") or size.get("longest_edge") or default.max_pixels),
    )


class PromptBuilder:
    """Chat template + tokenizer + feature extraction of one checkpoint.

    ``thinker_config`` gives the placeholder ids and the number of mel bins; ``image_rule`` the patching."""

    def __init__(self, tokenizer, chat_template: str, thinker_config, image_rule: ImageRule,
                 video_rule: VideoRule | None = None):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.config = thinker_config
        self.image_rule = image_rule
        self.video_rule = video_rule or VideoRule()
        for rule in (self.image_rule, self.video_rule):
            if rule.merge_size != thinker_config.vision_config.spatial_merge_size:
                raise ValueError(f"processor merge_size {rule.merge_size} differs from the vision encoder's "
                                 f"spatial_merge_size {thinker_config.vision_config.spatial_merge_size}")

    @classmethod
    def from_pretrained(cls, path: str | Path, thinker_config) -> PromptBuilder:
        from transformers import AutoTokenizer

        path = Path(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(tokenizer, load_chat_template(path, tokenizer), thinker_config, load_image_rule(path),
                   load_image_rule(path, file_name="video_preprocessor_config.json", kind=VideoRule))

    def render(self, turns: list[Turn], *, system_prompt: str | None = None) -> str:
        """The prompt text, one placeholder per media item, ending with the assistant's turn opening.
        ``system_prompt`` is added first when no turn is a system turn."""
        conversation = []
        if system_prompt is not None and not any(t.role == "system" for t in turns):
            conversation.append({"role": "system", "content": [{"type": "text", "text": system_prompt}]})
        for turn in turns:
            content = [{"type": "text", "text": v} if kind == "text" else {"type": kind} for kind, v in turn.parts]
            conversation.append({"role": turn.role, "content": content})
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)

    def build(self, turns: list[Turn], *, system_prompt: str | None = None) -> dict[str, torch.Tensor]:
        """The engine's inputs for one conversation (batch 1): ``input_ids`` (1, L), ``attention_mask``, and where
        media are present ``input_features`` (n_audio, mel, 3000), ``feature_attention_mask``, ``pixel_values``,
        ``image_grid_thw`` (n_image, 3), ``pixel_values_videos``, ``video_grid_thw`` (n_video, 3) and
        ``video_second_per_grid`` (n_video,)."""
        cfg = self.config
        audios = [v for t in turns for kind, v in t.parts if kind == "audio"]
        images = [v for t in turns for kind, v in t.parts if kind == "image"]
        videos = [v for t in turns for kind, v in t.parts if kind == "video"]
        ids = self.tokenizer(self.render(turns, system_prompt=system_prompt))["input_ids"]
        inputs: dict[str, torch.Tensor] = {}
        repeats = {cfg.audio_token_id: [], cfg.image_token_id: [], cfg.video_token_id: []}
        if audios:
            feats, mask = log_mel_features(audios, n_mels=cfg.audio_config.num_mel_bins)
            inputs["input_features"], inputs["feature_attention_mask"] = feats, mask
            repeats[cfg.audio_token_id] = [audio_token_count(int(n)) for n in mask.sum(-1)]
        if images:
            rule = self.image_rule
            pixels, grid = image_patches(images, patch_size=rule.patch_size, merge_size=rule.merge_size,
                                         temporal_patch_size=rule.temporal_patch_size)
            inputs["pixel_values"], inputs["image_grid_thw"] = pixels, grid
            repeats[cfg.image_token_id] = [int(g.prod()) // rule.merge_size**2 for g in grid]
        if videos:
            rule = self.video_rule
            pixels, grid = video_patches([frames for frames, _ in videos], patch_size=rule.patch_size,
                                         merge_size=rule.merge_size, temporal_patch_size=rule.temporal_patch_size)
            inputs["pixel_values_videos"], inputs["video_grid_thw"] = pixels, grid
            inputs["video_second_per_grid"] = torch.tensor([seconds for _, seconds in videos], dtype=torch.float32)
            repeats[cfg.video_token_id] = [int(g.prod()) // rule.merge_size**2 for g in grid]
        expanded: list[int] = []
        seen = {tok: 0 for tok in repeats}
        for tok in ids:
            if tok in repeats:
                counts = repeats[tok]
                if seen[tok] >= len(counts):
                    raise ValueError(f"the chat template rendered more placeholders of token {tok} than the "
                                     f"request has media of that kind ({len(counts)})")
                expanded.extend([tok] * counts[seen[tok]])
                seen[tok] += 1
            else:
                expanded.append(tok)
        short = {tok: (seen[tok], len(c)) for tok, c in repeats.items() if seen[tok] != len(c)}
        if short:
            raise ValueError(f"the chat template rendered (placeholders, media) {short}: it must render one "
                             "placeholder per media item")
        inputs["input_ids"] = torch.tensor([expanded], dtype=torch.long)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        return inputs

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    """Text pieces of a growing id sequence whose concatenation equals decoding all ids at once.

    A piece is released once it no longer ends in an unfinished UTF-8 character (byte-level BPE splits one
    character over several tokens). Each step decodes only a short window (the ids since the last released
    piece and the few before them, for context), not the whole reply."""

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids up to here have been released as text
        self.text = ""

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            piece = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += piece
            return piece
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character at the very end is emitted as it decodes)."""
        full = self._decode(self.ids)
        piece = full[len(self.text):] if full.startswith(self.text) else ""
        self.text += piece
        self._prefix = self._read = len(self.ids)
        return piece
