"""Int4 checkpoints: a tiny Qwen2.5-Omni written by HF 4.57.6, whose Thinker decoder linears this test
quantizes to 4 bits and packs into each published layout with its own writers (AWQ GEMM; GPTQ v1 symmetric,
asymmetric with one group per row span, symmetric with desc_act's g_idx). Ours loads the packed files; HF runs
the same weights dequantized back to floats. Logits and the greedy reply must agree (the parity criterion of
test_thinker_parity), and generate / stream with audio output run end to end.

The writers here follow the layouts as AutoAWQ (``WQLinear_GEMM.from_linear``) and AutoGPTQ / GPTQModel (v1 ``pack``)
write them, independently of omni_model.quant's readers (docs/quantization.md).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from omni_model import OmniConfig, OmniModel
from omni_model import model as model_module
from omni_model.layers.quant_linear import W4A16Linear
from omni_model.loader import CheckpointError, load_state_dict
from omni_model.memory import PUBLISHED_QUANT, model_memory
from omni_model.models.audio_encoder import audio_token_lengths
from omni_model.quant import QuantConfig, read_quantization_config, unpack_gptq

transformers = pytest.importorskip("transformers")

REL_TOL = 1e-4  # test_thinker_parity's criterion: max |ours - HF| <= 1e-4 max |HF logits| over real tokens
PROJS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
         "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
LAYOUTS = {  # name -> (quantization_config, asymmetric zero points allowed from)
    "awq": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
             "modules_to_not_convert": ["visual", "audio_tower", "talker", "token2wav"]}, 0),
    "gptq-sym": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": False,
                  "checkpoint_format": "gptq"}, None),
    "gptq-asym": ({"quant_method": "gptq", "bits": 4, "group_size": -1, "sym": False, "desc_act": False,
                   "checkpoint_format": "gptq"}, 1),  # v1 stores zero - 1: a zero point of 0 cannot be written
    "gptq-desc-act": ({"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True, "desc_act": True,
                       "checkpoint_format": "gptq"}, None),
    "awq-float-mlp1": ({"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True,
                        "modules_to_not_convert": ["layers.1.mlp"]}, 0),  # layer 1's MLP stays float
}


def quantizable_config() -> OmniConfig:
    """The tiny preset at Thinker width 64 and SwiGLU 96: int4 layouts need input widths in multiples of 32, and
    two (hidden) or three (down_proj) groups of 32 make the group and g_idx handling matter."""
    tiny = OmniConfig.preset("tiny")
    th = tiny.thinker_config
    r = dataclasses.replace
    thinker = r(th, text_config=r(th.text_config, hidden_size=64, intermediate_size=96, mrope_section=(2, 2, 4)),
                vision_config=r(th.vision_config, out_hidden_size=64), audio_config=r(th.audio_config, output_dim=64))
    return r(tiny, thinker_config=thinker, talker_config=r(tiny.talker_config, embedding_size=64))


# ------------------------------------------------------------------------------------- quantize and write


def quantize(w: torch.Tensor, group_size: int, zero_from: int | None, g_idx: torch.Tensor | None):
    """Round-to-nearest int4 of a Linear weight (N, K): returns q (K, N), zero points and fp16 scales (G, N), the
    g_idx (K,) and the dequantized weight (N, K) in fp64, ``(q - z[g_idx]) * s[g_idx]``. ``zero_from`` None:
    symmetric (GPTQ: scale 2 max|w| / 15, zero 8); else asymmetric with zero points clamped to [zero_from, 15]."""
    wt = w.t().double()
    k, n = wt.shape
    g = k if group_size == -1 else group_size
    g_idx = torch.arange(k) // g if g_idx is None else g_idx
    groups = k // g
    q = torch.empty(k, n, dtype=torch.int64)
    z = torch.empty(groups, n, dtype=torch.int64)
    s = torch.empty(groups, n, dtype=torch.float16)
    for gi in range(groups):
        rows = g_idx == gi
        x = wt[rows]
        if zero_from is None:
            scale = (2 * x.abs().amax(0) / 15).clamp_min(1e-6).half().double()
            zero = torch.full((n,), 8, dtype=torch.int64)
        else:
            lo, hi = x.amin(0).clamp(max=0), x.amax(0).clamp(min=0)
            scale = ((hi - lo) / 15).clamp_min(1e-6).half().double()
            zero = torch.round(-lo / scale).long().clamp(zero_from, 15)
        q[rows] = (torch.round(x / scale) + zero).clamp(0, 15).long()
        z[gi], s[gi] = zero, scale.half()
    deq = (q - z[g_idx]).double() * s.double()[g_idx]
    return q, z, s, g_idx, deq.t()


def _words(nibbles: torch.Tensor) -> torch.Tensor:
    """(..., 8) values in [0, 15] -> (...) int32, value i in bits 4i..4i+3 (two's complement past 2^31)."""
    w = sum(nibbles[..., i].long() << (4 * i) for i in range(8))
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def pack_awq(q, z, s):
    """AutoAWQ GEMM: word c of a row holds columns 8c + AWQ_ORDER[i] in nibble i; zeros packed the same way."""
    def cols(v):
        v = v.reshape(v.shape[0], -1, 8)
        return _words(torch.stack([v[..., AWQ_ORDER[i]] for i in range(8)], -1))

    return {"qweight": cols(q), "qzeros": cols(z), "scales": s}


def pack_gptq(q, z, s, g_idx):
    """GPTQ v1: word r of a column holds rows 8r + i in nibble i; zeros minus one, 8 columns to a word, in order."""
    qweight = _words(q.reshape(-1, 8, q.shape[1]).transpose(1, 2))  # (K/8, N)
    qzeros = _words(((z - 1) & 0xF).reshape(z.shape[0], -1, 8))
    return {"qweight": qweight, "qzeros": qzeros, "scales": s, "g_idx": g_idx.to(torch.int32)}


def write_quantized(src, dst, layout: str, seed: int = 0):
    """A copy of checkpoint ``src`` with its Thinker decoder linears quantized in ``layout``; returns (dst, the
    dequantized weights {checkpoint key: (N, K) fp32})."""
    qconfig, zero_from = LAYOUTS[layout]
    gen = torch.Generator().manual_seed(seed)
    state = load_state_dict(src)
    layers = 1 + max(int(k.split(".")[3]) for k in state if k.startswith("thinker.model.layers."))
    dequantized = {}
    for i in range(layers):
        g_idx_by_input = {}  # desc_act: one row order per input (q/k/v and gate/up share theirs, as in GPTQ)
        for proj in PROJS:
            key = f"thinker.model.layers.{i}.{proj}"
            if any(skip in key for skip in qconfig.get("modules_to_not_convert") or ()):
                continue  # left float, as AutoAWQ leaves the modules it does not convert
            w = state.pop(f"{key}.weight")
            k = w.shape[1]
            g_idx = None
            if qconfig.get("desc_act"):
                share = "qkv" if proj[-6:] in ("q_proj", "k_proj", "v_proj") else proj
                share = "gate_up" if proj.endswith(("gate_proj", "up_proj")) else share
                if share not in g_idx_by_input:
                    g = qconfig["group_size"]
                    g_idx_by_input[share] = torch.empty(k, dtype=torch.int64)
                    g_idx_by_input[share][torch.randperm(k, generator=gen)] = torch.arange(k) // g
                g_idx = g_idx_by_input[share]
            q, z, s, g_idx, deq = quantize(w, qconfig["group_size"], zero_from, g_idx)
            packed = pack_awq(q, z, s) if qconfig["quant_method"] == "awq" else pack_gptq(q, z, s, g_idx)
            state.update({f"{key}.{name}": t.contiguous() for name, t in packed.items()})
            dequantized[f"{key}.weight"] = deq.float()
    dst.mkdir(parents=True)
    save_file(state, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(config))
    for extra in ("spk_dict.pt", "generation_config.json"):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)
    return dst, dequantized


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    from omni_model.hf_compat import build_tiny_hf_checkpoint

    return build_tiny_hf_checkpoint(tmp_path_factory.mktemp("int4_float"), seed=1, config=quantizable_config())


@pytest.fixture(scope="module")
def checkpoints(float_checkpoint, tmp_path_factory):
    """layout -> (path, HF model holding the dequantized weights). Written once per module."""
    src, hf = float_checkpoint
    root = tmp_path_factory.mktemp("int4")
    out = {}
    for n, layout in enumerate(LAYOUTS):
        path, deq = write_quantized(src, root / layout, layout, seed=n)
        hf_q = copy.deepcopy(hf)
        params = dict(hf_q.named_parameters())
        with torch.no_grad():
            for key, w in deq.items():
                params[key].copy_(w)
        out[layout] = (path, hf_q.eval())
    return out


def prompt(config: OmniConfig, seed: int = 0) -> dict:
    """A text + audio prompt in the tiny vocabulary (ids 9-12 chat markers, 13+ characters; audio ids 1, 4, 5)."""
    th = config.thinker_config
    gen = torch.Generator().manual_seed(seed)
    frames = 160
    n_audio = int(audio_token_lengths(torch.tensor([frames]))[0])
    ids = [9, 11, 20, 21, 10, 9, 6, th.audio_start_token_id] + [th.audio_token_id] * n_audio
    ids += [th.audio_end_token_id, 30, 31, 32, 10, 9, 12]
    feats = torch.randn(1, th.audio_config.num_mel_bins, frames, generator=gen)
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                input_features=feats, feature_attention_mask=torch.ones(1, frames, dtype=torch.long))


# ------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logits_and_greedy_reply_match_hf_dequantized(checkpoints, layout):
    path, hf = checkpoints[layout]
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch",
                                     enable_audio_output=False)
    int4 = [m for m in ours.thinker.model.modules() if isinstance(m, W4A16Linear)]
    layers = ours.config.thinker_config.text_config.num_hidden_layers
    assert len(int4) == 4 * layers - (2 if layout == "awq-float-mlp1" else 0)
    assert all((m.zeros is None) == LAYOUTS[layout][0].get("sym", False) for m in int4)
    assert all((m.perm is not None) == LAYOUTS[layout][0].get("desc_act", False) for m in int4)
    inputs = prompt(ours.config)
    with torch.no_grad():
        ref = hf.thinker(**inputs).logits.float()
    for backend in ("torch", "triton"):
        ours.backend = backend
        logits = ours.thinker_logits(**inputs)
        scale = ref.abs().max().item()
        err = (logits - ref).abs().max().item()
        print(f"{layout}/{backend}: max |ours - HF dequantized| = {err:.3g} (max |HF| {scale:.3g})")
        torch.testing.assert_close(logits, ref, rtol=0, atol=REL_TOL * scale)
    ours.backend = "torch"
    with torch.no_grad():
        hf_ids = hf.generate(**inputs, thinker_max_new_tokens=8, return_audio=False)
    hf_ids = getattr(hf_ids, "sequences", hf_ids)
    out = ours.generate(**inputs, thinker_max_new_tokens=8, return_audio=False)
    assert torch.equal(out.sequences, hf_ids), (out.sequences, hf_ids)


def test_greedy_reply_on_triton(checkpoints):
    """desc_act through the Triton kernels in the model: the prefill's GEMM and the decode steps' split-K GEMV
    (batch 1) give HF's greedy ids on the dequantized weights."""
    path, hf = checkpoints["gptq-desc-act"]
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, backend="triton",
                                     enable_audio_output=False)
    inputs = prompt(ours.config, seed=3)
    with torch.no_grad():
        hf_ids = hf.generate(**inputs, thinker_max_new_tokens=4, return_audio=False)
    out = ours.generate(**inputs, thinker_max_new_tokens=4, return_audio=False)
    assert torch.equal(out.sequences, getattr(hf_ids, "sequences", hf_ids))


def test_int4_changes_the_model(checkpoints, float_checkpoint):
    """The dequantized weights differ from the float ones enough to change the logits: the parity above is the
    int4 model's, not the float checkpoint's by accident."""
    _, hf_float = float_checkpoint
    path, hf = checkpoints["awq"]
    inputs = prompt(OmniConfig.from_pretrained(path))
    with torch.no_grad():
        a, b = hf.thinker(**inputs).logits, hf_float.thinker(**inputs).logits
    assert (a - b).abs().max() > 100 * REL_TOL * b.abs().max()


def test_generate_with_audio_matches_hf_and_streams(checkpoints):
    """AWQ, audio output end to end: greedy text and codes equal HF's on the dequantized weights, the waveform
    within 1e-3 relative for the same noise (test_generate_parity's criteria); stream gives the same text."""
    path, hf = checkpoints["awq"]
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    inputs = prompt(ours.config, seed=1)
    torch.manual_seed(1234)
    noise = torch.randn([1, 30000, ours.config.token2wav_config.dit.mel_dim])
    torch.manual_seed(1234)
    codec = ours.config.talker_config
    with torch.no_grad():  # HF's default stop ids are the 7B's codec ids: give it the tiny ones ours stops on
        hf_seq, hf_wav = hf.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=5, talker_max_new_tokens=30,
                                     talker_do_sample=False, return_audio=True,
                                     talker_eos_token_id=[codec.tts_codec_pad_token_id, codec.tts_codec_end_token_id])
    # HF drops the last code when it stops at talker_max_new_tokens: ask ours for one code less there.
    out = ours.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=5, talker_max_new_tokens=29,
                        talker_do_sample=False, token2wav_noise=noise)
    assert torch.equal(out.sequences, hf_seq), (out.sequences, hf_seq)
    assert len(out.codes[0]) >= 10, "an utterance long enough to mean something"
    wav, hf_wav = torch.from_numpy(out.audio[0]), hf_wav.reshape(-1).float()
    assert wav.shape == hf_wav.shape and wav.numel() > 0
    rel = (wav - hf_wav).abs().max() / hf_wav.abs().max()
    print(f"int4 AWQ: {len(out.codes[0])} codes, waveform max relative error {rel:.2e}")
    assert rel <= 1e-3
    text, audio = [], []
    for event in ours.stream(**inputs, speaker="Chelsie", thinker_max_new_tokens=5, talker_max_new_tokens=29,
                             talker_do_sample=False, seed=0):
        text.extend(event.text_ids)
        audio.append(event.audio)
    assert text == out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert np.concatenate(audio).size == out.audio[0].size


def test_bf16_within_twice_hf_bf16(checkpoints):
    """bf16 int4 (the model dtype of the real checkpoints; scales rounded to bf16 at load): our error against HF
    fp32 on the dequantized weights is at most twice that of HF run in bf16 (flash-attention's rule)."""
    path, hf = checkpoints["gptq-desc-act"]
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.bfloat16, backend="torch",
                                     enable_audio_output=False)
    inputs = prompt(ours.config, seed=2)
    with torch.no_grad():
        ref = hf.thinker(**inputs).logits.float()
        low = copy.deepcopy(hf.thinker).to(torch.bfloat16)(**inputs).logits.float()
    err = (ours.thinker_logits(**inputs) - ref).abs().max().item()
    hf_err = (low - ref).abs().max().item()
    print(f"bf16: ours {err:.3g}, HF bf16 {hf_err:.3g}")
    assert err <= 2 * hf_err


def test_omni_run_accepts_a_quantized_checkpoint(checkpoints, tmp_path, monkeypatch, capsys):
    import importlib.util

    from omni_model.cli import main
    from omni_model.hf_compat import save_tiny_processor

    path = shutil.copytree(checkpoints["gptq-sym"][0], tmp_path / "ckpt")
    save_tiny_processor(path, config=quantizable_config())
    if importlib.util.find_spec("torchvision") is None:
        from omni_model.hf_compat import load_tiny_processor

        monkeypatch.setattr(transformers.Qwen2_5OmniProcessor, "from_pretrained",
                            lambda path, **kwargs: load_tiny_processor(path))
    out = tmp_path / "reply.wav"
    assert main(["run", "--model", str(path), "--text", "hello", "--device", "cpu", "--max-new-tokens", "3",
                 "--out", str(out)]) == 0
    assert out.exists() and out.stat().st_size > 44
    assert "s of audio ->" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- bad files


def _copy_with(src, dst, *, config_change=None, state_change=None):
    shutil.copytree(src, dst)
    if config_change is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config_change(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if state_change is not None:
        state = load_state_dict(dst)
        state_change(state)
        save_file(state, str(dst / "model.safetensors"))
    return dst


def _set(**fields):
    def change(cfg):
        q = cfg["quantization_config"]
        for k, v in fields.items():
            if v is None:
                q.pop(k, None)
            else:
                q[k] = v
    return change


@pytest.mark.parametrize(
    "layout,change,match",
    [
        ("awq", _set(bits=8), r"quantization_config.bits = 8: only 4-bit"),
        ("gptq-sym", _set(bits=3), r"quantization_config.bits = 3"),
        ("awq", _set(version="gemv"), r"quantization_config.version = 'gemv'"),
        ("awq", _set(version="gemv_fast"), r"quantization_config.version = 'gemv_fast'"),
        ("awq", _set(version="marlin"), r"quantization_config.version = 'marlin'"),
        ("awq", _set(version="exllama"), r"quantization_config.version = 'exllama'"),
        ("awq", _set(zero_point=False), r"quantization_config.zero_point = False"),
        ("awq", _set(backend="llm-awq"), r"quantization_config.backend = 'llm-awq'"),
        ("gptq-sym", _set(checkpoint_format="gptq_v2"), r"quantization_config.checkpoint_format = 'gptq_v2'"),
        ("gptq-sym", _set(checkpoint_format="marlin"), r"quantization_config.checkpoint_format = 'marlin'"),
        ("gptq-sym", _set(checkpoint_format=None, format="gptq_v2"), r"quantization_config.format = 'gptq_v2'"),
        ("gptq-sym", _set(lm_head=True), r"quantization_config.lm_head = True"),
        ("gptq-sym", _set(pack_dtype="int16"), r"quantization_config.pack_dtype = 'int16'"),
        ("gptq-sym", _set(dynamic={"-:.*down_proj": {}}), r"quantization_config.dynamic = "),
        ("gptq-sym", _set(sym="yes"), r"quantization_config.sym = 'yes'"),
        ("gptq-sym", _set(quant_method="bitsandbytes"), r"quantization_config.quant_method = 'bitsandbytes'"),
        ("gptq-sym", _set(quant_method="fp8"), r"quantization_config.quant_method = 'fp8'"),
        ("gptq-sym", _set(quant_method=None), r"quantization_config.quant_method = None"),
        ("gptq-sym", _set(group_size=48), r"quantization_config.group_size = 48: the int4 kernels need a multiple"),
        ("gptq-sym", _set(group_size=0), r"quantization_config.group_size = 0"),
        ("awq", _set(group_size=128), r"quantization_config.group_size = 128: .* hidden_size = 64"),
        ("awq", _set(modules_to_not_convert=["layers.1.self_attn.q_proj"]),
         r"quantization_config.modules_to_not_convert = .*only some of the fused projections"),
    ],
)
def test_unsupported_config_is_refused_before_any_weight_is_read(checkpoints, tmp_path, monkeypatch, layout, change,
                                                                 match):
    path = _copy_with(checkpoints[layout][0], tmp_path / "ckpt", config_change=change)

    def no_reading(*args, **kwargs):
        raise AssertionError("a weight file was opened before the quantization_config was checked")

    monkeypatch.setattr(model_module, "load_state_dict", no_reading)
    monkeypatch.setattr(model_module, "checkpoint_files", no_reading)
    with pytest.raises(ValueError, match=match):
        OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, enable_audio_output=False)


def test_quantization_config_that_is_not_an_object(checkpoints, tmp_path):
    def change(cfg):
        cfg["quantization_config"] = "awq"

    path = _copy_with(checkpoints["awq"][0], tmp_path / "ckpt", config_change=change)
    with pytest.raises(ValueError, match="quantization_config must be a JSON object"):
        OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, enable_audio_output=False)


def test_bad_quantized_tensors_are_named(checkpoints, tmp_path):
    key = "thinker.model.layers.1.self_attn"

    def change(state):
        del state[f"{key}.k_proj.qzeros"]
        state[f"{key}.v_proj.scales"] = state[f"{key}.v_proj.scales"][:, :8].contiguous()
        state[f"{key}.q_proj.weight"] = torch.zeros(64, 64)  # a float weight left beside the quantized one

    path = _copy_with(checkpoints["awq"][0], tmp_path / "ckpt", state_change=change)
    with pytest.raises(CheckpointError) as err:
        OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, enable_audio_output=False)
    msg = str(err.value)
    assert f"missing: {key}.k_proj.qzeros (expected shape [2, 4])" in msg
    assert f"mis-shaped: {key}.v_proj.scales: expected [2, 32], found [2, 8]" in msg
    assert f"unexpected: {key}.q_proj.weight" in msg


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda s, k: s.__setitem__(f"{k}.q_proj.qweight", s[f"{k}.q_proj.qweight"].float()),
         r"q_proj.qweight must be int32, got float32"),
        (lambda s, k: s.__setitem__(f"{k}.k_proj.g_idx", torch.arange(64, dtype=torch.int32).flip(0) // 32),
         r"k_proj.g_idx differ: the fused projections share one input"),
        (lambda s, k: s.__setitem__(f"{k}.q_proj.g_idx", torch.zeros(64, dtype=torch.int32)),
         r"q_proj.g_idx: every group must hold group_size = 32 rows"),
        (lambda s, k: s.__setitem__(f"{k}.q_proj.g_idx", torch.full((64,), 2, dtype=torch.int32)),
         r"q_proj.g_idx must hold groups in \[0, 2\)"),
    ],
    ids=["dtype", "g_idx-differs", "g_idx-unequal-groups", "g_idx-range"],
)
def test_bad_quantized_values_are_named(checkpoints, tmp_path, change, match):
    key = "thinker.model.layers.0.self_attn"
    path = _copy_with(checkpoints["gptq-sym"][0], tmp_path / "ckpt", state_change=lambda s: change(s, key))
    with pytest.raises(ValueError, match=match):
        OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, enable_audio_output=False)


# ------------------------------------------------------------------------------------- pieces


def test_v1_zero_point_reads_back_plus_one():
    """A stored nibble z reads as zero point z + 1; a stored 15 (a zero point 0 written as -1) as 16, which is how
    AutoGPTQ's and ExLlama's v1 kernels read it."""
    qzeros = _words(torch.tensor([[[0, 7, 14, 15, 3, 3, 3, 3]]]))
    _, z = unpack_gptq(torch.zeros(1, 8, dtype=torch.int32), qzeros)
    assert z.tolist() == [[1, 8, 15, 16, 4, 4, 4, 4]]


def test_read_quantization_config(checkpoints, float_checkpoint):
    assert read_quantization_config(float_checkpoint[0]) is None
    cfg = read_quantization_config(checkpoints["gptq-desc-act"][0])
    assert cfg == QuantConfig("gptq", 32, sym=True, desc_act=True)
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg
    awq = read_quantization_config(checkpoints["awq"][0])
    assert awq.method == "awq" and not awq.sym and awq.quantizes("thinker.model.layers.0.mlp.down_proj")
    assert not awq.quantizes("thinker.visual.blocks.0.mlp.down_proj") and not awq.quantizes("talker.model.x")


def test_memory_figures_of_the_7b():
    """The 7B's parts as the loader builds them: the float total is docs/model.md's parameter count in bf16 (Token2Wav
    in fp32), and the int4 decoder holds half a byte a weight plus the fp16-sized scales (and zero points)."""
    cfg = OmniConfig.preset("qwen2.5-omni-7b")
    text = cfg.thinker_config.text_config
    float_report = model_memory(cfg)
    parts = dict(float_report.parts)
    linear_params = text.num_hidden_layers * text.hidden_size * (
        text.q_size + 2 * text.kv_size + text.q_size + 3 * text.intermediate_size)
    bias = text.num_hidden_layers * (text.q_size + 2 * text.kv_size)
    assert parts["thinker LM decoder linears (bfloat16)"] == 2 * (linear_params + bias)
    thinker = sum(b for n, b in parts.items() if n.startswith("thinker")) / 2
    assert abs(thinker / 8.93e9 - 1) < 0.01  # docs/model.md: thinker 8.93 B parameters
    assert abs(parts["talker"] / 2 / 1.35e9 - 1) < 0.01
    assert abs(parts["token2wav"] / 4 / 0.45e9 - 1) < 0.02
    groups = linear_params // 128
    for method, zeros in (("awq", True), ("gptq", False)):
        report = model_memory(cfg, PUBLISHED_QUANT[method])
        int4 = dict(report.parts)["thinker LM decoder linears (int4)"]
        assert int4 == linear_params // 2 + 2 * groups * (2 if zeros else 1) + 2 * bias
        assert report.weights == float_report.weights - parts["thinker LM decoder linears (bfloat16)"] + int4
    assert dict(float_report.kv_per_token)["thinker"] == 2 * 28 * 4 * 128 * 2


def test_from_config_builds_random_int4_weights():
    """OmniModel.from_config(..., quantization=...) (benchmarks, the peak-memory script): random int4 decoder
    linears of the float init's scale, deterministic by seed, and the whole pipeline runs on them."""
    cfg = quantizable_config()
    quant = QuantConfig("gptq", 32, sym=True, desc_act=True)
    a, b = (OmniModel.from_config(cfg, device="cpu", dtype=torch.float32, quantization=quant, seed=5)
            for _ in range(2))
    int4 = [m for m in a.thinker.model.modules() if isinstance(m, W4A16Linear)]
    assert a.quantization == quant and len(int4) == 4 * cfg.thinker_config.text_config.num_hidden_layers
    assert all(m.zeros is None and m.perm is not None for m in int4)
    inputs = prompt(cfg)
    la, lb = a.thinker_logits(**inputs), b.thinker_logits(**inputs)
    assert torch.equal(la, lb) and torch.isfinite(la).all() and la.abs().max() > 0
    out = a.generate(**inputs, thinker_max_new_tokens=3, talker_max_new_tokens=8, seed=0)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3 and out.audio[0].size > 0
    with pytest.raises(ValueError, match="quantization_config.group_size = 128"):
        OmniModel.from_config(cfg, device="cpu", dtype=torch.float32, quantization=QuantConfig("awq", 128, sym=False))
