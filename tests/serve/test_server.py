"""The real ``omni serve --model tiny`` process on a free localhost port, driven as clients drive it: the official
``openai`` client, raw HTTP with httpx, many concurrent streams of which some hang up, a conversation's second turn,
and SIGTERM. The tiny model has random weights: the tests check the plumbing and the equalities that must hold
(streamed = whole, concurrent = solo for greedy requests), not what the reply says.

One server process serves the whole module (its start is most of the cost); the SIGTERM test stops it, so it
runs last."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from serve_helpers import (
    audio_part,
    free_port,
    image_part,
    metric,
    pcm_of_events,
    pcm_of_wav,
    sse_events,
    tone,
    wait_health,
)

omni_model = pytest.importorskip("omni_model")
if not hasattr(omni_model, "EngineConfig"):
    pytest.skip("the engine (OmniEngine, EngineConfig) is not in this tree yet", allow_module_level=True)

MAX_SEQS = 32
# Short greedy replies: a few text tokens and enough codes for a first audio chunk and a last one. The seed fixes the
# noise Token2Wav starts from (drawn afresh for each request without one).
GREEDY = {"max_tokens": 6, "temperature": 0, "talker_temperature": 0, "talker_max_tokens": 24,
          "first_chunk_codes": 8, "seed": 0}
SPOKEN = {"model": "tiny", "modalities": ["text", "audio"], "audio": {"voice": "Chelsie", "format": "wav"}, **GREEDY}


@pytest.fixture(scope="module")
def server():
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "omni_model.cli", "serve", "--model", "tiny", "--device", "cpu", "--port", str(port),
           "--max-num-seqs", str(MAX_SEQS), "--kv-cache-tokens", "16384", "--log-level", "warning",
           "--shutdown-timeout", "60"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_health(url, timeout=180, proc=proc)
    except Exception:
        proc.kill()
        raise RuntimeError(f"omni serve did not start:\n{proc.stdout.read()}") from None
    yield url, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


def _chat(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def _stream(url: str, body: dict, *, disconnect_after: int | None = None) -> list:
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{url}/v1/chat/completions",
                                                            json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if disconnect_after is not None and sum(ln.startswith("data: ") for ln in lines) > disconnect_after:
                break
    return sse_events(lines)


def _text(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict)
                   and e.get("choices"))


def test_openai_client_streamed_equals_whole(server):
    openai = pytest.importorskip("openai")
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    messages = [{"role": "user", "content": [audio_part(tone(1.0)), {"type": "text", "text": "hello"}]}]
    extra = {k: GREEDY[k] for k in ("talker_temperature", "talker_max_tokens", "first_chunk_codes", "seed")}

    text_only = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0)
    assert text_only.choices[0].message.audio is None
    assert text_only.usage.completion_tokens >= 1 and text_only.usage.prompt_tokens > 25

    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                           modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"},
                                           extra_body=extra)
    message = whole.choices[0].message
    assert message.content == message.audio.transcript  # (not the text-only reply: speech adds a system prompt)
    wav = pcm_of_wav(message.audio.data)
    assert wav.size > 0
    assert whole.usage.model_extra["timings"]["ttfa_ms"] > 0

    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, modalities=["text", "audio"],
        audio={"voice": "Ethan", "format": "pcm16"}, stream=True, stream_options={"include_usage": True},
        extra_body=extra))
    text, audio = [], []
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text.append(delta.content or "")
        a = delta.audio if isinstance(delta.audio, dict) or delta.audio is None else delta.audio.model_dump()
        if a is not None and a.get("data"):
            audio.append(np.frombuffer(base64.b64decode(a["data"]), dtype="<i2"))
    assert "".join(text) == message.content
    assert np.array_equal(np.concatenate(audio), wav)  # the same samples, streamed and whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_bad_requests_get_400_and_the_engine_goes_on(server):
    url, _ = server
    user = [{"role": "user", "content": "hi"}]
    cases = [
        (httpx.post(f"{url}/v1/chat/completions", content=b"{not json", timeout=30,
                    headers={"content-type": "application/json"}), None),
        (_chat(url, {"model": "tiny", "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "@@@", "format": "wav"}}]}]}),
         "messages[0].content[0].input_audio.data"),
        (_chat(url, {**SPOKEN, "messages": user, "audio": {"voice": "Nobody"}}), "audio.voice"),
        (_chat(url, {"model": "tiny", "messages": user, "top_p": "most"}), "top_p"),
        # beyond the KV cache of 16384 tokens (and the tiny tokenizer is one token per character)
        (_chat(url, {"model": "tiny", "messages": [{"role": "user", "content": "a" * 20000}]}), "messages"),
    ]
    for r, param in cases:
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    assert _chat(url, {"model": "nope", "messages": user}).json()["error"]["code"] == "model_not_found"
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["engine_step_failures"] == 0
    assert _chat(url, {**SPOKEN, "messages": user}).status_code == 200


def test_32_streams_8_hang_up(server):
    url, _ = server
    prompts = [f"question {i}" for i in range(4)]
    bodies = [{**SPOKEN, "messages": [{"role": "user", "content": p}]} for p in prompts]
    solo = [_stream(url, body) for body in bodies]
    for events in solo:
        assert events[-1] == "[DONE]" and pcm_of_events(events[:-1]).size > 0
    results: dict[int, list] = {}
    aborted0 = _finished(url, "abort")

    # The 8 that hang up ask for a long reply, so that they are sure to be mid-reply when they go.
    long = {**SPOKEN, "max_tokens": 200, "talker_max_tokens": 1000, "messages": [{"role": "user", "content": "go on"}]}

    def client(i: int) -> None:
        results[i] = _stream(url, long if i % 4 == 1 else bodies[i % 4], disconnect_after=2 if i % 4 == 1 else None)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 32
    for i, events in results.items():
        if i % 4 == 1:
            continue  # hung up after its first chunks
        ref = solo[i % 4]
        assert events[-1] == "[DONE]", i
        assert _text(events) == _text(ref), i
        # The same samples to fp32 rounding: a batched DiT solve may round differently from a solo one, which moves
        # a sample across a 16-bit step now and then.
        got, want = pcm_of_events(events).astype(np.int32), pcm_of_events(ref).astype(np.int32)
        assert got.shape == want.shape and np.abs(got - want).max() <= 1, i
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        health = httpx.get(f"{url}/health").json()
        if health["in_flight"] == 0 and health["engine"]["running"] == 0 and health["engine"]["waiting"] == 0:
            break
        time.sleep(0.1)
    stats = health["engine"]
    assert health["in_flight"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["thinker_free_blocks"] == stats["thinker_total_blocks"]
    assert stats["talker_free_blocks"] == stats["talker_total_blocks"]
    text = httpx.get(f"{url}/metrics").text
    assert _finished(url, "abort") - aborted0 == 8  # the clients that hung up were aborted, not run to the end
    assert metric(text, "omni_kv_blocks_used", 'decoder="thinker"') == 0
    assert metric(text, "omni_kv_blocks_used", 'decoder="talker"') == 0
    assert _chat(url, {**SPOKEN, "messages": [{"role": "user", "content": "still there?"}]}).status_code == 200


def _finished(url: str, reason: str) -> float:
    try:
        return metric(httpx.get(f"{url}/metrics").text, "omni_requests_finished_total", f'reason="{reason}"')
    except KeyError:  # no request has finished so yet
        return 0.0


def test_second_turn_reuses_the_cache(server):
    url, _ = server
    turn1 = [{"role": "user", "content": [audio_part(tone(2.0, freq=330.0)), image_part(56, 56, seed=5),
                                          {"type": "text", "text": "what do you hear and see?"}]}]
    hits0 = metric(httpx.get(f"{url}/metrics").text, "omni_prefix_cache_hit_tokens_total")
    first = _chat(url, {**SPOKEN, "messages": turn1}).json()
    turn2 = turn1 + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                     {"role": "user", "content": "tell me more"}]
    second = _chat(url, {**SPOKEN, "messages": turn2}).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    # the first turn's whole prompt (audio and image tokens included), to the last full block, came from the cache
    assert cached >= first["usage"]["prompt_tokens"] // 16 * 16 > 0
    hits = metric(httpx.get(f"{url}/metrics").text, "omni_prefix_cache_hit_tokens_total")
    assert hits - hits0 >= cached
    t1, t2 = first["usage"]["timings"], second["usage"]["timings"]
    print(f"\nTTFA first turn {t1['ttfa_ms']:.0f} ms, second turn {t2['ttfa_ms']:.0f} ms "
          f"({cached} of {second['usage']['prompt_tokens']} prompt tokens cached)")


def test_sigterm_drains_then_exits(server):
    """Runs last: a stream under way completes after SIGTERM, new connections are refused, the process exits 0."""
    url, proc = server
    body = {**SPOKEN, "max_tokens": 12, "talker_max_tokens": 48, "messages": [{"role": "user", "content": "bye"}]}
    with httpx.Client(timeout=120) as client, client.stream("POST", f"{url}/v1/chat/completions",
                                                            json={**body, "stream": True}) as r:
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        proc.send_signal(signal.SIGTERM)
        rest = list(lines)
    events = sse_events([first, *rest])
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert proc.wait(60) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=5)
