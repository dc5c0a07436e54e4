"""generate / stream: encoders -> Thinker -> Talker -> DiT -> BigVGAN, with the two decoders in lockstep.

The Thinker and the Talker each run on a :class:`~omni_model.engine.runner.DecoderRunner` (paged KV cache, block
manager, CUDA graphs for decode on CUDA). Talker step k needs the Thinker's hidden state of reply token k, so one
iteration of the loop is one Thinker step for every row still writing text, then one Talker step for every row
still speaking (REFERENCE.md, "Talker inputs"):

* Talker prompt: per prompt position the Thinker's final hidden state plus its input embedding (media positions:
  hidden state only), then the speaker's bos embedding, then reply token 0 (hidden + embedding); the last two
  positions also get the codec pad / bos embeddings. Positions are the Thinker's, continued as text.
* Talker step k feeds codec_embedding(code k-1) + reply element k: reply tokens 1..N-2 (hidden + embedding),
  then the text-end embedding, then text-pad forever. The last reply token (end of turn, or the token at
  ``thinker_max_new_tokens``) is never spoken, as in HF.

Codes are sampled under a logits mask: only ids the DiT's code table has, plus the stop ids, can come out.
``generate`` runs Token2Wav over all codes of a row (HF's numbers); ``stream`` hands codes to a
:class:`~omni_model.streaming.Token2WavStreamer` as they come and yields audio chunks before the text is done.

A request whose KV blocks run out fails alone (its row reports the error); the others finish. Every exit (an
error, or a stream closed early) returns the blocks of all rows.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from omni_model.engine.block_manager import CacheFullError, SeqBlocks
from omni_model.engine.kv_cache import blocks_for_budget
from omni_model.engine.runner import DecoderRunner, RunnerConfig
from omni_model.layers.backend import use_backend
from omni_model.layers.sampler import SamplingParams, mark_seen, sample
from omni_model.model import OmniModel, prepare_thinker_prompt

SAMPLE_RATE = 24000


@dataclass
class GenerateOutput:
    """``sequences`` (B, L + N) like HF's (prompt with its padding, then the reply, rows that stopped early padded);
    ``codes`` one 1-D LongTensor per row (no bos/eos) or None; ``audio`` float32 arrays at 24 kHz or None;
    ``errors`` per row: None, or why that request failed (e.g. the KV cache ran out) while the others finished."""

    sequences: torch.Tensor
    codes: list[torch.Tensor] | None
    audio: list[np.ndarray] | None
    errors: list[str | None] = field(default_factory=list)


@dataclass
class StreamEvent:
    """One step of :meth:`OmniModel.stream`: new thinker ids, new 24 kHz samples (either may be empty), the
    timings so far, and the batch row it belongs to. ``stage_times``: stage marks in ms since the request
    (encoders, thinker_prefill, first_token, talker_prefill, first_audio, done) and the row's Token2Wav totals
    (token2wav_dit_ms, token2wav_vocoder_ms, token2wav_first_chunk_ms, token2wav_chunks). The last event of a row
    is empty and carries the complete timings."""

    text_ids: list[int]
    audio: np.ndarray
    stage_times: dict[str, float]
    row: int = 0


@dataclass
class GenerationConfig:
    """The keyword arguments of ``generate`` / ``stream`` (CONTRACT.md), checked once."""

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
    token2wav_sway_coefficient: float = -1.0
    token2wav_noise: torch.Tensor | None = None
    seed: int | None = None
    first_chunk_codes: int | None = None

    def __post_init__(self):
        for name in ("thinker_max_new_tokens", "talker_max_new_tokens", "token2wav_num_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.first_chunk_codes is not None and self.first_chunk_codes < 1:
            raise ValueError(f"first_chunk_codes must be a positive int or None, got {self.first_chunk_codes}")

    @property
    def thinker_sampling(self) -> SamplingParams:
        return SamplingParams(self.thinker_do_sample, self.thinker_temperature, self.thinker_top_k,
                              self.thinker_top_p, self.thinker_repetition_penalty)

    @property
    def talker_sampling(self) -> SamplingParams:
        return SamplingParams(self.talker_do_sample, self.talker_temperature, self.talker_top_k, self.talker_top_p,
                              self.talker_repetition_penalty)


INPUT_NAMES = ("input_ids", "attention_mask", "input_features", "feature_attention_mask", "pixel_values",
               "image_grid_thw", "pixel_values_videos", "video_grid_thw", "video_second_per_grid")


def split_kwargs(kwargs: dict) -> tuple[dict, GenerationConfig]:
    """Processor outputs vs generation options; an unknown keyword is a TypeError naming it."""
    inputs = {k: kwargs.pop(k) for k in INPUT_NAMES if k in kwargs}
    known = set(GenerationConfig.__dataclass_fields__)
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
    if "input_ids" not in inputs:
        raise TypeError("input_ids is required")
    return inputs, GenerationConfig(**kwargs)


# ------------------------------------------------------------------------------------------------ the engine


class Engine:
    """The two runners of one model, made on first use and kept for later requests."""

    def __init__(self, model: OmniModel, *, max_tokens: int | None = None, memory_fraction: float = 0.35,
                 block_size: int = 16, cuda_graphs: bool = True):
        self.model = model
        weight = model.thinker.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        if max_tokens is None and self.device.type != "cuda":
            max_tokens = 16384
        text = model.config.thinker_config.text_config
        self.thinker = self._runner(model.thinker.model, text.max_position_embeddings, block_size, max_tokens,
                                    memory_fraction, cuda_graphs, prefix_caching=True)
        self.talker = None
        if model.talker is not None:
            talker_cfg = model.config.talker_config
            self.talker = self._runner(model.talker, talker_cfg.max_position_embeddings, block_size, max_tokens,
                                       memory_fraction, cuda_graphs, prefix_caching=False)

    def _runner(self, decoder, max_len, block_size, max_tokens, memory_fraction, cuda_graphs, prefix_caching):
        layers = decoder.paged_attention_layers()
        num_blocks = blocks_for_budget(
            num_layers=len(layers), num_kv_heads=layers[0].num_kv_heads, head_dim=layers[0].head_dim,
            block_size=block_size, dtype=self.dtype, device=self.device, memory_fraction=memory_fraction,
            max_tokens=max_tokens,
        )
        config = RunnerConfig(num_blocks=num_blocks, block_size=block_size, max_model_len=max_len,
                              cuda_graphs=cuda_graphs, enable_prefix_caching=prefix_caching)
        return DecoderRunner(decoder, config, dtype=self.dtype, device=self.device)


def engine_for(model: OmniModel) -> Engine:
    engine = getattr(model, "_engine", None)
    if engine is None:
        engine = Engine(model)
        object.__setattr__(model, "_engine", engine)  # not a submodule
    return engine


# ------------------------------------------------------------------------------------------------ per row


class _Readback:
    """Sampled ids on their way to the host for ``rows``: on CUDA a non-blocking copy into pinned memory and an
    event, read one iteration later, once the GPU has moved on to the next step (no stall, no idle GPU)."""

    def __init__(self, rows: list[_Row], ids: torch.Tensor):
        self.rows = rows
        self.event = None
        if ids.device.type == "cuda":
            self.host = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
            self.host.copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = ids

    def values(self) -> list[int]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


@dataclass
class _Row:
    index: int
    prompt_ids: list[int]
    positions: torch.Tensor  # (3, L) prompt TMRoPE ids
    delta: int  # decode position = cache index + delta
    tseq: SeqBlocks | None = None
    tokens: list[int] = field(default_factory=list)  # read back on the host
    tokens_in_flight: int = 0  # sampled on the device, not read back yet
    thinker_done: bool = False
    # Talker state (audio rows only).
    speak: bool = False
    prompt_hidden: torch.Tensor | None = None  # (L, E)
    prompt_embeds: torch.Tensor | None = None  # (L, E), media positions zeroed
    reply: list[torch.Tensor] = field(default_factory=list)  # reply elements (E,): hidden + embedding
    kseq: SeqBlocks | None = None
    codes: list[int] = field(default_factory=list)
    codes_in_flight: int = 0
    talker_done: bool = False
    error: str | None = None
    # A cache that ran out on a step fed with a token not yet read back: the error stands only if that token
    # does not end the row (a row that finished needs no more room).
    thinker_blocked: str | None = None
    talker_blocked: str | None = None
    streamer: object | None = None

    @property
    def thinker_active(self) -> bool:
        return not self.thinker_done and self.error is None

    @property
    def talker_waiting(self) -> bool:
        return self.speak and self.kseq is None and not self.talker_done and self.error is None

    @property
    def talker_active(self) -> bool:
        return self.speak and self.kseq is not None and not self.talker_done and self.error is None


class _Generation:
    """One request batch through the lockstep loop. ``steps`` yields (new text ids, new codes) per iteration.

    The loop never waits for the GPU to hand over a token: each step feeds the last sampled ids straight from the
    device (``last_token`` / ``last_code``), and their values reach the host one iteration later (:class:`_Readback`)
    for the stop checks. A row whose token turns out to end it has run one step too many: that step's reply element,
    KV entry and sample are dropped (its blocks go back with the row's). With greedy decoding the outputs are exactly
    those of a loop that syncs every step; with sampling the extra step draws from the generator too.
    """

    def __init__(self, model: OmniModel, inputs: dict, cfg: GenerationConfig):
        self.model, self.cfg = model, cfg
        self.config = model.config
        self.thinker_cfg = self.config.thinker_config
        self.talker_cfg = self.config.talker_config
        if cfg.return_audio and (model.talker is None or model.token2wav is None):
            raise ValueError("return_audio=True needs the talker and token2wav: load the model with "
                             "enable_audio_output=True")
        self.speaker = None
        if cfg.return_audio:
            speakers = getattr(model, "speakers", None)
            if not speakers:
                raise ValueError("return_audio=True needs speakers: the checkpoint has no spk_dict.pt")
            if cfg.speaker not in speakers:
                raise ValueError(f"unknown speaker {cfg.speaker!r}; known speakers: {sorted(speakers)}")
            self.speaker = speakers[cfg.speaker]
        self.prompt = prepare_thinker_prompt(self.thinker_cfg, **inputs, use_audio_in_video=cfg.use_audio_in_video)
        self.input_ids = inputs["input_ids"]
        self.engine = engine_for(model)
        self.device = self.engine.device
        self.generator = torch.Generator(device=self.device)
        if cfg.seed is not None:
            self.generator.manual_seed(cfg.seed)
        else:
            self.generator.seed()
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}
        self.rows = self._rows()
        # The last sampled id of every row, on the device: the next step's input, before the host knows it.
        self.last_token = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
        self.last_code = torch.zeros(len(self.rows), dtype=torch.long, device=self.device)
        self.thinker_reads: list[_Readback] = []
        self.talker_reads: list[_Readback] = []
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        # (rows, vocab) masks of the ids each row has seen, for the repetition penalties (kept on the device).
        self.thinker_seen: torch.Tensor | None = None
        self.codec_seen: torch.Tensor | None = None
        self.thinker_stop = set(self._thinker_stop_ids())
        t = self.talker_cfg
        self.codec_stop = {t.tts_codec_end_token_id, t.tts_codec_pad_token_id}
        self.talker_allowed = None
        self.text_end_pad = None
        if model.talker is not None:
            vocab = t.vocab_size
            table = model.token2wav.dit.num_embeds if model.token2wav is not None else vocab
            allowed = torch.arange(vocab) < table
            allowed[list(self.codec_stop)] = True
            allowed[t.tts_codec_start_token_id] = False  # HF suppresses the codec bos
            self.talker_allowed = allowed.to(self.device)
        if cfg.return_audio:
            # Reply elements after the text: the Thinker's embeddings of text-end, then text-pad (made once).
            ids = self._h2d([t.tts_text_end_token_id, t.tts_text_pad_token_id])
            self.text_end_pad = self.model.thinker.model.embed_tokens(ids)

    def mark(self, stage: str) -> None:
        if stage not in self.times:
            self.times[stage] = (time.perf_counter() - self.t0) * 1e3

    def _h2d(self, values: list, dtype: torch.dtype = torch.long) -> torch.Tensor:
        """A small host list on the device without a sync (pinned staging, non-blocking copy)."""
        t = torch.tensor(values, dtype=dtype)
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def _index(self, rows: list[_Row]) -> torch.Tensor:
        """The batch rows of ``rows`` as a device index (made once per distinct set of rows)."""
        key = tuple(r.index for r in rows)
        index = self._indices.get(key)
        if index is None:
            index = self._indices[key] = self._h2d(list(key))
        return index

    def _thinker_stop_ids(self) -> list[int]:
        # The checkpoint's generation_config.json (read by from_pretrained) wins over the config's eos ids.
        ids = getattr(self.model, "eos_token_ids", None)
        return list(ids) if ids is not None else list(self.thinker_cfg.stop_token_ids)

    def _rows(self) -> list[_Row]:
        p = self.prompt
        rows, start = [], 0
        ids = p.ids.cpu()
        for b, n in enumerate(p.seq_lens):
            pos = p.positions[:, start:start + n].cpu()
            rows.append(_Row(index=b, prompt_ids=ids[start:start + n].tolist(), positions=pos,
                             delta=int(pos.max()) + 1 - n, speak=self.cfg.return_audio))
            start += n
        return rows

    # ----------------------------------------------------------------------------------------- thinker

    def _sample_thinker(self, logits: torch.Tensor, rows: list[_Row], index: torch.Tensor) -> None:
        """Samples the next token of ``rows`` on the device and starts its readback."""
        params = self.cfg.thinker_sampling
        seen = None
        if params.repetition_penalty != 1.0:
            if self.thinker_seen is None:  # HF penalises every id of the sequence, the prompt's included
                self.thinker_seen = torch.zeros(len(self.rows), logits.shape[-1], dtype=torch.bool, device=self.device)
                for r in self.rows:
                    mark_seen(self.thinker_seen[r.index:r.index + 1], self._h2d([r.prompt_ids]))
            seen = self.thinker_seen[index]
        ids = sample(logits, params, seen=seen, generator=self.generator)
        if seen is not None:
            self.thinker_seen[index, ids] = True
        self.last_token[index] = ids
        for r in rows:
            r.tokens_in_flight += 1
        self.thinker_reads.append(_Readback(rows, ids))

    def _read_thinker(self, keep: int = 0) -> None:
        """Reads back all but the newest ``keep`` thinker samples: appends them, ends rows at a stop id or at
        ``thinker_max_new_tokens``."""
        while len(self.thinker_reads) > keep:
            read = self.thinker_reads.pop(0)
            for r, tok in zip(read.rows, read.values()):
                r.tokens_in_flight -= 1
                if r.thinker_done:
                    continue  # sampled after the row's end: dropped
                r.tokens.append(tok)
                stop = tok in self.thinker_stop
                if stop or len(r.tokens) >= self.cfg.thinker_max_new_tokens:
                    r.thinker_done = True
                    r.thinker_blocked = None
                    if stop and r.tokens_in_flight and r.reply:
                        r.reply.pop()  # the end of turn was fed one step too many: its element is not a reply
                elif r.thinker_blocked is not None and not r.tokens_in_flight:
                    r.error, r.thinker_done = r.thinker_blocked, True

    def thinker_prefill(self) -> None:
        runner, thinker = self.engine.thinker, self.model.thinker
        p = self.prompt
        live = []
        media_ids = self._media_ids()
        salt = self._media_salt() if any(m is not None for m in (p.audio, p.images, p.videos)) else None
        for r in self.rows:
            media = [i for i, t in enumerate(r.prompt_ids) if t in media_ids]
            try:
                # The talker needs hidden states of every prompt token: no prefix reuse for speaking rows.
                r.tseq = runner.allocate(r.prompt_ids, media_start=media[0] if media else None,
                                         salt=salt if media else None, reuse_prefix=not r.speak)
                live.append(r)
            except (CacheFullError, ValueError) as exc:
                r.error, r.thinker_done = str(exc), True

        embeds = thinker.embed_prompt(p.ids.to(self.device), audio=p.audio, images=p.images, videos=p.videos)
        self.mark("encoders")
        if not live:
            return
        offsets = np.cumsum([0] + p.seq_lens)
        take = torch.cat([torch.arange(offsets[r.index] + r.tseq.num_cached_tokens, offsets[r.index + 1])
                          for r in live]).to(self.device)
        positions = p.positions.to(self.device)
        hidden = runner.prefill([r.tseq for r in live], embeds[take], positions[:, take])
        last = self._h2d(list(np.cumsum([r.tseq.num_tokens - r.tseq.num_cached_tokens for r in live]) - 1))
        self._sample_thinker(thinker.compute_logits(hidden[last]), live, self._index(live))
        self.mark("thinker_prefill")
        if self.cfg.return_audio:
            starts = np.cumsum([0] + [r.tseq.num_tokens for r in live])
            media_tensor = self._h2d(sorted(media_ids))
            for i, r in enumerate(live):
                sl = slice(int(starts[i]), int(starts[i + 1]))
                ids = p.ids[offsets[r.index]:offsets[r.index + 1]].to(self.device)
                r.prompt_hidden = hidden[sl]
                r.prompt_embeds = embeds[offsets[r.index]:offsets[r.index + 1]].masked_fill(
                    torch.isin(ids, media_tensor)[:, None], 0)

    def _media_ids(self) -> set[int]:
        c = self.thinker_cfg
        return {c.audio_token_id, c.image_token_id, c.video_token_id}

    def _media_salt(self) -> bytes:
        # Media placeholders are equal ids for different content: salt the prefix hash with the request's
        # features (a digest of all media of the batch, made once) so prompts share blocks only when the media
        # are equal.
        h = hashlib.blake2b(digest_size=16)
        for media in (self.prompt.audio, self.prompt.images, self.prompt.videos):
            if media is not None:
                h.update(media[0].detach().float().cpu().numpy().tobytes())
                h.update(repr(media[1]).encode())
        return h.digest()

    def _thinker_feedable(self, r: _Row) -> bool:
        return (r.thinker_active and r.thinker_blocked is None
                and len(r.tokens) + r.tokens_in_flight < self.cfg.thinker_max_new_tokens)

    def thinker_step(self) -> None:
        """Feeds each row's last sampled token (from the device), records its reply element, samples the next
        token; then reads back the previous iteration's tokens."""
        rows = [r for r in self.rows if self._thinker_feedable(r)]
        runner, thinker = self.engine.thinker, self.model.thinker
        for i in reversed(runner.reserve_decode([r.tseq for r in rows])):
            r = rows.pop(i)
            message = "KV cache full: the thinker ran out of blocks"
            if r.tokens_in_flight:
                r.thinker_blocked = message  # stands unless the token in flight ends the row
            else:
                r.error, r.thinker_done = message, True
        if rows:
            index = self._index(rows)
            embeds = thinker.model.embed_tokens(self.last_token[index])
            pos = self._h2d([r.tseq.num_tokens - 1 + r.delta for r in rows]).expand(3, -1)
            hidden = runner.decode([r.tseq for r in rows], embeds, pos)
            if self.cfg.return_audio:
                elements = hidden + embeds  # one add for the batch; each row keeps its row
                for i, r in enumerate(rows):
                    r.reply.append(elements[i])
            self._sample_thinker(thinker.compute_logits(hidden), rows, index)
        self._read_thinker(keep=1 if rows else 0)

    # ----------------------------------------------------------------------------------------- talker

    def _sample_codes(self, logits: torch.Tensor, rows: list[_Row], index: torch.Tensor) -> None:
        t = self.talker_cfg
        if self.codec_seen is None:
            # HF's talker input ids: codec mask per prompt position, codec pad, codec bos, then the codes.
            self.codec_seen = torch.zeros(len(self.rows), logits.shape[-1], dtype=torch.bool, device=self.device)
            self.codec_seen[:, [t.tts_codec_mask_token_id, t.tts_codec_pad_token_id, t.tts_codec_start_token_id]] = True
        ids = sample(logits, self.cfg.talker_sampling, seen=self.codec_seen[index], allowed=self.talker_allowed,
                     generator=self.generator)
        self.codec_seen[index, ids] = True
        self.last_code[index] = ids
        for r in rows:
            r.codes_in_flight += 1
        self.talker_reads.append(_Readback(rows, ids))

    def _read_codes(self, keep: int = 0) -> list[tuple[_Row, int]]:
        """Reads back all but the newest ``keep`` talker samples; returns the new codes (stop ids end a row)."""
        new = []
        while len(self.talker_reads) > keep:
            read = self.talker_reads.pop(0)
            for r, c in zip(read.rows, read.values()):
                r.codes_in_flight -= 1
                if r.talker_done:
                    continue
                if c in self.codec_stop:
                    r.talker_done, r.talker_blocked = True, None
                    continue
                r.codes.append(c)
                new.append((r, c))
                if len(r.codes) >= self.cfg.talker_max_new_tokens:
                    r.talker_done, r.talker_blocked = True, None
                elif r.talker_blocked is not None and not r.codes_in_flight:
                    r.error, r.talker_done = r.talker_blocked, True
        return new

    def talker_prefill(self) -> int:
        """Starts the talker of every row whose first reply element is known; returns how many it started."""
        rows = [r for r in self.rows if r.talker_waiting and r.reply and r.tokens]
        # A reply of one token (only the end of turn) has nothing to speak.
        for r in self.rows:
            if r.talker_waiting and r.thinker_done and not r.reply:
                r.talker_done = True
        if not rows:
            return 0
        talker, runner = self.model.talker, self.engine.talker
        bos = self.speaker["bos_token"]
        spk = self.model.thinker.model.embed_tokens(self._h2d([bos]))[0]
        embeds, positions, live = [], [], []
        for r in rows:
            ids = r.prompt_ids + [bos, r.tokens[0]]
            try:
                r.kseq = runner.allocate(ids, reuse_prefix=False)
            except (CacheFullError, ValueError) as exc:
                r.error, r.talker_done = str(exc), True
                continue
            embeds.append(talker.prompt_embeds(r.prompt_embeds, r.prompt_hidden, None, spk, r.reply[0]))
            top = int(r.positions.max())
            extra = torch.tensor([top + 1, top + 2]).expand(3, -1)
            positions.append(torch.cat([r.positions, extra], dim=1))
            live.append(r)
        if not live:
            return 0
        hidden = runner.prefill([r.kseq for r in live], talker.project(torch.cat(embeds)),
                                torch.cat(positions, dim=1).to(self.device))
        last = self._h2d(list(np.cumsum([r.kseq.num_tokens for r in live]) - 1))
        self._sample_codes(talker.logits(hidden[last]), live, self._index(live))
        self.mark("talker_prefill")
        return 1

    def _reply_element(self, r: _Row) -> torch.Tensor | None:
        k = len(r.codes) + r.codes_in_flight  # codes so far = the index of the next talker step
        if k < len(r.reply) and (r.thinker_done or k < len(r.tokens)):
            return r.reply[k]  # an element of a token read back (a later end of turn can only drop later ones)
        if not r.thinker_done:
            return None  # not known yet (cannot happen in lockstep, but be safe)
        return self.text_end_pad[0 if k == len(r.reply) else 1]

    def _talker_feedable(self, r: _Row) -> bool:
        return (r.talker_active and r.talker_blocked is None
                and len(r.codes) + r.codes_in_flight < self.cfg.talker_max_new_tokens)

    def talker_step(self) -> int:
        """Feeds each speaking row's last code (from the device) plus its reply element; returns the number of
        launches (0 when no row could take a step)."""
        rows, elems = [], []
        for r in self.rows:
            if self._talker_feedable(r):
                e = self._reply_element(r)
                if e is not None:
                    rows.append(r)
                    elems.append(e)
        talker, runner = self.model.talker, self.engine.talker
        for i in reversed(runner.reserve_decode([r.kseq for r in rows])):
            r = rows.pop(i)
            elems.pop(i)
            message = "KV cache full: the talker ran out of blocks"
            if r.codes_in_flight:
                r.talker_blocked = message
            else:
                r.error, r.talker_done = message, True
        if not rows:
            return 0
        index = self._index(rows)
        embeds = talker.project(talker.step_embeds(self.last_code[index], torch.stack(elems)))
        pos = self._h2d([r.kseq.num_tokens - 1 + r.delta for r in rows]).expand(3, -1)
        hidden = runner.decode([r.kseq for r in rows], embeds, pos)
        self._sample_codes(talker.logits(hidden), rows, index)
        return 1

    # ----------------------------------------------------------------------------------------- loop

    def steps(self) -> Iterator[tuple[list[tuple[_Row, list[int]]], list[tuple[_Row, int]]]]:
        """Yields (new thinker tokens per row, new codes) once per lockstep iteration, as they are read back."""
        before = {r.index: 0 for r in self.rows}
        self.thinker_prefill()
        while True:
            if any(self._thinker_feedable(r) for r in self.rows) or self.thinker_reads:
                self.thinker_step()
                self.mark("first_token")
            launched = 0
            if self.cfg.return_audio:
                launched = self.talker_step() + self.talker_prefill()
            codes = self._read_codes(keep=launched)
            yield self._new_tokens(before), codes
            if not (self.thinker_reads or self.talker_reads or any(self._thinker_feedable(r) for r in self.rows)
                    or any(r.talker_active or (r.talker_waiting and (r.reply or r.thinker_done))
                           for r in self.rows)):
                break

    def _new_tokens(self, before: dict[int, int]) -> list[tuple[_Row, list[int]]]:
        out = []
        for r in self.rows:
            if len(r.tokens) > before[r.index]:
                out.append((r, r.tokens[before[r.index]:]))
                before[r.index] = len(r.tokens)
        return out

    def release(self) -> None:
        for r in self.rows:
            if r.tseq is not None:
                self.engine.thinker.free(r.tseq)
            if r.kseq is not None:
                self.engine.talker.free(r.kseq)

    # ----------------------------------------------------------------------------------------- outputs

    def sequences(self) -> torch.Tensor:
        ids = self.input_ids.cpu().long()
        n = max((len(r.tokens) for r in self.rows), default=0)
        pad = getattr(self.thinker_cfg.text_config, "pad_token_id", None)
        if pad is None:
            pad = next(iter(sorted(self.thinker_stop)), 0)
        out = torch.full((ids.shape[0], n), pad, dtype=torch.long)
        for r in self.rows:
            out[r.index, :len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
        return torch.cat([ids, out], dim=1).to(self.input_ids.device)

    def noise(self) -> torch.Tensor | None:
        """The token2wav initial noise: the user's, or HF's CPU draw from ``seed`` (None: Token2Wav draws)."""
        if self.cfg.token2wav_noise is not None:
            return self.cfg.token2wav_noise
        if self.cfg.seed is None:
            return None
        gen = torch.Generator().manual_seed(self.cfg.seed)
        return torch.randn([1, 30000, self.model.token2wav.dit.cfg.mel_dim], generator=gen)

    def speaker_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.speaker["cond"].float().reshape(1, -1)
        ref = self.speaker["ref_mel"].float()
        return cond, ref.reshape(1, *ref.shape[-2:])


def generate(model: OmniModel, **kwargs) -> GenerateOutput:
    inputs, cfg = split_kwargs(kwargs)
    with use_backend(model.backend), torch.inference_mode():
        gen = _Generation(model, inputs, cfg)
        try:
            for _ in gen.steps():
                pass
        finally:
            gen.release()
        codes = audio = None
        if cfg.return_audio:
            codes = [torch.tensor(r.codes, dtype=torch.long) for r in gen.rows]
            audio = []
            cond, ref = gen.speaker_tensors()
            noise = gen.noise()
            for r in gen.rows:
                if not r.codes:
                    audio.append(np.zeros(0, dtype=np.float32))
                    continue
                wav = model.token2wav(
                    torch.tensor([r.codes]), cond, ref, noise,
                    num_steps=cfg.token2wav_num_steps, guidance_scale=cfg.token2wav_guidance_scale,
                    sway_coefficient=cfg.token2wav_sway_coefficient,
                )
                audio.append(wav[0].float().cpu().numpy())
        errors = [r.error for r in gen.rows]
        if len(gen.rows) == 1 and errors[0] is not None:
            raise CacheFullError(errors[0]) if "KV cache" in errors[0] else ValueError(errors[0])
        return GenerateOutput(sequences=gen.sequences(), codes=codes, audio=audio, errors=errors)


def stream(model: OmniModel, **kwargs) -> Iterator[StreamEvent]:
    from omni_model.streaming import Token2WavStreamer

    inputs, cfg = split_kwargs(kwargs)
    with use_backend(model.backend), torch.inference_mode():
        gen = _Generation(model, inputs, cfg)
        try:
            if cfg.return_audio:
                cond, ref = gen.speaker_tensors()
                noise = gen.noise()
                for r in gen.rows:
                    r.streamer = Token2WavStreamer(
                        model.token2wav, cond, ref, noise, num_steps=cfg.token2wav_num_steps,
                        guidance_scale=cfg.token2wav_guidance_scale,
                        sway_coefficient=cfg.token2wav_sway_coefficient, first_chunk_codes=cfg.first_chunk_codes,
                    )
            empty = np.zeros(0, dtype=np.float32)
            t2w_times: dict[int, dict[str, float]] = {r.index: {} for r in gen.rows}

            def times(row: int) -> dict[str, float]:
                return {**gen.times, **t2w_times[row]}

            for tokens, codes in gen.steps():
                by_row: dict[int, list[int]] = {}
                for r, c in codes:
                    by_row.setdefault(r.index, []).append(c)
                for r, ids in tokens:
                    yield StreamEvent(text_ids=ids, audio=empty, stage_times=times(r.index), row=r.index)
                for r in gen.rows:
                    if r.streamer is None:
                        continue
                    chunks = r.streamer.push(by_row.get(r.index, []))
                    if r.talker_done or r.error is not None:
                        chunks += r.streamer.finish()
                    t2w_times[r.index] = r.streamer.stage_times
                    if r.talker_done or r.error is not None:
                        r.streamer = None
                    for chunk in chunks:
                        gen.mark("first_audio")
                        yield StreamEvent(text_ids=[], audio=chunk, stage_times=times(r.index), row=r.index)
            gen.mark("done")
            for r in gen.rows:  # a last, empty event per row carries the complete timings
                yield StreamEvent(text_ids=[], audio=empty, stage_times=times(r.index), row=r.index)
        finally:
            for r in gen.rows:  # a stream closed early: no chunk may still be running on Token2Wav's stream
                if r.streamer is not None:
                    r.streamer.close()
            gen.release()
