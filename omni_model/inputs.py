"""Checks of what a caller hands in, before any work: the processor outputs of a prompt and the generation options.

Every inconsistency is a ValueError naming the argument (an unknown option a TypeError), raised before any encoder
runs or any cache block is taken: media token counts against the features and grids, grids against the merge size,
audio lengths against their mask, prompts whose TMRoPE positions exceed the rotary table, sampling values out of
range, unknown speakers.

:func:`prepare_thinker_prompt` packs a checked batch without padding (:class:`ThinkerPrompt`); :func:`split_rows`
turns it into one prompt per row (the engine takes one conversation per request); :class:`GenerationConfig` is the
checked set of options of ``generate`` / ``stream`` / ``OmniEngine.add_request``; :func:`media_items` lists the
media of a row with a content digest each, which the prefix cache mixes into the hash of every block that holds
their placeholder tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields

import torch

from omni_model.layers.sampler import SamplingParams
from omni_model.models.audio_encoder import audio_token_lengths
from omni_model.rope_index import config_kwargs as rope_config_kwargs
from omni_model.rope_index import get_rope_index

# The keyword names of the HF processor's output that describe a prompt (``model.generate(**inputs)`` works).
INPUT_NAMES = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values",
               "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


# ------------------------------------------------------------------------------------------------ prompts


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
    video_seconds: list[float] | None = None  # seconds per temporal grid of each video (positions depend on it)

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
        video_seconds=seconds.tolist() if videos else None,
    )


def _item_groups(ids: list[int], token: int, sizes: list[int]) -> list[list[int]]:
    """The positions of each item's placeholder tokens: the k-th item owns the k-th run of ``sizes[k]`` tokens
    ``token`` in order of appearance (HF's masked_scatter order)."""
    where = [i for i, t in enumerate(ids) if t == token]
    groups, at = [], 0
    for n in sizes:
        groups.append(where[at:at + n])
        at += n
    return groups


def split_rows(cfg, prompt: ThinkerPrompt) -> list[ThinkerPrompt]:
    """One checked prompt per row of a batch (batch 1 each, no padding), each with the media its tokens use.

    Media tensors hold the items of all rows in prompt order; an item whose placeholder tokens straddle two rows is
    a ValueError (the counts agree overall but the rows do not own whole items)."""
    merge = cfg.vision_config.spatial_merge_size
    audio_sizes = [] if prompt.audio is None else audio_token_lengths(torch.tensor(prompt.audio[1])).tolist()
    image_grids = [] if prompt.images is None else prompt.images[1]
    video_grids = [] if prompt.videos is None else prompt.videos[1]
    kinds = (("audio", cfg.audio_token_id, audio_sizes),
             ("image", cfg.image_token_id, [t * h * w // merge**2 for t, h, w in image_grids]),
             ("video", cfg.video_token_id, [t * h * w // merge**2 for t, h, w in video_grids]))
    ids = prompt.ids.cpu().tolist()
    starts = [0]
    for n in prompt.seq_lens:
        starts.append(starts[-1] + n)
    owner: dict[str, list[int]] = {}
    for name, token, sizes in kinds:
        owner[name] = []
        for k, group in enumerate(_item_groups(ids, token, sizes)):
            rows = {next(r for r in range(len(prompt.seq_lens)) if starts[r] <= i < starts[r + 1]) for i in group}
            if len(rows) != 1:
                raise ValueError(f"{name} {k}: its {len(group)} placeholder tokens are split across rows "
                                 f"{sorted(rows)}; every row must hold whole media items")
            owner[name].append(rows.pop())
    out = []
    patch_rows = {"image": [t * h * w for t, h, w in image_grids], "video": [t * h * w for t, h, w in video_grids]}
    for r, n in enumerate(prompt.seq_lens):
        sl = slice(starts[r], starts[r + 1])
        audio = images = videos = seconds = None
        mine = [k for k, o in enumerate(owner["audio"]) if o == r]
        if mine:
            audio = (prompt.audio[0][mine[0]:mine[-1] + 1], prompt.audio[1][mine[0]:mine[-1] + 1])
        for name in ("image", "video"):
            mine = [k for k, o in enumerate(owner[name]) if o == r]
            if not mine:
                continue
            media = prompt.images if name == "image" else prompt.videos
            first = sum(patch_rows[name][:mine[0]])
            last = first + sum(patch_rows[name][k] for k in mine)
            part = (media[0][first:last], media[1][mine[0]:mine[-1] + 1])
            if name == "image":
                images = part
            else:
                videos = part
                seconds = prompt.video_seconds[mine[0]:mine[-1] + 1]
        out.append(ThinkerPrompt(
            real=torch.ones(1, n, dtype=torch.bool), ids=prompt.ids[sl], positions=prompt.positions[:, sl],
            seq_lens=[n], rope_deltas=prompt.rope_deltas[r:r + 1], audio=audio, images=images, videos=videos,
            video_seconds=seconds if videos is not None else None,
        ))
    return out


@dataclass(frozen=True)
class MediaItem:
    """One audio, image or video (``kind``, the ``index``-th of its kind) of a prompt row: its placeholder tokens
    sit at ``token_positions`` within [start, end), and ``digest`` names its content (and everything else its TMRoPE
    positions depend on)."""

    kind: str
    index: int
    token_positions: tuple[int, ...]
    digest: bytes

    @property
    def start(self) -> int:
        return self.token_positions[0]

    @property
    def end(self) -> int:
        return self.token_positions[-1] + 1


def media_items(cfg, prompt: ThinkerPrompt, *, use_audio_in_video: bool = False,
                digests: bool = True) -> list[MediaItem]:
    """The media of a one-row prompt, each with a content digest (features or pixels read on the host once; empty
    with ``digests=False``)."""
    merge = cfg.vision_config.spatial_merge_size
    ids = prompt.ids.cpu().tolist()
    items = []

    def digest(*parts) -> bytes:
        if not digests:
            return b""
        h = hashlib.blake2b(digest_size=16)
        for part in parts:
            h.update(part.detach().float().cpu().contiguous().numpy().tobytes() if isinstance(part, torch.Tensor)
                     else repr(part).encode())
        return h.digest()

    if prompt.audio is not None:
        features, lens = prompt.audio
        sizes = audio_token_lengths(torch.tensor(lens)).tolist()
        for k, group in enumerate(_item_groups(ids, cfg.audio_token_id, sizes)):
            d = digest("audio", features[k, :, :lens[k]], lens[k], use_audio_in_video)
            items.append(MediaItem("audio", k, tuple(group), d))
    for name, media, token in (("image", prompt.images, cfg.image_token_id),
                               ("video", prompt.videos, cfg.video_token_id)):
        if media is None:
            continue
        pixels, grids = media
        seconds = prompt.video_seconds if name == "video" else [None] * len(grids)
        sizes = [t * h * w // merge**2 for t, h, w in grids]
        first = 0
        for k, group in enumerate(_item_groups(ids, token, sizes)):
            t, h, w = grids[k]
            d = digest(name, pixels[first:first + t * h * w], grids[k], seconds[k], use_audio_in_video)
            first += t * h * w
            items.append(MediaItem(name, k, tuple(group), d))
    return items


# ------------------------------------------------------------------------------------------------ options


@dataclass(frozen=True)
class GenerationConfig:
    """The keyword arguments of ``generate`` / ``stream`` / ``OmniEngine.add_request``, checked once.

    ``stream_audio`` (not a ``generate`` argument: ``generate`` sets it False): with False, Token2Wav runs once over
    all codes of the reply when the Talker stops (HF's numbers) instead of in chunks as the codes come.
    """

    use_audio_in_video: bool = False
    speaker: str = "Chelsie"
    return_audio: bool = True
    thinker_max_new_tokens: int = 1024
    thinker_do_sample: bool = False
    thinker_temperature: float = 1.0
    thinker_top_k: int | None = None
    thinker_top_p: float | None = None
    thinker_repetition_penalty: float = 1.0
    talker_max_new_tokens: int = 4096
    talker_do_sample: bool = True
    talker_top_k: int | None = 40
    talker_top_p: float | None = 0.8
    talker_temperature: float = 0.9
    talker_repetition_penalty: float = 1.05
    token2wav_num_steps: int = 10
    token2wav_guidance_scale: float = 0.5
    token2wav_sway_coefficient: float | None = -1.0
    token2wav_noise: torch.Tensor | None = None
    seed: int | None = None
    first_chunk_codes: int | None = None
    stream_audio: bool = True

    def __post_init__(self):
        for name in ("use_audio_in_video", "return_audio", "thinker_do_sample", "talker_do_sample", "stream_audio"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.speaker, str):
            raise ValueError(f"speaker must be a str, got {self.speaker!r}")
        for name, least in (("thinker_max_new_tokens", 1), ("talker_max_new_tokens", 1), ("token2wav_num_steps", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
        if self.first_chunk_codes is not None and (isinstance(self.first_chunk_codes, bool)
                                                   or not isinstance(self.first_chunk_codes, int)
                                                   or self.first_chunk_codes < 1):
            raise ValueError(f"first_chunk_codes must be a positive int or None, got {self.first_chunk_codes!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {self.seed!r}")
        for name in ("token2wav_guidance_scale", "token2wav_sway_coefficient"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.token2wav_noise is not None and (not isinstance(self.token2wav_noise, torch.Tensor)
                                                 or self.token2wav_noise.dim() != 3
                                                 or self.token2wav_noise.shape[0] != 1):
            raise ValueError("token2wav_noise must be a tensor of shape (1, frames, mel_dim), got "
                             f"{tuple(getattr(self.token2wav_noise, 'shape', ())) or type(self.token2wav_noise)}")
        self.thinker_sampling  # noqa: B018 (checks the sampling values, naming the argument)
        self.talker_sampling  # noqa: B018

    def _sampling(self, prefix: str) -> SamplingParams:
        get = lambda name: getattr(self, f"{prefix}_{name}")  # noqa: E731
        try:
            return SamplingParams(get("do_sample"), get("temperature"), get("top_k"), get("top_p"),
                                  get("repetition_penalty"))
        except ValueError as exc:
            raise ValueError(f"{prefix}_{exc}") from None

    @property
    def thinker_sampling(self) -> SamplingParams:
        return self._sampling("thinker")

    @property
    def talker_sampling(self) -> SamplingParams:
        return self._sampling("talker")


OPTION_NAMES = tuple(f.name for f in fields(GenerationConfig))


def split_kwargs(kwargs: dict) -> tuple[dict, GenerationConfig]:
    """Processor outputs vs generation options; an unknown keyword is a TypeError naming it."""
    kwargs = dict(kwargs)
    inputs = {k: kwargs.pop(k) for k in INPUT_NAMES if k in kwargs}
    unknown = sorted(set(kwargs) - set(OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
    if "input_ids" not in inputs:
        raise TypeError("input_ids is required")
    return inputs, GenerationConfig(**kwargs)
