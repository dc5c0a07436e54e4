"""``omni run`` end to end on the tiny checkpoint and its bad-input cases."""

from __future__ import annotations

import importlib.util
import shutil
import wave
from pathlib import Path

import numpy as np
import pytest

from omni_model.cli import main
from omni_model.demo import read_wav

pytest.importorskip("transformers")


def _write_wav(path: Path, x: np.ndarray, rate: int, width: int = 2) -> Path:
    """x (n,) or (n, channels) in [-1, 1] as PCM with ``width`` bytes a sample."""
    x = x.reshape(x.shape[0], -1)
    pcm = (x * 127 + 128).astype("u1") if width == 1 else (x * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(x.shape[1])
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(pcm.tobytes())
    return path


def _tone(freq: float, seconds: float, rate: int) -> np.ndarray:
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(int(seconds * rate)) / rate)).astype(np.float32)


@pytest.fixture
def checkpoint(tiny_hf_checkpoint, tmp_path, monkeypatch):
    """A copy of the shared tiny checkpoint with the tiny processor files added."""
    from omni_model.hf_compat import load_tiny_processor, save_tiny_processor

    path = shutil.copytree(tiny_hf_checkpoint[0], tmp_path / "ckpt")
    save_tiny_processor(path)
    if importlib.util.find_spec("torchvision") is None:
        import transformers

        monkeypatch.setattr(transformers.Qwen2_5OmniProcessor, "from_pretrained",
                            lambda path, **kwargs: load_tiny_processor(path))
    return path


@pytest.fixture
def media(tmp_path):
    from PIL import Image

    wav = _write_wav(tmp_path / "q.wav", _tone(440.0, 1.0, 16000), 16000)
    png = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(png)
    return wav, png


def test_tiny_processor(checkpoint, media):
    from PIL import Image
    from transformers import Qwen2_5OmniProcessor

    processor = Qwen2_5OmniProcessor.from_pretrained(checkpoint)
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": None}, {"type": "image", "image": None},
                                                 {"type": "text", "text": "hello"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=prompt, audio=[read_wav(media[0])], images=[Image.open(media[1]).convert("RGB")],
                       return_tensors="pt", padding=True)
    ids = inputs["input_ids"][0]
    assert int(ids.max()) < 99
    assert int((ids == 1).sum()) == 25  # 1 s: 100 mel frames -> 50 -> 25 audio tokens
    assert int((ids == 2).sum()) == int(inputs["image_grid_thw"].prod()) // 4
    assert inputs["input_features"].shape[1] == 20
    assert processor.tokenizer.decode(processor.tokenizer("hello there")["input_ids"]) == "hello there"


def test_run_writes_text_and_wav(checkpoint, media, tmp_path, capsys):
    out = tmp_path / "reply.wav"
    argv = ["run", "--model", str(checkpoint), "--text", "hello", "--audio", str(media[0]), "--image", str(media[1]),
            "--device", "cpu", "--max-new-tokens", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.endswith("\n")  # the reply's text (random weights: any characters), then a newline
    with wave.open(str(out), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24000, 1, 2)
        assert w.getnframes() > 0
        assert f"{w.getnframes() / 24000:.2f} s of audio -> {out}" in captured.err

    silent = tmp_path / "silent.wav"
    assert main([*argv, "--out", str(silent), "--no-audio"]) == 0
    assert not silent.exists()


def test_run_without_config(tmp_path, capsys):
    assert main(["run", "--model", str(tmp_path), "--text", "hi", "--device", "cpu"]) == 2
    assert "config.json" in capsys.readouterr().err


def test_run_bad_media(checkpoint, media, tmp_path, capsys):
    base = ["run", "--model", str(checkpoint), "--text", "hi", "--device", "cpu", "--no-audio"]
    text = tmp_path / "notes.txt"
    text.write_text("not audio")
    assert main([*base, "--audio", str(text)]) == 2
    assert "--audio" in capsys.readouterr().err
    missing = tmp_path / "missing.wav"
    assert main([*base, "--audio", str(missing)]) == 2
    assert str(missing) in capsys.readouterr().err
    assert main([*base, "--image", str(text)]) == 2
    assert "--image" in capsys.readouterr().err


@pytest.mark.parametrize("rate, channels, width", [(8000, 1, 2), (16000, 2, 2), (8000, 2, 1)])
def test_read_wav_resamples(tmp_path, rate, channels, width):
    tone = _tone(440.0, 1.0, rate)
    x = np.stack([tone] * channels, axis=1)
    y = read_wav(_write_wav(tmp_path / "in.wav", x, rate, width))
    assert y.ndim == 1 and y.dtype == np.float32 and y.size == 16000
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert abs(np.argmax(spectrum) * 16000 / y.size - 440.0) < 2.0
    assert 0.3 < np.abs(y[1000:-1000]).max() < 0.6


def test_run_with_missing_weights(checkpoint, capsys):
    for shard in checkpoint.glob("model-*.safetensors"):  # (one shard may hold only parts --no-audio never reads)
        shard.unlink()
    assert main(["run", "--model", str(checkpoint), "--text", "hi", "--device", "cpu", "--no-audio"]) == 2
    assert ".safetensors" in capsys.readouterr().err
