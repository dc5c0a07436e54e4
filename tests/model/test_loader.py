"""Checkpoint reading: safetensors (one file, shards + index, prefix filtering), the one-error state-dict check,
spk_dict.pt, and the tiny checkpoint HF writes (hf_compat)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import save_file

from omni_model import loader
from omni_model.config import OmniConfig
from omni_model.loader import (
    INDEX_FILE,
    CheckpointError,
    check_state_dict,
    load_speakers,
    load_state_dict,
    module_shapes,
)

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "thinker.model.embed_tokens.weight": torch.randn(7, 4, generator=g),
        "thinker.lm_head.weight": torch.randn(7, 4, generator=g),
        "thinker.visual.blocks.0.attn.qkv.bias": torch.randn(12, generator=g),
        "talker.codec_head.weight": torch.randn(5, 3, generator=g),
        "token2wav.code2wav_dit_model.rotary_embed.inv_freq": torch.rand(2, generator=g),
        "token2wav.code2wav_bigvgan_model.steps": torch.arange(3),  # an integer tensor keeps its dtype
    }


@pytest.fixture
def sharded(tmp_path):
    """Two shards + index, like save_pretrained: the thinker in shard 1, everything else in shard 2."""
    tensors = _tensors()
    where = {k: SHARD1 if k.startswith("thinker.") else SHARD2 for k in tensors}
    for shard in (SHARD1, SHARD2):
        save_file({k: v for k, v in tensors.items() if where[k] == shard}, str(tmp_path / shard))
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": where}))
    return tmp_path, tensors


@pytest.fixture
def opened(monkeypatch):
    """The safetensors files load_state_dict opens for reading tensors."""
    files = []
    real = loader.safe_open

    def spy(file, *args, **kwargs):
        if kwargs.get("device") is not None:  # checkpoint_files opens the single file for its keys only
            files.append(str(file).rsplit("/", 1)[-1])
        return real(file, *args, **kwargs)

    monkeypatch.setattr(loader, "safe_open", spy)
    return files


def _equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------------------------- tensors


def test_sharded_round_trip(sharded, opened):
    path, tensors = sharded
    _equal(load_state_dict(path), tensors)
    assert sorted(opened) == [SHARD1, SHARD2]


def test_prefixes_open_only_the_shards_they_need(sharded, opened):
    path, tensors = sharded
    got = load_state_dict(path, prefixes=["thinker."])
    _equal(got, {k: v for k, v in tensors.items() if k.startswith("thinker.")})
    assert opened == [SHARD1]
    (path / SHARD2).unlink()  # never read, so never needed
    assert sorted(load_state_dict(path, prefixes="thinker.model.")) == ["thinker.model.embed_tokens.weight"]
    assert load_state_dict(path, prefixes=["speaker."]) == {}


def test_single_file_and_dtype(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"))
    _equal(load_state_dict(tmp_path), tensors)
    _equal(load_state_dict(tmp_path / "model.safetensors"), tensors)
    half = load_state_dict(tmp_path, dtype=torch.bfloat16, prefixes=("token2wav.",))
    assert half["token2wav.code2wav_dit_model.rotary_embed.inv_freq"].dtype == torch.bfloat16
    assert half["token2wav.code2wav_bigvgan_model.steps"].dtype == torch.int64


def test_progress_bar(sharded, capsys):
    path, _ = sharded
    load_state_dict(path)
    assert "tensor" not in capsys.readouterr().err  # small: no bar by default
    load_state_dict(path, progress=True)
    assert "6/6" in capsys.readouterr().err


def test_missing_shard_is_named(sharded):
    path, _ = sharded
    (path / SHARD2).unlink()
    with pytest.raises(FileNotFoundError, match=rf"1 shard\(s\) named in {INDEX_FILE} do not exist: .*{SHARD2}"):
        load_state_dict(path)


def test_missing_index_is_named(sharded):
    path, _ = sharded
    (path / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{INDEX_FILE} is missing: the shards {SHARD1}, {SHARD2}"):
        load_state_dict(path)


def test_no_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="expected model.safetensors or model.safetensors.index.json"):
        load_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="checkpoint directory .*nowhere does not exist"):
        load_state_dict(tmp_path / "nowhere")


def test_broken_index(sharded):
    path, _ = sharded
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"]["talker.codec_head.bias"] = SHARD1
    (path / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{SHARD1} lacks 1 tensor\(s\) .*: talker.codec_head.bias"):
        load_state_dict(path)
    (path / INDEX_FILE).write_text("{}")
    with pytest.raises(ValueError, match="is not a safetensors index"):
        load_state_dict(path)


# ----------------------------------------------------------------------------------------------- checks


def test_check_state_dict_names_everything():
    expected = {"a.weight": (4, 3), "a.bias": (4,), "b.weight": (2, 2), "c.weight": (5,)}
    found = {"a.weight": torch.zeros(4, 3), "b.weight": torch.zeros(2, 3), "c.weight": torch.zeros(6),
             "d.weight": torch.zeros(1), "e.scale": torch.zeros(2)}
    with pytest.raises(CheckpointError) as info:
        check_state_dict(expected, found, what="tiny checkpoint")
    message = str(info.value)
    assert message.splitlines()[0] == ("tiny checkpoint does not match the model: 1 missing, 2 unexpected, "
                                       "2 mis-shaped tensor(s)")
    for line in ("missing: a.bias (expected shape [4])", "unexpected: d.weight (shape [1])",
                 "unexpected: e.scale (shape [2])", "mis-shaped: b.weight: expected [2, 2], found [2, 3]",
                 "mis-shaped: c.weight: expected [5], found [6]"):
        assert f"  {line}" in message.splitlines()
    assert isinstance(info.value, ValueError)
    assert (info.value.missing, info.value.unexpected) == (["a.bias"], ["d.weight", "e.scale"])
    assert info.value.mismatched == {"b.weight": ((2, 2), (2, 3)), "c.weight": ((5,), (6,))}
    check_state_dict(expected, {k: torch.empty(s) for k, s in expected.items()})
    check_state_dict(expected, dict(expected))  # shapes work as well as tensors


def test_module_shapes_on_meta():
    with torch.device("meta"):
        module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    assert module_shapes(module, "x.") == {"x.0.weight": (4, 3), "x.0.bias": (4,), "x.1.weight": (4,),
                                           "x.1.bias": (4,)}


# ----------------------------------------------------------------------------------------------- speakers


def _speaker(**changes):
    entry = {"cond": torch.randn(1, 16), "ref_mel": torch.randn(1, 300, 10), "bos_token": 90}
    entry.update(changes)
    return entry


def test_speakers(tmp_path):
    torch.save({"Chelsie": _speaker(), "Ethan": _speaker(cond=torch.randn(16), bos_token=torch.tensor(88))},
               tmp_path / "spk_dict.pt")
    speakers = load_speakers(tmp_path, cond_dim=16, mel_dim=10)
    assert sorted(speakers) == ["Chelsie", "Ethan"]
    assert speakers["Ethan"]["cond"].shape == (1, 16) and speakers["Ethan"]["bos_token"] == 88
    assert speakers["Chelsie"]["ref_mel"].shape == (1, 300, 10) and type(speakers["Ethan"]["bos_token"]) is int
    assert sorted(load_speakers(tmp_path / "spk_dict.pt")) == ["Chelsie", "Ethan"]


def test_speaker_file_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"speaker file {tmp_path / 'spk_dict.pt'} does not exist"):
        load_speakers(tmp_path)


def test_speaker_file_corrupt(tmp_path):
    (tmp_path / "spk_dict.pt").write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match="spk_dict.pt is not a readable speaker table"):
        load_speakers(tmp_path)
    # Code to run at unpickling is refused (weights_only), not executed.
    with open(tmp_path / "spk_dict.pt", "wb") as fh:
        pickle.dump({"Chelsie": {"cond": OmniConfig}}, fh, protocol=2)
    with pytest.raises(ValueError, match="not a readable speaker table"):
        load_speakers(tmp_path)
    torch.save([1, 2], tmp_path / "spk_dict.pt")
    with pytest.raises(ValueError, match="must hold a non-empty dict"):
        load_speakers(tmp_path)


def test_speaker_entries_invalid(tmp_path):
    torch.save({
        "A": _speaker(cond=torch.randn(2, 16)),
        "B": _speaker(ref_mel=torch.randn(300, 10)),
        "C": _speaker(bos_token="90"),
        "D": {"cond": torch.randn(1, 16)},
        "E": _speaker(),
    }, tmp_path / "spk_dict.pt")
    with pytest.raises(ValueError) as info:
        load_speakers(tmp_path)
    message = str(info.value)
    for part in ("'A': cond must be a float tensor (1, D) or (D,), got tensor [2, 16]",
                 "'B': ref_mel must be a float tensor (1, T, mel)", "'C': bos_token must be a non-negative int",
                 "'D': missing ref_mel, bos_token"):
        assert part in message
    assert "'E'" not in message
    torch.save({"A": _speaker()}, tmp_path / "spk_dict.pt")
    with pytest.raises(ValueError, match="'A': cond has width 16, the model expects 192"):
        load_speakers(tmp_path, cond_dim=192)
    with pytest.raises(ValueError, match="'A': ref_mel has 10 mel bins, the model expects 80"):
        load_speakers(tmp_path, mel_dim=80)
    torch.save({"A": _speaker(), "B": _speaker(cond=torch.randn(1, 8))}, tmp_path / "spk_dict.pt")
    with pytest.raises(ValueError, match=r"speakers disagree on \(cond dim, mel dim\)"):
        load_speakers(tmp_path)


# ----------------------------------------------------------------------------------------------- HF's checkpoint


def test_tiny_hf_checkpoint_layout(tiny_hf_checkpoint):
    path, hf = tiny_hf_checkpoint
    index = json.loads((path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((path / s).is_file() for s in shards)
    assert OmniConfig.from_pretrained(path) == OmniConfig.preset("tiny")
    state = load_state_dict(path)
    _equal(state, hf.state_dict())
    check_state_dict(module_shapes(hf), state)
    speakers = load_speakers(path, cond_dim=16, mel_dim=10)
    assert sorted(speakers) == ["Chelsie", "Ethan"]
    assert all(s["bos_token"] == 90 and s["ref_mel"].shape == (1, 300, 10) for s in speakers.values())
    assert not torch.equal(speakers["Chelsie"]["cond"], speakers["Ethan"]["cond"])
    thinker = load_state_dict(path, prefixes=["thinker."])
    assert sorted(thinker) == sorted(k for k in hf.state_dict() if k.startswith("thinker."))


def test_tiny_hf_checkpoint_loads_in_hf(tiny_hf_checkpoint):
    from transformers import Qwen2_5OmniForConditionalGeneration

    path, hf = tiny_hf_checkpoint
    reloaded = Qwen2_5OmniForConditionalGeneration.from_pretrained(path).eval()
    _equal(reloaded.state_dict(), hf.state_dict())
    assert sorted(reloaded.speaker_map) == ["Chelsie", "Ethan"]
    inputs = _thinker_inputs(OmniConfig.preset("tiny").thinker_config)
    with torch.no_grad():
        logits = reloaded.thinker(**inputs).logits
        saved = hf.thinker.rope_deltas
        assert torch.equal(logits, hf.thinker(**inputs).logits)
        hf.thinker.rope_deltas = saved
    assert torch.isfinite(logits).all()


def _thinker_inputs(cfg):
    """An audio clip (300 mel frames -> 75 tokens), a 4x4-patch image (4 tokens) and text, HF processor style."""
    g = torch.Generator().manual_seed(1)
    frames = 300
    n_audio = ((frames - 1) // 2 + 1 - 2) // 2 + 1
    ids = [10, cfg.audio_start_token_id, *[cfg.audio_token_id] * n_audio, cfg.audio_end_token_id,
           cfg.vision_start_token_id, *[cfg.image_token_id] * 4, cfg.vision_end_token_id, 11, 12, 13]
    ids = torch.tensor([ids])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                input_features=torch.randn(1, cfg.audio_config.num_mel_bins, frames, generator=g),
                feature_attention_mask=torch.ones(1, frames, dtype=torch.long),
                pixel_values=torch.randn(16, cfg.vision_config.patch_dim, generator=g),
                image_grid_thw=torch.tensor([[1, 4, 4]]))


@torch.no_grad()
def test_tiny_hf_model_is_numerically_sane(tiny_hf_checkpoint):
    """Scaled weights: every stage is O(1), finite, and the waveform is not clamped flat."""
    _, hf = tiny_hf_checkpoint
    cfg = OmniConfig.preset("tiny")
    saved = hf.thinker.rope_deltas, hf.talker.rope_deltas  # forward() caches these on the shared model
    out = hf.thinker(**_thinker_inputs(cfg.thinker_config), output_hidden_states=True)
    assert torch.isfinite(out.logits).all()
    assert 0.3 < out.logits.std() < 5
    assert all(0.3 < h.std() < 5 for h in out.hidden_states)
    # Larger than HF's N(0, 0.02): the scale is what makes errors visible.
    assert hf.thinker.model.layers[0].mlp.up_proj.weight.std() > 0.1
    talker_ids = torch.tensor([[96, 96, 92, 93]])
    embeds = torch.randn(1, 4, cfg.talker_config.embedding_size)
    talker = hf.talker(input_ids=talker_ids, input_text_ids=torch.tensor([[10, 11, 90, 12]]), inputs_embeds=embeds,
                       attention_mask=torch.ones(1, 4, dtype=torch.long), image_grid_thw=None, video_grid_thw=None)
    assert torch.isfinite(talker.logits).all() and 0.3 < talker.logits.std() < 5
    hf.thinker.rope_deltas, hf.talker.rope_deltas = saved
    spk = hf.speaker_map["Chelsie"]
    codes = torch.randint(0, cfg.token2wav_config.dit.num_embeds, (1, 12), generator=torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    wav = hf.token2wav(codes, conditioning=spk["cond"], reference_mel=spk["ref_mel"], num_steps=4)
    assert wav.shape == (12 * cfg.token2wav_config.samples_per_code,)
    assert torch.isfinite(wav).all() and 0.05 < wav.std() < 0.6
    assert (wav.abs() >= 1).float().mean() < 0.05
