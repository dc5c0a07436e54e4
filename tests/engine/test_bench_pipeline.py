"""The end-to-end benchmark runs on CPU at the tiny preset and produces complete, consistent records: every contract
field, time to first audio before the end of the answer, RTF = total / audio seconds, stage marks in pipeline
order, Token2Wav chunks covering every code once (the first chunk done before the first audio), HF's reply equal
to ours (same weights, fp32) with its first audio at its very end, and the video-with-audio prompt laid out as
HF's processor lays it out."""

import importlib.util
import math
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omni_benchmarks import bench_pipeline as bp
from omni_kernels.testing import RECORD_FIELDS
from omni_model.config import OmniConfig

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(records as dicts, plot path or None): one CPU run for the whole module (about 10 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # a loaded 2-core machine wakes torch's pool slowly for tiny ops
    try:
        plot = tmp_path_factory.mktemp("pipeline") / "timeline.png" if HAS_MATPLOTLIB else None
        rows = [r.to_dict() for r in bp.run(device="cpu", quick=True, plot_path=plot)]
    finally:
        torch.set_num_threads(n)
    return rows, plot


def _by(rows):
    return {(d["provider"], d["shape"]): d for d in rows}


def test_records_complete(bench):
    rows, _ = bench
    plan = bp.plan_for(torch.device("cpu"), True, "qwen2.5-omni-7b")
    speech, video = bp.speech_label(plan), bp.video_label(plan)
    assert speech == "tiny audio-5s reply<=2s" and video == "tiny video4s+audio prefill"
    expected = {(bp.STREAM, speech), (f"{bp.STREAM}-fc12", speech), (bp.STREAM, video)}
    if HAS_TRANSFORMERS:
        expected |= {(bp.HF, speech), (bp.HF, video)}
    assert set(_by(rows)) == expected
    for d in rows:
        assert d["bench"] == "pipeline" and d["dtype"] == "float32"
        assert set(RECORD_FIELDS) <= set(d), f"{d['provider']}: missing {set(RECORD_FIELDS) - set(d)}"
        assert d.get("error") is None, f"{d['provider']} / {d['shape']}: {d['error']}"
        assert "metric" in d and d["ms_p20"] <= d["ms_p50"] <= d["ms_p80"]
        assert d["peak_gib"] is None  # CUDA only


def test_stream_records(bench):
    rows, _ = bench
    plan = bp.plan_for(torch.device("cpu"), True, "")
    cfg = OmniConfig.preset("tiny")
    samples_per_code = cfg.token2wav_config.dit.repeats * 240
    for provider, first in ((bp.STREAM, 48), (f"{bp.STREAM}-fc12", 12)):
        d = _by(rows)[(provider, bp.speech_label(plan))]
        assert d["ttfa_ms"] == d["ms_p50"] > 0
        assert d["ttfa_ms"] < d["total_ms"]
        # Greedy talker on these weights runs to the cap; the audio is exactly the codes' samples.
        assert d["codes"] == plan.talker_codes and d["text_tokens"] == plan.thinker_tokens
        assert d["audio_s"] == pytest.approx(d["codes"] * samples_per_code / bp.SAMPLE_RATE)
        assert d["rtf"] == pytest.approx(d["total_ms"] / 1e3 / d["audio_s"])
        st = d["stage_times"]
        marks = [st[k] for k in bp.STAGES]
        assert marks == sorted(marks), st
        assert 0 <= d["prep_ms"] < st["first_audio"]  # host prompt checks before the stream's own clock starts
        chunks = d["chunks"]
        assert chunks[0]["codes"] == [0, first]
        assert [c["codes"][0] for c in chunks[1:]] == [c["codes"][1] for c in chunks[:-1]]
        assert chunks[-1]["codes"][1] == d["codes"]
        assert chunks[0]["end_ms"] <= d["ttfa_ms"]  # the first chunk's samples are the first audio
        for c in chunks:
            assert 0 < c["start_ms"] < c["end_ms"] <= d["total_ms"]
            assert c["dit_ms"] > 0 and c["vocoder_ms"] > 0
        assert d["first_chunk_codes"] == (None if first == 48 else 12)
    fast = _by(rows)[(f"{bp.STREAM}-fc12", bp.speech_label(plan))]
    assert len(fast["chunks"]) > 1


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_hf_records(bench):
    rows, _ = bench
    plan = bp.plan_for(torch.device("cpu"), True, "")
    by = _by(rows)
    hf = by[(bp.HF, bp.speech_label(plan))]
    assert hf["ttfa_ms"] == hf["total_ms"] == hf["stage_times"]["first_audio"]
    assert hf["stage_times"]["thinker"] < hf["stage_times"]["talker"] < hf["stage_times"]["token2wav"]
    # Same weights and inputs in fp32: HF writes our reply; its talker's last code is cut (HF drops the final id).
    assert hf["match_text_tokens"] == hf["text_tokens"] == plan.thinker_tokens
    assert 0 < hf["audio_s"] <= plan.talker_codes / 50
    assert hf["rtf"] == pytest.approx(hf["total_ms"] / 1e3 / hf["audio_s"])
    ours = by[(bp.STREAM, bp.speech_label(plan))]
    assert ours["baseline"] == bp.HF and ours["speedup"] == pytest.approx(hf["ms_p50"] / ours["ms_p50"])
    mem_ours, mem_hf = by[(bp.STREAM, bp.video_label(plan))], by[(bp.HF, bp.video_label(plan))]
    assert mem_ours["prompt_tokens"] == mem_hf["prompt_tokens"] > 100
    assert mem_hf["match_text_tokens"] == 1 and mem_ours["next_token"] == mem_hf["next_token"]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib not installed")
def test_plot_written(bench, tmp_path):
    rows, plot = bench
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = bp.plot_timeline(rows, tmp_path / "again.png")  # from JSON-style dicts too
    assert again is not None and again.stat().st_size > 10_000
    assert bp.plot_timeline([d for d in rows if d["provider"] == bp.HF], tmp_path / "none.png") is None


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_hf_code_table_processor():
    """7B: HF's talker may only pick codes the DiT embeds (8193) or a stop code, as our sampler's mask allows."""
    cfg = OmniConfig.preset("qwen2.5-omni-7b")
    table, stops = cfg.token2wav_config.dit.num_embeds, sorted(cfg.talker_config.stop_token_ids)
    [proc] = bp._code_table_processor(cfg)
    scores = torch.randn(2, cfg.talker_config.vocab_size)
    scores[0, table + 10] = 100.0  # outside the table: banned
    scores[0, stops[1]] = 50.0  # a stop code: kept
    scores[1, table + 10] = 100.0
    out = proc(None, scores.clone())
    assert out[0].argmax() == stops[1] and out[1].argmax() < table
    banned = torch.ones(cfg.talker_config.vocab_size, dtype=torch.bool)
    banned[:table] = False
    banned[stops] = False
    assert torch.isneginf(out[:, banned]).all() and torch.isfinite(out[:, ~banned]).all()
    assert bp._code_table_processor(OmniConfig.preset("tiny")) is None  # tiny: the table is the whole vocabulary


def test_chunk_lengths():
    # Temporal ids 0, 0, 25, 25, 50, 50, 75, 100 in chunks of 50: [0, 50), [50, 100), [100, ...).
    assert bp.chunk_lengths([0, 0, 25, 25, 50, 50, 75, 100], 50) == [4, 3, 1]
    assert bp.chunk_lengths(list(range(7)), 50) == [7]
    assert sum(bp.chunk_lengths(list(range(1500)), 50)) == 1500


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
@pytest.mark.parametrize("seconds, fps, frame_hw", [(4.0, 2.0, (56, 56)), (7.0, 2.0, (28, 56)), (3.0, 1.0, (56, 28))])
def test_video_layout_matches_hf_processor(seconds, fps, frame_hw):
    """Our video-with-audio ids equal the expansion by HF 4.57.6's processor code of
    ``<vision_bos><VIDEO><vision_eos>`` with the same grid, seconds per grid and audio length."""
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import Qwen2_5OmniProcessor

    from omni_model.processor import audio_token_count

    cfg = OmniConfig.preset("tiny")
    th = cfg.thinker_config
    inputs = bp.video_audio_inputs(cfg, seconds, fps, frame_hw)
    grid = inputs["video_grid_thw"][0].numpy()
    names = {"<|AUDIO|>": th.audio_token_id, "<|VIDEO|>": th.video_token_id, "<|IMAGE|>": th.image_token_id,
             "<|audio_bos|>": th.audio_start_token_id, "<|audio_eos|>": th.audio_end_token_id,
             "<|vision_bos|>": th.vision_start_token_id, "<|vision_eos|>": th.vision_end_token_id}
    merge = th.vision_config.spatial_merge_size
    fake = SimpleNamespace(audio_token="<|AUDIO|>", image_token="<|IMAGE|>", video_token="<|VIDEO|>",
                           vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
                           audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
                           image_processor=SimpleNamespace(merge_size=merge),
                           video_processor=SimpleNamespace(merge_size=merge))
    fake.get_chunked_index = lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(fake, idx, n)
    [text] = Qwen2_5OmniProcessor.replace_multimodal_special_tokens(
        fake, ["<|vision_bos|><|VIDEO|><|vision_eos|>"],
        iter([audio_token_count(int(inputs["feature_attention_mask"].sum()))]), iter([]), iter([grid]),
        video_second_per_grid=iter([float(inputs["video_second_per_grid"][0])]), use_audio_in_video=True,
        position_id_per_seconds=th.position_id_per_seconds, seconds_per_chunk=float(th.seconds_per_chunk))
    hf_ids = [names[t] for t in re.findall(r"<\|\w+\|>", text)]
    ids = inputs["input_ids"][0].tolist()
    body = ids[bp.PREFIX_TOKENS:len(ids) - bp.SUFFIX_TOKENS]
    assert body == hf_ids
    assert inputs["pixel_values_videos"].shape[0] == int(np.prod(grid))
    assert grid[0] == max(1, round(seconds * fps / th.vision_config.temporal_patch_size))


def test_spoken_question_inputs():
    cfg = OmniConfig.preset("tiny")
    th = cfg.thinker_config
    inputs = bp.spoken_question_inputs(cfg, 5.0)
    ids = inputs["input_ids"][0]
    assert int(inputs["feature_attention_mask"].sum()) == 500  # 5 s at 100 mel frames per second
    assert int((ids == th.audio_token_id).sum()) == 125  # 25 audio tokens per second
    assert ids.shape[0] == bp.PREFIX_TOKENS + 2 + 125 + bp.SUFFIX_TOKENS
    # 60 s of audio: two processor windows joined into one 6000-frame clip (1500 tokens).
    feats, mask = bp._log_mel(cfg, 60.0, 0)
    assert feats.shape[-1] == mask.shape[-1] == 6000 and int(mask.sum()) == 6000
    assert math.isfinite(float(feats.abs().max()))


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers not installed")
def test_hf_generate_takes_the_code_table(monkeypatch):
    """The processor reaches HF's talker through ``generate(talker_logits_processor=...)`` (the 7B path: its DiT
    table is smaller than the codec vocabulary). Tiny has no gap, so the table is cut to 60 codes here."""
    from omni_model.model import OmniModel

    cfg = OmniConfig.preset("tiny")
    table, stops = 60, set(cfg.talker_config.stop_token_ids)
    small = SimpleNamespace(talker_config=cfg.talker_config,
                            token2wav_config=SimpleNamespace(dit=SimpleNamespace(num_embeds=table)))
    real = bp._code_table_processor
    monkeypatch.setattr(bp, "_code_table_processor", lambda _cfg: real(small))
    torch.manual_seed(0)
    model = OmniModel.from_config(cfg, device="cpu", dtype=torch.float32, seed=0)
    hf = bp.build_hf(cfg, model, torch.float32, torch.device("cpu"))
    prompt = bp.spoken_question_inputs(cfg, 1.0)
    codes = []
    original = hf.talker.generate

    def capture(*args, **kwargs):
        out = original(*args, **kwargs)
        codes.extend(out[0, kwargs["input_ids"].shape[1]:].tolist())
        return out

    monkeypatch.setattr(hf.talker, "generate", capture)
    plan = bp.plan_for(torch.device("cpu"), True, "")
    run = bp.hf_generate_once(hf, cfg, prompt, plan, torch.device("cpu"), thinker_tokens=3, talker_codes=30)
    assert len(codes) >= 2 and all(c < table or c in stops for c in codes), codes
    assert run.audio_s > 0 and set(run.stage_times) >= {"thinker", "talker", "token2wav"}
