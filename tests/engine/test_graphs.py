"""CUDA-graph replay (omni_model.engine.graphs): the cache's bookkeeping on CPU with a stand-in for the capture, and
the real thing on a GPU (graphed Token2Wav chunks equal eager ones; a step a graph cannot hold falls back)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from omni_model.engine import graphs
from omni_model.engine.graphs import GraphCache


class _FakeGraph:
    """Stands in for a captured graph on CPU: replay re-runs the step on the static buffers and writes the result
    into the captured output, as a real replay writes into graph-owned memory."""

    def __init__(self, fn):
        self.fn, self.out, self.replays = fn, None, 0

    def replay(self):
        self.replays += 1
        self.out.copy_(self.fn())

    def pool(self):
        return "pool"


@pytest.fixture
def fake_capture(monkeypatch):
    captured = []

    def capture(fn, device, pool=None, warmup=1):
        g = _FakeGraph(fn)
        for _ in range(warmup):
            fn()
        g.out = fn()
        captured.append((g, pool))
        return g, g.out

    monkeypatch.setattr(graphs, "capture", capture)
    return captured


def _cache():
    cache = GraphCache("cpu")
    cache.enabled = True  # as on CUDA; the capture is the stand-in
    return cache


def test_replays_with_new_inputs_and_returns_own_tensors(fake_capture):
    cache = _cache()
    calls = []

    def step(a, b):
        calls.append(1)
        return a * 2 + b

    x, y = torch.arange(4.0), torch.ones(4)
    first = cache("k", step, x, y)
    assert torch.equal(first, x * 2 + y) and len(cache) == 1
    second = cache("k", step, x + 10, y * 3)  # new values go through the static buffers
    assert torch.equal(second, (x + 10) * 2 + y * 3)
    assert torch.equal(first, x * 2 + y), "a replay must not overwrite an earlier result"
    graph, _ = fake_capture[0]
    assert graph.replays == 2 and len(fake_capture) == 1


def test_keys_and_shapes_make_separate_graphs_sharing_one_pool(fake_capture):
    cache = _cache()
    cache("a", torch.neg, torch.ones(3))
    cache("b", torch.neg, torch.ones(3))
    cache("a", torch.neg, torch.ones(5))
    cache("a", torch.neg, torch.ones(3, dtype=torch.float64))
    assert len(cache) == 4
    assert [pool for _, pool in fake_capture] == [None, "pool", "pool", "pool"]


def test_capture_new_false_runs_eagerly_unless_a_graph_exists(fake_capture):
    cache = _cache()
    out = cache("k", torch.neg, torch.ones(7), capture_new=False)
    assert torch.equal(out, -torch.ones(7)) and len(cache) == 0
    cache("k", torch.neg, torch.ones(2))
    cache("k", torch.neg, torch.full((2,), 4.0), capture_new=False)  # the shape has a graph: replayed
    assert fake_capture[0][0].replays == 2


def test_failed_capture_warns_once_and_runs_eagerly(monkeypatch):
    def capture(fn, device, pool=None, warmup=1):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(graphs, "capture", capture)
    cache = _cache()
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = cache("k", torch.neg, torch.ones(3))
    assert torch.equal(out, -torch.ones(3)) and not cache.enabled
    out = cache("k", torch.neg, torch.ones(3))  # no second warning, still correct
    assert torch.equal(out, -torch.ones(3))


def test_disabled_on_cpu():
    assert not GraphCache("cpu").enabled
    assert not GraphCache("cuda", enabled=False).enabled


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_graph_replays_new_inputs():
    cache = GraphCache("cuda")
    lin = nn.Linear(16, 16).cuda()
    for seed in range(3):
        x = torch.randn(4, 16, device="cuda", generator=torch.Generator("cuda").manual_seed(seed))
        with torch.no_grad():
            torch.testing.assert_close(cache("lin", lin, x), lin(x), rtol=0, atol=0)
    assert len(cache) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_capture_of_a_syncing_step_falls_back():
    cache = GraphCache("cuda")

    def step(x):
        return x * float(x.sum().item())  # a host sync: not capturable

    x = torch.ones(3, device="cuda")
    with pytest.warns(UserWarning, match="CUDA graph capture failed"):
        out = cache("sync", step, x)
    torch.testing.assert_close(out, x * 3)
    assert not cache.enabled


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_stream_equals_eager_stream():
    from omni_model.config import OmniConfig
    from omni_model.hf_compat import randomize_weights_
    from omni_model.loader import random_speakers
    from omni_model.models.token2wav import Token2Wav
    from omni_model.streaming import Token2WavRunner, stream_audio

    config = OmniConfig.preset("tiny")
    model = Token2Wav(config.token2wav_config)
    holder = nn.Module()
    holder.token2wav = model
    randomize_weights_(holder, seed=0)
    model = model.cuda()
    speaker = random_speakers(config)["Chelsie"]
    cond, ref_mel = speaker["cond"].float(), speaker["ref_mel"].float()
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, model.dit.num_embeds, (1, 150), generator=gen)
    noise = torch.randn(1, 30000, model.dit.cfg.mel_dim, generator=gen)
    eager, _ = stream_audio(model, codes, cond, ref_mel, noise, cuda_graphs=False)
    runner = Token2WavRunner(model)
    for _ in range(2):  # the second utterance replays the graphs the first captured
        graphed, _ = stream_audio(model, codes, cond, ref_mel, noise, runner=runner)
        np.testing.assert_allclose(graphed, eager, rtol=1e-5, atol=1e-6)
    assert len(runner.graphs) >= 2, "the DiT solve and the vocoder of the steady chunks were captured"


def test_streamer_feeds_every_chunk_through_the_graph_inputs(fake_capture):
    """Streaming Token2Wav with the stand-in capture on CPU: a chunk step that read anything of its window other
    than its inputs (a closed-over conditioning or noise slice) would replay the first window's audio."""
    from omni_model.config import OmniConfig
    from omni_model.hf_compat import randomize_weights_
    from omni_model.loader import random_speakers
    from omni_model.models.token2wav import Token2Wav
    from omni_model.streaming import Token2WavRunner, stream_audio

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = OmniConfig.preset("tiny")
        model = Token2Wav(config.token2wav_config)
        holder = nn.Module()
        holder.token2wav = model
        randomize_weights_(holder, seed=0)
        speaker = random_speakers(config)["Chelsie"]
        cond, ref_mel = speaker["cond"].float(), speaker["ref_mel"].float()
        gen = torch.Generator().manual_seed(1)
        codes = torch.randint(0, model.dit.num_embeds, (1, 200), generator=gen)  # 4 chunks + a last one
        noise = torch.randn(1, 30000, model.dit.cfg.mel_dim, generator=gen)
        eager, _ = stream_audio(model, codes, cond, ref_mel, noise, cuda_graphs=False, push_size=12)
        runner = Token2WavRunner(model)
        runner.graphs.enabled = True  # as on CUDA, with the stand-in capture
        # 12 codes a push: each chunk runs alone, so every window shape recurs and replays its graph.
        graphed, streamer = stream_audio(model, codes, cond, ref_mel, noise, runner=runner, push_size=12)
        np.testing.assert_array_equal(graphed, eager)
        replays = sum(g.replays for g, _ in fake_capture)
        assert len(streamer.chunks) >= 4 and len(runner.graphs) >= 3
        assert replays == 2 * (len(streamer.chunks) - 1), "every non-final chunk's DiT and vocoder replayed"
    finally:
        torch.set_num_threads(threads)
