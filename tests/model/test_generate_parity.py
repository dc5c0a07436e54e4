"""generate() against HF 4.57.6 on the tiny checkpoint: greedy text ids and codec ids equal, the waveform within
1e-3 relative for the same initial noise; batch > 1 with audio; bad inputs."""

import numpy as np
import pytest
import torch

from omni_model import OmniModel
from omni_model.demo import demo_inputs

transformers = pytest.importorskip("transformers")

THINKER_NEW = 6
TALKER_NEW = 40


@pytest.fixture(scope="module")
def models(tiny_hf_checkpoint):
    path, _ = tiny_hf_checkpoint
    hf = transformers.Qwen2_5OmniForConditionalGeneration.from_pretrained(path, torch_dtype=torch.float32).eval()
    ours = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch")
    return hf, ours


def _assert_no_blocks_held(model):
    engine = model.engine
    for runner in (engine.thinker, engine.talker):
        runner.blocks.check_invariants()
        assert runner.blocks.num_free_blocks == runner.config.num_blocks, "a request kept cache blocks"
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == stats["draining"] == 0


def _inputs(config, with_image=False):
    inputs = demo_inputs(config, audio_seconds=1.0)
    if not with_image:
        th = config.thinker_config
        ids = inputs["input_ids"][0].tolist()
        keep = [t for t in ids if t not in (th.image_token_id, th.vision_start_token_id, th.vision_end_token_id)]
        inputs = dict(input_ids=torch.tensor([keep]), attention_mask=torch.ones(1, len(keep), dtype=torch.long),
                      input_features=inputs["input_features"], feature_attention_mask=inputs["feature_attention_mask"])
    return inputs


def _hf_generate_codes(hf, config, inputs, **kwargs) -> tuple[torch.Tensor, list[int]]:
    """HF generate with audio; returns (sequences, the talker's codec ids before its first stop id), the ids read
    from HF's talker output by hooking its generate."""
    captured = {}
    original = hf.talker.generate

    def spy(*args, **kw):
        result = original(*args, **kw)
        captured["ids"] = result[:, kw["input_ids"].shape[1]:]
        return result

    hf.talker.generate = spy
    try:
        sequences, _ = hf.generate(**inputs, **kwargs, return_audio=True)
    finally:
        hf.talker.generate = original
    stop = {config.talker_config.tts_codec_end_token_id, config.talker_config.tts_codec_pad_token_id}
    ids = captured["ids"][0].tolist()
    return sequences, ids[: next((i for i, c in enumerate(ids) if c in stop), len(ids))]


def test_greedy_generate_matches_hf(models):
    hf, ours = models
    inputs = _inputs(ours.config)
    torch.manual_seed(1234)
    noise = torch.randn([1, 30000, ours.config.token2wav_config.dit.mel_dim])
    torch.manual_seed(1234)  # HF draws the same noise inside token2wav (greedy decoding draws nothing before)
    with torch.no_grad():
        hf_seq, hf_wav = hf.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=THINKER_NEW,
                                     talker_max_new_tokens=TALKER_NEW, talker_do_sample=False, return_audio=True)
    # HF drops the last code when it stops at talker_max_new_tokens: ask ours for one code less there.
    out = ours.generate(**inputs, speaker="Chelsie", thinker_max_new_tokens=THINKER_NEW,
                        talker_max_new_tokens=TALKER_NEW - 1, talker_do_sample=False, token2wav_noise=noise)
    assert torch.equal(out.sequences, hf_seq), (out.sequences, hf_seq)
    wav = torch.from_numpy(out.audio[0])
    hf_wav = hf_wav.reshape(-1).float()
    assert wav.shape == hf_wav.shape, (wav.shape, hf_wav.shape)
    rel = (wav - hf_wav).abs().max() / hf_wav.abs().max()
    print(f"codes {len(out.codes[0])}, waveform max relative error {rel:.2e}")
    assert rel <= 1e-3


def test_codes_match_hf_talker(models):
    """The codec ids themselves, read from HF's talker output by hooking its generate."""
    hf, ours = models
    inputs = _inputs(ours.config)
    with torch.no_grad():
        _, hf_codes = _hf_generate_codes(hf, ours.config, inputs, speaker="Ethan", thinker_max_new_tokens=THINKER_NEW,
                                         talker_max_new_tokens=TALKER_NEW, talker_do_sample=False)
    out = ours.generate(**inputs, speaker="Ethan", thinker_max_new_tokens=THINKER_NEW, talker_max_new_tokens=TALKER_NEW,
                        talker_do_sample=False, return_audio=False)
    assert out.audio is None
    out = ours.generate(**inputs, speaker="Ethan", thinker_max_new_tokens=THINKER_NEW, talker_max_new_tokens=TALKER_NEW,
                        talker_do_sample=False, seed=0)
    assert out.codes[0].tolist() == hf_codes


def test_batch_with_audio_and_return_audio_false(models):
    _, ours = models
    a = _inputs(ours.config)
    ids = a["input_ids"][0].tolist()
    text = [11, 12, 13]
    batch = dict(
        input_ids=torch.tensor([[0] * (len(ids) - len(text)) + text, ids]),
        attention_mask=torch.tensor([[0] * (len(ids) - len(text)) + [1] * len(text), [1] * len(ids)]),
        input_features=a["input_features"], feature_attention_mask=a["feature_attention_mask"],
    )
    out = ours.generate(**batch, thinker_max_new_tokens=4, talker_max_new_tokens=20, talker_do_sample=False, seed=0)
    assert out.sequences.shape == (2, len(ids) + 4)
    assert len(out.codes) == 2 and len(out.audio) == 2
    for row in range(2):
        single = {k: (v[row:row + 1] if k in ("input_ids", "attention_mask") else v) for k, v in batch.items()}
        if row == 0:
            single = dict(input_ids=torch.tensor([text]), attention_mask=torch.ones(1, 3, dtype=torch.long))
        alone = ours.generate(**single, thinker_max_new_tokens=4, talker_max_new_tokens=20, talker_do_sample=False,
                              seed=0)
        assert out.sequences[row, -4:].tolist() == alone.sequences[0, -4:].tolist()
        assert out.codes[row].tolist() == alone.codes[0].tolist()
        np.testing.assert_allclose(out.audio[row], alone.audio[0], rtol=1e-4, atol=1e-5)
    text_only = ours.generate(**batch, thinker_max_new_tokens=4, return_audio=False)
    assert text_only.audio is None and text_only.codes is None
    assert torch.equal(text_only.sequences, out.sequences)


def test_stream_matches_generate(models):
    _, ours = models
    inputs = _inputs(ours.config)
    kw = dict(speaker="Chelsie", thinker_max_new_tokens=THINKER_NEW, talker_max_new_tokens=80,
              talker_do_sample=False, seed=3)
    full = ours.generate(**inputs, **kw)
    text, audio, first_audio_text = [], [], None
    for event in ours.stream(**inputs, **kw):
        text.extend(event.text_ids)
        if event.audio.size and first_audio_text is None:
            first_audio_text = len(text)
        audio.append(event.audio)
    streamed = np.concatenate(audio)
    assert text == full.sequences[0, inputs["input_ids"].shape[1]:].tolist()
    assert streamed.shape == full.audio[0].shape, "every sample exactly once"
    from omni_model.streaming import stream_snr_db

    snr = stream_snr_db(full.audio[0], streamed)
    print(f"streamed vs generate: {snr:.1f} dB")
    assert snr >= 40.0
    _assert_no_blocks_held(ours)


def test_closed_stream_releases_blocks(models):
    _, ours = models
    inputs = _inputs(ours.config)
    events = ours.stream(**inputs, thinker_max_new_tokens=30, talker_max_new_tokens=200, seed=1)
    next(events)
    next(events)
    events.close()
    _assert_no_blocks_held(ours)
    out = ours.generate(**inputs, thinker_max_new_tokens=3, return_audio=False)
    assert out.sequences.shape[1] == inputs["input_ids"].shape[1] + 3


def test_bad_generation_inputs(models, tmp_path):
    _, ours = models
    inputs = _inputs(ours.config)
    with pytest.raises(ValueError, match=r"unknown speaker 'Nobody'; known speakers: \['Chelsie', 'Ethan'\]"):
        ours.generate(**inputs, speaker="Nobody")
    with pytest.raises(TypeError, match="unexpected keyword arguments: talker_beams"):
        ours.generate(**inputs, talker_beams=2)
    with pytest.raises(ValueError, match="thinker_max_new_tokens must be an int >= 1"):
        ours.generate(**inputs, thinker_max_new_tokens=0)
    text_model = OmniModel.from_config(ours.config, device="cpu", dtype=torch.float32, enable_audio_output=False)
    with pytest.raises(ValueError, match="enable_audio_output=True"):
        text_model.generate(**inputs)
    mute = OmniModel.from_config(ours.config, device="cpu", dtype=torch.float32)
    mute.speakers = {}
    with pytest.raises(ValueError, match="spk_dict.pt"):
        mute.generate(**inputs)


def _first_new_token(ids: list[int], seen_before: list[int]) -> int:
    """The first id of ``ids`` past position 1 that does not occur before it (nor in ``seen_before``)."""
    for i in range(2, len(ids)):
        if ids[i] not in ids[:i] and ids[i] not in seen_before:
            return i
    pytest.skip("the greedy reply repeats every id: no mid-reply stop id to pick")


def test_stop_mid_reply_matches_hf(models, monkeypatch):
    """The reply ends at an end-of-turn id in the middle (not at thinker_max_new_tokens): ours reads each token
    back one step after feeding it, so the step fed with the stop id must leave no trace in the text, the codes
    (its reply element) or the cache. HF stops at the same id."""
    hf, ours = models
    inputs = _inputs(ours.config)
    prompt_len = inputs["input_ids"].shape[1]
    kw = dict(speaker="Chelsie", talker_max_new_tokens=TALKER_NEW, talker_do_sample=False)
    free = ours.generate(**inputs, thinker_max_new_tokens=12, return_audio=False)
    reply = free.sequences[0, prompt_len:].tolist()
    at = _first_new_token(reply, inputs["input_ids"][0].tolist())
    stop = reply[at]
    with torch.no_grad():
        hf_seq, hf_codes = _hf_generate_codes(hf, ours.config, inputs, **kw, thinker_max_new_tokens=12,
                                              thinker_eos_token_id=stop)
    monkeypatch.setattr(ours.engine, "stop_ids", {stop})
    out = ours.generate(**inputs, **kw, thinker_max_new_tokens=12, seed=0)
    assert out.sequences[0, prompt_len:].tolist() == reply[:at + 1]
    assert torch.equal(out.sequences, hf_seq)
    n = min(len(hf_codes), len(out.codes[0]))
    assert n >= at + 2, "the talker must run past the end of the text"
    assert out.codes[0].tolist()[:n] == hf_codes[:n]
    _assert_no_blocks_held(ours)


def test_codec_stop_mid_speech_truncates(models, monkeypatch):
    """A stop code read back one step late: the codes are exactly those before it, as if every step synced."""
    _, ours = models
    inputs = _inputs(ours.config)
    kw = dict(speaker="Ethan", thinker_max_new_tokens=THINKER_NEW, talker_max_new_tokens=TALKER_NEW,
              talker_do_sample=False, return_audio=True, seed=0)
    free = ours.generate(**inputs, **kw).codes[0].tolist()
    at = _first_new_token(free, [])
    monkeypatch.setattr(ours.engine, "codec_stop", ours.engine.codec_stop | {free[at]})
    out = ours.generate(**inputs, **kw)
    assert out.codes[0].tolist() == free[:at]
    assert len(out.audio[0]) > 0
    _assert_no_blocks_held(ours)


def test_steps_read_tokens_back_one_step_late(models, monkeypatch):
    """No step waits for its own sample: every token is read back only after the next step was launched."""
    from omni_model.engine import readback

    _, ours = models
    inputs = _inputs(ours.config)
    log = []
    engine = ours.engine
    decode = engine.thinker.decode

    def logged_decode(*args, **kwargs):
        log.append("decode")
        return decode(*args, **kwargs)

    values = readback.Readback.values

    def logged_values(self):
        log.append("read")
        return values(self)

    monkeypatch.setattr(engine.thinker, "decode", logged_decode)
    monkeypatch.setattr(readback.Readback, "values", logged_values)
    ours.generate(**inputs, thinker_max_new_tokens=5, return_audio=False)
    # prefill sample, then decode 1 .. 4: each read comes after the launch of the step fed by the token read.
    assert log == ["decode", "read"] * 4 + ["read"], log


def test_row_that_cannot_fit_fails_alone(tiny_hf_checkpoint):
    """A row whose prompt and reply can never fit the KV cache fails before any allocation, with a clear error; the
    other row's reply is the one it gets alone; every block comes back. Alone, such a prompt raises."""
    from omni_model import EngineConfig

    path, _ = tiny_hf_checkpoint
    small = OmniModel.from_pretrained(path, device="cpu", dtype=torch.float32, backend="torch",
                                      engine_config=EngineConfig(kv_cache_tokens=32, block_size=4, max_num_seqs=4,
                                                                 max_num_batched_tokens=64))
    long_ids, short_ids = list(range(20, 52)), [11, 12, 13]  # 32 and 3 tokens
    new = 6
    alone = small.generate(input_ids=torch.tensor([short_ids]), thinker_max_new_tokens=new, return_audio=False)
    batch = dict(input_ids=torch.tensor([long_ids, [0] * 29 + short_ids]),
                 attention_mask=torch.tensor([[1] * 32, [0] * 29 + [1] * 3]))
    out = small.generate(**batch, thinker_max_new_tokens=new, return_audio=False)
    assert out.errors[0] is not None and "KV cache" in out.errors[0] and "thinker_max_new_tokens" in out.errors[0]
    assert out.errors[1] is None
    assert out.sequences[1, -new:].tolist() == alone.sequences[0, -new:].tolist()
    _assert_no_blocks_held(small)
    with pytest.raises(ValueError, match="KV cache"):
        small.generate(input_ids=torch.tensor([long_ids]), thinker_max_new_tokens=new, return_audio=False)
