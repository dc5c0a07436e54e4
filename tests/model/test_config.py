"""OmniConfig against transformers 4.57.6's own config classes: presets, defaults, the config.json layout,
derived fields and invariants."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from omni_model.config import (
    AudioConfig,
    BigVGANConfig,
    DiTConfig,
    OmniConfig,
    TalkerConfig,
    TextConfig,
    ThinkerConfig,
    Token2WavConfig,
    VisionConfig,
)

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration  # noqa: E402

PRESETS = ["qwen2.5-omni-7b", "qwen2.5-omni-3b", "tiny"]


def _hf(cfg: OmniConfig) -> Qwen2_5OmniConfig:
    return Qwen2_5OmniConfig(**cfg.to_dict())


# ----------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_preset_round_trips_through_hf(name):
    cfg = OmniConfig.preset(name)
    hf = _hf(cfg)
    assert OmniConfig.from_dict(hf.to_dict()) == cfg
    assert OmniConfig.from_dict(json.loads(hf.to_json_string())) == cfg
    assert OmniConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", PRESETS)
def test_preset_as_hf_objects(name):
    """The fields HF's model code reads, read back from HF's config objects."""
    cfg = OmniConfig.preset(name)
    hf = _hf(cfg)
    th = hf.thinker_config
    text, vis, aud = th.text_config, th.vision_config, th.audio_config
    ours = cfg.thinker_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers) == (
        ours.text_config.vocab_size, ours.text_config.hidden_size, ours.text_config.intermediate_size,
        ours.text_config.num_hidden_layers)
    assert (text.num_attention_heads, text.num_key_value_heads, text.rms_norm_eps, text.rope_theta) == (
        ours.text_config.num_attention_heads, ours.text_config.num_key_value_heads, ours.text_config.rms_norm_eps,
        ours.text_config.rope_theta)
    assert text.rope_scaling["mrope_section"] == list(ours.text_config.mrope_section)
    assert text.tie_word_embeddings is False and text.use_sliding_window is False
    assert (vis.depth, vis.hidden_size, vis.num_heads, vis.intermediate_size, vis.out_hidden_size) == (
        ours.vision_config.depth, ours.vision_config.hidden_size, ours.vision_config.num_heads,
        ours.vision_config.intermediate_size, ours.vision_config.out_hidden_size)
    assert list(vis.fullatt_block_indexes) == list(ours.vision_config.fullatt_block_indexes)
    assert (vis.window_size, vis.spatial_merge_size, vis.patch_size, vis.temporal_patch_size) == (112, 2, 14, 2)
    assert (aud.d_model, aud.encoder_layers, aud.encoder_attention_heads, aud.encoder_ffn_dim, aud.num_mel_bins,
            aud.n_window, aud.output_dim) == (
        ours.audio_config.d_model, ours.audio_config.encoder_layers, ours.audio_config.encoder_attention_heads,
        ours.audio_config.encoder_ffn_dim, ours.audio_config.num_mel_bins, ours.audio_config.n_window,
        ours.audio_config.output_dim)
    # attribute_map aliases: HF's model reads *_token_id, config.json stores *_token_index.
    for n in ("audio_token_id", "image_token_id", "video_token_id", "vision_start_token_id", "audio_start_token_id",
              "audio_end_token_id"):
        assert getattr(th, n) == getattr(ours, n), n
    tk, ours_tk = hf.talker_config, cfg.talker_config
    for n in ("vocab_size", "embedding_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "tts_codec_start_token_id",
              "tts_codec_end_token_id", "tts_codec_pad_token_id", "tts_codec_mask_token_id", "tts_text_start_token_id",
              "tts_text_end_token_id", "tts_text_pad_token_id", "image_token_id", "vision_start_token_id",
              "spatial_merge_size"):
        assert getattr(tk, n) == getattr(ours_tk, n), n
    assert tk.rope_scaling["mrope_section"] == list(ours_tk.mrope_section)
    dit, voc = hf.token2wav_config.dit_config, hf.token2wav_config.bigvgan_config
    ours_dit, ours_voc = cfg.token2wav_config.dit, cfg.token2wav_config.bigvgan
    for n in ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "emb_dim", "block_size",
              "repeats", "num_embeds", "mel_dim", "enc_dim", "enc_emb_dim"):
        assert getattr(dit, n) == getattr(ours_dit, n), n
    assert list(dit.look_ahead_layers) == list(ours_dit.look_ahead_layers)
    assert list(dit.look_backward_layers) == list(ours_dit.look_backward_layers)
    assert list(dit.enc_channels) == list(ours_dit.enc_channels)
    assert list(voc.upsample_rates) == list(ours_voc.upsample_rates) == [5, 3, 2, 2, 2, 2]
    assert voc.upsample_initial_channel == ours_voc.upsample_initial_channel
    assert hf.enable_audio_output is True


def test_published_7b_values():
    """docs/model.md's table for Qwen2.5-Omni-7B."""
    cfg = OmniConfig.preset("qwen2.5-omni-7b")
    text, vis, aud = cfg.thinker_config.text_config, cfg.thinker_config.vision_config, cfg.thinker_config.audio_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (3584, 28, 28, 4, 128, 18944, 152064)
    assert text.mrope_section == (16, 24, 24) and text.rope_theta == 1e6 and text.rms_norm_eps == 1e-6
    assert (vis.depth, vis.hidden_size, vis.num_heads, vis.head_dim, vis.intermediate_size) == (32, 1280, 16, 80, 3420)
    assert vis.fullatt_block_indexes == (7, 15, 23, 31) and vis.window_merged == 4
    assert (aud.encoder_layers, aud.d_model, aud.encoder_attention_heads, aud.head_dim, aud.encoder_ffn_dim,
            aud.num_mel_bins) == (32, 1280, 20, 64, 5120, 128)
    tk = cfg.talker_config
    assert (tk.hidden_size, tk.num_hidden_layers, tk.num_attention_heads, tk.head_dim, tk.num_key_value_heads,
            tk.intermediate_size, tk.vocab_size, tk.embedding_size) == (896, 24, 12, 128, 4, 18944, 8448, 3584)
    assert (tk.tts_codec_pad_token_id, tk.tts_codec_start_token_id, tk.tts_codec_end_token_id,
            tk.tts_codec_mask_token_id) == (8292, 8293, 8294, 8296)
    assert (tk.tts_text_pad_token_id, tk.tts_text_end_token_id) == (151859, 151861)
    dit, voc = cfg.token2wav_config.dit, cfg.token2wav_config.bigvgan
    assert (dit.num_hidden_layers, dit.hidden_size, dit.num_attention_heads, dit.head_dim, dit.block_size) == (
        22, 1024, 16, 64, 24)
    assert [dit.block_window(i) for i in (0, 10, 20, 5)] == [(1, 0), (0, 1), (1, 0), (0, 0)]
    assert dit.code_table_size == 8194 and dit.input_dim == 80 + 128 + 512 + 192
    assert voc.hop_length == 240 and cfg.token2wav_config.samples_per_code == 480
    assert cfg.thinker_config.stop_token_ids == (151645,)


def test_published_3b_values():
    cfg = OmniConfig.preset("qwen2.5-omni-3b")
    text = cfg.thinker_config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size, text.vocab_size) == (2048, 36, 16, 2, 128, 11008, 151936)
    assert cfg.thinker_config.vision_config.out_hidden_size == cfg.thinker_config.audio_config.output_dim == 2048
    tk = cfg.talker_config
    assert (tk.hidden_size, tk.num_attention_heads, tk.head_dim, tk.num_key_value_heads, tk.intermediate_size,
            tk.embedding_size, tk.mrope_section) == (896, 14, 64, 2, 4864, 2048, (16, 16, 0))


@pytest.mark.parametrize("name,expected", [
    # docs/model.md: thinker 8.93 B (LM + head 7.62 B, vision 0.68 B, audio 0.64 B), talker 1.35 B, DiT 0.33 B,
    # BigVGAN 0.12 B. The 3B's Hub size is "6B" in all.
    ("qwen2.5-omni-7b", dict(lm=7.62, visual=0.68, audio_tower=0.64, talker=1.35, dit=0.33, bigvgan=0.12)),
    ("qwen2.5-omni-3b", dict(lm=3.40, visual=0.67, audio_tower=0.64, talker=0.38, dit=0.33, bigvgan=0.12)),
])
def test_preset_parameter_counts(name, expected):
    """HF's model built from the preset (on the meta device) has the published parameter counts."""
    with torch.device("meta"):
        m = Qwen2_5OmniForConditionalGeneration(_hf(OmniConfig.preset(name)))

    def billions(*mods):
        return round(sum(p.numel() for mod in mods for p in mod.parameters()) / 1e9, 2)

    got = dict(lm=billions(m.thinker.model, m.thinker.lm_head), visual=billions(m.thinker.visual),
               audio_tower=billions(m.thinker.audio_tower), talker=billions(m.talker),
               dit=billions(m.token2wav.code2wav_dit_model), bigvgan=billions(m.token2wav.code2wav_bigvgan_model))
    assert got == expected


def test_tiny_is_reference_tiny():
    """docs/model.md, "The tiny configuration", field by field."""
    cfg = OmniConfig.preset("tiny")
    th = cfg.thinker_config
    text, vis, aud = th.text_config, th.vision_config, th.audio_config
    assert (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
            text.num_key_value_heads, text.intermediate_size, text.mrope_section) == (99, 32, 2, 4, 2, 37, (1, 1, 2))
    assert (vis.depth, vis.hidden_size, vis.num_heads, vis.intermediate_size, vis.out_hidden_size,
            vis.spatial_merge_size, vis.window_size, vis.fullatt_block_indexes) == (2, 32, 4, 24, 32, 2, 112, (1,))
    assert (aud.d_model, aud.encoder_attention_heads, aud.encoder_layers, aud.encoder_ffn_dim, aud.num_mel_bins,
            aud.n_window, aud.output_dim) == (32, 4, 2, 32, 20, 100, 32)
    assert (th.audio_token_id, th.image_token_id, th.video_token_id, th.audio_start_token_id, th.audio_end_token_id,
            th.user_token_id, th.vision_start_token_id, th.vision_end_token_id) == (1, 2, 3, 4, 5, 6, 7, 8)
    tk = cfg.talker_config
    assert (tk.vocab_size, tk.embedding_size, tk.hidden_size, tk.num_hidden_layers, tk.num_attention_heads,
            tk.head_dim, tk.num_key_value_heads, tk.mrope_section) == (99, 32, 16, 2, 2, 8, 1, (1, 1, 2))
    assert (tk.tts_codec_pad_token_id, tk.tts_codec_start_token_id, tk.tts_codec_end_token_id,
            tk.tts_codec_mask_token_id) == (92, 93, 94, 96)
    assert (tk.tts_text_pad_token_id, tk.tts_text_start_token_id, tk.tts_text_end_token_id) == (89, 90, 91)
    dit, voc = cfg.token2wav_config.dit, cfg.token2wav_config.bigvgan
    assert (dit.hidden_size, dit.num_hidden_layers, dit.num_attention_heads, dit.head_dim, dit.emb_dim,
            dit.block_size, dit.look_ahead_layers, dit.look_backward_layers, dit.num_embeds, dit.mel_dim,
            dit.enc_channels, dit.enc_dim, dit.enc_emb_dim) == (
        32, 4, 4, 8, 32, 24, (1,), (0, 2), 99, 10, (32, 32, 32, 32, 96), 16, 16)
    assert (voc.mel_dim, voc.upsample_initial_channel) == (10, 128)
    assert voc.upsample_rates == BigVGANConfig.upsample_rates
    assert voc.upsample_kernel_sizes == BigVGANConfig.upsample_kernel_sizes


def test_tiny_builds_hf_model():
    model = Qwen2_5OmniForConditionalGeneration(_hf(OmniConfig.preset("tiny")))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["thinker.lm_head.weight"] == (99, 32)
    assert shapes["talker.model.embed_tokens.weight"] == (99, 32)
    assert shapes["talker.codec_head.weight"] == (99, 16)
    assert shapes["talker.model.layers.0.self_attn.q_proj.weight"] == (16, 16)
    assert shapes["token2wav.code2wav_dit_model.text_embed.codec_embed.weight"] == (100, 32)
    assert shapes["token2wav.code2wav_dit_model.input_embed.proj.weight"] == (32, 10 + 16 + 32 + 16)
    assert shapes["thinker.visual.merger.mlp.0.weight"] == (128, 128)


def test_preset_names():
    assert OmniConfig.preset("Qwen/Qwen2.5-Omni-7B") == OmniConfig.preset("qwen2.5-omni-7b")
    with pytest.raises(ValueError, match=r"unknown preset 'qwen2-7b'.*qwen2.5-omni-3b, qwen2.5-omni-7b, tiny"):
        OmniConfig.preset("qwen2-7b")


# ----------------------------------------------------------------------------------------------- the JSON layout

# Where our default deliberately differs from HF's (HF has no usable default there; see config.py).
NO_HF_DEFAULT = {("thinker_config", "vision_start_token_id"), ("thinker_config", "vision_end_token_id"),
                 ("talker_config", "rope_scaling")}


def test_defaults_equal_hf_defaults():
    ours, hf = OmniConfig().to_dict(), Qwen2_5OmniConfig().to_dict()
    checked = 0

    def compare(a, b, path):
        nonlocal checked
        for key, value in a.items():
            where = (path[0], key) if path else (key,)
            if where in NO_HF_DEFAULT or key in ("architectures", "model_type"):
                continue
            assert key in b, f"{'.'.join(path + (key,))} is not an HF config key"
            if isinstance(value, dict) and key.endswith("_config"):
                compare(value, b[key], path + (key,))
            else:
                assert value == b[key], f"{'.'.join(path + (key,))}: ours {value!r}, HF {b[key]!r}"
                checked += 1

    compare(ours, hf, ())
    assert checked > 100


def test_missing_keys_mean_what_they_mean_to_hf():
    sparse = {
        "thinker_config": {"text_config": {"hidden_size": 1024, "num_attention_heads": 8, "num_key_value_heads": 2,
                                           "rope_scaling": {"mrope_section": [16, 24, 24], "type": "default"}},
                           "vision_config": {"out_hidden_size": 1024}, "audio_config": {"output_dim": 1024}},
        "talker_config": {"embedding_size": 1024, "rope_scaling": {"mrope_section": [16, 24, 24]}},
    }
    ours = OmniConfig.from_dict(sparse)
    assert ours == OmniConfig.from_dict(Qwen2_5OmniConfig(**sparse).to_dict())
    assert ours.thinker_config.text_config.intermediate_size == 18944
    assert OmniConfig.from_dict({}) == OmniConfig()


def test_published_layout_quirks():
    """What Qwen's published config.json carries besides HF's keys: pre-release DiT names, extra vision keys,
    our own spelling of the aliased ids; unknown keys are ignored."""
    d = OmniConfig.preset("qwen2.5-omni-7b").to_dict()
    dit = d["token2wav_config"]["dit_config"]
    del dit["hidden_size"]
    dit.update(dim=512, depth=dit.pop("num_hidden_layers"), heads=dit.pop("num_attention_heads"), enc_lin_neurons=192)
    d["thinker_config"]["vision_config"].update(embed_dim=1280, in_chans=3, tokens_per_second=25)
    d["thinker_config"]["audio_token_id"] = d["thinker_config"].pop("audio_token_index")
    d.update(enable_talker=True, torch_dtype="bfloat16")
    cfg = OmniConfig.from_dict(d)
    assert cfg.token2wav_config.dit.hidden_size == 512
    assert cfg.token2wav_config.dit.num_hidden_layers == 22
    assert cfg.thinker_config.audio_token_id == 151646


def test_file_round_trip(tmp_path):
    cfg = OmniConfig.preset("qwen2.5-omni-3b")
    _hf(cfg).save_pretrained(tmp_path / "hf")
    assert OmniConfig.from_pretrained(tmp_path / "hf") == cfg
    cfg.save_pretrained(tmp_path / "ours")
    assert OmniConfig.from_pretrained(tmp_path / "ours" / "config.json") == cfg
    assert OmniConfig.from_dict(Qwen2_5OmniConfig.from_pretrained(tmp_path / "ours").to_dict()) == cfg


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "config.json")):
        OmniConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        OmniConfig.from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="expects a dict"):
        OmniConfig.from_dict([1, 2])


@pytest.mark.parametrize("section,key,value,match", [
    ("text_config", "rope_scaling", {"rope_type": "yarn", "factor": 4.0, "mrope_section": [16, 24, 24]},
     "rope_scaling type 'yarn' is not supported"),
    ("text_config", "rope_scaling", {"rope_type": "default"}, "rope_scaling has no 'mrope_section'"),
    ("text_config", "use_sliding_window", True, "use_sliding_window=True is not supported"),
    ("text_config", "head_dim", 64, "head_dim=64 != hidden_size // num_attention_heads = 128"),
])
def test_unsupported_json_is_refused(section, key, value, match):
    d = OmniConfig.preset("qwen2.5-omni-7b").to_dict()
    d["thinker_config"][section][key] = value
    with pytest.raises(ValueError, match=match):
        OmniConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------- invariants


def _tiny_part(path: str, **changes):
    """The tiny preset with ``changes`` applied to the part at ``path`` (dotted fields of OmniConfig)."""
    cfg = OmniConfig.preset("tiny")
    names = path.split(".") if path else []
    parts = [cfg]
    for n in names:
        parts.append(getattr(parts[-1], n))
    new = dataclasses.replace(parts[-1], **changes)
    for parent, n in zip(reversed(parts[:-1]), reversed(names)):
        new = dataclasses.replace(parent, **{n: new})
    return new


@pytest.mark.parametrize("path,changes,match", [
    ("thinker_config.text_config", dict(mrope_section=(1, 1, 1)),
     r"TextConfig: sum\(mrope_section\)=3 must equal head_dim // 2 = 4"),
    ("thinker_config.text_config", dict(mrope_section=(2, 2)), "mrope_section must be 3 non-negative ints"),
    ("thinker_config.text_config", dict(num_key_value_heads=3),
     "num_attention_heads=4 must be divisible by num_key_value_heads=3"),
    ("thinker_config.text_config", dict(hidden_size=30), "hidden_size=30 must be divisible by num_attention_heads=4"),
    ("thinker_config.text_config", dict(vocab_size=0), "vocab_size must be a positive int, got 0"),
    ("thinker_config.vision_config", dict(num_heads=5), "hidden_size=32 must be divisible by num_heads=5"),
    ("thinker_config.vision_config", dict(num_heads=16), r"head_dim=2 must be divisible by 4 \(2-D rotary\)"),
    ("thinker_config.vision_config", dict(window_size=100), "window_size=100 must be a multiple of"),
    ("thinker_config.vision_config", dict(fullatt_block_indexes=(2,)), r"fullatt_block_indexes=\[2\] must be"),
    ("thinker_config.audio_config", dict(encoder_attention_heads=5), "d_model=32 must be divisible by"),
    ("thinker_config.audio_config", dict(max_source_positions=50), "max_source_positions=50 must be >= n_window"),
    ("thinker_config", dict(image_token_id=1), "special token ids must be distinct"),
    ("thinker_config", dict(video_token_id=99), r"video_token_id=99 must be a token id in \[0, text_config"),
    ("talker_config", dict(head_dim=6),
     r"TalkerConfig: sum\(mrope_section\)=4 must equal head_dim // 2 = 3"),
    ("talker_config", dict(tts_codec_mask_token_id=99), r"tts_codec_mask_token_id=99 must be a token id in \[0, voc"),
    ("talker_config", dict(tts_codec_end_token_id=92), "codec special ids must be distinct"),
    ("token2wav_config.dit", dict(look_ahead_layers=(4,)), r"look_ahead_layers=\[4\] must be layer indices"),
    ("token2wav_config.dit", dict(enc_kernel_sizes=(5, 3, 3, 1)), "must have the same length"),
    ("token2wav_config.dit", dict(enc_channels=(32, 33, 32, 32, 96)), "must be divisible by enc_res2net_scale=2"),
    ("token2wav_config.bigvgan", dict(upsample_kernel_sizes=(11, 7, 4, 4, 4)), "must have the same non-zero len"),
    ("token2wav_config.bigvgan", dict(upsample_kernel_sizes=(10, 7, 4, 4, 4, 4)), "upsample kernel 10 with rate 5"),
    ("token2wav_config.bigvgan", dict(upsample_initial_channel=32), "halves 6 times to 0"),
])
def test_invariants(path, changes, match):
    with pytest.raises(ValueError, match=match):
        _tiny_part(path, **changes)


def test_cross_part_invariants():
    th = OmniConfig.preset("tiny").thinker_config
    with pytest.raises(ValueError, match="out_hidden_size=16 must equal text_config.hidden_size=32"):
        dataclasses.replace(th, vision_config=dataclasses.replace(th.vision_config, out_hidden_size=16))
    with pytest.raises(ValueError, match="output_dim=16 must equal text_config.hidden_size=32"):
        dataclasses.replace(th, audio_config=dataclasses.replace(th.audio_config, output_dim=16))
    with pytest.raises(ValueError, match="dit.mel_dim=10 must equal bigvgan.mel_dim=80"):
        Token2WavConfig(dit=OmniConfig.preset("tiny").token2wav_config.dit, bigvgan=BigVGANConfig())
    with pytest.raises(ValueError, match="embedding_size=64 must equal the Thinker's text_config.hidden_size=32"):
        _tiny_part("talker_config", embedding_size=64)
    with pytest.raises(ValueError, match=r"image_token_id: thinker 2 vs talker 9; .*spatial_merge_size: vision 2"):
        _tiny_part("talker_config", image_token_id=9, spatial_merge_size=1)
    with pytest.raises(ValueError, match=r"tts_text_pad_token_id=150 must be a token id in \[0, thinker"):
        _tiny_part("talker_config", tts_text_pad_token_id=150)
    # A Thinker-only config may carry a Talker section that was never meant to run (HF accepts it too).
    cfg = dataclasses.replace(OmniConfig.preset("qwen2.5-omni-3b"), talker_config=TalkerConfig(),
                              enable_audio_output=False)
    assert OmniConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="embedding_size=3584 must equal"):
        dataclasses.replace(cfg, enable_audio_output=True)


# ----------------------------------------------------------------------------------------------- derived fields


def test_derived_fields():
    cfg = OmniConfig.preset("tiny")
    th = cfg.thinker_config
    assert (th.text_config.head_dim, th.text_config.num_kv_groups, th.text_config.q_size,
            th.text_config.kv_size) == (8, 2, 32, 16)
    vis = th.vision_config
    assert (vis.head_dim, vis.patch_dim, vis.merge_unit, vis.merged_hidden_size, vis.window_merged) == (
        8, 3 * 2 * 14 * 14, 4, 128, 4)
    assert (th.audio_config.head_dim, th.audio_config.chunk_mel_frames, th.audio_config.num_hidden_layers) == (
        8, 200, 2)
    assert (th.tokens_per_second, th.chunk_positions, th.stop_token_ids) == (25, 50, ())
    tk = cfg.talker_config
    assert (tk.num_kv_groups, tk.q_size, tk.kv_size, tk.stop_token_ids) == (2, 16, 8, (92, 94))
    dit, voc = cfg.token2wav_config.dit, cfg.token2wav_config.bigvgan
    assert (dit.inner_dim, dit.ff_inner_dim, dit.input_dim, dit.code_table_size) == (32, 64, 10 + 16 + 32 + 16, 100)
    assert (voc.num_upsamples, voc.hop_length, voc.out_channels) == (6, 240, 2)
    assert cfg.token2wav_config.dit_config is dit and cfg.token2wav_config.bigvgan_config is voc
    assert dataclasses.replace(th, eos_token_id=None, text_config=dataclasses.replace(
        th.text_config, eos_token_id=(7, 9))).stop_token_ids == (7, 9)


def test_frozen_and_hashable():
    cfg = OmniConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.thinker_config.text_config.hidden_size = 64
    assert len({cfg, OmniConfig.preset("tiny"), OmniConfig.preset("qwen2.5-omni-7b")}) == 2
    for cls in (TextConfig, VisionConfig, AudioConfig, ThinkerConfig, TalkerConfig, DiTConfig, BigVGANConfig,
                Token2WavConfig, OmniConfig):
        hash(cls())
