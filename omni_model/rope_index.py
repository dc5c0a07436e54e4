"""TMRoPE position ids of a Thinker prompt: three ids (temporal, height, width) per token, host-side index math.

Used once per request before the Thinker prefill (omni_model.model); the decode steps then only add ``delta``.
Every Thinker attention layer rotates q and k by these ids (omni_kernels.apply_tmrope). The result equals HF
transformers 4.57.6 (``Qwen2_5OmniPreTrainedModelForConditionalGeneration.get_rope_index``) element for element,
quirks included; HF walks the prompt token by token in Python, this module walks it media segment by media segment
and builds each segment's ids with ``arange`` and broadcasting.

The rules (docs/model.md, "Position ids (TMRoPE)"), per row with the padding removed. A cursor starts at 0; the
prompt is read as 1-D runs and vision blocks:

* text, a bos/eos token, and a whole audio segment (``audio_bos``, its tokens, ``audio_eos``) take consecutive ids
  ``cursor, cursor + 1, ...`` on all three axes;
* an image or a video (``vision_bos``, ``t*h*w / merge**2`` tokens, ``vision_eos``; the bos is the last token of the
  run before it): merged token (k, r, c) of the grid, in t-major then row-major order, gets
  ``(st + t_id[k], st + r, st + c)`` with ``st`` the id after the bos, ``t_id[k] = k * position_id_per_seconds``
  for an image and ``long(k * float32(second_per_grid) * position_id_per_seconds)`` for a video (both products in
  fp32 as HF computes them, then truncated); the cursor then moves to the block's maximum + 1 (the eos);
* a video with its audio (``use_audio_in_video``): ``vision_bos, audio_bos`` share one id, video and audio ids both
  start at ``st`` (audio token a gets ``st + a``), and the two streams are interleaved in chunks of
  ``T = int(position_id_per_seconds * seconds_per_chunk)`` temporal ids: video chunk 0, audio chunk 0, video
  chunk 1, ...; a stream that runs out stops, the other goes on. Audio token a is in chunk ``a // T``. HF's
  chunking of the video advances by at most one chunk per token (``get_chunked_index``), so a video token's chunk
  is ``c_i = min(floor(t_i / T), c_{i-1} + 1)``, i.e. ``c = i + cummin(floor(t / T) - i)``: when the t ids jump
  over a chunk, the jump is spread over the next tokens (a frame can be split). ``audio_eos, vision_eos`` then
  share one id: one more than the maximum of the last chunk HF appended (the video's maximum when the video has
  more chunks than the audio, else the last audio id), which need not be the maximum of the block;
* ``delta = max id + 1 - number of real tokens``; a decode token at cache position ``n`` gets ``n + delta``.

Without any grid (``image_grid_thw`` and ``video_grid_thw`` both None: text and audio prompts) HF takes a 1-D path:
``cumsum(mask) - 1``, and there ``delta`` also counts the padded slots' id 1 in the maximum (a row with one real
token and padding gets delta 1). Padded slots get id 1 on both paths. HF needs a mask on the 1-D path and fails on
an all-padding row on the vision path; here a missing mask means no padding and an all-padding row keeps ids 1 and
delta 0. With ``use_audio_in_video`` every video must carry its audio (HF would silently give a video laid out
without it text ids; here that is an error).

Shapes: input_ids (B, L) integer; attention_mask (B, L) of 0/1 or None (no padding); image_grid_thw (N_img, 3),
video_grid_thw (N_vid, 3) as (t, h, w) patches before merging, in prompt order over the whole batch; audio_seqlens
(N_aud,) mel frames per audio in prompt order (the audios of videos included when ``use_audio_in_video``);
second_per_grids (N_vid,). Returns position_ids (3, B, L) int64 and deltas (B, 1) int64 on input_ids' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

# Segment kinds of a row walk.
_IMAGE, _VIDEO, _AUDIO = 0, 1, 2
_KIND_NAME = {_IMAGE: "image", _VIDEO: "video", _AUDIO: "audio"}


def audio_token_count(mel_frames: int) -> int:
    """Thinker tokens of an audio of ``mel_frames`` mel frames: conv stride 2, then AvgPool(2) (docs/model.md)."""
    return ((mel_frames - 1) // 2 + 1 - 2) // 2 + 1


def config_kwargs(cfg, spatial_merge_size: int) -> dict:
    """The keyword arguments of :func:`get_rope_index` that come from a model config (the Thinker's or the
    Talker's: both carry the same token ids and timing fields)."""
    return dict(
        spatial_merge_size=spatial_merge_size,
        position_id_per_seconds=cfg.position_id_per_seconds,
        seconds_per_chunk=cfg.seconds_per_chunk,
        image_token_id=cfg.image_token_id,
        video_token_id=cfg.video_token_id,
        audio_token_id=cfg.audio_token_id,
        vision_start_token_id=cfg.vision_start_token_id,
        audio_start_token_id=cfg.audio_start_token_id,
        audio_end_token_id=cfg.audio_end_token_id,
    )


def get_rope_index(
    input_ids: torch.Tensor,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    use_audio_in_video: bool = False,
    audio_seqlens: torch.Tensor | None = None,
    second_per_grids: torch.Tensor | Sequence[float] | None = None,
    *,
    spatial_merge_size: int = 2,
    position_id_per_seconds: int = 25,
    seconds_per_chunk: float = 2,
    image_token_id: int = 151655,
    video_token_id: int = 151656,
    audio_token_id: int = 151646,
    vision_start_token_id: int = 151652,
    audio_start_token_id: int = 151647,
    audio_end_token_id: int = 151648,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TMRoPE position ids (3, B, L) int64 and decode deltas (B, 1) int64 of a batch of prompts (module docstring).

    ``audio_seqlens`` are mel frame counts (the processor's ``feature_attention_mask.sum(-1)``); an audio has
    ``((n - 1) // 2 + 1 - 2) // 2 + 1`` tokens. ``audio_end_token_id`` is part of HF's signature family but not
    read: audio_eos takes its id from its position in the prompt. Raises ValueError naming the argument for
    malformed input (wrong shapes or dtypes, token counts that do not match the grids or ``audio_seqlens``, fewer
    grids / lengths than media, a ``second_per_grids`` of the wrong length).
    """
    del audio_end_token_id  # eos ids follow from the layout
    ids, mask = _check_ids_and_mask(input_ids, attention_mask)
    merge = _check_positive_int("spatial_merge_size", spatial_merge_size)
    images = _check_grid("image_grid_thw", image_grid_thw, merge)
    videos = _check_grid("video_grid_thw", video_grid_thw, merge)
    audio_tokens = _check_audio_seqlens(audio_seqlens)
    seconds = _check_seconds(second_per_grids, videos)
    if not position_id_per_seconds > 0:
        raise ValueError(f"position_id_per_seconds must be > 0, got {position_id_per_seconds}")
    tokens_per_chunk = int(position_id_per_seconds * seconds_per_chunk)  # HF's int() truncation
    if tokens_per_chunk < 1:
        raise ValueError(f"position_id_per_seconds * seconds_per_chunk must be >= 1, got "
                         f"{position_id_per_seconds} * {seconds_per_chunk}")
    tok = (image_token_id, video_token_id, audio_token_id, vision_start_token_id, audio_start_token_id)
    B, L = ids.shape
    device = input_ids.device

    if images is None and videos is None:
        # HF's 1-D path: plain positions over the real tokens; text and audio only (any image/video tokens without
        # grids are read as text, as HF does).
        if audio_tokens is not None:
            _check_audio_total(ids, mask, audio_tokens, audio_start_token_id, audio_token_id)
        if mask is None:
            positions = torch.arange(L, dtype=torch.int64).expand(B, L)
            deltas = torch.zeros(B, 1, dtype=torch.int64)
        else:
            m = mask.to(torch.int64)
            positions = (m.cumsum(-1) - 1).masked_fill_(m == 0, 1)
            deltas = positions.max(-1, keepdim=True).values + 1 - m.sum(-1, keepdim=True)
        return positions.unsqueeze(0).expand(3, B, L).contiguous().to(device), deltas.to(device)

    # Walk every row first (all validation happens here), then build the ids.
    rows = [ids[b] if mask is None else ids[b][mask[b]] for b in range(B)]
    counters = [0, 0, 0]  # next image, video and audio index, shared by the rows as in HF
    plans = [
        _walk_row(b, row, counters, images, videos, audio_tokens, seconds, merge, use_audio_in_video, tok)
        for b, row in enumerate(rows)
    ]
    position_ids = torch.ones(3, B, L, dtype=torch.int64)
    deltas = torch.zeros(B, 1, dtype=torch.int64)
    for b, (row, plan) in enumerate(zip(rows, plans)):
        if row.numel() == 0:
            continue  # an all-padding row: ids stay 1, delta 0 (HF fails on it)
        row_ids = _build_row(row.numel(), plan, images, videos, audio_tokens, seconds, merge,
                             position_id_per_seconds, tokens_per_chunk)
        if mask is None:
            position_ids[:, b] = row_ids
        else:
            position_ids[:, b, mask[b]] = row_ids
        deltas[b, 0] = row_ids.max() + 1 - row.numel()
    return position_ids.to(device), deltas.to(device)


# ------------------------------------------------------------------------------------------------------ checks


def _check_ids_and_mask(input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (B, L), got shape {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must have an integer dtype, got {input_ids.dtype}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids has no tokens (L = 0)")
    ids = input_ids.detach().to("cpu", torch.int64)
    if attention_mask is None:
        return ids, None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.detach().cpu()
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 and 1")
    return ids, mask == 1


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _check_grid(name: str, grid, merge: int) -> list[tuple[int, int, int]] | None:
    if grid is None:
        return None
    g = torch.as_tensor(grid).detach().cpu()
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"{name} must have shape (N, 3) as (t, h, w), got {tuple(g.shape)}")
    if g.dtype.is_floating_point or g.dtype.is_complex or g.dtype == torch.bool:
        raise ValueError(f"{name} must have an integer dtype, got {g.dtype}")
    rows = [tuple(r) for r in g.tolist()]
    for i, (t, h, w) in enumerate(rows):
        if min(t, h, w) < 1:
            raise ValueError(f"{name}[{i}] = {(t, h, w)}: every grid size must be >= 1")
        if h % merge or w % merge:
            raise ValueError(f"{name}[{i}] = {(t, h, w)}: h and w must be divisible by spatial_merge_size {merge}")
    return rows


def _check_audio_seqlens(audio_seqlens) -> list[int] | None:
    if audio_seqlens is None:
        return None
    s = torch.as_tensor(audio_seqlens).detach().cpu()
    if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
        raise ValueError(f"audio_seqlens must have an integer dtype, got {s.dtype}")
    return [audio_token_count(n) for n in s.flatten().tolist()]


def _check_seconds(second_per_grids, videos) -> torch.Tensor | None:
    if second_per_grids is None or videos is None:
        return None  # HF never reads it without videos
    s = torch.as_tensor(second_per_grids).detach().cpu()
    if s.dtype.is_complex or s.dtype == torch.bool:
        raise ValueError(f"second_per_grids must be real numbers, got {s.dtype}")
    s = s.float().flatten()  # HF: second_per_grids[i].cpu().float()
    if s.numel() != len(videos):
        raise ValueError(f"second_per_grids must have one entry per row of video_grid_thw ({len(videos)}), "
                         f"got {s.numel()}")
    if not bool((torch.isfinite(s) & (s >= 0)).all()):
        raise ValueError(f"second_per_grids must be finite and >= 0, got {s.tolist()}")
    return s


def _check_audio_total(ids, mask, audio_tokens, audio_start, audio_tok) -> None:
    """1-D path: the audio tokens of the batch must be those that ``audio_seqlens`` announces."""
    real = ids if mask is None else ids[mask]
    n_audio = int((real == audio_start).sum())
    if n_audio > len(audio_tokens):
        raise ValueError(f"audio_seqlens has {len(audio_tokens)} entries but the prompts hold {n_audio} audios")
    expected = sum(audio_tokens[:n_audio])
    found = int((real == audio_tok).sum())
    if found != expected:
        raise ValueError(f"the prompts hold {found} audio tokens but audio_seqlens gives {expected} for their "
                         f"{n_audio} audios")


# ------------------------------------------------------------------------------------------------- row walk


def _walk_row(b, row, counters, images, videos, audio_tokens, seconds, merge, use_audio_in_video, tok) -> list:
    """HF's walk over one row (padding removed), one step per media segment; validates as it goes.

    Returns the row's vision segments as (kind, p, video_or_image_index, audio_index or None), p the row position
    of the segment's first media token. Audio segments need no entry: their ids continue the 1-D run.
    """
    image_tok, video_tok, audio_tok, vision_start, audio_start = tok
    n = row.numel()
    starts = torch.nonzero(row == vision_start).flatten()
    after = row[starts[starts + 1 < n] + 1]
    remain = [int((after == image_tok).sum()),
              int((after == (audio_start if use_audio_in_video else video_tok)).sum()),
              int((row == audio_start).sum())]
    where = [torch.nonzero(row == t).flatten() for t in (image_tok, video_tok, audio_tok)]
    # With use_audio_in_video a video step also consumes its audio, so HF counts only images and audios.
    steps = remain[_IMAGE] + remain[_AUDIO] + (0 if use_audio_in_video else remain[_VIDEO])
    used = [0, 0, 0]
    plan = []
    st = 0
    for _ in range(steps):
        first = [n + 1] * 3
        for kind in (_IMAGE, _VIDEO, _AUDIO):
            if remain[kind] > 0 and where[kind].numel():
                k = int(torch.searchsorted(where[kind], st))
                if k == where[kind].numel():
                    raise ValueError(f"input_ids row {b}: its start tokens announce {remain[kind]} more "
                                     f"{_KIND_NAME[kind]}(s) but no {_KIND_NAME[kind]} token follows position {st}")
                first[kind] = int(where[kind][k])
        p = min(first)
        if p > n:
            raise ValueError(f"input_ids row {b}: a media start token without media tokens after position {st}")
        # HF's order of tests: audio, then image, then video.
        kind = _AUDIO if p == first[_AUDIO] else _IMAGE if p == first[_IMAGE] else _VIDEO
        where_msg = f"input_ids row {b}, position {p}"
        if kind == _AUDIO:
            a = _take(counters, _AUDIO, audio_tokens, "audio_seqlens", where_msg)
            length = audio_tokens[a]
            _check_span(row, p, st, 1, length, 1, audio_tok, "audio", f"audio_seqlens[{a}]", where_msg)
            used[_AUDIO] += length
            st = p + length + 1
        elif kind == _IMAGE:
            i = _take(counters, _IMAGE, images, "image_grid_thw", where_msg)
            length = _vision_tokens(images[i], merge)
            _check_span(row, p, st, 1, length, 1, image_tok, "image", f"image_grid_thw[{i}] = {images[i]}",
                        where_msg)
            used[_IMAGE] += length
            plan.append((_IMAGE, p, i, None))
            st = p + length + 1
        elif not use_audio_in_video:
            v = _take(counters, _VIDEO, videos, "video_grid_thw", where_msg)
            _need_seconds(seconds, where_msg)
            length = _vision_tokens(videos[v], merge)
            _check_span(row, p, st, 1, length, 1, video_tok, "video", f"video_grid_thw[{v}] = {videos[v]}",
                        where_msg)
            used[_VIDEO] += length
            plan.append((_VIDEO, p, v, None))
            st = p + length + 1
        else:
            v = _take(counters, _VIDEO, videos, "video_grid_thw", where_msg)
            a = _take(counters, _AUDIO, audio_tokens, "audio_seqlens", where_msg)
            _need_seconds(seconds, where_msg)
            n_video, n_audio = _vision_tokens(videos[v], merge), audio_tokens[a]
            if n_audio < 1:
                raise ValueError(f"{where_msg}: audio_seqlens[{a}] gives {n_audio} tokens for the video's audio")
            if p - 2 < st:
                raise ValueError(f"{where_msg}: the video-with-audio tokens must follow vision_start and audio_start")
            span = row[p:p + n_video + n_audio]
            got_v, got_a = int((span == video_tok).sum()), int((span == audio_tok).sum())
            if got_v != n_video or got_a != n_audio or p + n_video + n_audio + 2 > n:
                raise ValueError(
                    f"{where_msg}: a video with its audio needs {n_video} video tokens (video_grid_thw[{v}] = "
                    f"{videos[v]}) and {n_audio} audio tokens (audio_seqlens[{a}]) interleaved, then audio_end and "
                    f"vision_end; found {got_v} video and {got_a} audio tokens in that span")
            used[_VIDEO] += n_video
            used[_AUDIO] += n_audio
            plan.append((_VIDEO, p, v, a))
            st = p + n_video + n_audio + 2
            remain[_AUDIO] -= 1
        remain[kind] -= 1
    for kind, arg in ((_IMAGE, "image_grid_thw"), (_VIDEO, "video_grid_thw"), (_AUDIO, "audio_seqlens")):
        if used[kind] != where[kind].numel():
            raise ValueError(
                f"input_ids row {b} holds {where[kind].numel()} {_KIND_NAME[kind]} tokens but its "
                f"{_KIND_NAME[kind]} segments (start token, the tokens {arg} gives, end token) account for "
                f"{used[kind]}")
    return plan


def _take(counters, kind, table, name, where_msg) -> int:
    i = counters[kind]
    if table is None or i >= len(table):
        have = 0 if table is None else len(table)
        raise ValueError(f"{where_msg}: {name} has {have} entries, fewer than the prompts' "
                         f"{_KIND_NAME[kind]}s (this is number {i + 1})")
    counters[kind] += 1
    return i


def _need_seconds(seconds, where_msg) -> None:
    if seconds is None:
        raise ValueError(f"{where_msg}: second_per_grids is required for videos")


def _vision_tokens(grid, merge) -> int:
    t, h, w = grid
    return t * h * w // merge**2


def _check_span(row, p, st, n_bos, length, n_eos, token, name, source, where_msg) -> None:
    if length < 1:
        raise ValueError(f"{where_msg}: {source} gives {length} {name} tokens")
    if p - n_bos < st:
        raise ValueError(f"{where_msg}: the {name} tokens must follow their start token")
    run = row[p:p + length]
    if p + length + n_eos > row.numel() or not bool((run == token).all()):
        got = int((run == token).cumprod(0).sum())
        raise ValueError(f"{where_msg}: {source} gives {length} {name} tokens followed by an end token, found a "
                         f"run of {got}")


# ------------------------------------------------------------------------------------------------ id building


def _build_row(n, plan, images, videos, audio_tokens, seconds, merge, per_second, tokens_per_chunk) -> torch.Tensor:
    """(3, n) ids of one row from its vision segments; everything between them is a 1-D run."""
    out = torch.empty(3, n, dtype=torch.int64)
    pos, cursor = 0, 0  # next row position to fill, next id
    for kind, p, index, audio_index in plan:
        t, h, w = images[index] if kind == _IMAGE else videos[index]
        gh, gw = h // merge, w // merge
        if kind == _IMAGE:
            t_ids = torch.arange(t) * 1 * per_second  # HF: integer arithmetic for images
        else:
            t_ids = torch.arange(t) * seconds[index] * per_second  # fp32, as HF
        t_ids = t_ids.long()
        video = torch.stack([
            t_ids.view(-1, 1, 1).expand(t, gh, gw).reshape(-1),
            torch.arange(gh).view(1, -1, 1).expand(t, gh, gw).reshape(-1),
            torch.arange(gw).view(1, 1, -1).expand(t, gh, gw).reshape(-1),
        ])
        block_max = max(int(t_ids.max()), gh - 1, gw - 1)
        if audio_index is None:
            # text and the vision_bos: one run; then the block starts right after the bos id.
            out[:, pos:p] = torch.arange(cursor, cursor + p - pos)
            start = cursor + p - pos
            out[:, p:p + video.shape[1]] = video + start
            pos, cursor = p + video.shape[1], start + block_max + 1
            continue
        # vision_bos and audio_bos share one id.
        out[:, pos:p - 1] = torch.arange(cursor, cursor + p - 1 - pos)
        out[:, p - 1] = cursor + p - 2 - pos
        start = cursor + p - 1 - pos
        n_audio = audio_tokens[audio_index]
        n_video = video.shape[1]
        # Chunk of each token (module docstring): audio a // T; video i + cummin(floor(t / T) - i).
        step = torch.arange(n_video)
        video_chunk = step + torch.cummin(video[0] // tokens_per_chunk - step, 0).values
        audio_chunk = torch.arange(n_audio) // tokens_per_chunk
        # Video chunk j goes after the audio of chunks < j; audio chunk j after the video of chunks <= j.
        video_at = step + torch.clamp(video_chunk * tokens_per_chunk, max=n_audio)
        audio_at = torch.arange(n_audio) + torch.searchsorted(video_chunk, audio_chunk, right=True)
        block = torch.empty(3, n_video + n_audio, dtype=torch.int64)
        block[:, video_at] = video + start
        block[:, audio_at] = torch.arange(start, start + n_audio)
        end = p + n_video + n_audio
        out[:, p:end] = block
        # HF moves on from the maximum of the last chunk it appended.
        last_max = block_max if int(video_chunk[-1]) > int(audio_chunk[-1]) else n_audio - 1
        cursor = start + last_max + 1
        out[:, end:end + 2] = cursor  # audio_eos and vision_eos share one id
        pos, cursor = end + 2, cursor + 1
    out[:, pos:] = torch.arange(cursor, cursor + n - pos)
    return out
