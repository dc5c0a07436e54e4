import numpy as np
import pytest
import torch

from omni_model.processor import audio_token_count, image_patches, log_mel_features

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("n_mels", [128, 20])
def test_log_mel_equals_whisper_feature_extractor(n_mels):
    from transformers import WhisperFeatureExtractor

    rng = np.random.default_rng(0)
    clips = [rng.standard_normal(16000 * 3 + 37).astype(np.float32) * 0.1,
             np.sin(np.arange(8000) / 16000 * 2 * np.pi * 440).astype(np.float32)]
    fe = WhisperFeatureExtractor(feature_size=n_mels)
    hf = fe(clips, sampling_rate=16000, padding="max_length", return_attention_mask=True, return_tensors="pt")
    feats, mask = log_mel_features(clips, n_mels=n_mels)
    assert torch.equal(mask, hf["attention_mask"].to(mask.dtype))
    torch.testing.assert_close(feats, hf["input_features"], atol=2e-5, rtol=1e-5)


def test_image_patches_equal_qwen2vl_processor():
    pytest.importorskip("PIL")
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (56, 84, 3), dtype=np.uint8), rng.integers(0, 256, (112, 56, 3), dtype=np.uint8)]
    proc = Qwen2VLImageProcessor(do_resize=False)
    hf = proc(images=images, return_tensors="pt")
    pixels, grid = image_patches(images)
    assert torch.equal(grid, hf["image_grid_thw"])
    torch.testing.assert_close(pixels, hf["pixel_values"], atol=1e-6, rtol=1e-6)


def test_bad_media():
    with pytest.raises(ValueError, match=r"audios\[0\] must be 1-D"):
        log_mel_features([np.zeros((2, 100), np.float32)])
    with pytest.raises(ValueError, match=r"images\[0\] sides must be multiples of 28"):
        image_patches([np.zeros((30, 28, 3), np.uint8)])


def test_audio_token_count():
    assert audio_token_count(100) == 25  # 1 s
    assert audio_token_count(300) == 75
