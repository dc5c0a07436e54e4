"""Helpers of the server tests: media as a client sends them, SSE parsing, and servers on free localhost ports."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import wave

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tone(seconds: float = 1.0, rate: int = 16000, freq: float = 440.0) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


def wav_file(samples: np.ndarray, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buf.getvalue()


def audio_part(samples: np.ndarray | None = None, rate: int = 16000, fmt: str = "wav") -> dict:
    samples = tone() if samples is None else samples
    return {"type": "input_audio",
            "input_audio": {"data": base64.b64encode(wav_file(samples, rate)).decode(), "format": fmt}}


def png_bytes(height: int, width: int, seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_part(height: int = 40, width: int = 56, seed: int = 0) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png_bytes(height, width, seed)).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def sse_events(lines) -> list[dict | str]:
    """The ``data:`` payloads of a server-sent event stream, JSON decoded (``[DONE]`` stays a string)."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def pcm_of_events(events) -> np.ndarray:
    deltas = [e["choices"][0]["delta"] for e in events if isinstance(e, dict) and e.get("choices")]
    data = b"".join(base64.b64decode(d["audio"]["data"]) for d in deltas if "data" in (d.get("audio") or {}))
    return np.frombuffer(data, dtype="<i2")


def pcm_of_wav(b64: str) -> np.ndarray:
    with wave.open(io.BytesIO(base64.b64decode(b64)), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")


def metric(text: str, name: str, labels: str = "") -> float:
    """One sample's value from Prometheus text (``labels`` as written: ``decoder="thinker"``)."""
    key = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(key + " "):
            return float(line.split()[-1])
    raise KeyError(f"{key} not in the metrics")


def wait_health(url: str, timeout: float = 120.0, proc=None) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url}/health did not answer within {timeout} s")


class InProcessServer:
    """uvicorn serving ``app`` in a thread of the test process (no signal handlers)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        wait_health(self.url, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def mp4_bytes(frames: int = 25, fps: int = 10, height: int = 48, width: int = 64) -> bytes:
    """An MPEG-4 video whose frame i is a flat grey of level 10 * i (so a decoded frame tells its index)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 10 * i % 250, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def video_part(**kw) -> dict:
    return {"type": "video_url",
            "video_url": {"url": "data:video/mp4;base64," + base64.b64encode(mp4_bytes(**kw)).decode()}}
