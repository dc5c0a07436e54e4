"""Serving: many spoken conversations at once through the engine, against HF ``generate`` one request at a time.

Cases, with random weights at the preset's shapes (7B: bf16; CPU: the tiny preset in fp32) and the same weights in
HF's model, in the same process:

* ``poisson N=.. rate=..``: N requests arriving as a Poisson process (``rate`` per second, a seeded draw), the
  prompts a mix of a text question, a spoken question and an image question (``mix``), every answer spoken (greedy
  Talker, the reply capped at ``thinker_tokens`` text ids and ``talker_codes`` codes).

  - ``omni-engine``: requests are added to ``model.engine`` at their arrival times while one loop steps it. Per
    request: TTFT (arrival to its first text id on the host), TTFA (arrival to its first samples), RTF (arrival to
    its last samples, over the seconds of audio it got). ``ms_p20/p50/p80`` are TTFA quantiles (``metric``);
    extra fields ``ttft_p50_ms``, ``ttft_p99_ms``, ``ttfa_p50_ms``, ``ttfa_p99_ms``, ``rtf_p50``, ``rtf_max``,
    ``text_tokens_per_s`` and ``audio_s_per_s`` (totals over the makespan), ``ttfa_ms`` (every request's).
  - ``hf-generate``: HF's ``generate`` serves the same requests one after another (first come, first served; a
    request waits for the one before it). HF returns text and audio at the end, so its TTFT and TTFA are the
    request's whole latency. Each request is timed once; the queue is computed from those times and the arrivals
    (the process does not sleep through the arrivals). At 7B it serves the first 8 requests only (``served``): a
    reply takes it about 20 s, and a longer queue only grows its latencies further.
  - ``omni-http`` (``--url``): the same load shape sent to a running ``omni serve`` by its streaming HTTP API,
    measured as a client sees it (``benchmarks/serving_client.py``; its own questions of the same kinds).

* ``burst N``: N requests that arrive together (``omni-engine-burst``) against the same N run one after another
  through the engine (``omni-engine-sequential``), the prefix cache emptied before each run; ``speedup`` is the
  ratio of the makespans (``ms_p50`` is the makespan), ``audio_s`` the audio of either run (checked equal); the
  burst record also has the TTFA / RTF fields of its N concurrent streams (the GPU target: 32 streams).

* ``host running=1|8|64``: the engine's host time per step with that many running requests and the models'
  forward passes replaced by no-ops (the decoders return zeros; Token2Wav does nothing), so what is timed is the
  scheduling, the metadata, the sampling launches and the bookkeeping. ``us_per_request`` (the step time over the
  running requests) shows what a request adds to a step.

``omni bench --suite e2e`` runs the quick CPU set; ``python benchmarks/bench_serving.py --json F`` writes the
records and a plot of the TTFA distributions beside them (``F`` stem + ``_ttfa.png``, needs matplotlib).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omni_benchmarks.bench_pipeline import CPU as PIPELINE_PLAN
from omni_benchmarks.bench_pipeline import (
    build_hf,
    hf_generate_once,
    release,
    spoken_question_inputs,
    to_device,
)
from omni_benchmarks.bench_thinker import error_text, short_name
from omni_kernels.testing import Record, make_record, quantiles, write_records
from omni_model.config import SAMPLE_RATE, OmniConfig
from omni_model.engine.config import EngineConfig
from omni_model.engine.runner import DecoderRunner
from omni_model.model import OmniModel
from omni_model.processor import image_patches
from omni_model.streaming import Token2WavRunner

BENCH = "serving"
SEED = 0
SPEAKERS = ("Chelsie", "Ethan")
MIXES = ("text", "speech", "image")
ENGINE, HF, HTTP = "omni-engine", "hf-generate", "omni-http"
TTFA_METRIC = "ms_p* = time to first audio (ms, arrival -> first samples)"


@dataclass(frozen=True)
class Plan:
    preset: str
    num_requests: int
    rate: float  # arrivals per second (Poisson)
    mix: tuple[str, ...]
    thinker_tokens: int
    talker_codes: int
    burst: int  # requests of the burst case (0: skip)
    host_batches: tuple[int, ...]
    host_steps: int
    question_s: float = 2.0
    image_hw: tuple[int, int] = (448, 448)
    max_num_seqs: int = 64
    hf_requests: int | None = None  # HF serves the first this many requests (None: all); a 7B reply takes HF ~20 s


FULL = Plan("qwen2.5-omni-7b", 64, 4.0, MIXES, 40, 500, burst=32, host_batches=(1, 8, 64), host_steps=50,
            hf_requests=8)
CPU = Plan("tiny", 8, 4.0, MIXES, 8, 60, burst=16, host_batches=(1, 8, 64), host_steps=10, question_s=1.0,
           image_hw=(56, 56), max_num_seqs=64)


def plan_for(device: torch.device, quick: bool, preset: str) -> Plan:
    if device.type != "cuda":
        return CPU
    plan = dataclasses.replace(FULL, preset=preset)
    return dataclasses.replace(plan, num_requests=32, host_steps=20) if quick else plan


# --------------------------------------------------------------------------------------------------- prompts


def image_question_inputs(cfg: OmniConfig, hw: tuple[int, int], *, seed: int) -> dict:
    """A text question about an image: ``<vision_bos> <IMAGE> x n <vision_eos>`` then text, random pixels."""
    th = cfg.thinker_config
    vision = th.vision_config
    gen = np.random.default_rng(seed)
    image = gen.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    pixels, grid = image_patches([image], patch_size=vision.patch_size,
                                 temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)
    n_image = int(grid.prod()) // vision.spatial_merge_size**2
    text = torch.randint(10, min(th.text_config.vocab_size, 90), (12,), generator=torch.Generator().manual_seed(seed))
    ids = ([th.vision_start_token_id] + [th.image_token_id] * n_image + [th.vision_end_token_id] + text.tolist())
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                pixel_values=pixels, image_grid_thw=grid)


def text_question_inputs(cfg: OmniConfig, *, seed: int, tokens: int = 32) -> dict:
    vocab = min(cfg.thinker_config.text_config.vocab_size, 90)
    ids = torch.randint(10, vocab, (1, tokens), generator=torch.Generator().manual_seed(seed))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids))


def make_requests(cfg: OmniConfig, plan: Plan, n: int, device: torch.device, dtype: torch.dtype, *,
                  seed: int) -> list[tuple[dict, dict]]:
    """``n`` (inputs, options) cycling through the mix, each prompt with its own content (no two share a prefix,
    and sets made with other seeds share none with this one)."""
    out = []
    for i in range(n):
        kind, s = plan.mix[i % len(plan.mix)], seed + i
        if kind == "text":
            inputs = text_question_inputs(cfg, seed=s)
        elif kind == "speech":
            inputs = spoken_question_inputs(cfg, plan.question_s, seed=s)
        else:
            inputs = image_question_inputs(cfg, plan.image_hw, seed=s)
        out.append((to_device(inputs, device, dtype), options(plan, i, s)))
    return out


def arrivals(n: int, rate: float, seed: int = SEED) -> list[float]:
    """Arrival times (s) of a Poisson process: exponential gaps of mean 1 / rate, the first request at 0."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return np.concatenate([[0.0], np.cumsum(gaps[1:])]).tolist()


def options(plan: Plan, i: int, seed: int) -> dict:
    return dict(speaker=SPEAKERS[i % 2], thinker_max_new_tokens=plan.thinker_tokens,
                talker_max_new_tokens=plan.talker_codes, talker_do_sample=False, seed=seed)


# --------------------------------------------------------------------------------------------------- ours


@dataclass
class Trace:
    """One request's clock (s, from the run's start) and what it got."""

    arrival: float
    first_token: float | None = None
    first_audio: float | None = None
    done: float | None = None
    samples: int = 0
    tokens: int = 0
    error: str | None = None

    def fields(self) -> dict:
        audio_s = self.samples / SAMPLE_RATE
        return dict(ttft=None if self.first_token is None else self.first_token - self.arrival,
                    ttfa=None if self.first_audio is None else self.first_audio - self.arrival,
                    rtf=(self.done - self.arrival) / audio_s if audio_s and self.done is not None else None)


def serve_engine(model, requests: list[tuple[dict, dict]], times: list[float]) -> tuple[list[Trace], float]:
    """Adds each request at its arrival time and steps the engine until all are done; returns (traces, makespan s)."""
    engine = model.engine
    traces: dict[str, Trace] = {}
    order = sorted(range(len(requests)), key=lambda i: times[i])
    t0 = time.perf_counter()
    nxt = 0
    while nxt < len(order) or engine.has_unfinished_requests():
        now = time.perf_counter() - t0
        while nxt < len(order) and times[order[nxt]] <= now:
            inputs, opts = requests[order[nxt]]
            rid = engine.add_request(inputs, **opts)
            traces[rid] = Trace(arrival=times[order[nxt]])
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, times[order[nxt]] - (time.perf_counter() - t0)))
            continue
        for out in engine.step():
            tr, now = traces[out.request_id], time.perf_counter() - t0
            if out.text_ids and tr.first_token is None:
                tr.first_token = now
            if out.audio.size:
                if tr.first_audio is None:
                    tr.first_audio = now
                tr.samples += out.audio.size
            tr.tokens += len(out.text_ids)
            if out.finished:
                tr.done, tr.error = now, out.error
    return list(traces.values()), time.perf_counter() - t0


def latency_fields(traces: list[Trace], makespan: float) -> dict:
    """TTFT / TTFA percentiles (ms), RTF per stream, throughput over the makespan, every TTFA, failures."""
    rows = [t.fields() for t in traces]
    errors = [t.error for t in traces if t.error]
    ttfa = [r["ttfa"] * 1e3 for r in rows if r["ttfa"] is not None]
    ttft = [r["ttft"] * 1e3 for r in rows if r["ttft"] is not None]
    rtf = [r["rtf"] for r in rows if r["rtf"] is not None]

    def pct(values, q):
        return float(np.percentile(values, q)) if values else None

    return dict(ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), ttfa_p50_ms=pct(ttfa, 50),
                ttfa_p99_ms=pct(ttfa, 99), rtf_p50=pct(rtf, 50), rtf_max=max(rtf) if rtf else None,
                text_tokens_per_s=sum(t.tokens for t in traces) / makespan,
                audio_s_per_s=sum(t.samples for t in traces) / SAMPLE_RATE / makespan, makespan_s=makespan,
                ttfa_ms=ttfa, requests=len(traces), failed=len(errors), errors=errors[:3])


def serving_record(provider: str, shape: str, dtype, device, traces: list[Trace], makespan: float,
                   **extra) -> Record:
    fields = latency_fields(traces, makespan)
    ttfa = fields["ttfa_ms"]
    return make_record(bench=BENCH, provider=provider, shape=shape, dtype=dtype, device=device,
                       timing=quantiles(ttfa) if ttfa else None, metric=TTFA_METRIC, **fields, **extra)


def burst(model, requests: list[tuple[dict, dict]]) -> tuple[list[Trace], float, float, float]:
    """The traces and makespan (s) of ``requests`` arriving at once, the makespan of the same requests run one after
    another through the engine (the prefix cache emptied before each run, so neither reuses the other's prompts),
    and the seconds of audio each run made (equal: the same greedy replies)."""
    model.engine.reset_prefix_cache()
    traces, t_together = serve_engine(model, requests, [0.0] * len(requests))
    model.engine.reset_prefix_cache()
    t0, samples = time.perf_counter(), 0
    for request in requests:
        samples += sum(t.samples for t in serve_engine(model, [request], [0.0])[0])
    together = sum(t.samples for t in traces)
    if together != samples:
        raise RuntimeError(f"the burst made {together} samples together and {samples} one by one")
    return traces, t_together, time.perf_counter() - t0, samples / SAMPLE_RATE


# --------------------------------------------------------------------------------------------------- host time


def host_overhead(model, plan: Plan, device: torch.device) -> dict[int, list[float]]:
    """Per batch size B: ms per ``step()`` with B requests decoding, the forward passes replaced by no-ops."""
    engine = model.engine
    cfg = model.config
    saved = (DecoderRunner._run, Token2WavRunner.run, engine.stop_ids, engine.codec_stop)

    def no_forward(runner, meta, embeds, positions):
        return torch.zeros(embeds.shape[0], runner.decoder.hidden_size, dtype=runner.dtype, device=runner.device)

    DecoderRunner._run = no_forward
    Token2WavRunner.run = lambda self, jobs: None
    engine.stop_ids, engine.codec_stop = set(), set()  # zeros never stop: every request keeps running
    out = {}
    try:
        for batch in plan.host_batches:
            ids = [engine.add_request(text_question_inputs(cfg, seed=SEED + k, tokens=8), speaker="Chelsie",
                                      thinker_max_new_tokens=plan.host_steps * 4, talker_do_sample=False,
                                      talker_max_new_tokens=plan.host_steps * 4) for k in range(batch)]
            while engine.stats()["running"] < batch or engine.scheduler.waiting:
                engine.step()
            for _ in range(4):  # until every Talker decodes too
                engine.step()
            times = []
            for _ in range(plan.host_steps):
                t = time.perf_counter()
                engine.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append((time.perf_counter() - t) * 1e3)
            out[batch] = times
            for rid in ids:
                engine.abort_request(rid)
            while engine.has_unfinished_requests():
                engine.step()
    finally:
        DecoderRunner._run, Token2WavRunner.run, engine.stop_ids, engine.codec_stop = saved
    return out


# --------------------------------------------------------------------------------------------------- run


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b", *, url: str | None = None,
        hf: bool = True, plot_path: str | os.PathLike | None = None, plan: Plan | None = None) -> list[Record]:
    """The records of every case (see the module docstring); a case that fails is a record with ``error``.
    ``plan``: the sizes (default: :func:`plan_for` the device)."""
    dev = torch.device(device)
    plan = plan or plan_for(dev, quick, preset)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = OmniConfig.preset(plan.preset)
    name = short_name(plan.preset)
    shape = (f"{name} poisson N={plan.num_requests} rate={plan.rate:g}/s {'+'.join(plan.mix)} "
             f"reply<={plan.talker_codes / 50:g}s")
    records: list[Record] = []
    threads = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(1)  # tiny ops: a pool only adds hand-offs (see bench_pipeline)
    try:
        model = OmniModel.from_config(cfg, device=dev, dtype=dtype, seed=SEED,
                                      engine_config=EngineConfig(max_num_seqs=plan.max_num_seqs))
        requests = make_requests(cfg, plan, plan.num_requests, dev, dtype, seed=SEED)
        times = arrivals(plan.num_requests, plan.rate)
        # Warm-up (graphs, kernels, every DiT shape of a reply), with prompts of their own (no prefix cache hit).
        serve_engine(model, make_requests(cfg, plan, len(plan.mix), dev, dtype, seed=SEED + 10_000), [0.0] * 3)
        try:
            traces, makespan = serve_engine(model, requests, times)
            records.append(serving_record(ENGINE, shape, dtype, dev, traces, makespan, rate=plan.rate))
        except Exception as exc:
            records.append(error_record(ENGINE, shape, dtype, dev, exc))
        if plan.burst:
            bshape = f"{name} burst N={plan.burst} reply<={plan.talker_codes / 50:g}s"
            try:
                traces, together, sequential, audio_s = burst(model, make_requests(cfg, plan, plan.burst, dev,
                                                                                   dtype, seed=SEED + 20_000))
                records.append(make_record(bench=BENCH, provider=f"{ENGINE}-sequential", shape=bshape, dtype=dtype,
                                           device=dev, timing=(sequential * 1e3,) * 3, metric="ms_p* = makespan",
                                           audio_s=audio_s))
                fields = {**latency_fields(traces, together), "audio_s": audio_s}  # N concurrent streams
                records.append(make_record(bench=BENCH, provider=f"{ENGINE}-burst", shape=bshape, dtype=dtype,
                                           device=dev, timing=(together * 1e3,) * 3, metric="ms_p* = makespan",
                                           **fields))
                records[-1].baseline, records[-1].speedup = f"{ENGINE}-sequential", sequential / together
                print(f"bench_serving: {plan.burst} requests together {together:.2f} s, one after another "
                      f"{sequential:.2f} s: {sequential / together:.2f}x")
            except Exception as exc:
                records.append(error_record(f"{ENGINE}-burst", bshape, dtype, dev, exc))
        try:
            for batch, ms in host_overhead(model, plan, dev).items():
                p = quantiles(ms)
                records.append(make_record(bench=BENCH, provider=f"{ENGINE}-host", shape=f"{name} running={batch}",
                                           dtype=dtype, device=dev, timing=p, metric="ms_p* = host ms per step, "
                                           "forward passes replaced by no-ops", us_per_request=p[1] * 1e3 / batch))
        except Exception as exc:
            records.append(error_record(f"{ENGINE}-host", f"{name} running=*", dtype, dev, exc))
        if url is not None:
            records.append(http_record(url, plan, shape, dtype, dev))
        if hf:
            records.append(hf_record(cfg, model, requests, times, plan, shape, dtype, dev))
        del model
        release()
    finally:
        torch.set_num_threads(threads)
    plot_path = plot_path if plot_path is not None else os.environ.get("OMNI_BENCH_PLOT")
    if plot_path:
        plot_ttfa(records, plot_path)
    return records


def error_record(provider: str, shape: str, dtype, device, exc) -> Record:
    return make_record(bench=BENCH, provider=provider, shape=shape, dtype=dtype, device=device, timing=None,
                       metric=TTFA_METRIC, error=error_text(exc))


def hf_record(cfg, model, requests, times, plan, shape, dtype, dev) -> Record:
    """HF generate serving the requests one after another: each timed once, the FCFS queue computed."""
    try:
        hf = build_hf(cfg, model, dtype, dev)
        hf_plan = dataclasses.replace(PIPELINE_PLAN, thinker_tokens=plan.thinker_tokens, talker_codes=plan.talker_codes)
        hf_generate_once(hf, cfg, requests[0][0], hf_plan, dev, thinker_tokens=2, talker_codes=8)  # warm-up
        clock, traces = 0.0, []
        order = sorted(range(len(requests)), key=lambda i: times[i])[:plan.hf_requests]
        for i in order:
            run = hf_generate_once(hf, cfg, requests[i][0], hf_plan, dev, speaker=requests[i][1]["speaker"])
            start = max(clock, times[i])
            clock = start + run.total_ms / 1e3
            traces.append(Trace(arrival=times[i], first_token=clock, first_audio=clock, done=clock,
                                samples=int(run.audio_s * SAMPLE_RATE), tokens=run.text_tokens))
        del hf
        release()
        return serving_record(HF, shape, dtype, dev, traces, clock - min(times), rate=plan.rate,
                              served=f"the first {len(traces)} of {len(requests)} requests")
    except Exception as exc:
        return error_record(HF, shape, dtype, dev, exc)


def http_record(url: str, plan: Plan, shape: str, dtype, dev) -> Record:
    """The same load shape (N, rate, mix, reply caps) sent to a running server by its streaming HTTP API and measured
    as a client sees it (``serving_client``: its own text, spoken and image questions, Poisson arrivals)."""
    try:
        from omni_benchmarks.serving_client import run_http

        kinds = {"text": "text", "speech": "audio", "image": "image"}
        rows = run_http(url, num_requests=plan.num_requests, rate=plan.rate, seed=SEED,
                        mix=",".join(f"{kinds[k]}:1" for k in plan.mix), max_tokens=plan.thinker_tokens,
                        extra_body=dict(talker_max_tokens=plan.talker_codes, talker_temperature=0.0, seed=SEED))
        traces = [Trace(arrival=r["start_s"],
                        first_token=None if r["ttft_s"] is None else r["start_s"] + r["ttft_s"],
                        first_audio=None if r["ttfa_s"] is None else r["start_s"] + r["ttfa_s"],
                        done=None if r["latency_s"] is None else r["start_s"] + r["latency_s"],
                        samples=int(round((r["audio_s"] or 0) * SAMPLE_RATE)), tokens=r["text_tokens"] or 0,
                        error=None if r["ok"] else str(r["error"])) for r in rows]
        ended = [t.done for t in traces if t.done is not None]
        makespan = max(ended) - min(t.arrival for t in traces)
        return serving_record(HTTP, shape, dtype, dev, traces, makespan, rate=plan.rate, url=url)
    except Exception as exc:
        return error_record(HTTP, shape, dtype, dev, exc)


def plot_ttfa(records: list, path: str | os.PathLike) -> Path | None:
    """A PNG of the TTFA distributions (empirical CDFs) of the Poisson case, one line per provider."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("bench_serving: matplotlib is not installed; no TTFA plot (pip install matplotlib)")
        return None
    rows = [r.to_dict() if isinstance(r, Record) else r for r in records]
    rows = [d for d in rows if d.get("ttfa_ms") and d["provider"] in (ENGINE, HF, HTTP)]
    if not rows:
        return None
    fig = Figure(figsize=(8, 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for d in rows:
        values = np.sort(np.asarray(d["ttfa_ms"]))
        ax.step(values, np.arange(1, values.size + 1) / values.size, where="post",
                label=f"{d['provider']}: p50 {d['ttfa_p50_ms']:.0f} ms, p99 {d['ttfa_p99_ms']:.0f} ms")
    ax.set_xscale("log")
    ax.set_xlabel("time to first audio (ms, arrival -> first samples)")
    ax.set_ylabel("share of requests")
    ax.set_title(f"{BENCH}: {rows[0]['shape']} on {rows[0]['device']} ({rows[0]['dtype']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------------------------------- CLI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--preset", default="qwen2.5-omni-7b")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--rate", type=float, default=None, help="arrivals per second (Poisson)")
    parser.add_argument("--mix", default=None, help=f"comma-separated prompt kinds from {MIXES}")
    parser.add_argument("--url", default=None, help="also measure a running `omni serve` at this base URL")
    parser.add_argument("--no-hf", action="store_true", help="skip HF generate")
    parser.add_argument("--json", default=None, help="write the records here (the TTFA plot goes beside it)")
    args = parser.parse_args()
    global FULL, CPU
    overrides = {k: v for k, v in dict(num_requests=args.num_requests, rate=args.rate,
                                       mix=tuple(args.mix.split(",")) if args.mix else None).items() if v is not None}
    if set(overrides.get("mix", ())) - set(MIXES):
        parser.error(f"--mix: unknown kinds {sorted(set(overrides['mix']) - set(MIXES))}; choose from {MIXES}")
    FULL, CPU = dataclasses.replace(FULL, **overrides), dataclasses.replace(CPU, **overrides)
    plot = str(Path(args.json).with_name(Path(args.json).stem + "_ttfa.png")) if args.json else None
    records = run(args.device, args.quick, args.preset, url=args.url, hf=not args.no_hf, plot_path=plot)
    if args.json:
        write_records(records, args.json)
        print(f"bench_serving: wrote {len(records)} records to {args.json}" + (f", plot {plot}" if plot else ""))
    else:
        print(json.dumps([r.to_dict() for r in records], indent=1, default=str))


if __name__ == "__main__":
    main()
