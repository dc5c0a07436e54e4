"""Bad Thinker inputs: each is a clear ValueError raised before any encoder or decoder work.

"Before work" is enforced: the encoders and the decoder of the model under test raise AssertionError if called.
"""

from __future__ import annotations

import pytest
import torch

from omni_model import OmniConfig, OmniModel
from omni_model.models.audio_encoder import audio_token_lengths

PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def model():
    return OmniModel.from_config(OmniConfig.preset("tiny"), device="cpu", dtype=torch.float32,
                                 enable_audio_output=False)


@pytest.fixture
def no_work(model, monkeypatch):
    """The model, with every piece of real work turned into a failure."""
    def refuse(*args, **kwargs):
        raise AssertionError("work started before the inputs were checked")

    for module in (model.thinker.audio_tower, model.thinker.visual, model.thinker.model):
        monkeypatch.setattr(module, "forward", refuse)
    return model


def _ids(cfg, *parts):
    """One row of ids from ints and (token name, count) pairs."""
    names = {"audio": cfg.audio_token_id, "image": cfg.image_token_id, "video": cfg.video_token_id,
             "abos": cfg.audio_start_token_id, "aeos": cfg.audio_end_token_id,
             "vbos": cfg.vision_start_token_id, "veos": cfg.vision_end_token_id}
    row = []
    for p in parts:
        if isinstance(p, tuple):
            row += [names[p[0]]] * p[1]
        else:
            row.append(p)
    return torch.tensor([row])


def _audio(lens, frames, mel):
    feats = torch.randn(len(lens), mel, frames)
    mask = (torch.arange(frames)[None, :] < torch.tensor(lens)[:, None]).long()
    return feats, mask


def _image_inputs(cfg, grid=(1, 4, 4), tokens=None):
    t, h, w = grid
    n = t * h * w // 4 if tokens is None else tokens
    ids = _ids(cfg, 10, ("vbos", 1), ("image", n), ("veos", 1), 11)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=torch.randn(t * h * w, PATCH_DIM),
                image_grid_thw=torch.tensor([grid]))


def _audio_inputs(cfg, lens=(250,), tokens=None):
    feats, mask = _audio(list(lens), max(lens), cfg.audio_config.num_mel_bins)
    n = audio_token_lengths(torch.tensor(list(lens))).tolist()
    parts = [10]
    for i, k in enumerate(n):
        parts += [("abos", 1), ("audio", k if tokens is None or i else tokens), ("aeos", 1)]
    ids = _ids(cfg, *parts, 11)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                feature_attention_mask=mask)


def _video_inputs(cfg, grid=(2, 4, 4), seconds=(1.0,), tokens=None):
    t, h, w = grid
    n = t * h * w // 4 if tokens is None else tokens
    ids = _ids(cfg, 10, ("vbos", 1), ("video", n), ("veos", 1), 11)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                pixel_values_videos=torch.randn(t * h * w, PATCH_DIM), video_grid_thw=torch.tensor([grid]),
                video_second_per_grid=torch.tensor(list(seconds)))


def test_good_inputs_pass_the_checks(model):
    cfg = model.config.thinker_config
    for inputs in (_image_inputs(cfg), _audio_inputs(cfg, (250, 90)), _video_inputs(cfg)):
        logits = model.thinker_logits(**inputs)
        assert logits.shape == (*inputs["input_ids"].shape, cfg.text_config.vocab_size)
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize("tokens, match", [(3, "image tokens: the prompt has 3 tokens but image_grid_thw"),
                                           (5, "image tokens: the prompt has 5 tokens")])
def test_image_token_count_mismatch(no_work, tokens, match):
    with pytest.raises(ValueError, match=match):
        no_work.thinker_logits(**_image_inputs(no_work.config.thinker_config, tokens=tokens))


def test_video_token_count_mismatch(no_work):
    with pytest.raises(ValueError, match="video tokens: the prompt has 7 tokens but video_grid_thw"):
        no_work.thinker_logits(**_video_inputs(no_work.config.thinker_config, tokens=7))


def test_audio_token_count_mismatch(no_work):
    with pytest.raises(ValueError, match=r"audio tokens: the prompt has 61 tokens but input_features \(lengths"):
        no_work.thinker_logits(**_audio_inputs(no_work.config.thinker_config, tokens=61))


def test_media_tokens_without_features(no_work):
    inputs = _image_inputs(no_work.config.thinker_config)
    del inputs["pixel_values"], inputs["image_grid_thw"]
    with pytest.raises(ValueError, match="image tokens: the prompt has 4 tokens but image_grid_thw .* gives 0"):
        no_work.thinker_logits(**inputs)


def test_pixels_do_not_match_grid(no_work):
    inputs = _image_inputs(no_work.config.thinker_config)
    inputs["pixel_values"] = inputs["pixel_values"][:-1]
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(16, 1176\)"):
        no_work.thinker_logits(**inputs)


@pytest.mark.parametrize("grid", [(1, 5, 4), (1, 4, 6 + 1)])
def test_grid_not_divisible_by_merge_size(no_work, grid):
    inputs = _image_inputs(no_work.config.thinker_config, grid=grid, tokens=4)
    with pytest.raises(ValueError, match="divisible by the spatial merge size 2"):
        no_work.thinker_logits(**inputs)


def test_video_grid_not_divisible_by_merge_size(no_work):
    inputs = _video_inputs(no_work.config.thinker_config, grid=(2, 4, 3), tokens=6)
    with pytest.raises(ValueError, match=r"video_grid_thw\[0\] = \(2, 4, 3\).*divisible"):
        no_work.thinker_logits(**inputs)


def test_audio_mask_not_a_prefix(no_work):
    inputs = _audio_inputs(no_work.config.thinker_config, (250,))
    inputs["feature_attention_mask"][0, 10] = 0  # a hole: lengths no longer describe the mask
    with pytest.raises(ValueError, match="not a run of ones followed by zeros"):
        no_work.thinker_logits(**inputs)


def test_audio_mask_shape_disagrees_with_features(no_work):
    inputs = _audio_inputs(no_work.config.thinker_config, (250,))
    inputs["feature_attention_mask"] = inputs["feature_attention_mask"][:, :200]
    with pytest.raises(ValueError, match="feature_attention_mask must have shape"):
        no_work.thinker_logits(**inputs)


def test_audio_too_short(no_work):
    inputs = _audio_inputs(no_work.config.thinker_config, (250,))
    inputs["feature_attention_mask"][0, 2:] = 0
    with pytest.raises(ValueError, match="fewer than 3 mel frames"):
        no_work.thinker_logits(**inputs)


def test_second_per_grid_count(no_work):
    inputs = _video_inputs(no_work.config.thinker_config, seconds=(1.0, 2.0))
    with pytest.raises(ValueError, match="video_second_per_grid must have one entry per video"):
        no_work.thinker_logits(**inputs)


def test_attention_mask_shape(no_work):
    inputs = _image_inputs(no_work.config.thinker_config)
    inputs["attention_mask"] = inputs["attention_mask"][:, 1:]
    with pytest.raises(ValueError, match="attention_mask must have the shape of input_ids"):
        no_work.thinker_logits(**inputs)


def test_video_positions_beyond_limit(no_work):
    """Two frames 2000 s apart: temporal id 2 + 50000, the last text token 50004 > 32768. A clear ValueError before
    any work (docs/model.md: on long video prompts HF tries to allocate hundreds of GB instead)."""
    inputs = _video_inputs(no_work.config.thinker_config, grid=(2, 2, 2), seconds=(2000.0,))
    with pytest.raises(ValueError, match="position ids up to 50004, beyond max_position_embeddings 32768"):
        no_work.thinker_logits(**inputs)


def test_long_text_beyond_limit(no_work):
    limit = no_work.config.thinker_config.text_config.max_position_embeddings
    ids = torch.full((1, limit + 1), 10)
    with pytest.raises(ValueError, match=f"beyond max_position_embeddings {limit}"):
        no_work.thinker_logits(input_ids=ids, attention_mask=torch.ones_like(ids))
