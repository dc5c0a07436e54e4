"""The server's front end over a scripted engine (tests/serve/scripted_engine.py): wire format, streaming, errors,
aborts of clients that go away, admission (429), metrics and the prefix reuse of a conversation's next turn.

The scripted engine answers each request with outputs that depend only on its prompt, so every stream can be
checked exactly; test_server.py runs the real ``omni serve`` process with the tiny model's engine."""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from scripted_engine import ScriptedEngine
from serve_helpers import (
    InProcessServer,
    audio_part,
    free_port,
    image_part,
    metric,
    pcm_of_events,
    pcm_of_wav,
    sse_events,
    tone,
    video_part,
    wait_health,
    wav_file,
)

from omni_model.demo import SYSTEM_PROMPT
from omni_model.serve.prompt import Turn

MAX_PIXELS = 200 * 200  # the test server's --max-image-pixels


def make_context(tiny_processor, engine: ScriptedEngine, *, max_num_seqs: int = 64, max_waiting: int = 64):
    from omni_model import OmniConfig
    from omni_model.serve.app import ServerContext
    from omni_model.serve.async_engine import AsyncEngine
    from omni_model.serve.media import MediaPolicy
    from omni_model.serve.metrics import ServerMetrics
    from omni_model.serve.prompt import PromptBuilder

    config = OmniConfig.preset("tiny")
    metrics = ServerMetrics()
    return ServerContext(model_name="tiny", engine=AsyncEngine(engine, max_num_seqs=max_num_seqs,
                                                               max_waiting=max_waiting, metrics=metrics),
                         builder=PromptBuilder.from_pretrained(tiny_processor, config.thinker_config),
                         metrics=metrics, speakers=["Chelsie", "Ethan"],
                         policy=MediaPolicy(max_image_pixels=MAX_PIXELS))


@pytest.fixture(scope="module")
def served(tiny_processor):
    from omni_model.serve.app import build_app

    engine = ScriptedEngine(step_s=0.01)
    ctx = make_context(tiny_processor, engine)
    with InProcessServer(build_app(ctx)) as server:
        yield server, engine, ctx


def _chat(url: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30, **kw)


def _expected(engine: ScriptedEngine, ctx, *, index: int = -1):
    """The text and PCM16 samples the scripted engine gives the request added ``index``-th."""
    inputs, options = engine.added[index]
    ids, audio = engine.expected(inputs["input_ids"][0].tolist(), options)
    pcm = (np.clip(audio, -1, 1) * 32767.0).astype("<i2")
    return ctx.builder.decode(ids), pcm


def test_listings(served):
    server, _, _ = served
    models = httpx.get(f"{server.url}/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    voices = httpx.get(f"{server.url}/v1/audio/voices").json()
    assert [v["id"] for v in voices["data"]] == ["Chelsie", "Ethan"]
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["engine"]["thinker_total_blocks"] == 256


def test_openai_client_text_and_audio(served):
    openai = pytest.importorskip("openai")
    server, engine, ctx = served
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    messages = [{"role": "user", "content": [audio_part(), {"type": "text", "text": "what is this?"}]}]

    text_only = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    text, _ = _expected(engine, ctx)
    assert text_only.choices[0].message.content == text and len(text) == 5
    assert text_only.choices[0].message.audio is None
    assert text_only.choices[0].finish_reason == "length"
    assert engine.added[-1][1]["return_audio"] is False and "speaker" not in engine.added[-1][1]
    assert SYSTEM_PROMPT not in ctx.builder.tokenizer.decode(engine.added[-1][0]["input_ids"][0].tolist())
    assert text_only.usage.completion_tokens == 5 and text_only.usage.prompt_tokens > 25

    whole = client.chat.completions.with_raw_response.create(
        model="tiny", messages=messages, modalities=["text", "audio"], audio={"voice": "Ethan", "format": "wav"})
    assert float(whole.headers["x-omni-ttft-ms"]) >= 0 and float(whole.headers["x-omni-ttfa-ms"]) >= 0
    whole = whole.parse()
    text, pcm = _expected(engine, ctx)
    assert engine.added[-1][1]["speaker"] == "Ethan"
    assert whole.choices[0].message.content == text == whole.choices[0].message.audio.transcript
    assert np.array_equal(pcm_of_wav(whole.choices[0].message.audio.data), pcm)
    assert whole.choices[0].finish_reason == "stop"
    timings = whole.usage.model_extra["timings"]
    assert timings["audio_seconds"] == pytest.approx(pcm.size / 24000) and timings["rtf"] > 0

    pieces, transcript, audio = [], [], []
    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, modalities=["text", "audio"], audio={"voice": "Ethan", "format": "pcm16"},
        stream=True, stream_options={"include_usage": True}))
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        pieces.append(delta.content or "")
        # delta.audio: a typed model in recent openai clients, an extra dict in older ones
        a = delta.audio if isinstance(delta.audio, dict) or delta.audio is None else delta.audio.model_dump()
        if a is not None:
            transcript.append(a.get("transcript") or "")
            if a.get("data"):
                audio.append(np.frombuffer(base64.b64decode(a["data"]), dtype="<i2"))
    assert "".join(pieces) == "".join(transcript) == text
    assert np.array_equal(np.concatenate(audio), pcm)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(text)


def test_stream_layout_and_pcm16(served):
    """Raw SSE: a role chunk first, text and audio chunks, one finish chunk with usage, then [DONE]; the bare
    PCM16 of a whole reply with audio.format pcm16 equals the streamed samples."""
    server, engine, ctx = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi there"}], "modalities": ["text", "audio"],
            "audio": {"voice": "Chelsie", "format": "pcm16"}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    finish = [c for c in chunks if c["choices"][0]["finish_reason"]]
    assert len(finish) == 1 and finish[0] is chunks[-1] and finish[0]["usage"]["completion_tokens"] == 12
    text, pcm = _expected(engine, ctx)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text
    assert np.array_equal(pcm_of_events(chunks), pcm)
    # the system prompt for speech was added (no system message given)
    prompt = ctx.builder.tokenizer.decode(engine.added[-1][0]["input_ids"][0].tolist())
    assert prompt.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\nhi there")

    whole = _chat(server.url, body).json()
    raw = np.frombuffer(base64.b64decode(whole["choices"][0]["message"]["audio"]["data"]), dtype="<i2")
    assert np.array_equal(raw, pcm)


def _error(r: httpx.Response, status: int, param: str | None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    if status == 400:
        assert err["type"] == "invalid_request_error"
    return err


def test_bad_requests(served, tmp_path):
    server, engine, _ = served
    url = server.url
    user = {"role": "user", "content": "hi"}

    def chat(content=None, **fields):
        msgs = [{"role": "user", "content": content}] if content is not None else [user]
        return _chat(url, {"model": "tiny", "messages": msgs, **fields})

    r = httpx.post(f"{url}/v1/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=30,
                   headers={"content-type": "application/json"})
    _error(r, 400, None, "invalid_json")
    _error(chat(temperature="hot"), 400, "temperature", "invalid_type")
    _error(chat(max_tokens=0), 400, "max_tokens")
    _error(chat(talker_temprature=0.5), 400, "talker_temprature", "unknown_parameter")
    _error(_chat(url, {"model": "tiny"}), 400, "messages", "missing_required_parameter")
    _error(chat([{"type": "input_audio", "input_audio": {"data": "%%%not base64", "format": "wav"}}]), 400,
           "messages[0].content[0].input_audio.data", "invalid_base64")
    junk = base64.b64encode(b"this is not a wav file at all" * 10).decode()
    _error(chat([{"type": "input_audio", "input_audio": {"data": junk, "format": "wav"}}]), 400,
           "messages[0].content[0].input_audio.data", "invalid_audio")
    empty = base64.b64encode(wav_file(np.zeros(0, np.float32))).decode()
    _error(chat([{"type": "input_audio", "input_audio": {"data": empty, "format": "wav"}}]), 400,
           "messages[0].content[0].input_audio.data", "empty_media")
    _error(chat([{"type": "input_audio", "input_audio": {"data": junk, "format": "aiff"}}]), 400,
           "messages[0].content[0].input_audio.format")
    _error(chat([{"type": "text", "text": "x"}, image_part(300, 300)]), 400, "messages[0].content[1].image_url.url",
           "image_too_large")
    _error(chat([{"type": "image_url", "image_url": {"url": "https://example.com/x.png"}}]), 400,
           "messages[0].content[0].image_url.url", "invalid_url")
    _error(chat([{"type": "image_url", "image_url": {"url": str(tmp_path / "x.png")}}]), 400,
           "messages[0].content[0].image_url.url", "invalid_url")
    _error(chat([{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                                            + base64.b64encode(b"no png").decode()}}]), 400,
           "messages[0].content[0].image_url.url", "invalid_image")
    _error(chat([{"type": "telepathy", "text": "x"}]), 400, "messages[0].content[0]")
    _error(chat(modalities=["text", "audio"], audio={"voice": "Nobody"}), 400, "audio.voice", "invalid_voice")
    _error(chat(modalities=["text", "audio"], audio={"voice": "Ethan", "format": "mp3"}), 400, "audio.format")
    _error(chat("x" * 2000), 400, "messages", "context_length_exceeded")
    _error(_chat(url, {"model": "gpt-4o", "messages": [user]}), 404, "model", "model_not_found")
    assert httpx.get(f"{url}/v1/nothing").json()["error"]["message"]
    # none of this reached the engine, and the server still answers
    assert all(len(inputs["input_ids"][0]) < 2000 for inputs, _ in engine.added)
    assert _chat(url, {"model": "tiny", "messages": [user]}).status_code == 200
    assert httpx.get(f"{url}/health").json()["engine_step_failures"] == 0


def _stream_client(url: str, body: dict, *, disconnect_after: int | None, results: dict, key: int) -> None:
    with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        lines = []
        for line in r.iter_lines():
            lines.append(line)
            if disconnect_after is not None and sum(ln.startswith("data: ") for ln in lines) > disconnect_after:
                break  # leaving the block closes the connection mid-stream
        results[key] = sse_events(lines)


def test_many_clients_some_disconnect(served):
    server, engine, ctx = served
    before = len(engine.added)
    # The 8 that hang up ask for a long reply, so that they are sure to be mid-reply when they go (a loaded machine
    # may be slow to run the client's thread).
    bodies = [{"model": "tiny", "stream": True, "modalities": ["text", "audio"], "audio": {"voice": "Chelsie"},
               "messages": [{"role": "user", "content": f"question number {i}"}],
               **({"max_tokens": 3000} if i % 4 == 0 else {})} for i in range(32)]
    results: dict[int, list] = {}
    threads = [threading.Thread(target=_stream_client, args=(server.url, body),
                                kwargs=dict(disconnect_after=3 if i % 4 == 0 else None, results=results, key=i))
               for i, body in enumerate(bodies)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 32 and len(engine.added) == before + 32
    by_prompt = {tuple(inputs["input_ids"][0].tolist()): (inputs, options) for inputs, options in engine.added[before:]}
    for i, events in results.items():
        if i % 4 == 0:
            assert "[DONE]" not in events
            continue
        assert events[-1] == "[DONE]"
        turn = Turn("user", [("text", f"question number {i}")])
        ids = ctx.builder.tokenizer(ctx.builder.render([turn], system_prompt=SYSTEM_PROMPT))["input_ids"]
        inputs, options = by_prompt[tuple(ids)]
        text, audio = engine.expected(ids, options)
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == ctx.builder.decode(text)
        assert np.array_equal(pcm_of_events(events[:-1]), (np.clip(audio, -1, 1) * 32767.0).astype("<i2"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the aborted ones finish at the engine's next step
        health = httpx.get(f"{server.url}/health").json()
        if health["in_flight"] == 0 and health["engine"]["running"] == 0:
            break
        time.sleep(0.05)
    stats = health["engine"]
    reasons = list(engine.finish_reasons.values())
    assert reasons.count("abort") == 8  # the clients that left were aborted mid-reply, not run to the end
    assert health["in_flight"] == 0 and stats["running"] == 0 and stats["waiting"] == 0
    assert stats["thinker_free_blocks"] == stats["thinker_total_blocks"]
    assert stats["talker_free_blocks"] == stats["talker_total_blocks"]
    text = httpx.get(f"{server.url}/metrics").text
    assert metric(text, "omni_kv_blocks_used", 'decoder="thinker"') == 0
    assert metric(text, "omni_kv_blocks_used", 'decoder="talker"') == 0
    assert metric(text, "omni_requests_running") == 0
    still = _chat(server.url, {"model": "tiny", "messages": [{"role": "user", "content": "still there?"}]})
    assert still.status_code == 200


def test_second_turn_hits_prefix_cache(served):
    server, engine, ctx = served
    turn1 = [{"role": "user", "content": [audio_part(tone(1.5, freq=330.0)), image_part(56, 56, seed=3),
                                          {"type": "text", "text": "describe both"}]}]
    body = {"model": "tiny", "modalities": ["text", "audio"], "audio": {"voice": "Chelsie"}}
    hits0 = metric(httpx.get(f"{server.url}/metrics").text, "omni_prefix_cache_hit_tokens_total")
    first = _chat(server.url, {**body, "messages": turn1}).json()
    reply = first["choices"][0]["message"]["content"]
    turn2 = turn1 + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then?"}]
    second = _chat(server.url, {**body, "messages": turn2}).json()
    (in1, _), (in2, _) = engine.added[-2], engine.added[-1]
    ids1, ids2 = in1["input_ids"][0].tolist(), in2["input_ids"][0].tolist()
    assert ids2[:len(ids1)] == ids1  # the whole first prompt, media tokens included, is the second's prefix
    for key in ("input_features", "feature_attention_mask", "pixel_values", "image_grid_thw"):
        assert np.array_equal(in1[key].numpy(), in2[key].numpy()), key
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= len(ids1) // 16 * 16 > 0
    hits = metric(httpx.get(f"{server.url}/metrics").text, "omni_prefix_cache_hit_tokens_total")
    assert hits - hits0 == cached + first["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_metrics_exposition(served):
    server, _, _ = served
    assert _chat(server.url, {"model": "tiny", "messages": [{"role": "user", "content": "hello"}],
                              "modalities": ["text", "audio"]}).status_code == 200
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("omni_requests_running", "omni_requests_waiting", "omni_ttft_seconds_count",
                 "omni_ttfa_seconds_count", "omni_rtf_count", "omni_text_tokens_total", "omni_audio_seconds_total",
                 "omni_prefix_cache_hit_tokens_total"):
        metric(text, name)
    assert metric(text, "omni_ttfa_seconds_count") >= 1 and metric(text, "omni_audio_seconds_total") > 0


def test_queue_full_answers_429_at_once(tiny_processor):
    from omni_model.serve.app import build_app

    engine = ScriptedEngine(step_s=0.05, max_num_seqs=1, reply_tokens=20)
    ctx = make_context(tiny_processor, engine, max_num_seqs=1, max_waiting=1)
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with InProcessServer(build_app(ctx)) as server, httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as a, \
                client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as b:
            assert a.status_code == b.status_code == 200
            t0 = time.perf_counter()
            r = client.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False})
            assert time.perf_counter() - t0 < 0.5
            _error(r, 429, None, "queue_full")
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limit_error"
            assert sse_events(a.iter_lines())[-1] == "[DONE]"
            assert sse_events(b.iter_lines())[-1] == "[DONE]"
        assert client.post(f"{server.url}/v1/chat/completions", json={**body, "stream": False}).status_code == 200


def test_engine_step_failure_fails_requests_not_server(tiny_processor):
    from omni_model.serve.app import build_app

    class Flaky(ScriptedEngine):
        fail_next = True

        def step(self):
            if self.fail_next:
                self.fail_next = False
                raise RuntimeError("device fell over")
            return super().step()

    engine = Flaky(step_s=0.0)
    ctx = make_context(tiny_processor, engine)
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
    with InProcessServer(build_app(ctx)) as server:
        r = _chat(server.url, body)
        assert r.status_code == 500 and "device fell over" in r.json()["error"]["message"]
        assert _chat(server.url, body).status_code == 200
        assert httpx.get(f"{server.url}/health").json()["engine_step_failures"] == 1
        with httpx.stream("POST", f"{server.url}/v1/chat/completions", json={**body, "stream": True}) as r:
            assert sse_events(r.iter_lines())[-1] == "[DONE]"


def test_sse_payloads_are_single_lines(served):
    server, _, _ = served
    body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "line\nbreaks\n"}]}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=30) as r:
        raw = r.read().decode()
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    assert json.loads(blocks[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_sigterm_drains_then_exits(tiny_processor):
    """``omni serve``'s uvicorn front in a process of its own: after SIGTERM a stream under way completes, new
    connections are refused, and the process exits 0."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    script = Path(__file__).with_name("scripted_engine.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port), str(tiny_processor)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_health(url, timeout=120, proc=proc)
        body = {"model": "tiny", "stream": True, "messages": [{"role": "user", "content": "bye"}],
                "modalities": ["text", "audio"]}
        with httpx.Client(timeout=60) as client, client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            refused, deadline = False, time.monotonic() + 10
            while not refused and time.monotonic() < deadline:  # the listening socket closes within a moment
                try:
                    assert httpx.get(f"{url}/health", timeout=5).status_code == 503  # draining meanwhile
                    time.sleep(0.05)
                except httpx.ConnectError:
                    refused = True
            assert refused
            rest = list(lines)
        events = sse_events([first, *rest])
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "stop"
        assert len(_text_of(events)) == 40  # the whole reply, not cut by the shutdown
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


def _text_of(events) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if isinstance(e, dict)
                   and e.get("choices"))


def test_serving_client_load_generator(served):
    from omni_benchmarks.serving_client import parse_mix, run_http, summarize

    server, engine, _ = served
    before = len(engine.added)
    records = run_http(server.url, num_requests=9, rate=100.0, mix="text:1,audio:1,image:1", seed=3, image_size=56,
                       max_tokens=12, extra_body={"talker_temperature": 0})
    assert len(records) == 9 and all(r["ok"] for r in records), [r["error"] for r in records]
    assert len(engine.added) == before + 9
    assert {r["kind"] for r in records} <= {"text", "audio", "image"} and len({r["kind"] for r in records}) > 1
    for r in records:
        assert 0 < r["ttft_s"] <= r["latency_s"] and 0 < r["ttfa_s"] <= r["latency_s"]
        assert r["audio_s"] == pytest.approx(12 * 480 / 24000)  # the scripted engine's 12 chunks
        assert r["rtf"] == pytest.approx(r["latency_s"] / r["audio_s"]) and r["text_tokens"] == 12
        assert r["server_ttfa_ms"] is not None
    summary = summarize(records)
    assert summary["ok"] == 9 and summary["failed"] == 0
    assert summary["ttfa_s"]["p50"] <= summary["ttfa_s"]["p99"] <= summary["ttfa_s"]["max"]
    assert summary["audio_s_per_s"] > 0 and summary["text_tokens_per_s"] > 0
    assert parse_mix("text:3,audio:1") == {"text": 0.75, "audio": 0.25}
    with pytest.raises(ValueError, match="kinds"):
        parse_mix("video:1")
    failed = run_http(server.url, num_requests=2, rate=float("inf"), mix="text:1", model="nope")
    assert not any(r["ok"] for r in failed) and all(r["status"] == 404 for r in failed)
    assert summarize(failed)["failed"] == 2


def test_video_request(served):
    pytest.importorskip("av")
    server, engine, _ = served
    body = {"model": "tiny", "messages": [{"role": "user", "content": [video_part(frames=20, fps=10),
                                                                        {"type": "text", "text": "what moves?"}]}]}
    assert _chat(server.url, body).status_code == 200
    inputs, _ = engine.added[-1]
    assert inputs["video_grid_thw"].tolist()[0][0] == 2  # 2 s at 2 frames a second, 2 frames a patch
    assert inputs["pixel_values_videos"].shape[0] == int(inputs["video_grid_thw"].prod())
    junk = {"type": "video_url", "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(b"x" * 64).decode()}}
    _error(_chat(server.url, {"model": "tiny", "messages": [{"role": "user", "content": [junk]}]}), 400,
           "messages[0].content[0].video_url.url", "invalid_video")
    system_video = {"model": "tiny", "messages": [{"role": "system", "content": [video_part()]},
                                                  {"role": "user", "content": "hi"}]}
    _error(_chat(server.url, system_video), 400, "messages[0].content[0]", "unsupported_content")


def test_engine_errors_name_the_request_field():
    from omni_model.serve.app import _engine_error

    err = _engine_error(ValueError("the prompt of 5008 tokens plus thinker_max_new_tokens=1024 needs 6032 positions "
                                   "in the thinker's KV cache, which holds 4096"), {"return_audio": False})
    assert (err.status, err.param, err.code) == (400, "messages", "context_length_exceeded")
    assert "max_tokens=1024" in err.message and "thinker_max_new_tokens" not in err.message
    err = _engine_error(ValueError("talker_max_new_tokens=100000 needs 100178 positions"),
                        {"talker_max_new_tokens": 100000})
    assert (err.param, err.code) == ("talker_max_tokens", "invalid_value") and "talker_max_tokens=100000" in err.message
    err = _engine_error(ValueError("speaker 'X' is not in spk_dict.pt"), {"speaker": "X"})
    assert err.param == "audio.voice"
