"""OmniEngine on the tiny model (CPU, fp32, random weights): every request of a batch equals its solo run.

The oracle of each test is the same request run alone through the same engine (greedy, or sampled with the same
seed): text ids and codes exactly, audio to fp32 tolerance (batched DiT solves and vocoders reorder sums). HF parity
of the solo path itself is tested in tests/model/test_generate_parity.py.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import omni_kernels
from omni_model import EngineConfig, OmniConfig, OmniModel
from omni_model.demo import demo_inputs
from omni_model.engine.scheduler import StepPlan

TALKER = dict(talker_do_sample=False, talker_max_new_tokens=40, first_chunk_codes=12, seed=5)  # seed: the noise


@pytest.fixture(scope="module")
def model():
    config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, kv_cache_tokens=8192, block_size=8)
    return OmniModel.from_config(OmniConfig.preset("tiny"), device="cpu", dtype=torch.float32, seed=0,
                                 engine_config=config)


def _text(ids: list[int]) -> dict:
    return dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))


def _spoken(model) -> dict:
    return demo_inputs(model.config, audio_seconds=1.0)


class Run:
    """A request's outputs gathered over steps."""

    def __init__(self):
        self.text, self.codes, self.audio, self.finished, self.error, self.reason = [], [], [], False, None, None
        self.codes_at: dict[int, int] = {}  # step -> codes received by the end of it

    def take(self, out, step: int):
        assert not self.finished, "an output after the last one"
        self.text += out.text_ids
        self.codes += out.codes
        if out.audio.size:
            self.audio.append(out.audio)
        self.finished, self.error, self.reason = out.finished, out.error, out.finish_reason
        self.codes_at[step] = len(self.codes)

    @property
    def wave(self) -> np.ndarray:
        return np.concatenate(self.audio) if self.audio else np.zeros(0, dtype=np.float32)


def drive(engine, schedule: dict[int, list[tuple[dict, dict]]], max_steps: int = 2000) -> list[Run]:
    """Adds schedule[s] (a list of (inputs, options)) before step s, steps until everything finished; returns one
    Run per request in the order added."""
    ids, runs = [], {}
    step = 0
    while step <= max(schedule, default=0) or engine.has_unfinished_requests():
        for inputs, options in schedule.get(step, []):
            rid = engine.add_request(inputs, **options)
            ids.append(rid)
            runs[rid] = Run()
        for out in engine.step():
            runs[out.request_id].take(out, step)
        step += 1
        assert step < max_steps, "the engine did not finish"
    assert all(r.finished for r in runs.values())
    return [runs[i] for i in ids]


def assert_same(run: Run, solo: Run, audio: bool = True):
    assert run.error is None and solo.error is None, (run.error, solo.error)
    assert run.text == solo.text
    assert run.codes == solo.codes
    if audio:
        assert run.wave.shape == solo.wave.shape and run.wave.size > 0
        np.testing.assert_allclose(run.wave, solo.wave, rtol=0, atol=2e-5)


def assert_nothing_held(engine):
    for runner in (engine.thinker, engine.talker):
        runner.blocks.check_invariants()
        assert runner.blocks.num_free_blocks == runner.blocks.num_blocks, "a request kept cache blocks"
    stats = engine.stats()
    assert stats["running"] == stats["waiting"] == stats["draining"] == 0
    assert sorted(engine.scheduler.free_slots) == list(range(engine.config.max_num_seqs))


def test_requests_joining_at_different_steps_equal_their_solo_runs(model):
    """Three requests join at steps 0, 3 and mid-speech of the first; each gives its solo text, codes and audio."""
    engine = model.engine
    reqs = [(_spoken(model), dict(thinker_max_new_tokens=6, speaker="Chelsie", **TALKER)),
            (_text([11, 12, 13, 14, 15]), dict(thinker_max_new_tokens=5, speaker="Ethan", **TALKER)),
            (_text(list(range(20, 47))), dict(thinker_max_new_tokens=4, speaker="Chelsie", **TALKER))]
    solo = [drive(engine, {0: [r]})[0] for r in reqs]
    assert all(s.codes for s in solo)
    joined = drive(engine, {0: [reqs[0]], 3: [reqs[1]], 12: [reqs[2]]})
    spoken_by_11 = max(n for s, n in joined[0].codes_at.items() if s <= 11)
    assert 0 < spoken_by_11 < len(joined[0].codes), "the third request joined while the first was speaking"
    for run, alone in zip(joined, solo):
        assert_same(run, alone)
    assert_nothing_held(engine)


def test_mixed_sampling_settings_in_one_batch(model):
    """Greedy, sampled and penalised rows in one batch, each equal to its solo run with the same seed; a seeded
    sampled request is the same alone, beside others, and when it joins late."""
    engine = model.engine
    text = [(_text([30 + i, 31, 32 + i, 33]), None) for i in range(4)]
    options = [dict(thinker_max_new_tokens=8, return_audio=False),
               dict(thinker_max_new_tokens=8, return_audio=False, thinker_do_sample=True, thinker_temperature=0.7,
                    thinker_top_p=0.9, seed=11),
               dict(thinker_max_new_tokens=8, return_audio=False, thinker_do_sample=True, thinker_top_k=5, seed=12),
               dict(thinker_max_new_tokens=8, speaker="Ethan", thinker_repetition_penalty=1.3, talker_do_sample=True,
                    talker_max_new_tokens=24, seed=13)]
    reqs = [(inputs, o) for (inputs, _), o in zip(text, options)]
    solo = [drive(engine, {0: [r]})[0] for r in reqs]
    together = drive(engine, {0: reqs})
    late = drive(engine, {0: reqs[:1] + reqs[2:], 2: reqs[1:2]})
    for i in range(4):
        assert_same(together[i], solo[i], audio=i == 3)
    assert_same(late[-1], solo[1], audio=False)
    assert solo[1].text != drive(engine, {0: [(reqs[1][0], {**options[1], "seed": 99})]})[0].text, \
        "another seed draws other tokens"
    assert_nothing_held(engine)


def test_preemption_and_resumption_equal_no_preemption(model):
    """A cache too small for three concurrent replies: the newest request is preempted (its blocks freed), resumed
    later from its prompt and tokens, and every request still gives its solo result; nothing is streamed twice."""
    small = OmniModel.from_config(model.config, device="cpu", dtype=torch.float32, seed=0,
                                  engine_config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=32,
                                                             kv_cache_tokens=96, block_size=8))
    small.load_state_dict(model.state_dict())
    small.speakers = model.speakers
    engine = small.engine
    reqs = [(_text(list(range(10 + i, 26 + i))), dict(thinker_max_new_tokens=10, speaker="Chelsie", **TALKER))
            for i in range(3)]
    solo = [drive(engine, {0: [r]})[0] for r in reqs]
    together = drive(engine, {0: reqs})
    assert engine.stats()["num_preemptions"] > 0, "the test must preempt"
    for run, alone in zip(together, solo):
        assert_same(run, alone)
    assert_nothing_held(engine)


def test_chunked_prefill_keeps_decoding(model, monkeypatch):
    """A long prompt that arrives mid-reply is prefilled in chunks of the step budget while the running request
    decodes in every step; both equal their solo runs."""
    engine = model.engine
    short = (_text([11, 12, 13]), dict(thinker_max_new_tokens=12, return_audio=False))
    long = (_text([40 + i % 50 for i in range(150)]), dict(thinker_max_new_tokens=3, return_audio=False))
    plans = []
    schedule = engine.scheduler.schedule

    def logged():
        plan = schedule()
        plans.append(plan)
        return plan

    monkeypatch.setattr(engine.scheduler, "schedule", logged)
    both = drive(engine, {0: [short], 2: [long]})  # first: the long prompt is in no cache yet
    monkeypatch.undo()
    solo = [drive(engine, {0: [r]})[0] for r in (short, long)]
    chunked = [p for p in plans if p.thinker_chunks and p.thinker_decodes]
    assert len(chunked) >= 2, "the long prompt took several steps, each beside a decode"
    for p in plans:
        assert len(p.thinker_decodes) + sum(n for _, _, n in p.thinker_chunks) <= engine.config.max_num_batched_tokens
    assert_same(both[0], solo[0], audio=False)
    assert_same(both[1], solo[1], audio=False)


def test_prefix_cache_serves_the_next_turn(model):
    """The second turn of a conversation (the first turn's prompt and reply, then a new question) reuses the first
    turn's blocks, media included, and gives the reply it gets without the cache."""
    engine = model.engine
    first = _spoken(model)
    turn1 = drive(engine, {0: [(first, dict(thinker_max_new_tokens=4, speaker="Chelsie", **TALKER))]})[0]
    ids = first["input_ids"][0].tolist() + turn1.text + [15, 16, 17]
    second = dict(first, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    hits = engine.stats()["prefix_cache_hit_tokens"]
    cached = drive(engine, {0: [(second, dict(thinker_max_new_tokens=4, speaker="Chelsie", **TALKER))]})[0]
    assert engine.stats()["prefix_cache_hit_tokens"] - hits >= first["input_ids"].shape[1] - 8

    fresh = OmniModel.from_config(model.config, device="cpu", dtype=torch.float32, seed=0,
                                  engine_config=EngineConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                             kv_cache_tokens=1024, block_size=8,
                                                             enable_prefix_caching=False))
    fresh.load_state_dict(model.state_dict())
    fresh.speakers = model.speakers
    uncached = drive(fresh.engine, {0: [(second, dict(thinker_max_new_tokens=4, speaker="Chelsie", **TALKER))]})[0]
    assert_same(cached, uncached)


def test_abort_mid_speech_frees_every_block(model):
    engine = model.engine
    rid = engine.add_request(_spoken(model), thinker_max_new_tokens=8, speaker="Chelsie", **TALKER)
    other = engine.add_request(_text([11, 12]), thinker_max_new_tokens=3, return_audio=False)
    last = {}
    for _ in range(200):
        last.update({o.request_id: o for o in engine.step()})
        if last[rid].codes:
            break
    assert last[rid].codes and not last[rid].finished, "aborted mid-speech"
    engine.abort_request(rid)  # no step is running: applied at once
    assert engine.stats()["talker_free_blocks"] == engine.stats()["talker_total_blocks"]
    while engine.has_unfinished_requests():
        last.update({o.request_id: o for o in engine.step()})
    assert last[rid].finished and last[rid].finish_reason == "abort"
    assert last[other].finished and last[other].error is None
    assert_nothing_held(engine)


def test_failures_stay_with_their_request(model, monkeypatch):
    """A request whose encoder raises, and one whose Token2Wav raises, fail alone with their error; the others and
    the engine go on."""
    engine = model.engine
    good = (_text([11, 12, 13]), dict(thinker_max_new_tokens=4, speaker="Ethan", **TALKER))
    solo = drive(engine, {0: [good]})[0]
    audio_tower = model.thinker.audio_tower.forward

    def broken_encoder(*args, **kwargs):
        raise RuntimeError("bad audio")

    monkeypatch.setattr(model.thinker.audio_tower, "forward", broken_encoder)
    unseen = demo_inputs(model.config, audio_seconds=1.5)  # media no earlier request cached: its encoder runs
    runs = drive(engine, {0: [good, (unseen, dict(thinker_max_new_tokens=4, **TALKER))]})
    assert_same(runs[0], solo)
    assert runs[1].reason == "error" and "bad audio" in runs[1].error
    monkeypatch.setattr(model.thinker.audio_tower, "forward", audio_tower)

    from omni_model import streaming

    solve = streaming.Token2WavRunner._solve

    def broken_solve(self, group):
        if any(job.utterance.num_steps == 7 for job in group):
            raise RuntimeError("bad chunk")
        return solve(self, group)

    monkeypatch.setattr(streaming.Token2WavRunner, "_solve", broken_solve)
    bad = (_text([11, 12, 13]), dict(thinker_max_new_tokens=4, speaker="Ethan", token2wav_num_steps=7, **TALKER))
    runs = drive(engine, {0: [good, bad]})
    assert_same(runs[0], solo)
    assert runs[1].reason == "error" and "bad chunk" in runs[1].error
    assert_nothing_held(engine)


def test_bad_requests_are_refused_before_queueing(model):
    engine = model.engine
    with pytest.raises(ValueError, match="unknown speaker"):
        engine.add_request(_text([10, 11]), speaker="Nobody")
    with pytest.raises(TypeError, match="unexpected keyword arguments: beams"):
        engine.add_request(_text([10, 11]), beams=2)
    with pytest.raises(ValueError, match="thinker_top_p must lie in"):
        engine.add_request(_text([10, 11]), thinker_top_p=2.0)
    with pytest.raises(ValueError, match="batch 1"):
        engine.add_request(dict(input_ids=torch.full((2, 3), 10)))
    with pytest.raises(ValueError, match="thinker_max_new_tokens"):
        engine.add_request(_text([10, 11]), thinker_max_new_tokens=9000)
    with pytest.raises(ValueError, match="input_ids must lie in"):
        engine.add_request(_text([10, 200]))
    rid = engine.add_request(_text([10, 11]), thinker_max_new_tokens=1, return_audio=False, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request(_text([10, 11]), request_id="x")
    assert engine.stats()["waiting"] == 1 and rid == "x"
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["x"]
    assert_nothing_held(engine)


def test_two_threads_generate_at_once(model):
    """Two threads call generate together: one steps the engine for both, each gets its solo result."""
    a = dict(_spoken(model), thinker_max_new_tokens=5, speaker="Chelsie", **TALKER)
    b = dict(_text([21, 22, 23, 24]), thinker_max_new_tokens=6, speaker="Ethan", **TALKER)
    solo = [model.generate(**a), model.generate(**b)]
    results = [None, None]
    barrier = threading.Barrier(2)

    def call(i, kwargs):
        barrier.wait()
        results[i] = model.generate(**kwargs)

    threads = [threading.Thread(target=call, args=(i, kw)) for i, kw in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    for got, alone in zip(results, solo):
        assert torch.equal(got.sequences, alone.sequences)
        assert got.codes[0].tolist() == alone.codes[0].tolist()
        np.testing.assert_allclose(got.audio[0], alone.audio[0], rtol=0, atol=2e-5)
    assert_nothing_held(model.engine)


def test_thinker_logits_and_generate_in_any_order(model):
    inputs = _text([11, 12, 13, 14])
    before = model.thinker_logits(**inputs)
    out = model.generate(**inputs, thinker_max_new_tokens=3, return_audio=False)
    after = model.thinker_logits(**inputs)
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert out.sequences[0, 4].item() == int(before[0, -1].argmax())


class _NoHostReads(TorchDispatchMode):
    """Fails on any op that reads device data on the host (``.item()``, ``int(t)``) or whose output shape depends
    on data (``nonzero``, boolean indexing): on a GPU each is a sync. The kernels' front doors are exempt (on CUDA
    their index checks are off and they only launch); so are ``.tolist()`` / ``.numpy()`` patched to fail too."""

    def __init__(self):
        super().__init__()
        self.paused = 0
        self.violations: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and self._reads_data(func, args):
            self.violations.append(str(func))
        return func(*args, **(kwargs or {}))

    @staticmethod
    def _reads_data(func, args) -> bool:
        if func is torch.ops.aten.index.Tensor:  # integer indices give a static shape; boolean masks do not
            return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1])
        return torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags


def test_decode_steps_make_no_host_read(model, monkeypatch):
    """Every decode-only step of both decoders (embedding lookups, the runner's metadata, attention, sampling with
    per-row settings, the penalties' seen-id update, the start of the read-back) runs under a dispatch mode that
    fails on host reads of device data and data-dependent shapes."""
    engine = model.engine
    mode = _NoHostReads()
    for name in ("apply_tmrope", "tmrope_store_kv", "store_kv_cache", "paged_decode_attention",
                 "paged_prefill_attention", "add_rms_norm", "silu_and_mul"):
        op = getattr(omni_kernels, name)

        def exempt(*args, _op=op, **kwargs):
            mode.paused += 1
            try:
                return _op(*args, **kwargs)
            finally:
                mode.paused -= 1

        for module in ("omni_model.layers.attention", "omni_model.layers.norm", "omni_model.layers.mlp"):
            if hasattr(__import__(module, fromlist=[name]), name):
                monkeypatch.setattr(f"{module}.{name}", exempt)

    real = {"tolist": torch.Tensor.tolist, "numpy": torch.Tensor.numpy}

    def host_copy(name):
        def call(self, *args, **kwargs):
            if not mode.paused:
                mode.violations.append(name)
            return real[name](self, *args, **kwargs)
        return call

    launch = engine._launch
    checked = []

    def checked_launch(plan: StepPlan):
        if not plan.decode_only or not (plan.thinker_decodes or plan.talker_decodes):
            return launch(plan)
        checked.append((len(plan.thinker_decodes), len(plan.talker_decodes)))
        with monkeypatch.context() as m, mode:
            m.setattr(torch.Tensor, "tolist", host_copy("tolist"))
            m.setattr(torch.Tensor, "numpy", host_copy("numpy"))
            launch(plan)

    monkeypatch.setattr(engine, "_launch", checked_launch)
    drive(engine, {0: [(_text([11, 12, 13]), dict(thinker_max_new_tokens=6, speaker="Chelsie", talker_do_sample=True,
                                                  talker_max_new_tokens=16, seed=1, thinker_repetition_penalty=1.2)),
                       (_text([14, 15]), dict(thinker_max_new_tokens=4, thinker_do_sample=True, seed=2,
                                              return_audio=False))]})
    assert any(t and k for t, k in checked), "some checked step decoded both decoders"
    assert not mode.violations, mode.violations
