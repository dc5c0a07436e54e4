"""Load generator for a running ``omni serve``: requests arriving as a Poisson process, measured as a client sees
them over HTTP (streamed server-sent events).

Each request is drawn from a prompt mix of ``text`` (a typed question), ``audio`` (a spoken question: a synthetic
speech-like signal as a base64 WAV) and ``image`` (a synthetic picture as a PNG ``data:`` URL, with a question). Per
request it records, from the moment the request was sent:

* ``ttft_s``: time to the first piece of text; ``ttfa_s``: time to the first audio samples;
* ``latency_s``: time to the end of the stream; ``audio_s``: seconds of 24 kHz audio received;
* ``rtf``: ``latency_s / audio_s``, the real-time factor of that stream (below 1: the voice arrives faster than it
  plays); ``text_tokens``, ``prompt_tokens``, ``cached_tokens`` (from the stream's usage), and the server's own
  ``server_ttft_ms`` / ``server_ttfa_ms`` (engine times, from its arrival in the engine).

``run_http`` returns those records; ``summarize`` gives p50 / p99 of the times, throughput and the error count.
From the command line: ``python -m omni_benchmarks.serving_client --url http://127.0.0.1:8000 -n 64 --rate 4``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import math
import time
import wave

import numpy as np

from omni_model.config import SAMPLE_RATE  # of the voice the server sends (PCM16 mono)
from omni_model.processor import SAMPLE_RATE as QUESTION_RATE  # of the spoken questions (the audio encoder's)

KINDS = ("text", "audio", "image")
TEXT_QUESTIONS = ("What is the capital of France?", "Tell me a short story about a cat.",
                  "How does a rainbow form?", "Give me three tips for sleeping better.",
                  "Why is the sky blue?", "Explain what a prime number is.")


def parse_mix(mix: str | dict[str, float]) -> dict[str, float]:
    """``"text:1,audio:2,image:1"`` (or a dict) -> normalised weights over :data:`KINDS`."""
    if isinstance(mix, str):
        pairs = [p.split(":") for p in mix.split(",") if p.strip()]
        if any(len(p) != 2 for p in pairs):
            raise ValueError(f"mix {mix!r}: write it as kind:weight pairs, e.g. text:1,audio:1,image:1")
        mix = {k.strip(): float(w) for k, w in pairs}
    unknown = sorted(set(mix) - set(KINDS))
    if unknown or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mix {mix}: kinds must be among {KINDS} with non-negative weights, not all zero")
    total = sum(mix.values())
    return {k: w / total for k, w in mix.items()}


def _wav_b64(samples: np.ndarray, rate: int) -> str:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _png_data_url(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def make_messages(kind: str, index: int, *, image_size: int = 224, audio_seconds: float = 2.0) -> list[dict]:
    """The user message of one request of ``kind`` (deterministic for ``index``)."""
    from omni_model.demo import synthetic_image, synthetic_question

    question = TEXT_QUESTIONS[index % len(TEXT_QUESTIONS)]
    if kind == "text":
        content = [{"type": "text", "text": question}]
    elif kind == "audio":
        wav = _wav_b64(synthetic_question(audio_seconds, QUESTION_RATE, seed=index), QUESTION_RATE)
        content = [{"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}]
    elif kind == "image":
        content = [{"type": "image_url", "image_url": {"url": _png_data_url(synthetic_image(image_size, image_size))}},
                   {"type": "text", "text": "What is in this picture?"}]
    else:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return [{"role": "user", "content": content}]


async def _one(client, url: str, index: int, kind: str, body: dict, t_send: float) -> dict:
    rec = {"index": index, "kind": kind, "ok": False, "status": None, "error": None, "ttft_s": None,
           "ttfa_s": None, "latency_s": None, "audio_s": 0.0, "rtf": None, "text_tokens": None, "prompt_tokens": None,
           "cached_tokens": None, "server_ttft_ms": None, "server_ttfa_ms": None}
    samples = 0
    finished = False
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                rec["error"] = (await r.aread()).decode(errors="replace")[:500]
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                now = time.perf_counter() - t_send
                if payload == "[DONE]":
                    finished = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    rec["error"] = event["error"].get("message")
                    break
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if delta.get("content") and rec["ttft_s"] is None:
                        rec["ttft_s"] = now
                    data = (delta.get("audio") or {}).get("data")
                    if data:
                        samples += len(base64.b64decode(data)) // 2
                        if rec["ttfa_s"] is None:
                            rec["ttfa_s"] = now
                usage = event.get("usage")
                if usage:
                    rec["text_tokens"] = usage.get("completion_tokens")
                    rec["prompt_tokens"] = usage.get("prompt_tokens")
                    rec["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
                    timings = usage.get("timings") or {}
                    rec["server_ttft_ms"] = timings.get("ttft_ms")
                    rec["server_ttfa_ms"] = timings.get("ttfa_ms")
    except Exception as exc:  # a refused connection or a timeout is a failed request, not a failed run
        rec["error"] = f"{type(exc).__name__}: {exc}"
        return rec
    rec["latency_s"] = time.perf_counter() - t_send
    rec["audio_s"] = samples / SAMPLE_RATE
    rec["rtf"] = rec["latency_s"] / rec["audio_s"] if samples else None
    rec["ok"] = finished and rec["error"] is None
    return rec


async def _run(url: str, *, num_requests: int, rate: float, mix: dict[str, float], seed: int, model: str | None,
               voice: str | None, audio: bool, max_tokens: int, image_size: int, timeout: float,
               extra_body: dict | None) -> list[dict]:
    import httpx

    rng = np.random.default_rng(seed)
    kinds = list(mix)
    draws = rng.choice(len(kinds), size=num_requests, p=[mix[k] for k in kinds])
    gaps = rng.exponential(1.0 / rate, size=num_requests) if math.isfinite(rate) else np.zeros(num_requests)
    gaps[0] = 0.0
    arrivals = np.cumsum(gaps)
    limits = httpx.Limits(max_connections=num_requests + 4, max_keepalive_connections=num_requests + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            model = (await client.get(f"{url}/v1/models")).json()["data"][0]["id"]
        if audio and voice is None:
            voice = (await client.get(f"{url}/v1/audio/voices")).json()["data"][0]["id"]
        bodies = []
        for i in range(num_requests):
            kind = kinds[draws[i]]
            body = {"model": model, "messages": make_messages(kind, i, image_size=image_size), "stream": True,
                    "stream_options": {"include_usage": True}, "max_tokens": max_tokens, **(extra_body or {})}
            if audio:
                body.update(modalities=["text", "audio"], audio={"voice": voice, "format": "pcm16"})
            bodies.append((kind, body))
        t0 = time.perf_counter()

        async def launch(i: int) -> dict:
            delay = arrivals[i] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            t_send = time.perf_counter()
            rec = await _one(client, url, i, bodies[i][0], bodies[i][1], t_send)
            rec["start_s"] = t_send - t0
            return rec

        return list(await asyncio.gather(*(launch(i) for i in range(num_requests))))


def run_http(url: str, *, num_requests: int = 32, rate: float = 4.0,
             mix: str | dict[str, float] = "text:1,audio:1,image:1", seed: int = 0, model: str | None = None,
             voice: str | None = None, audio: bool = True, max_tokens: int = 64, image_size: int = 224,
             timeout: float = 600.0, extra_body: dict | None = None) -> list[dict]:
    """Sends ``num_requests`` streamed chat requests to the server at ``url`` (e.g. ``http://127.0.0.1:8000``), with
    Poisson arrivals at ``rate`` per second (``float("inf")``: all at once), kinds drawn from ``mix``; returns one
    record per request (see the module docstring), in request order. ``model`` / ``voice`` default to the server's
    first; ``audio=False`` asks for text only; ``extra_body`` adds request fields (e.g. the Talker's sampling)."""
    if num_requests < 1:
        raise ValueError(f"num_requests must be at least 1, got {num_requests}")
    if not rate > 0:
        raise ValueError(f"rate must be positive (requests per second), got {rate}")
    return asyncio.run(_run(url.rstrip("/"), num_requests=num_requests, rate=rate, mix=parse_mix(mix), seed=seed,
                            model=model, voice=voice, audio=audio, max_tokens=max_tokens, image_size=image_size,
                            timeout=timeout, extra_body=extra_body))


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p99": float(np.percentile(a, 99)), "mean": float(a.mean()),
            "max": float(a.max())}


def summarize(records: list[dict]) -> dict:
    """p50 / p99 (and mean, max) of TTFT, TTFA, latency and RTF over the successful requests; their count and the
    failures; text tokens/s and audio seconds/s over the run's wall time (first send to last end)."""
    ok = [r for r in records if r["ok"]]
    out = {"requests": len(records), "ok": len(ok), "failed": len(records) - len(ok),
           "errors": sorted({str(r["error"])[:200] for r in records if not r["ok"]})}
    for key in ("ttft_s", "ttfa_s", "latency_s", "rtf", "server_ttft_ms", "server_ttfa_ms"):
        out[key] = _percentiles([r[key] for r in ok if r[key] is not None])
    if ok:
        wall = max(r["start_s"] + r["latency_s"] for r in ok) - min(r["start_s"] for r in ok)
        out["wall_s"] = wall
        out["text_tokens_per_s"] = sum(r["text_tokens"] or 0 for r in ok) / wall if wall > 0 else None
        out["audio_s_per_s"] = sum(r["audio_s"] for r in ok) / wall if wall > 0 else None
        out["faster_than_real_time"] = sum(1 for r in ok if r["rtf"] is not None and r["rtf"] < 1.0)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("-n", "--num-requests", type=int, default=32)
    p.add_argument("--rate", type=float, default=4.0, help="requests per second (inf: all at once)")
    p.add_argument("--mix", default="text:1,audio:1,image:1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--no-audio", action="store_true")
    p.add_argument("--json", default=None, help="write {records, summary} to this file")
    args = p.parse_args(argv)
    records = run_http(args.url, num_requests=args.num_requests, rate=args.rate, mix=args.mix, seed=args.seed,
                       audio=not args.no_audio, max_tokens=args.max_tokens)
    summary = summarize(records)
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": records, "summary": summary}, f, indent=2)
    return 0 if summary["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
