"""What ``omni demo`` and ``omni run`` do: prompts in, streamed text and a WAV file out."""

from __future__ import annotations

import argparse
import os
import sys
import time
import wave
from pathlib import Path

import numpy as np
import torch

from omni_model.config import SAMPLE_RATE

SYSTEM_PROMPT = (
    "You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory and "
    "visual inputs, as well as generating text and speech."
)


class WavWriter:
    """Writes mono float32 chunks as 16-bit PCM while they arrive (the file is valid after ``close``)."""

    def __init__(self, path: str | os.PathLike, sample_rate: int = SAMPLE_RATE):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wav = wave.open(str(self.path), "wb")
        self._wav.setnchannels(1)
        self._wav.setsampwidth(2)
        self._wav.setframerate(sample_rate)
        self.samples = 0

    def write(self, chunk: np.ndarray) -> None:
        if chunk.size:
            pcm = (np.clip(chunk, -1.0, 1.0) * 32767.0).astype("<i2")
            self._wav.writeframes(pcm.tobytes())
            self.samples += chunk.size

    def close(self) -> None:
        self._wav.close()


def read_wav(path: str | os.PathLike, sample_rate: int = 16000) -> np.ndarray:
    """Mono float32 samples at ``sample_rate`` from a PCM WAV file; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--audio: no such file: {path}")
    try:
        with wave.open(str(path), "rb") as w:
            rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
            raw = w.readframes(n)
    except (wave.Error, EOFError) as exc:
        raise ValueError(f"--audio: {path} is not a PCM WAV file ({exc}); convert it, e.g. with "
                         f"`ffmpeg -i in -ar 16000 -ac 1 out.wav`") from exc
    kinds = {1: ("u1", 128.0, 128.0), 2: ("<i2", 0.0, 32768.0), 4: ("<i4", 0.0, 2147483648.0)}
    if width not in kinds:
        raise ValueError(f"--audio: {path} has {8 * width}-bit samples; 8, 16 or 32-bit PCM is supported")
    dtype, offset, scale = kinds[width]
    x = (np.frombuffer(raw, dtype=dtype).astype(np.float32) - offset) / scale
    x = x.reshape(-1, channels).mean(axis=1)
    if x.size == 0:
        raise ValueError(f"--audio: {path} holds no samples")
    if rate != sample_rate:
        x = resample(x, rate, sample_rate)
    return x


def resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited resampling by windowed-sinc interpolation (Hann window, 16 zero crossings)."""
    n_out = int(round(x.size * dst / src))
    t = np.arange(n_out) * (src / dst)
    cutoff = min(1.0, dst / src)
    taps = 16
    base = np.floor(t).astype(np.int64)
    out = np.zeros(n_out, dtype=np.float64)
    for k in range(-taps + 1, taps + 1):
        idx = base + k
        valid = (idx >= 0) & (idx < x.size)
        d = t - idx
        w = cutoff * np.sinc(cutoff * d) * (0.5 + 0.5 * np.cos(np.pi * np.clip(d / taps, -1, 1)))
        out[valid] += w[valid] * x[idx[valid]]
    return out.astype(np.float32)


# ------------------------------------------------------------------------------------------------ demo


def synthetic_question(seconds: float = 2.0, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A speech-like signal: a voiced source (120-180 Hz glottal pulses) through moving vowel formants, with
    syllable-rate amplitude modulation and short pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 150 + 30 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    source = sum(np.sin(k * phase) / k for k in range(1, 30))
    vowels = np.array([[730, 1090], [270, 2290], [300, 870], [530, 1840]])  # a, i, u, e
    syllable = (t * 4).astype(int) % len(vowels)
    out = np.zeros_like(t)
    for formant in range(2):
        f = vowels[syllable, formant]
        out += np.sin(2 * np.pi * np.cumsum(f) / sample_rate) * source * (0.6 if formant else 1.0)
    envelope = np.clip(np.sin(np.pi * (t * 4 % 1.0)), 0, None) ** 0.5
    out = out * envelope + 0.01 * rng.standard_normal(t.size)
    return (0.3 * out / np.abs(out).max()).astype(np.float32)


def synthetic_image(height: int, width: int) -> np.ndarray:
    """A colour gradient with a disc: (H, W, 3) uint8."""
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), 128 + 0 * x], axis=-1)
    disc = (y - height / 2) ** 2 + (x - width / 2) ** 2 < (min(height, width) / 4) ** 2
    img[disc] = (230, 40, 40)
    return img.astype(np.uint8)


def demo_inputs(config, *, audio_seconds: float = 2.0) -> dict:
    """Processor-style inputs for the tiny model: a spoken question and an image, as ids without a tokenizer."""
    from omni_model.processor import audio_token_count, image_patches, log_mel_features

    th = config.thinker_config
    vision = th.vision_config
    feats, mask = log_mel_features([synthetic_question(audio_seconds)], n_mels=th.audio_config.num_mel_bins)
    n_audio = audio_token_count(int(mask.sum()))
    side = vision.patch_size * vision.spatial_merge_size * 2
    pixels, grid = image_patches([synthetic_image(side, side)], patch_size=vision.patch_size,
                                 temporal_patch_size=vision.temporal_patch_size, merge_size=vision.spatial_merge_size)
    n_image = int(grid.prod()) // vision.spatial_merge_size**2
    text = [i for i in range(10, 20)]  # plain text ids of the tiny vocabulary
    ids = ([th.user_token_id] + [th.audio_start_token_id] + [th.audio_token_id] * n_audio
           + [th.audio_end_token_id] + [th.vision_start_token_id] + [th.image_token_id] * n_image
           + [th.vision_end_token_id] + text)
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=feats, feature_attention_mask=mask, pixel_values=pixels, image_grid_thw=grid)


def run_demo(out_dir: str = ".", device: str = "cpu") -> int:
    from omni_model.config import OmniConfig
    from omni_model.model import OmniModel

    t0 = time.perf_counter()
    config = OmniConfig.preset("tiny")
    model = OmniModel.from_config(config, device=device, dtype=torch.float32, seed=0)
    print("omni demo: the tiny Qwen2.5-Omni configuration with RANDOM weights: the reply is noise-like by "
          "design; it shows the pipeline (encoders, thinker, talker, DiT, vocoder) running and streaming.")
    print(f"  model built on {device} in {time.perf_counter() - t0:.2f}s")
    inputs = demo_inputs(config)
    print(f"  prompt: {inputs['input_ids'].shape[1]} tokens (a 2 s synthetic spoken question and a synthetic image)")
    out = Path(out_dir) / "reply.wav"
    writer = WavWriter(out)
    text: list[int] = []
    times: dict[str, float] = {}
    try:
        # Greedy codes: with random weights, sampling picks a stop code early about as often as any other code.
        for event in model.stream(**inputs, speaker="Chelsie", thinker_max_new_tokens=24, talker_max_new_tokens=200,
                                  talker_do_sample=False, seed=0):
            text.extend(event.text_ids)
            writer.write(event.audio)
            times = event.stage_times
    finally:
        writer.close()
    print(f"  text ids: {text}")
    print(f"  audio: {writer.samples} samples ({writer.samples / SAMPLE_RATE:.2f} s at {SAMPLE_RATE} Hz) -> {out}")
    marks = {k: v for k, v in times.items() if not k.startswith("token2wav_")}
    print("  stages (ms since the request): "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(marks.items(), key=lambda kv: kv[1])))
    if "token2wav_chunks" in times:
        print(f"  token2wav: {times['token2wav_chunks']:.0f} chunks, DiT {times['token2wav_dit_ms']:.0f} ms, "
              f"vocoder {times['token2wav_vocoder_ms']:.0f} ms "
              f"(first chunk {times['token2wav_first_chunk_ms']:.0f} ms)")
    print(f"omni demo: done in {time.perf_counter() - t0:.1f}s")
    return 0


# ------------------------------------------------------------------------------------------------ run


def _processor_inputs(processor, args: argparse.Namespace) -> dict:
    content = []
    if args.audio:
        content.append({"type": "audio", "audio": read_wav(args.audio)})
    if args.image:
        if not Path(args.image).is_file():
            raise FileNotFoundError(f"--image: no such file: {args.image}")
        from PIL import Image, UnidentifiedImageError

        try:
            content.append({"type": "image", "image": Image.open(args.image).convert("RGB")})
        except UnidentifiedImageError as exc:
            raise ValueError(f"--image: {args.image} is not an image PIL can read") from exc
    if args.video:
        if not Path(args.video).is_file():
            raise FileNotFoundError(f"--video: no such file: {args.video}")
        content.append({"type": "video", "video": str(args.video)})
    if args.text:
        content.append({"type": "text", "text": args.text})
    if not content:
        raise ValueError("give at least one of --text, --audio, --image, --video")
    conversation = [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audios = [c["audio"] for c in content if c["type"] == "audio"] or None
    images = [c["image"] for c in content if c["type"] == "image"] or None
    videos = [c["video"] for c in content if c["type"] == "video"] or None
    try:
        inputs = processor(text=prompt, audio=audios, images=images, videos=videos, return_tensors="pt",
                           padding=True)
    except Exception as exc:  # decoding backends raise many types; name the file the user gave
        raise ValueError(f"could not process the media ({type(exc).__name__}: {exc})") from exc
    return {k: v for k, v in inputs.items()}


def run_checkpoint(args: argparse.Namespace) -> int:
    from omni_model.model import OmniModel

    model_dir = Path(args.model)
    for name in ("config.json",):
        if not (model_dir / name).is_file():
            print(f"omni run: {model_dir} is not a checkpoint directory: {name} is missing", file=sys.stderr)
            return 2
    try:
        from transformers import Qwen2_5OmniProcessor
    except ImportError:
        print("omni run: needs transformers for the tokenizer and processor: pip install 'omni[run]'",
              file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        processor = Qwen2_5OmniProcessor.from_pretrained(model_dir)
    except ImportError as exc:  # transformers' video processor needs torchvision, even for prompts without video
        print(f"omni run: transformers could not build the Qwen2.5-Omni processor ({exc}); install torchvision "
              "for your torch", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"omni run: {exc}", file=sys.stderr)
        return 2
    try:
        inputs = _processor_inputs(processor, args)
        model = OmniModel.from_pretrained(model_dir, device=device, dtype=dtype,
                                          enable_audio_output=not args.no_audio)
    except (FileNotFoundError, ValueError, OSError) as exc:
        print(f"omni run: {exc}", file=sys.stderr)
        return 2
    writer = None if args.no_audio else WavWriter(args.out)
    tokens: list[int] = []
    printed = ""
    events = model.stream(**inputs, speaker=args.speaker, return_audio=not args.no_audio,
                          thinker_max_new_tokens=args.max_new_tokens)
    try:
        for event in events:
            if event.text_ids:
                tokens.extend(event.text_ids)
                text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
            if writer is not None:
                writer.write(event.audio)
    except KeyboardInterrupt:
        events.close()  # releases the request's cache blocks
        print("\nomni run: interrupted", file=sys.stderr)
        return 130
    finally:
        if writer is not None:
            writer.close()
    print()
    if writer is not None:
        print(f"omni run: {writer.samples / SAMPLE_RATE:.2f} s of audio -> {args.out}", file=sys.stderr)
    return 0
