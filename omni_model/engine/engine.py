"""``OmniEngine``: many spoken conversations at once (vLLM's ``LLMEngine`` shape: ``add_request`` / ``step``).

One :meth:`OmniEngine.step` (``docs/engine.md`` has the picture):

1. take the requests added and aborted since the last step (aborted ones give back every block now);
2. schedule (:class:`~omni_model.engine.scheduler.Scheduler`): per decoder its decodes, then prefill chunks under
   ``max_num_batched_tokens``; admissions, Talker starts, preemptions;
3. launch the Thinker's work (encoders once per media item, a decode batch from CUDA graphs, a prefill batch of
   chunks), then the Talker's, each ending in one sampling call over its rows with every row's own settings, and
   the start of the copy of the sampled ids to the host (:mod:`~omni_model.engine.readback`). A decode step makes
   no host read of device data;
4. read back the previous step's ids: append tokens and codes, end replies at their stop ids, free the caches a
   request no longer needs;
5. Token2Wav: push the new codes into each speaking request's utterance; the chunks that became ready, across all
   requests, run as one batch (:class:`~omni_model.streaming.Token2WavRunner`, on its own CUDA stream);
6. one :class:`~omni_model.engine.request.RequestOutput` per request with news.

A request that fails (its encoders, its Token2Wav, an utterance longer than its noise) fails alone with its error in
its output; a failure of a whole batched decoder step fails the requests of that step; the engine goes on.
``add_request`` and ``abort_request`` may be called from any thread while one thread steps.
"""

from __future__ import annotations

import collections
import secrets
import threading
import uuid
from collections.abc import Callable

import torch

from omni_model.engine.config import CPU_KV_CACHE_TOKENS, EngineConfig
from omni_model.engine.kv_cache import bytes_per_token
from omni_model.engine.readback import Readback
from omni_model.engine.request import Request, RequestOutput, Status
from omni_model.engine.runner import DecoderRunner, RunnerConfig, to_device
from omni_model.engine.scheduler import Scheduler, StepPlan
from omni_model.engine.talker_inputs import chunk_inputs as talker_chunk_inputs
from omni_model.engine.talker_inputs import prompt_inputs, reply_element, step_inputs
from omni_model.engine.thinker_inputs import chunk_inputs as thinker_chunk_inputs
from omni_model.engine.thinker_inputs import encode_media
from omni_model.inputs import OPTION_NAMES, GenerationConfig, ThinkerPrompt, media_items, prepare_thinker_prompt
from omni_model.layers.backend import use_backend
from omni_model.layers.sampler import (
    TALKER_STREAM,
    THINKER_STREAM,
    SamplingRows,
    counter_uniforms,
    mark_seen,
    sample,
)
from omni_model.models.token2wav import HF_NOISE_FRAMES
from omni_model.streaming import Token2WavRunner, Utterance


class RequestTooLarge(ValueError):
    """A request whose prompt and longest reply cannot fit a decoder's KV cache even alone."""


class OmniEngine:
    """Continuous batching of the Thinker, the Talker and Token2Wav for one :class:`~omni_model.model.OmniModel`.

    Caches are allocated and the decode CUDA graphs captured here, when the engine starts.
    """

    def __init__(self, model, config: EngineConfig | None = None, *, lock: threading.RLock | None = None):
        self.model = model
        self.config = config = config or EngineConfig()
        weight = model.thinker.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.lock = lock or threading.RLock()
        cfg = model.config
        text = cfg.thinker_config.text_config
        speaks = model.talker is not None and model.token2wav is not None
        tokens = self._cache_tokens(speaks)
        blocks = max(1, tokens // config.block_size)

        def runner(decoder, max_len: int, store_hidden: bool) -> DecoderRunner:
            rc = RunnerConfig(num_blocks=blocks, block_size=config.block_size, max_model_len=max_len,
                              max_batch=config.max_num_seqs, cuda_graphs=config.cuda_graphs,
                              enable_prefix_caching=config.enable_prefix_caching,
                              graph_batch_sizes=config.cuda_graph_batch_sizes, store_hidden=store_hidden)
            return DecoderRunner(decoder, rc, dtype=self.dtype, device=self.device)

        self.thinker = runner(model.thinker.model, text.max_position_embeddings, speaks)
        self.talker = runner(model.talker, cfg.talker_config.max_position_embeddings, False) if speaks else None
        self.scheduler = Scheduler(config, self.thinker, self.talker)
        self.token2wav = Token2WavRunner(model.token2wav, cuda_graphs=config.cuda_graphs) if speaks else None

        slots, dev = config.max_num_seqs, self.device
        # Per-slot device state: the last sampled id (the next decode input) and the ids seen so far (penalties).
        self.last_token = torch.zeros(slots, dtype=torch.long, device=dev)
        self.thinker_seen = torch.zeros(slots, text.vocab_size, dtype=torch.bool, device=dev)
        # The checkpoint's generation_config.json (read by from_pretrained) wins over the config's eos ids.
        eos = model.eos_token_ids if model.eos_token_ids is not None else cfg.thinker_config.stop_token_ids
        self.stop_ids = set(eos)
        self.media_ids = {cfg.thinker_config.audio_token_id, cfg.thinker_config.image_token_id,
                          cfg.thinker_config.video_token_id}
        if speaks:
            t = cfg.talker_config
            self.last_code = torch.zeros(slots, dtype=torch.long, device=dev)
            self.codec_seen = torch.zeros(slots, t.vocab_size, dtype=torch.bool, device=dev)
            self.codec_stop = set(t.stop_token_ids)
            allowed = torch.arange(t.vocab_size) < model.token2wav.dit.num_embeds  # codes the DiT's table has
            allowed[list(self.codec_stop)] = True
            allowed[t.tts_codec_start_token_id] = False  # HF suppresses the codec bos
            self.talker_allowed = allowed.to(dev)
            with torch.inference_mode():
                # Reply elements after the text: the Thinker's embeddings of text-end, then text-pad.
                ids = to_device([t.tts_text_end_token_id, t.tts_text_pad_token_id], dev)
                self.text_end_pad = model.thinker.model.embed_tokens(ids)

        self._requests: dict[str, Request] = {}
        self._draining: list[Request] = []
        self._inbox: collections.deque[Request] = collections.deque()
        self._aborts: set[str] = set()
        self._ids_lock = threading.Lock()
        self._reads: list[Readback] = []
        self._step = 0
        with use_backend(model.backend), torch.inference_mode():
            self.thinker.capture_graphs(text.hidden_size)
            if self.talker is not None:
                self.talker.capture_graphs(cfg.talker_config.hidden_size)

    def _cache_tokens(self, speaks: bool) -> int:
        """Tokens each decoder's cache holds (both hold the same number; see EngineConfig)."""
        if self.config.kv_cache_tokens is not None:
            return self.config.kv_cache_tokens
        if self.device.type != "cuda":
            return CPU_KV_CACHE_TOKENS
        per_token = 0
        for decoder, hidden in ((self.model.thinker.model, speaks), (self.model.talker if speaks else None, False)):
            if decoder is None:
                continue
            layers = decoder.paged_attention_layers()
            per_token += bytes_per_token(len(layers), layers[0].num_kv_heads, layers[0].head_dim, self.dtype,
                                         decoder.hidden_size if hidden else 0)
        free, _ = torch.cuda.mem_get_info(self.device)
        tokens = int(free * self.config.kv_cache_memory_fraction) // per_token
        if tokens < self.config.block_size:
            raise RuntimeError(f"no room for the KV caches: {free / 2**30:.1f} GiB free, one token needs "
                               f"{per_token} bytes; lower max_num_seqs or pass kv_cache_tokens")
        return tokens

    # ----------------------------------------------------------------------------------------------- requests

    def add_request(self, inputs: dict, *, request_id: str | None = None,
                    sink: Callable[[RequestOutput], None] | None = None, **options) -> str:
        """Checks one conversation (the processor's outputs, batch 1) and its options (the keyword arguments of
        ``generate``) and queues it; returns its id. Bad input is a ValueError (an unknown option a TypeError) naming
        the argument, raised before anything is queued or allocated. ``sink``: called with each of this request's
        outputs by the thread that steps (they are also returned by :meth:`step`)."""
        unknown = sorted(set(options) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"unexpected keyword arguments: {', '.join(unknown)}")
        if not isinstance(inputs, dict) or "input_ids" not in inputs:
            raise ValueError("inputs must be a dict of processor outputs with input_ids")
        cfg = GenerationConfig(**options)
        prompt = prepare_thinker_prompt(self.model.config.thinker_config, **inputs,
                                        use_audio_in_video=cfg.use_audio_in_video)
        if len(prompt.seq_lens) != 1:
            raise ValueError(f"input_ids must hold one conversation (batch 1), got {len(prompt.seq_lens)} rows")
        return self.add_prompt(prompt, cfg, request_id=request_id, sink=sink)

    def add_prompt(self, prompt: ThinkerPrompt, options: GenerationConfig, *, request_id: str | None = None,
                   sink: Callable[[RequestOutput], None] | None = None) -> str:
        """:meth:`add_request` for a prompt row already checked by ``prepare_thinker_prompt``."""
        self._check_fits(prompt.seq_lens[0], options)
        if options.return_audio:
            self._check_speaker(options)
        seed = options.seed if options.seed is not None else secrets.randbits(63)
        media = media_items(self.model.config.thinker_config, prompt, use_audio_in_video=options.use_audio_in_video,
                            digests=self.config.enable_prefix_caching)
        with self._ids_lock:
            if request_id is None:
                request_id = uuid.uuid4().hex
            elif not isinstance(request_id, str) or not request_id:
                raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
            if request_id in self._requests:
                raise ValueError(f"request_id {request_id!r} is already in use by an unfinished request")
            req = Request(request_id, prompt, options, seed=seed, media=media, block_size=self.config.block_size,
                          hashed=self.config.enable_prefix_caching, sink=sink)
            self._requests[request_id] = req
            self._inbox.append(req)
        return request_id

    def _check_fits(self, length: int, options: GenerationConfig) -> None:
        """A request must fit the caches alone, reply included: else no preemption could ever let it finish."""
        checks = [("thinker", self.thinker, length + options.thinker_max_new_tokens, "thinker_max_new_tokens",
                   options.thinker_max_new_tokens)]
        if options.return_audio and self.talker is not None:
            checks.append(("talker", self.talker, length + 2 + options.talker_max_new_tokens, "talker_max_new_tokens",
                           options.talker_max_new_tokens))
        for name, runner, need, option, value in checks:
            capacity = min(runner.config.max_model_len, runner.config.num_blocks * runner.config.block_size)
            if need > capacity:
                raise RequestTooLarge(f"the prompt of {length} tokens plus {option}={value} needs {need} positions in "
                                      f"the {name}'s KV cache, which holds {capacity}: shorten the prompt, lower "
                                      f"{option} or give the engine a larger cache (EngineConfig.kv_cache_tokens)")

    def _check_speaker(self, options: GenerationConfig) -> None:
        model = self.model
        if self.talker is None:
            raise ValueError("return_audio=True needs the talker and token2wav: load the model with "
                             "enable_audio_output=True")
        if not model.speakers:
            raise ValueError("return_audio=True needs speakers: the checkpoint has no spk_dict.pt")
        if options.speaker not in model.speakers:
            raise ValueError(f"unknown speaker {options.speaker!r}; known speakers: {sorted(model.speakers)}")
        noise = options.token2wav_noise
        mel = model.token2wav.dit.cfg.mel_dim
        if noise is not None and noise.shape[2] != mel:
            raise ValueError(f"token2wav_noise must have shape (1, frames, {mel}), got {tuple(noise.shape)}")

    def abort_request(self, request_id: str) -> None:
        """Stops a request (a closed stream, a gone client); its blocks are free at the next step, or now when no
        step is running. Unknown or finished ids are ignored. Never blocks."""
        with self._ids_lock:
            self._aborts.add(request_id)
        if self.lock.acquire(blocking=False):
            try:
                self._apply_aborts()
            finally:
                self.lock.release()

    def reset_prefix_cache(self) -> bool:
        """Empties both decoders' prefix caches; only between requests (returns False, changing nothing, while any
        request is unfinished)."""
        with self.lock:
            if self._requests:
                return False
            done = self.thinker.blocks.reset_prefix_cache()
            return (self.talker is None or self.talker.blocks.reset_prefix_cache()) and done

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def stats(self) -> dict:
        """Request counts, free and total blocks per decoder (evictable cached blocks count as free), the prefix
        cache's hits (prompt tokens served) and the preemptions so far."""
        s = self.scheduler
        out = {
            "running": len(s.running),
            "waiting": len(s.waiting) + len(self._inbox),
            "draining": len(self._draining),
            "thinker_free_blocks": self.thinker.blocks.num_free_blocks,
            "thinker_total_blocks": self.thinker.blocks.num_blocks,
            "talker_free_blocks": 0 if self.talker is None else self.talker.blocks.num_free_blocks,
            "talker_total_blocks": 0 if self.talker is None else self.talker.blocks.num_blocks,
            "block_size": self.config.block_size,
            "prefix_cache_hit_tokens": s.prefix_hit_tokens,
            "num_preemptions": s.num_preemptions,
        }
        return out

    # ----------------------------------------------------------------------------------------------- one step

    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns the outputs of the requests that made progress, finished or failed."""
        with self.lock, use_backend(self.model.backend), torch.inference_mode():
            self._step += 1
            self._take_inbox()
            self._apply_aborts()
            plan = self.scheduler.schedule()
            self._launch(plan)
            self._read_back()
            self._settle()
            if self.token2wav is not None:
                self._run_token2wav()
            return self._outputs()

    def _take_inbox(self) -> None:
        while self._inbox:
            self.scheduler.waiting.append(self._inbox.popleft())

    def _apply_aborts(self) -> None:
        with self._ids_lock:
            ids, self._aborts = self._aborts, set()
        for request_id in ids:
            req = self._requests.get(request_id)
            if req is None or req.status is Status.FINISHED:
                continue
            if req in self._inbox:
                self._inbox.remove(req)
            self._end(req, "abort", None)  # its last output goes out with the next step

    def _launch(self, plan: StepPlan) -> None:
        for req in plan.admitted:
            self._init_slot(req)
        for run, work in ((self._run_thinker, plan.thinker_decodes or plan.thinker_chunks),
                          (self._run_talker, plan.talker_decodes or plan.talker_chunks or plan.talker_starts)):
            if not work:
                continue
            try:
                run(plan)
            except Exception as exc:  # a batched step cannot say which request broke it: its requests fail
                involved = {id(r): r for r in (plan.thinker_decodes + plan.talker_decodes + plan.talker_starts
                                                + [c[0] for c in plan.thinker_chunks + plan.talker_chunks])}
                for req in involved.values():
                    self._fail(req, f"{type(exc).__name__}: {exc}")

    def _init_slot(self, req: Request) -> None:
        """The device state of a (re)admitted request's slot: its seen ids, and the last sample a resumed track
        decodes from."""
        slot, dev = req.slot, self.device
        if req.options.thinker_repetition_penalty != 1.0:
            self.thinker_seen[slot] = False
            mark_seen(self.thinker_seen[slot:slot + 1], to_device([req.prompt_ids + req.thinker.samples], dev))
        if req.thinker.samples:
            self.last_token[slot] = to_device(req.thinker.samples[-1:], dev)[0]
        if self.talker is not None and req.speak:
            t = self.model.config.talker_config
            self.codec_seen[slot] = False
            seen = [t.tts_codec_mask_token_id, t.tts_codec_pad_token_id, t.tts_codec_start_token_id]
            mark_seen(self.codec_seen[slot:slot + 1], to_device([seen + req.talker.samples], dev))
            if req.talker.samples:
                self.last_code[slot] = to_device(req.talker.samples[-1:], dev)[0]

    # ----------------------------------------------------------------------------------------------- thinker

    def _run_thinker(self, plan: StepPlan) -> None:
        thinker, dev = self.model.thinker, self.device
        decodes, embeds = plan.thinker_decodes, None
        if decodes:
            embeds = thinker.model.embed_tokens(self.last_token[to_device([r.slot for r in decodes], dev)])
        chunks = []
        for r, start, n in plan.thinker_chunks:
            try:
                if encode_media(thinker, r, start, dev):
                    r.mark("encoders")
            except Exception as exc:  # this request's media broke its encoder: it fails alone
                self._fail(r, f"encoder failed: {type(exc).__name__}: {exc}")
                continue
            chunks.append((r, start, n))
        chunk_embeds = None
        if chunks:
            chunk_embeds = torch.cat([thinker_chunk_inputs(thinker, r, a, n, dev) for r, a, n in chunks])

        def reply_elements(hidden: torch.Tensor) -> None:
            elements = hidden + embeds if any(r.speak for r in decodes) else None  # one add for the batch
            for i, r in enumerate(decodes):
                if r.speak and len(r.reply) == r.thinker.computed - r.num_prompt_tokens:
                    r.reply.append(elements[i])  # the Talker's input for the token just fed

        self._run_decoder(False, decodes, embeds, chunks, chunk_embeds, thinker.compute_logits, reply_elements)

    def _register(self, req: Request, talker: bool = False) -> None:
        """Offers a decoder's newly complete blocks (computed, their tokens known) to the prefix cache: the
        Thinker's prompt and reply blocks, the Talker's prompt blocks (its later positions hold codes)."""
        track, runner = (req.talker, self.talker) if talker else (req.thinker, self.thinker)
        if not req.hashed or track.seq is None:
            return
        known = req.num_prompt_tokens + (0 if talker else len(req.thinker.samples))
        full = min(track.computed, known, len(req.hashes) * req.block_size) // req.block_size
        for i in range(track.registered, full):
            runner.blocks.register(track.seq, i, req.hashes[i])
        track.registered = max(track.registered, full)

    # ----------------------------------------------------------------------------------------------- talker

    def _run_talker(self, plan: StepPlan) -> None:
        talker, dev = self.model.talker, self.device
        for r in plan.talker_starts:
            spk = self.model.speakers[r.options.speaker]
            r.talker_prompt = prompt_inputs(self.model.thinker, talker, r, self.thinker, spk["bos_token"],
                                            self.media_ids)
            r.utterance = self._utterance(r)
        decodes, embeds = plan.talker_decodes, None
        if decodes:
            elements = [reply_element(r, r.talker.drawn, self.text_end_pad) for r in decodes]
            embeds = step_inputs(talker, self.last_code[to_device([r.slot for r in decodes], dev)], elements)
        chunks, chunk_embeds = plan.talker_chunks, None
        if chunks:
            pad = self.text_end_pad
            chunk_embeds = torch.cat([talker_chunk_inputs(talker, r, a, n, pad, dev) for r, a, n in chunks])
        self._run_decoder(True, decodes, embeds, chunks, chunk_embeds, talker.logits)

    def _run_decoder(self, talker: bool, decodes: list[Request], embeds: torch.Tensor | None,
                     chunks: list[tuple[Request, int, int]], chunk_embeds: torch.Tensor | None, logits,
                     on_decode=None) -> None:
        """One decoder's work of the step: the decode batch, then the prefill chunks (their KV, and for those that
        reach their end the first sample), then one sampling call over every row that draws."""
        runner, dev = self.talker if talker else self.thinker, self.device
        track = (lambda r: r.talker) if talker else (lambda r: r.thinker)
        last_hidden, rows = [], []
        if decodes:
            positions = to_device([track(r).computed + r.delta for r in decodes], dev).expand(3, -1)
            hidden = runner.decode([track(r).seq for r in decodes], embeds, positions)
            if on_decode is not None:
                on_decode(hidden)
            for r in decodes:
                t = track(r)
                t.computed += 1
                t.target = t.computed
            last_hidden.append(hidden)
            rows += decodes
        if chunks:
            positions = to_device(torch.cat([r.positions_of(a, a + n) for r, a, n in chunks], dim=1), dev)
            hidden = runner.prefill([track(r).seq for r, _, _ in chunks], chunk_embeds, positions,
                                    [a for _, a, _ in chunks], [n for _, _, n in chunks])
            ends, offset = [], 0
            for r, _, n in chunks:
                offset += n
                t = track(r)
                t.computed += n
                self._register(r, talker=talker)
                if t.computed == t.target and t.sample_at_target:
                    t.sample_at_target = False
                    ends.append(offset - 1)
                    rows.append(r)
                    r.mark("talker_prefill" if talker else "thinker_prefill")
            if ends:
                last_hidden.append(hidden[to_device(ends, dev)])
        if rows:
            self._sample(rows, logits(torch.cat(last_hidden)), talker=talker)

    def _utterance(self, req: Request) -> Utterance:
        o = req.options
        spk = self.model.speakers[o.speaker]
        noise = o.token2wav_noise
        if noise is None:  # HF's CPU draw of 30000 frames, from the request's seed
            mel = self.model.token2wav.dit.cfg.mel_dim
            noise = torch.randn([1, HF_NOISE_FRAMES, mel], generator=torch.Generator().manual_seed(req.seed))
        ref = spk["ref_mel"].float()
        return Utterance(self.model.token2wav, spk["cond"].float().reshape(1, -1), ref.reshape(1, *ref.shape[-2:]),
                         noise, num_steps=o.token2wav_num_steps, guidance_scale=o.token2wav_guidance_scale,
                         sway_coefficient=o.token2wav_sway_coefficient, first_chunk_codes=o.first_chunk_codes,
                         chunked=o.stream_audio)

    # ----------------------------------------------------------------------------------------------- sampling

    def _sample(self, rows: list[Request], logits: torch.Tensor, *, talker: bool) -> None:
        """Draws the next id of every row with its own settings and counter-based uniform, on the device; the ids
        become the rows' next decode input and start their way to the host."""
        tracks = [r.talker if talker else r.thinker for r in rows]
        params = [r.options.talker_sampling if talker else r.options.thinker_sampling for r in rows]
        uniforms = counter_uniforms([r.seed for r in rows], [t.drawn for t in tracks],
                                    TALKER_STREAM if talker else THINKER_STREAM)
        batch = SamplingRows.build(params, uniforms.tolist(), logits.shape[-1], self.device)
        index = to_device([r.slot for r in rows], self.device)
        seen_all = self.codec_seen if talker else self.thinker_seen
        seen = seen_all[index] if batch.any_penalty else None
        ids = sample(logits, batch, seen=seen, allowed=self.talker_allowed if talker else None)
        if batch.any_penalty:
            seen_all[index, ids] = True
        (self.last_code if talker else self.last_token)[index] = ids
        for t in tracks:
            t.in_flight += 1
        self._reads.append(Readback([(r, talker) for r in rows], ids, self._step))

    # ----------------------------------------------------------------------------------------------- read back

    def _read_back(self) -> None:
        """Reads every sample of earlier steps (this step's stay in flight: the GPU is still making them)."""
        keep = [rb for rb in self._reads if rb.step == self._step]
        for rb in self._reads:
            if rb.step == self._step:
                continue
            for (req, talker), value in zip(rb.rows, rb.values()):
                if talker:
                    self._take_code(req, value)
                else:
                    self._take_token(req, value)
        self._reads = keep

    def _take_token(self, req: Request, token: int) -> None:
        t = req.thinker
        t.in_flight -= 1
        if t.done or req.status is Status.FINISHED:
            return  # drawn after the reply ended: dropped
        t.samples.append(token)
        req.new_text.append(token)
        req.changed = True
        req.mark("first_token")
        stop = token in self.stop_ids
        if stop or len(t.samples) >= req.options.thinker_max_new_tokens:
            t.done = True
            req.finish_reason = "stop" if stop else "length"
            if stop and req.speak and len(req.reply) == len(t.samples):
                req.reply.pop()  # the end of turn was fed one step too many: its element is no reply element
        req.extend_hashes()
        self._register(req)

    def _take_code(self, req: Request, code: int) -> None:
        k = req.talker
        k.in_flight -= 1
        if k.done or req.status is Status.FINISHED:
            return
        if code in self.codec_stop:
            k.done = True
            return
        k.samples.append(code)
        req.new_codes.append(code)
        req.changed = True
        try:
            req.utterance.push([code])
        except (ValueError, TypeError) as exc:  # e.g. an utterance longer than its noise tensor
            self._fail(req, str(exc))
            return
        if len(k.samples) >= req.options.talker_max_new_tokens:
            k.done = True

    def _settle(self) -> None:
        """Frees the caches requests no longer need; requests whose decoders are done leave the running set."""
        for req in list(self.scheduler.running):
            if req.speak and req.thinker.done and not req.reply and req.talker_prompt is None:
                req.talker.done = True  # a reply of only its end: nothing to speak
            if not req.needs_thinker_cache:
                self.scheduler.free_thinker(req)
            if req.decoders_done and not req.thinker.in_flight and not req.talker.in_flight:
                self.scheduler.release(req)
                if req.utterance is None:
                    self._end(req, req.finish_reason or "stop", None)
                else:
                    req.status = Status.DRAINING
                    self._draining.append(req)

    # ----------------------------------------------------------------------------------------------- token2wav

    def _run_token2wav(self) -> None:
        speaking = [r for r in self.scheduler.running + self._draining
                    if r.utterance is not None and r.status is not Status.FINISHED]
        jobs, owners = [], []
        for r in speaking:
            new = r.utterance.ready(final=r.talker.done)
            jobs += new
            owners += [r] * len(new)
        if jobs:
            tails = {id(r): r.utterance.mel_tail for r in speaking}
            try:
                self.token2wav.run(jobs)
            except Exception:  # find whose chunk broke the batch: each request's chunks alone
                for r in dict.fromkeys(owners):
                    r.utterance.mel_tail = tails[id(r)]
                    try:
                        self.token2wav.run([j for j, o in zip(jobs, owners) if o is r])
                    except Exception as exc:
                        self._fail(r, f"token2wav failed: {type(exc).__name__}: {exc}")
        for r in speaking:
            if r.status is Status.FINISHED:
                continue
            audio = r.utterance.collect()
            if audio:
                r.new_audio += audio
                r.changed = True
                r.mark("first_audio")
            if r.status is Status.DRAINING and r.utterance.finished and not r.utterance.in_flight:
                self._draining.remove(r)
                self._end(r, r.finish_reason or "stop", None)

    # ----------------------------------------------------------------------------------------------- endings

    def _fail(self, req: Request, error: str) -> None:
        if req.status is not Status.FINISHED:
            self._end(req, "error", error)

    def _end(self, req: Request, reason: str, error: str | None) -> None:
        """Finishes a request: every block and its slot go back, its audio in flight is dropped if it failed."""
        if req.status in (Status.RUNNING, Status.WAITING):
            self.scheduler.release(req)
            if req in self.scheduler.waiting:
                self.scheduler.waiting.remove(req)
        if req in self._draining:
            self._draining.remove(req)
        if req.utterance is not None and reason in ("abort", "error"):
            req.utterance.close()
        req.status = Status.FINISHED
        req.finish_reason = reason
        req.error = error
        req.mark("done")
        req.changed = True

    def _emit(self, req: Request) -> RequestOutput:
        extra = req.utterance.stage_times if req.utterance is not None else {}
        out = req.take_output(extra)
        if req.status is Status.FINISHED:
            with self._ids_lock:
                self._requests.pop(req.request_id, None)
        if req.sink is not None:
            req.sink(out)
        return out

    def _outputs(self) -> list[RequestOutput]:
        with self._ids_lock:  # add_request may insert from another thread meanwhile
            changed = [r for r in self._requests.values() if r.changed]
        return [self._emit(r) for r in changed]
