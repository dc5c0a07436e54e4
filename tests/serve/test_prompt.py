"""The server's own processing held equal to transformers 4.57.6's: the prompt (chat template, placeholder
expansion), the audio features, the image resize and patches; plus media decoding and streamed detokenization."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from serve_helpers import png_bytes, tone, wav_file

from omni_model import OmniConfig
from omni_model.serve.media import ImageRule, MediaPolicy, decode_audio, decode_image, read_url, smart_resize
from omni_model.serve.prompt import IncrementalDetokenizer, PromptBuilder, Turn, load_image_rule
from omni_model.serve.protocol import APIError


def _hf_processor(path: Path):
    """Qwen2_5OmniProcessor (HF 4.57.6) from ``path`` without torchvision (nothing here reaches its video part)."""
    from omni_model.hf_compat import load_tiny_processor

    return load_tiny_processor(path)


@pytest.fixture(scope="module")
def builder(tiny_processor):
    return PromptBuilder.from_pretrained(tiny_processor, OmniConfig.preset("tiny").thinker_config)


def test_prompt_equals_hf_processor(builder, tiny_processor):
    from PIL import Image

    hf = _hf_processor(tiny_processor)
    rule = builder.image_rule
    small, large = png_bytes(40, 56, seed=1), png_bytes(300, 200, seed=2)
    policy = MediaPolicy()
    images = [decode_image(b, rule, param="x", policy=policy) for b in (small, large)]
    audios = [tone(1.0, freq=300.0), tone(2.3, freq=500.0)]
    turns = [Turn("system", [("text", "be brief")]),
             Turn("user", [("audio", audios[0]), ("image", images[0]), ("text", "what is it?")]),
             Turn("assistant", [("text", "a tone")]),
             Turn("user", [("image", images[1]), ("audio", audios[1]), ("text", "and now?")])]
    ours = builder.build(turns)
    prompt = builder.render(turns)
    conversation = [{"role": t.role, "content": [{"type": k, "text": v} if k == "text" else {"type": k}
                                                 for k, v in t.parts]} for t in turns]
    assert prompt == hf.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    pil = [Image.open(io.BytesIO(b)).convert("RGB") for b in (small, large)]
    theirs = hf(text=prompt, audio=audios, images=pil, return_tensors="pt", padding=True)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert torch.equal(ours["image_grid_thw"], theirs["image_grid_thw"])
    assert torch.equal(ours["feature_attention_mask"].long(), theirs["feature_attention_mask"].long())
    torch.testing.assert_close(ours["input_features"], theirs["input_features"], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"].float(), atol=1e-5, rtol=1e-5)
    # the resize rule itself, over many sizes, equals transformers'
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize as hf_smart_resize

    for h, w in [(1, 1), (27, 29), (40, 56), (300, 200), (1080, 1920), (5, 900), (4000, 3000)]:
        kw = dict(factor=28, min_pixels=rule.min_pixels, max_pixels=rule.max_pixels)
        assert smart_resize(h, w, **kw) == hf_smart_resize(h, w, **kw), (h, w)


def test_prompt_with_speech_system_prompt(builder):
    turns = [Turn("user", [("text", "hi")])]
    spoken = builder.render(turns, system_prompt="SPEAK")
    assert spoken.startswith("<|im_start|>system\nSPEAK<|im_end|>\n<|im_start|>user\nhi")
    own = [Turn("system", [("text", "mine")]), *turns]
    assert "SPEAK" not in builder.render(own, system_prompt="SPEAK")


def test_image_rule_spellings(tmp_path):
    import json

    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "size": {"shortest_edge": 3136,
                                                                               "longest_edge": 12845056}}))
    assert load_image_rule(tmp_path) == ImageRule(min_pixels=3136, max_pixels=12845056)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 100, "max_pixels": 200,
                                                                   "image_mean": [0.5, 0.5, 0.5]}))
    with pytest.raises(ValueError, match="image_mean"):
        load_image_rule(tmp_path)


@pytest.mark.parametrize("fmt", ["wav", "flac", "ogg", "mp3"])
def test_decode_audio_formats(fmt, tmp_path):
    sf = pytest.importorskip("soundfile")
    x = tone(1.0, rate=22050, freq=440.0)
    stereo = np.stack([x, x], axis=1)
    if fmt == "wav":
        raw = wav_file(x, 22050)
    else:
        if fmt.upper() not in sf.available_formats():
            pytest.skip(f"this libsndfile has no {fmt}")
        buf = io.BytesIO()
        sf.write(buf, stereo, 22050, format=fmt.upper(), subtype={"ogg": "VORBIS", "mp3": "MPEG_LAYER_III"}.get(fmt))
        raw = buf.getvalue()
    y = decode_audio(raw, fmt, param="a")
    assert y.dtype == np.float32 and y.ndim == 1 and abs(y.size - 16000) <= 1200  # mp3 adds encoder padding
    spectrum = np.abs(np.fft.rfft(y * np.hanning(y.size)))
    assert abs(np.argmax(spectrum) * 16000 / y.size - 440.0) < 3.0
    if fmt in ("wav", "flac"):  # lossless: the resampled tone itself
        t = np.arange(16000) / 16000
        ref = 0.5 * np.sin(2 * np.pi * 440.0 * t)
        assert np.abs(y[200:-200] - ref[200:-200]).max() < 2e-3


def test_decode_audio_refusals():
    with pytest.raises(APIError, match="no samples") as e:
        decode_audio(wav_file(np.zeros(0, np.float32)), "wav", param="p")
    assert e.value.param == "p" and e.value.status == 400
    with pytest.raises(APIError, match="30 s"):
        decode_audio(wav_file(np.zeros(16000 * 31, np.float32)), "wav", param="p")
    with pytest.raises(APIError, match="too short"):
        decode_audio(wav_file(np.zeros(100, np.float32)), "wav", param="p")
    with pytest.raises(APIError, match="could not be decoded"):
        decode_audio(b"RIFF....WAVEjunk", "wav", param="p")


def test_read_url_local_paths(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "x.png").write_bytes(png_bytes(28, 28))
    (tmp_path / "secret.png").write_bytes(png_bytes(28, 28))
    policy = MediaPolicy(local_root=allowed)
    assert read_url(str(allowed / "x.png"), param="u", kind="image", policy=policy)[:4] == b"\x89PNG"
    assert read_url(f"file://{allowed / 'x.png'}", param="u", kind="image", policy=policy)[:4] == b"\x89PNG"
    for url in (str(tmp_path / "secret.png"), str(allowed / ".." / "secret.png"), str(allowed / "none.png")):
        with pytest.raises(APIError):
            read_url(url, param="u", kind="image", policy=policy)
    with pytest.raises(APIError, match="allowed-local-media-path"):
        read_url(str(allowed / "x.png"), param="u", kind="image", policy=MediaPolicy())
    with pytest.raises(APIError, match="not image data"):
        read_url("data:audio/wav;base64,AAAA", param="u", kind="image", policy=policy)


def test_incremental_detokenizer_multibyte():
    """Byte-level BPE splits one character over several ids: pieces wait for whole characters and add up to the
    full decode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world", "héllo wörld"], trainer)
    text = "héllo 你好 wörld 🎵 done"
    ids = tok.encode(text).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some ids hold only part of a character
    detok = IncrementalDetokenizer(lambda x: tok.decode(x))
    pieces = [detok.add([i]) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == text == detok.text
    assert not any("\ufffd" in p for p in pieces)


def test_video_patches_equal_hf():
    """Our temporal patching equals the Qwen2-VL processor's (odd frame counts repeat the last frame)."""
    from transformers import Qwen2VLImageProcessor

    from omni_model.processor import video_patches

    video = np.random.default_rng(0).integers(0, 255, (5, 56, 84, 3), dtype=np.uint8)
    hf = Qwen2VLImageProcessor()
    theirs, grid = hf._preprocess(list(video), do_resize=False, do_rescale=True, rescale_factor=1 / 255,
                                  do_normalize=True, image_mean=hf.image_mean, image_std=hf.image_std, patch_size=14,
                                  temporal_patch_size=2, merge_size=2, do_convert_rgb=False, size=hf.size,
                                  resample=hf.resample)
    ours, ours_grid = video_patches([video])
    assert ours_grid.tolist() == [list(grid)] == [[3, 4, 6]]
    torch.testing.assert_close(ours, torch.from_numpy(theirs).float(), atol=1e-6, rtol=0)


def test_decode_video_samples_two_frames_a_second(builder):
    pytest.importorskip("av")
    from serve_helpers import mp4_bytes

    from omni_model.serve.media import VideoRule, decode_video, sample_indices

    rule = builder.video_rule
    frames, seconds = decode_video(mp4_bytes(frames=30, fps=10), rule, param="v", policy=MediaPolicy())
    # 3 s at 10 fps -> 6 frames at 2 fps, spread over frames 0..29
    assert frames.shape[0] == 6 and frames.dtype == np.uint8
    assert frames.shape[1] % 28 == 0 and frames.shape[2] % 28 == 0
    assert frames.shape[1] * frames.shape[2] <= rule.max_pixels
    levels = frames[:, frames.shape[1] // 2, frames.shape[2] // 2, 0].astype(int)
    expected = np.array(sample_indices(30, 10.0)) * 10 % 250
    assert np.abs(levels - expected).max() <= 6  # lossy codec: near the frame's own grey level
    assert seconds == pytest.approx(1.0)  # 2 frames per patch at 2 frames a second
    assert sample_indices(1, 30.0) == [0, 0] and len(sample_indices(30 * 600, 30.0)) == 768
    with pytest.raises(APIError, match="not a video"):
        decode_video(b"\x00" * 100, VideoRule(), param="v", policy=MediaPolicy())
    with pytest.raises(APIError, match="pixels a frame"):
        decode_video(mp4_bytes(frames=2), rule, param="v", policy=MediaPolicy(max_image_pixels=100))
    turns = [Turn("user", [("video", (frames, seconds)), ("text", "what happens?")])]
    inputs = builder.build(turns)
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[3, frames.shape[1] // 14, frames.shape[2] // 14]]
    assert int((inputs["input_ids"] == 3).sum()) == int(grid.prod()) // 4  # <|VIDEO|> once per merged patch
    assert inputs["video_second_per_grid"].tolist() == [pytest.approx(seconds)]
