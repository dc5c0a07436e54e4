"""get_rope_index against HF transformers 4.57.6's ``get_rope_index``, element for element.

Prompts are laid out by HF's processor code (``Qwen2_5OmniProcessor.replace_multimodal_special_tokens`` with a
stand-in tokenizer side), so the video-with-audio interleaving is the processor's own. The oracle is HF's method,
bound to the tiny Thinker (docs/model.md's tiny configuration) for the hand-written cases and to a namespace carrying
the attributes the method reads (``spatial_merge_size``, ``config.*_token_id``, ``position_id_per_seconds``,
``seconds_per_chunk``) where the property test varies the merge size and the chunking.
"""

from __future__ import annotations

import re
import types

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniThinkerConfig
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import (
    Qwen2_5OmniPreTrainedModelForConditionalGeneration as HFBase,
)
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniThinkerForConditionalGeneration
from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

from omni_model.rope_index import audio_token_count, get_rope_index

# docs/model.md's tiny token ids.
AUDIO, IMAGE, VIDEO, AUDIO_BOS, AUDIO_EOS, VISION_BOS, VISION_EOS = 1, 2, 3, 4, 5, 7, 8
TINY_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, audio_token_id=AUDIO, vision_start_token_id=VISION_BOS,
                audio_start_token_id=AUDIO_BOS, audio_end_token_id=AUDIO_EOS)
PAD = 0
SPECIAL = {"<|AUDIO|>": AUDIO, "<|IMAGE|>": IMAGE, "<|VIDEO|>": VIDEO, "<|audio_bos|>": AUDIO_BOS,
           "<|audio_eos|>": AUDIO_EOS, "<|vision_bos|>": VISION_BOS, "<|vision_eos|>": VISION_EOS}
AUDIO_SEG = "<|audio_bos|><|AUDIO|><|audio_eos|>"
IMAGE_SEG = "<|vision_bos|><|IMAGE|><|vision_eos|>"
VIDEO_SEG = "<|vision_bos|><|VIDEO|><|vision_eos|>"


def text(*ids: int) -> str:
    return "".join(f"<t{i}>" for i in ids)


@pytest.fixture(scope="module")
def hf_thinker():
    """HF's tiny Thinker (docs/model.md, "The tiny configuration"); only its get_rope_index is used."""
    config = Qwen2_5OmniThinkerConfig(
        text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=37,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}),
        vision_config=dict(depth=2, hidden_size=32, num_heads=4, intermediate_size=24, out_hidden_size=32,
                           spatial_merge_size=2, window_size=112, fullatt_block_indexes=[1]),
        audio_config=dict(d_model=32, encoder_attention_heads=4, encoder_layers=2, encoder_ffn_dim=32,
                          num_mel_bins=20, n_window=100, output_dim=32),
        audio_token_index=AUDIO, image_token_index=IMAGE, video_token_index=VIDEO, audio_start_token_id=AUDIO_BOS,
        audio_end_token_id=AUDIO_EOS, user_token_id=6, vision_start_token_id=VISION_BOS,
        vision_end_token_id=VISION_EOS,
    )
    return Qwen2_5OmniThinkerForConditionalGeneration(config)


def hf_oracle(merge: int, per_second: int, per_chunk: int):
    """HF's get_rope_index bound to a namespace with exactly the attributes it reads."""
    obj = types.SimpleNamespace(
        spatial_merge_size=merge,
        config=types.SimpleNamespace(**TINY_IDS, position_id_per_seconds=per_second, seconds_per_chunk=per_chunk),
    )
    obj.get_llm_pos_ids_for_vision = types.MethodType(HFBase.get_llm_pos_ids_for_vision, obj)
    obj.get_chunked_index = types.MethodType(HFBase.get_chunked_index, obj)
    return types.MethodType(HFBase.get_rope_index, obj)


def layout(texts, *, mels=(), images=(), videos=(), seconds=(), use_audio_in_video=False, merge=2,
           per_second=25, per_chunk=2):
    """HF processor expansion of prompts written with ``<tN>`` text ids and the media placeholders, left padded.

    Returns the keyword arguments of get_rope_index (without the tiny ids and chunking)."""
    fake = types.SimpleNamespace(
        audio_token="<|AUDIO|>", image_token="<|IMAGE|>", video_token="<|VIDEO|>",
        vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
        audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
        image_processor=types.SimpleNamespace(merge_size=merge),
        video_processor=types.SimpleNamespace(merge_size=merge),
    )
    fake.get_chunked_index = lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(fake, idx, n)
    expanded = Qwen2_5OmniProcessor.replace_multimodal_special_tokens(
        fake, list(texts), iter([audio_token_count(m) for m in mels]),
        iter(np.array(images, dtype=np.int64).reshape(-1, 3)),
        iter(np.array(videos, dtype=np.int64).reshape(-1, 3)), video_second_per_grid=iter(seconds),
        use_audio_in_video=use_audio_in_video, position_id_per_seconds=per_second,
        seconds_per_chunk=float(per_chunk),
    )
    rows = [[SPECIAL[t] if t in SPECIAL else int(t[2:-1]) for t in re.findall(r"<\|\w+\|>|<t\d+>", s)]
            for s in expanded]
    width = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    return dict(
        input_ids=input_ids,
        attention_mask=mask,
        image_grid_thw=torch.tensor(images, dtype=torch.int64) if images else None,
        video_grid_thw=torch.tensor(videos, dtype=torch.int64) if videos else None,
        audio_seqlens=torch.tensor(mels, dtype=torch.int64) if mels else None,
        second_per_grids=torch.tensor(seconds, dtype=torch.float32) if videos else None,  # as BatchFeature makes it
        use_audio_in_video=use_audio_in_video,
    )


def ours(inputs, *, merge=2, per_second=25, per_chunk=2):
    return get_rope_index(**inputs, spatial_merge_size=merge, position_id_per_seconds=per_second,
                          seconds_per_chunk=per_chunk, **TINY_IDS)


def assert_equal_to_hf(hf_fn, inputs, **kw):
    pos, delta = ours(inputs, **kw)
    hf_pos, hf_delta = hf_fn(**inputs)
    B, L = inputs["input_ids"].shape
    assert pos.shape == (3, B, L) and pos.dtype == torch.int64
    assert delta.shape == (B, 1) and delta.dtype == torch.int64
    torch.testing.assert_close(pos, hf_pos.long(), rtol=0, atol=0)
    torch.testing.assert_close(delta, hf_delta.long(), rtol=0, atol=0)
    return pos, delta


# ---------------------------------------------------------------------------------------------- worked example


def test_reference_worked_example():
    ids = [100, 101, 7, 4] + [3] * 8 + [1] * 50 + [3] * 4 + [1] * 25 + [5, 8, 102, 103]
    pos, delta = get_rope_index(
        torch.tensor([ids]), video_grid_thw=torch.tensor([[3, 2, 2]]), use_audio_in_video=True,
        audio_seqlens=torch.tensor([300]), second_per_grids=torch.tensor([1.0]), spatial_merge_size=1, **TINY_IDS,
    )
    r = lambda a, b: list(range(a, b + 1))
    t = [0, 1, 2, 2] + [3] * 4 + [28] * 4 + r(3, 52) + [53] * 4 + r(53, 77) + [78, 78, 79, 80]
    h = [0, 1, 2, 2] + [3, 3, 4, 4] * 2 + r(3, 52) + [3, 3, 4, 4] + r(53, 77) + [78, 78, 79, 80]
    w = [0, 1, 2, 2] + [3, 4] * 4 + r(3, 52) + [3, 4, 3, 4] + r(53, 77) + [78, 78, 79, 80]
    torch.testing.assert_close(pos, torch.tensor([[t], [h], [w]]), rtol=0, atol=0)
    torch.testing.assert_close(delta, torch.tensor([[-14]]), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------- hand-written


CASES = {
    "text_only": dict(texts=[text(10, 11, 12, 13), text(20), text(30, 31)]),
    "audio_only": dict(texts=[text(10) + AUDIO_SEG + text(11, 12)], mels=[203]),
    "two_images": dict(texts=[text(10) + IMAGE_SEG + text(11) + IMAGE_SEG + text(12, 13)],
                       images=[(1, 4, 6), (2, 8, 2)]),
    "video_fractional": dict(texts=[VIDEO_SEG + text(11) + VIDEO_SEG + text(12) + VIDEO_SEG],
                             videos=[(5, 2, 4), (6, 4, 2), (3, 2, 2)], seconds=[0.5, 1.33, 2.0]),
    "video_with_audio": dict(texts=[text(10) + VIDEO_SEG + text(11, 12)], videos=[(7, 4, 4)], seconds=[1.33],
                             mels=[530], use_audio_in_video=True),
    # t ids 0, 65, 130, ...: every frame jumps a chunk, HF's chunking lags (frames are split across chunks).
    "video_with_audio_chunk_jumps": dict(texts=[VIDEO_SEG + text(11)], videos=[(6, 2, 4)], seconds=[2.6],
                                         mels=[900], use_audio_in_video=True),
    # Tall frames, short audio: the eos id follows the audio, below the video's maximum (an HF quirk).
    "video_with_short_audio": dict(texts=[text(10) + VIDEO_SEG + text(11, 12)], videos=[(1, 16, 2)], seconds=[1.0],
                                   mels=[13], use_audio_in_video=True),
    "audio_longer_than_video": dict(texts=[VIDEO_SEG + AUDIO_SEG], videos=[(2, 2, 2)], seconds=[0.5],
                                    mels=[900, 40], use_audio_in_video=True),
    "batch_left_padding": dict(
        texts=[text(10) + IMAGE_SEG + text(11) + AUDIO_SEG, text(12),
               text(13, 14) + VIDEO_SEG + text(15) + IMAGE_SEG, AUDIO_SEG + text(16)],
        images=[(1, 2, 4), (1, 6, 6)], videos=[(4, 4, 2)], seconds=[1.33], mels=[97, 35]),
    "batch_left_padding_audio_in_video": dict(
        texts=[text(10) + VIDEO_SEG + text(11), text(12), AUDIO_SEG + IMAGE_SEG + VIDEO_SEG],
        images=[(1, 4, 4)], videos=[(3, 2, 2), (9, 2, 4)], seconds=[2.0, 0.5], mels=[380, 55, 720],
        use_audio_in_video=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_hand_written_cases_equal_hf(hf_thinker, name):
    inputs = layout(**CASES[name])
    pos, _ = assert_equal_to_hf(hf_thinker.get_rope_index, inputs)
    mask = inputs["attention_mask"].bool()
    assert bool((pos[:, ~mask] == 1).all()), "padded slots must hold id 1"


def test_namespace_oracle_is_hf_thinker(hf_thinker):
    # The property test's oracle reads the same attributes as the real model's method.
    inputs = layout(**CASES["batch_left_padding_audio_in_video"])
    a, b = hf_oracle(2, 25, 2)(**inputs), hf_thinker.get_rope_index(**inputs)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_text_path_deltas_count_padding():
    # HF's 1-D path takes the maximum over the padded slots too: a one-token row next to padding gets delta 1.
    inputs = layout([text(10, 11, 12), text(13), text(14, 15)])
    pos, delta = assert_equal_to_hf(hf_oracle(2, 25, 2), inputs)
    assert delta.flatten().tolist() == [0, 1, 0]


def test_no_mask_and_int32_ids(hf_thinker):
    inputs = layout(**CASES["video_with_audio"])
    inputs["attention_mask"] = None
    expected = hf_thinker.get_rope_index(**inputs)
    inputs["input_ids"] = inputs["input_ids"].to(torch.int32)
    pos, delta = ours(inputs)
    assert pos.dtype == torch.int64 and delta.dtype == torch.int64
    torch.testing.assert_close(pos, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(delta, expected[1], rtol=0, atol=0)


def test_inputs_are_not_modified():
    inputs = layout(**CASES["batch_left_padding"])
    before = {k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    ours(inputs)
    for k, v in before.items():
        assert torch.equal(inputs[k], v), k


# ------------------------------------------------------------------------------------------- property test

SECONDS = st.one_of(st.sampled_from([0.5, 1.0, 1.33, 2.0, 0.04, 0.7, 2.6, 0.0]),
                    st.floats(0.0, 3.0, width=32, allow_subnormal=False))


@st.composite
def prompts(draw):
    merge = draw(st.sampled_from([2, 2, 1]))
    per_second, per_chunk = draw(st.sampled_from([(25, 2), (25, 2), (25, 1), (13, 2)]))
    use_audio_in_video = draw(st.booleans())
    texts, mels, images, videos, seconds = [], [], [], [], []
    for _ in range(draw(st.integers(1, 3))):
        parts = []
        for kind in draw(st.lists(st.sampled_from(["text", "audio", "image", "video"]), min_size=1, max_size=6)):
            if kind == "text":
                parts.append(text(*draw(st.lists(st.integers(10, 98), min_size=1, max_size=5))))
            elif kind == "audio":
                mels.append(draw(st.integers(3, 500)))
                parts.append(AUDIO_SEG)
            elif kind == "image":
                images.append((draw(st.integers(1, 2)), merge * draw(st.integers(1, 4)),
                               merge * draw(st.integers(1, 4))))
                parts.append(IMAGE_SEG)
            else:
                videos.append((draw(st.integers(1, 8)), merge * draw(st.integers(1, 6)),
                               merge * draw(st.integers(1, 3))))
                seconds.append(draw(SECONDS))
                if use_audio_in_video:  # the video's own audio, in prompt order with the other audios
                    mels.append(draw(st.integers(3, 900)))
                parts.append(VIDEO_SEG)
        texts.append("".join(parts))
    inputs = layout(texts, mels=mels, images=images, videos=videos, seconds=seconds,
                    use_audio_in_video=use_audio_in_video, merge=merge, per_second=per_second, per_chunk=per_chunk)
    if draw(st.integers(0, 4)) == 0:
        # An unused trailing image grid: HF ignores it, and it sends text/audio-only batches down the vision path.
        extra = torch.tensor([[1, 2 * merge, 2 * merge]])
        grid = inputs["image_grid_thw"]
        inputs["image_grid_thw"] = extra if grid is None else torch.cat([grid, extra])
    lengths = inputs["attention_mask"].sum(-1)
    has_grid = inputs["image_grid_thw"] is not None or videos
    if has_grid and bool((lengths == lengths[0]).all()) and draw(st.booleans()):
        inputs["attention_mask"] = None  # HF's 1-D path needs a mask; the vision path does not
    return inputs, dict(merge=merge, per_second=per_second, per_chunk=per_chunk)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prompts())
def test_random_prompts_equal_hf(case):
    inputs, kw = case
    assert_equal_to_hf(hf_oracle(kw["merge"], kw["per_second"], kw["per_chunk"]), inputs, **kw)


# ------------------------------------------------------------------------------------------------- errors


def _mixed_inputs(use_audio_in_video=False):
    if use_audio_in_video:
        return layout(**CASES["batch_left_padding_audio_in_video"])
    return layout(**CASES["batch_left_padding"])


def _drop_token(inputs, token, which):
    """Removes one ``token`` (the ``which``-th real one of the batch), re-padding on the left."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows = [ids[b][mask[b].bool()].tolist() for b in range(ids.shape[0])]
    hits = [(b, i) for b, r in enumerate(rows) for i, x in enumerate(r) if x == token]
    b, i = hits[which % len(hits)]
    del rows[b][i]
    width = max(map(len, rows))
    inputs = dict(inputs)
    inputs["input_ids"] = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    inputs["attention_mask"] = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return inputs


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.sampled_from([IMAGE, VIDEO, AUDIO]), st.integers(0, 10_000))
def test_missing_media_token_raises(use_audio_in_video, token, which):
    inputs = _drop_token(_mixed_inputs(use_audio_in_video), token, which)
    with pytest.raises(ValueError, match="image_grid_thw|video_grid_thw|audio_seqlens"):
        ours(inputs)


@settings(max_examples=40, deadline=None)
@given(st.booleans(), st.sampled_from(["image_grid_thw", "video_grid_thw", "audio_seqlens"]), st.integers(-3, 3))
def test_wrong_grid_or_length_raises(use_audio_in_video, name, change):
    inputs = _mixed_inputs(use_audio_in_video)
    value = inputs[name].clone()
    change = change or 1
    if name == "audio_seqlens":
        value[-1] += 4 * change  # 4 mel frames = one token
    else:
        t = int(value[-1, 0])
        value[-1, 0] = t + change if t + change >= 1 else t + 1
    inputs[name] = value
    with pytest.raises(ValueError, match=name):
        ours(inputs)


@pytest.mark.parametrize("name", ["image_grid_thw", "video_grid_thw", "audio_seqlens"])
def test_fewer_grids_than_media_raises(name):
    inputs = _mixed_inputs()
    inputs[name] = inputs[name][:-1]
    if name == "video_grid_thw":
        inputs["second_per_grids"] = inputs["second_per_grids"][:-1]
        inputs[name] = inputs[name] if len(inputs[name]) else None
    with pytest.raises(ValueError, match=name):
        ours(inputs)


def test_argument_errors_name_the_argument():
    good = _mixed_inputs()
    cases = {
        "input_ids": [dict(input_ids=good["input_ids"][0]), dict(input_ids=good["input_ids"].float())],
        "attention_mask": [dict(attention_mask=good["attention_mask"][:, 1:]),
                           dict(attention_mask=good["attention_mask"] * 2)],
        "image_grid_thw": [dict(image_grid_thw=good["image_grid_thw"][:, :2]),
                           dict(image_grid_thw=good["image_grid_thw"] + torch.tensor([0, 1, 0]))],
        "video_grid_thw": [dict(video_grid_thw=good["video_grid_thw"].float())],
        "second_per_grids": [dict(second_per_grids=torch.tensor([1.0, 2.0])), dict(second_per_grids=None),
                             dict(second_per_grids=torch.tensor([-1.0]))],
        "audio_seqlens": [dict(audio_seqlens=None), dict(audio_seqlens=good["audio_seqlens"].float())],
    }
    for name, changes in cases.items():
        for change in changes:
            with pytest.raises(ValueError, match=name):
                ours({**good, **change})
    with pytest.raises(ValueError, match="spatial_merge_size"):
        ours(good, merge=0)
    with pytest.raises(ValueError, match="seconds_per_chunk"):
        ours(good, per_chunk=0)


def test_video_without_its_audio_raises():
    # use_audio_in_video with a plainly laid out video: HF silently gives the video tokens text ids.
    inputs = layout([text(10) + VIDEO_SEG + AUDIO_SEG], videos=[(2, 2, 2)], seconds=[1.0], mels=[40])
    inputs["use_audio_in_video"] = True
    with pytest.raises(ValueError, match="video"):
        ours(inputs)


def test_text_path_checks_audio_counts():
    inputs = layout([text(10) + AUDIO_SEG], mels=[203])
    inputs["audio_seqlens"] = torch.tensor([250])
    with pytest.raises(ValueError, match="audio_seqlens"):
        ours(inputs)
