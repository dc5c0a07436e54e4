"""Prometheus metrics of the server (``GET /metrics``), in a registry of their own.

| name | kind | meaning |
|---|---|---|
| ``omni_requests_running`` | gauge | requests the engine is running (after its latest step) |
| ``omni_requests_waiting`` | gauge | requests queued in the engine, not yet admitted |
| ``omni_kv_blocks_used{decoder}`` | gauge | KV-cache blocks held by requests, ``decoder`` "thinker" or "talker" |
| ``omni_ttft_seconds`` | histogram | time to first text token, from the request's arrival in the engine |
| ``omni_ttfa_seconds`` | histogram | time to first audio sample, likewise |
| ``omni_rtf`` | histogram | real-time factor of a finished spoken reply: its total time / its audio seconds |
| ``omni_text_tokens_total`` | counter | text tokens made |
| ``omni_audio_seconds_total`` | counter | seconds of 24 kHz audio made |
| ``omni_prefix_cache_hit_tokens_total`` | counter | prompt tokens served from the prefix cache |
| ``omni_requests_finished_total{reason}`` | counter | finished requests by ``finish_reason`` (stop, length, ...) |

Blocks that only the prefix cache keeps (evictable) count as free, as the engine reports them.
"""

from __future__ import annotations

from typing import Any

from omni_model.config import SAMPLE_RATE

# Latency buckets from 10 ms to 30 s; RTF buckets around 1 (real time).
_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
_RTF = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)


class ServerMetrics:
    """The metrics above; ``observe_output`` and ``observe_stats`` are called by the engine thread."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("omni_requests_running", "Requests the engine is running", registry=r)
        self.waiting = Gauge("omni_requests_waiting", "Requests waiting in the engine's queue", registry=r)
        self.kv_blocks_used = Gauge("omni_kv_blocks_used", "KV-cache blocks held by requests", ["decoder"],
                                    registry=r)
        self.ttft = Histogram("omni_ttft_seconds", "Time to first text token", buckets=_LATENCY, registry=r)
        self.ttfa = Histogram("omni_ttfa_seconds", "Time to first audio", buckets=_LATENCY, registry=r)
        self.rtf = Histogram("omni_rtf", "Real-time factor of a spoken reply (time / audio seconds)", buckets=_RTF,
                             registry=r)
        self.text_tokens = Counter("omni_text_tokens", "Text tokens generated", registry=r)
        self.audio_seconds = Counter("omni_audio_seconds", "Seconds of audio generated", registry=r)
        self.prefix_hits = Counter("omni_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                   registry=r)
        self.finished = Counter("omni_requests_finished", "Finished requests by finish_reason", ["reason"],
                                registry=r)
        self._audio_samples: dict[str, int] = {}  # per request in flight (engine thread only)

    def observe_stats(self, stats: dict[str, Any]) -> None:
        self.running.set(stats.get("running", 0))
        self.waiting.set(stats.get("waiting", 0))
        for decoder in ("thinker", "talker"):
            total = stats.get(f"{decoder}_total_blocks")
            if total is not None:
                self.kv_blocks_used.labels(decoder=decoder).set(total - stats.get(f"{decoder}_free_blocks", total))

    def observe_output(self, out) -> None:
        if out.text_ids:
            self.text_tokens.inc(len(out.text_ids))
        samples = int(out.audio.size) if out.audio is not None else 0
        if samples:
            self.audio_seconds.inc(samples / SAMPLE_RATE)
            self._audio_samples[out.request_id] = self._audio_samples.get(out.request_id, 0) + samples
        if not out.finished:
            return
        total = self._audio_samples.pop(out.request_id, 0)
        self.finished.labels(reason=out.finish_reason or "stop").inc()
        times = out.stage_times or {}
        if "first_token" in times:
            self.ttft.observe(times["first_token"] / 1000.0)
        if "first_audio" in times:
            self.ttfa.observe(times["first_audio"] / 1000.0)
        if total and "done" in times and out.finish_reason in ("stop", "length"):
            self.rtf.observe(times["done"] / 1000.0 / (total / SAMPLE_RATE))
        if out.num_cached_tokens:
            self.prefix_hits.inc(out.num_cached_tokens)

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
