"""Thinker parity with HF transformers 4.57.6: the tiny model with scaled random weights, saved by HF and loaded by
ours, in fp32, on the torch and Triton backends (Triton runs under TRITON_INTERPRET=1 on CPU).

Inputs are built the way the HF processor builds them: prompt text expanded by the processor's own
``replace_multimodal_special_tokens`` (so the audio-in-video interleaving is HF's), left padding, mel features
(B_audio, mel, frames) with feature_attention_mask, patches (N, C * tp * p * p) with grids.

Criterion (issue #3): max |ours - HF| over real tokens <= 1e-4 * max |HF logits|. At padded positions HF still
returns rows (from queries whose every key is padding) that mean nothing; ours are 0 there, and only real tokens
are compared.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni_kernels import available
from omni_model import OmniConfig, OmniModel
from omni_model import model as model_module
from omni_model.layers.backend import use_backend
from omni_model.loader import CheckpointError, load_state_dict
from omni_model.model import prepare_thinker_prompt
from omni_model.models.audio_encoder import audio_token_lengths

_processing = pytest.importorskip("transformers.models.qwen2_5_omni.processing_qwen2_5_omni")
Qwen2_5OmniProcessor = _processing.Qwen2_5OmniProcessor

OPS = ("window_attention", "apply_tmrope", "store_kv_cache", "tmrope_store_kv", "paged_prefill_attention",
       "paged_decode_attention")


def _backend_param(name: str):
    missing = [op for op in OPS if name not in available(op, "cpu")]
    marks = pytest.mark.skip(reason=f"no {name} backend on cpu for: {', '.join(missing)}") if missing else ()
    return pytest.param(name, marks=marks, id=name)


BACKENDS = [_backend_param("torch"), _backend_param("triton")]
PATCH_DIM = 3 * 2 * 14 * 14
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def models(tiny_hf_checkpoint):
    path, hf = tiny_hf_checkpoint
    hf_thinker = getattr(hf, "thinker", hf).float().eval()
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, enable_audio_output=False)
    return hf_thinker, ours


def _special_ids(cfg) -> dict[str, int]:
    return {
        "<|AUDIO|>": cfg.audio_token_id, "<|IMAGE|>": cfg.image_token_id, "<|VIDEO|>": cfg.video_token_id,
        "<|audio_bos|>": cfg.audio_start_token_id, "<|audio_eos|>": cfg.audio_end_token_id,
        "<|vision_bos|>": cfg.vision_start_token_id, "<|vision_eos|>": cfg.vision_end_token_id,
    }


def expand_prompts(cfg, texts, *, audio_lens=(), image_grids=(), video_grids=(), seconds=(), use_audio_in_video=False):
    """Token ids (B, L) and left-padded attention_mask of prompts written as ``<tN>`` text ids and special tokens,
    with the media placeholders expanded by HF's processor code."""
    merge = cfg.vision_config.spatial_merge_size
    fake = SimpleNamespace(
        audio_token="<|AUDIO|>", image_token="<|IMAGE|>", video_token="<|VIDEO|>",
        vision_bos_token="<|vision_bos|>", vision_eos_token="<|vision_eos|>",
        audio_bos_token="<|audio_bos|>", audio_eos_token="<|audio_eos|>",
        image_processor=SimpleNamespace(merge_size=merge), video_processor=SimpleNamespace(merge_size=merge),
    )
    fake.get_chunked_index = lambda idx, n: Qwen2_5OmniProcessor.get_chunked_index(fake, idx, n)
    audio_tokens = audio_token_lengths(torch.tensor(list(audio_lens), dtype=torch.int64)).tolist()
    expanded = Qwen2_5OmniProcessor.replace_multimodal_special_tokens(
        fake, list(texts), iter(audio_tokens), iter(np.array(image_grids, dtype=np.int64).reshape(-1, 3)),
        iter(np.array(video_grids, dtype=np.int64).reshape(-1, 3)), video_second_per_grid=iter(seconds),
        use_audio_in_video=use_audio_in_video, position_id_per_seconds=cfg.position_id_per_seconds,
        seconds_per_chunk=float(cfg.seconds_per_chunk),
    )
    special = _special_ids(cfg)
    rows = [[special[t] if t in special else int(t[2:-1]) for t in re.findall(r"<\|\w+\|>|<t\d+>", s)]
            for s in expanded]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, the processor's default for this model
        ids[i, width - len(r):] = torch.tensor(r)
        mask[i, width - len(r):] = 1
    return ids, mask


def _audio(lens, frames, mel, seed):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(len(lens), mel, frames, generator=g)
    mask = (torch.arange(frames)[None, :] < torch.tensor(lens)[:, None]).long()
    return feats * mask[:, None, :], mask


def _pixels(grids, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(t * h * w for t, h, w in grids), PATCH_DIM, generator=g)


def build_case(name: str, cfg) -> dict:
    """Processor-like inputs of one parity case (small shapes: the Triton interpreter is slow)."""
    mel = cfg.audio_config.num_mel_bins
    if name == "text":
        ids, mask = expand_prompts(cfg, ["<t10><t11><t12><t13><t14><t15><t16><t17><t18>", "<t20><t21><t22><t23>"])
        return dict(input_ids=ids, attention_mask=mask)
    if name == "audio":  # 250 frames = a 2 s chunk and a tail chunk; 90 frames = one short chunk
        lens = [250, 90]
        feats, fmask = _audio(lens, 250, mel, 1)
        ids, mask = expand_prompts(cfg, ["<t10><|audio_bos|><|AUDIO|><|audio_eos|><t11><|audio_bos|><|AUDIO|>"
                                         "<|audio_eos|><t12>"], audio_lens=lens)
        return dict(input_ids=ids, attention_mask=mask, input_features=feats, feature_attention_mask=fmask)
    if name == "image":  # 4 x 6 patches (one window), 10 x 12 patches (windows cut at the edge)
        grids = [(1, 4, 6), (1, 10, 12)]
        ids, mask = expand_prompts(cfg, ["<t10><|vision_bos|><|IMAGE|><|vision_eos|><t11><|vision_bos|><|IMAGE|>"
                                         "<|vision_eos|><t12>"], image_grids=grids)
        return dict(input_ids=ids, attention_mask=mask, pixel_values=_pixels(grids, 2),
                    image_grid_thw=torch.tensor(grids))
    if name == "video":  # fractional seconds per grid: temporal ids 0, 19, 38 (floor of k * 0.77 * 25)
        grids, seconds = [(3, 4, 4), (2, 6, 4)], [0.77, 1.3]
        ids, mask = expand_prompts(cfg, ["<t10><|vision_bos|><|VIDEO|><|vision_eos|><t11><|vision_bos|><|VIDEO|>"
                                         "<|vision_eos|><t12>"], video_grids=grids, seconds=seconds)
        return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=_pixels(grids, 3),
                    video_grid_thw=torch.tensor(grids), video_second_per_grid=torch.tensor(seconds))
    if name == "video_audio":  # 4 frames at 1 s (ids 0, 25, 50, 75) and 250 mel frames (62 tokens): 2 chunks each
        grids, seconds, lens = [(4, 4, 4)], [1.0], [250]
        feats, fmask = _audio(lens, 250, mel, 4)
        ids, mask = expand_prompts(cfg, ["<t10><|vision_bos|><|VIDEO|><|vision_eos|><t12>"], audio_lens=lens,
                                   video_grids=grids, seconds=seconds, use_audio_in_video=True)
        return dict(input_ids=ids, attention_mask=mask, pixel_values_videos=_pixels(grids, 5),
                    video_grid_thw=torch.tensor(grids), video_second_per_grid=torch.tensor(seconds),
                    input_features=feats, feature_attention_mask=fmask, use_audio_in_video=True)
    if name == "mixed":  # row 0: audio + image; row 1 (left padded): video + audio
        image_grids, video_grids, seconds, lens = [(1, 4, 6)], [(2, 4, 4)], [0.5], [220, 90]
        feats, fmask = _audio(lens, 220, mel, 6)
        ids, mask = expand_prompts(
            cfg,
            ["<t10><|audio_bos|><|AUDIO|><|audio_eos|><t11><|vision_bos|><|IMAGE|><|vision_eos|><t12>",
             "<t13><|vision_bos|><|VIDEO|><|vision_eos|><t14><|audio_bos|><|AUDIO|><|audio_eos|><t15><t16>"],
            audio_lens=lens, image_grids=image_grids, video_grids=video_grids, seconds=seconds,
        )
        return dict(input_ids=ids, attention_mask=mask, input_features=feats, feature_attention_mask=fmask,
                    pixel_values=_pixels(image_grids, 7), image_grid_thw=torch.tensor(image_grids),
                    pixel_values_videos=_pixels(video_grids, 8), video_grid_thw=torch.tensor(video_grids),
                    video_second_per_grid=torch.tensor(seconds))
    raise KeyError(name)


CASES = ["text", "audio", "image", "video", "video_audio", "mixed"]
_HF_CACHE: dict[str, torch.Tensor] = {}


def _hf_logits(hf, name: str, inputs: dict) -> torch.Tensor:
    if name not in _HF_CACHE:
        with torch.no_grad():
            _HF_CACHE[name] = hf(**inputs).logits.float()
    return _HF_CACHE[name]


def _check(name: str, ours: torch.Tensor, ref: torch.Tensor, real: torch.Tensor) -> None:
    scale = ref[real].abs().max().item()
    err = (ours[real] - ref[real]).abs().max().item()
    print(f"{name}: max |ours - ref| = {err:.3g}, max |ref| = {scale:.3g}, ratio {err / scale:.3g}")
    torch.testing.assert_close(ours[real], ref[real], rtol=0, atol=REL_TOL * scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_thinker_logits_match_hf(models, case, backend):
    hf, ours = models
    inputs = build_case(case, ours.config.thinker_config)
    ref = _hf_logits(hf, case, inputs)
    ours.backend = backend
    logits = ours.thinker_logits(**inputs)
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    real = inputs["attention_mask"].bool()
    _check(f"{case}/{backend}", logits, ref, real)
    assert (logits[~real] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_audio_encoder_matches_hf(models, backend):
    hf, ours = models
    lens = [437, 150, 3]  # several chunks with a tail; one short chunk; the shortest audio with a token
    feats, fmask = _audio(lens, 437, ours.config.thinker_config.audio_config.num_mel_bins, 9)
    with torch.no_grad():
        ref = hf.get_audio_features(feats, feature_attention_mask=fmask)
    with torch.inference_mode(), use_backend(backend):
        out = ours.thinker.audio_tower(feats, lens)
    assert out.shape == ref.shape
    _check(f"audio_tower/{backend}", out, ref, torch.ones(ref.shape[0], dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vision_encoder_matches_hf(models, backend):
    hf, ours = models
    grids = [(1, 10, 12), (2, 8, 8), (3, 4, 18)]  # edge windows, several temporal slices
    pixels = _pixels(grids, 10)
    with torch.no_grad():
        ref = hf.get_image_features(pixels, torch.tensor(grids))
    with torch.inference_mode(), use_backend(backend):
        out = ours.thinker.visual(pixels, grids)
    assert out.shape == ref.shape
    _check(f"visual/{backend}", out, ref, torch.ones(ref.shape[0], dtype=torch.bool))


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_step_matches_longer_prefill(models, backend, shuffled_runner):
    """Prefill, then one decode step (is_prefill False) per row, over pages in shuffled order: the logits of the
    prompts one token longer (mixed batch: two rows of different lengths, image, video and audio)."""
    _, ours = models
    cfg = ours.config.thinker_config
    base = build_case("mixed", cfg)
    new = torch.tensor([[41], [42]])
    longer = dict(base, input_ids=torch.cat([base["input_ids"], new], 1),
                  attention_mask=torch.cat([base["attention_mask"], torch.ones_like(new)], 1))
    prompt = prepare_thinker_prompt(cfg, **base)
    thinker, page = ours.thinker, 16
    lens = prompt.seq_lens
    with torch.inference_mode(), use_backend(backend):
        expected = ours.thinker_logits(**longer)[:, -1]
        embeds = thinker.embed_prompt(prompt.ids, audio=prompt.audio, images=prompt.images, videos=prompt.videos)
        runner = shuffled_runner(thinker.model, sum(-(-(n + 1) // page) for n in lens) + 2, page, seed=0)
        seqs = [runner.allocate(n + 1) for n in lens]  # the prompt and its decode token
        runner.prefill(seqs, embeds, prompt.positions, starts=[0] * len(lens), new_lens=lens)
        # A decode token gets cache length + rope delta on all three axes.
        pos = (torch.tensor(lens) + prompt.rope_deltas[:, 0]).expand(3, -1)
        hidden = runner.decode(seqs, thinker.model.embed_tokens(new[:, 0]), pos)
        got = thinker.compute_logits(hidden)
    _check(f"decode/{backend}", got, expected, torch.ones(2, dtype=torch.bool))


@pytest.mark.parametrize("case", ["image", "mixed"])
def test_bf16_error_within_twice_hf_bf16(tiny_hf_checkpoint, models, case):
    """bf16 (torch backend): our error against HF fp32 is at most twice HF bf16's own (flash-attention's rule)."""
    path, _ = tiny_hf_checkpoint
    hf, _ = models
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.bfloat16, backend="torch",
                                     enable_audio_output=False)
    inputs = build_case(case, ours.config.thinker_config)
    ref = _hf_logits(hf, case, inputs)
    hf_bf16 = copy.deepcopy(hf).to(torch.bfloat16)
    with torch.no_grad():
        hf_low = hf_bf16(**inputs).logits.float()
    real = inputs["attention_mask"].bool()
    err = (ours.thinker_logits(**inputs) - ref)[real].abs().max().item()
    hf_err = (hf_low - ref)[real].abs().max().item()
    print(f"{case}/bf16: ours {err:.3g}, HF bf16 {hf_err:.3g} (max |ref| {ref[real].abs().max().item():.3g})")
    assert err <= 2 * hf_err


def test_from_pretrained_reads_only_the_parts_it_builds(tiny_hf_checkpoint, monkeypatch):
    path, _ = tiny_hf_checkpoint
    seen = []
    real = model_module.load_state_dict

    def spy(*args, prefixes=None, **kwargs):
        seen.append(list(prefixes))
        return real(*args, prefixes=prefixes, **kwargs)

    monkeypatch.setattr(model_module, "load_state_dict", spy)
    model = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, enable_audio_output=False)
    assert seen == [["thinker."]]  # talker.* and token2wav.* are never read
    assert model.talker is None and model.token2wav is None


def test_from_pretrained_names_bad_tensors(tiny_hf_checkpoint, tmp_path):
    path, _ = tiny_hf_checkpoint
    state = load_state_dict(path)
    del state["thinker.model.layers.1.self_attn.k_proj.bias"]
    state["thinker.visual.blocks.0.attn.q.weight"] = torch.zeros(31, 32)
    state["thinker.model.extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError) as err:
        OmniModel.from_pretrained(tmp_path, device="cpu", dtype=torch.float32, enable_audio_output=False)
    msg = str(err.value)
    assert "missing: thinker.model.layers.1.self_attn.k_proj.bias" in msg
    assert "unexpected: thinker.model.extra.weight" in msg
    assert "mis-shaped: thinker.visual.blocks.0.attn.q.weight: expected [32, 32], found [31, 32]" in msg
    state = load_state_dict(path)
    state["vocoder.weight"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="outside every known part .*: vocoder.weight"):
        OmniModel.from_pretrained(tmp_path, device="cpu", dtype=torch.float32, enable_audio_output=False)


def test_from_config_is_deterministic_by_seed():
    cfg = OmniConfig.preset("tiny")
    a, b, c = (OmniModel.from_config(cfg, device="cpu", dtype=torch.float32, seed=s, enable_audio_output=False)
               for s in (0, 0, 1))
    ids = torch.tensor([[10, 11, 12, 13]])
    la, lb, lc = (m.thinker_logits(ids) for m in (a, b, c))
    assert torch.isfinite(la).all() and la.abs().max() > 0
    assert torch.equal(la, lb) and not torch.equal(la, lc)
