"""Streaming code-to-wave (omni_model.streaming) on the tiny Token2Wav with random weights, fp32, CPU.

The oracle is our non-streaming ``Token2Wav`` (itself tested equal to HF 4.57.6 in test_token2wav_parity.py) on
the same codes and the same global noise tensor. Streaming is an approximation (a chunk's DiT window truncates
the context of its edge frames, and those errors reach the kept frames through the 36 ODE passes), so quality is
a measured SNR floor, not a tolerance.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from omni_model.config import OmniConfig
from omni_model.hf_compat import randomize_weights_
from omni_model.loader import random_speakers
from omni_model.models.token2wav import Token2Wav
from omni_model.streaming import Token2WavRunner, Token2WavStreamer, Utterance, stream_audio, stream_snr_db

NUM_CODES = 150  # 3 default chunks and a partial one; not a multiple of the block (12 codes) or the chunk (48)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: intra-op threads only add OpenMP hand-offs, which on a busy shared CPU made this module ~15x
    slower (measured 356 s with 2 threads under load, 23 s with 1). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(one_thread):
    """The tiny Token2Wav with hf_compat's unit-scale random weights (PyTorch's default init couples DiT blocks so
    weakly that streaming looks ~40 dB better than it is), the tiny Chelsie speaker, codes and HF-sized noise."""
    config = OmniConfig.preset("tiny")
    model = Token2Wav(config.token2wav_config)
    holder = nn.Module()
    holder.token2wav = model  # hf_compat's gains are keyed by checkpoint names (token2wav.code2wav_...)
    randomize_weights_(holder, seed=0)
    speaker = random_speakers(config)["Chelsie"]
    cond, ref_mel = speaker["cond"].float(), speaker["ref_mel"].float()
    gen = torch.Generator().manual_seed(1)
    codes = torch.randint(0, model.dit.num_embeds, (1, NUM_CODES), generator=gen)
    noise = torch.randn(1, 30000, model.dit.cfg.mel_dim, generator=gen)  # HF's draw size
    full = model(codes, cond, ref_mel, noise)[0].numpy()
    return model, codes, cond, ref_mel, noise, full


def _stream_all(model, codes, cond, ref_mel, noise, **kwargs) -> tuple[np.ndarray, Token2WavStreamer]:
    return stream_audio(model, codes, cond, ref_mel, noise, **kwargs)


def test_stream_snr_db():
    ref = np.ones(100, dtype=np.float32)
    assert stream_snr_db(ref, ref) == math.inf
    assert stream_snr_db(ref, 0.9 * ref) == pytest.approx(20.0)  # error 0.1 of the amplitude: 20 dB
    assert stream_snr_db(np.zeros(4), np.ones(4)) == -math.inf
    with pytest.raises(ValueError, match="same length"):
        stream_snr_db(ref, ref[:-1])


def test_batched_chunks_equal_each_utterance_alone(setup):
    """Chunks of several utterances run together (one DiT solve over their windows packed along the length, first
    chunks beside later ones, one vocoder call per window length) give each utterance its solo audio; a reply that
    is not streamed (chunked=False) is the non-streaming Token2Wav."""
    model, codes, cond, ref_mel, noise, full = setup
    gen = torch.Generator().manual_seed(3)
    others = [torch.randint(0, model.dit.num_embeds, (n,), generator=gen).tolist() for n in (70, 31)]
    noise2 = torch.randn(1, 30000, model.dit.cfg.mel_dim, generator=gen)
    solo = [_stream_all(model, codes, cond, ref_mel, noise)[0]]
    solo += [_stream_all(model, c, cond, ref_mel, noise2, first_chunk_codes=12)[0] for c in others]

    runner = Token2WavRunner(model)
    utts = [Utterance(model, cond, ref_mel, noise)]
    utts += [Utterance(model, cond, ref_mel, noise2, first_chunk_codes=12) for _ in others]
    streams = [codes[0].tolist()] + others
    pieces = [[] for _ in utts]
    batches = []
    for step in range(0, NUM_CODES, 20):  # 20 codes a step: utterances become ready at different steps
        jobs = []
        for u, c in zip(utts, streams):
            if step < len(c):
                u.push(c[step:step + 20])
            jobs += u.ready(final=step + 20 >= len(c) and not u.finished)
        runner.run(jobs)
        batches.append(len(jobs))
        for i, u in enumerate(utts):
            pieces[i] += u.collect(wait=True)
    assert max(batches) >= 2, "chunks of different utterances ran in one batch"
    for i in range(len(utts)):
        np.testing.assert_allclose(np.concatenate(pieces[i]), solo[i], rtol=0, atol=1e-5)

    whole = Utterance(model, cond, ref_mel, noise, chunked=False)
    whole.push(codes[0].tolist())
    assert whole.ready() == []
    runner.run(whole.ready(final=True))
    np.testing.assert_allclose(np.concatenate(whole.collect(wait=True)), full, rtol=0, atol=1e-5)


def test_length_order_and_push_pattern(setup):
    """N codes give exactly N * repeats * hop samples, in order; one-by-one pushes equal one big push."""
    model, codes, cond, ref_mel, noise, full = setup
    r, hop = model.dit.repeats, model.vocoder.hop
    at_once, streamer = _stream_all(model, codes, cond, ref_mel, noise)
    assert at_once.dtype == np.float32 and at_once.shape == (NUM_CODES * r * hop,) == full.shape

    # Chunks tile [0, N) in order, each chunk's samples are its codes' samples, windows are block aligned.
    block = model.dit.cfg.block_size // r
    assert [c.start for c in streamer.chunks] == [0] + [c.end for c in streamer.chunks[:-1]]
    assert streamer.chunks[-1].end == NUM_CODES and streamer.chunks[-1].final
    assert all(c.samples == (c.end - c.start) * r * hop for c in streamer.chunks)
    assert all(c.dit_lo % block == 0 and c.dit_lo <= c.start and c.dit_hi >= c.end for c in streamer.chunks)
    assert [(c.start, c.end, c.dit_lo, c.dit_hi) for c in streamer.chunks] == [
        (0, 48, 0, 60), (48, 96, 24, 108), (96, 150, 72, 150)]  # REFERENCE.md: 48 codes, 24 back, 12 ahead

    one_by_one = Token2WavStreamer(model, cond, ref_mel, noise)
    pieces, first_audio_at = [], None
    for i, code in enumerate(codes[0].tolist()):
        out = one_by_one.push([code])
        if out and first_audio_at is None:
            first_audio_at = i + 1
        pieces += out
    pieces += one_by_one.finish()
    assert first_audio_at == 48 + 12  # REFERENCE.md: the first audio needs 60 codes
    np.testing.assert_array_equal(np.concatenate(pieces), at_once)
    np.testing.assert_array_equal(_stream_all(model, codes, cond, ref_mel, noise, push_size=7)[0], at_once)
    assert one_by_one.finish() == []
    assert one_by_one.samples_emitted == at_once.shape[0]

    times = one_by_one.stage_times
    assert times["token2wav_chunks"] == 3 and times["token2wav_dit_ms"] > 0 and times["token2wav_vocoder_ms"] > 0
    assert all(c.dit_ms > 0 and c.vocoder_ms > 0 for c in one_by_one.chunks)


# SNR floors in dB of streamed against non-streaming audio on this tiny model, measured on CPU in fp32 (codes and
# noise from seeds 1 and 2):
#   default chunking (48 codes, 24 back, 12 ahead, vocoder 20 frames)   72.6, 70.6
#   first chunk 12 codes                                                70.3, 71.3
#   first chunk 5 codes (not block aligned)                             63.8, 66.5
# and the failures the floors must catch:
#   a window start 6 codes off the block grid                           43.8
#   no right DiT context                                                21.9
#   no vocoder context                                                  20.4, 19.9
#   no DiT and no vocoder context                                       18.7, 18.4
# Errors come from the right edge of each DiT window (one block ahead is one hop from the truncation in a single
# pass; 24 codes ahead measure 110 dB), so a smaller first chunk costs little. Each floor sits about 10 dB below
# the lowest value measured for its chunking (fp32 reruns with another thread count move these values by < 0.01
# dB) and about 10 dB above the best failure (43.8; tested: a window 6 codes off the grid fails all three).
# 7B shapes: for the benchmarks (stream_audio + stream_snr_db), not this CPU test.
SNR_FLOOR_DB = {None: 60.0, 12: 60.0, 5: 54.0}


@pytest.mark.parametrize("first_chunk_codes", [None, 12, 5])
def test_snr_against_non_streaming(setup, first_chunk_codes):
    model, codes, cond, ref_mel, noise, full = setup
    streamed, streamer = _stream_all(model, codes, cond, ref_mel, noise, first_chunk_codes=first_chunk_codes)
    snr = stream_snr_db(full, streamed)
    print(f"first_chunk_codes={first_chunk_codes}: streamed vs non-streaming SNR {snr:.1f} dB, chunks "
          f"{[(c.start, c.end) for c in streamer.chunks]}")
    assert snr >= SNR_FLOOR_DB[first_chunk_codes]
    first = streamer.chunks[0]
    assert first.end == (first_chunk_codes or 48)
    if first_chunk_codes == 5:  # back on the block grid after an unaligned first chunk
        assert [(c.start, c.end, c.dit_lo) for c in streamer.chunks[1:3]] == [(5, 48, 0), (48, 96, 24)]


def test_context_matters(setup):
    """Without DiT and vocoder context the SNR collapses: the floor above is a real test of the contexts."""
    model, codes, cond, ref_mel, noise, full = setup
    streamed, _ = _stream_all(model, codes, cond, ref_mel, noise, left_context_codes=0, right_context_codes=0,
                              vocoder_context_frames=0)
    snr = stream_snr_db(full, streamed)
    print(f"no context: SNR {snr:.1f} dB")
    assert snr < SNR_FLOOR_DB[None] - 20


def test_shorter_than_one_chunk(setup):
    """7 codes: nothing before finish(), then one chunk that is the whole non-streaming run (no context cut)."""
    model, codes, cond, ref_mel, noise, _ = setup
    short = codes[:, :7]
    streamer = Token2WavStreamer(model, cond, ref_mel, noise)
    assert streamer.push(short[0].tolist()) == []
    out = streamer.finish()
    assert len(out) == 1 and out[0].shape == (7 * model.dit.repeats * model.vocoder.hop,)
    torch.testing.assert_close(torch.from_numpy(out[0]), model(short, cond, ref_mel, noise)[0], rtol=1e-5, atol=1e-6)
    empty = Token2WavStreamer(model, cond, ref_mel, noise)
    assert empty.push([]) == [] and empty.finish() == []


def test_noise_drawn_from_generator(setup):
    """noise=None draws Token2Wav's noise from the generator: the same seed gives the non-streaming audio."""
    model, codes, cond, ref_mel, _, _ = setup
    short = codes[:, :30]
    full = model(short, cond, ref_mel, generator=torch.Generator().manual_seed(7))[0].numpy()
    streamer = Token2WavStreamer(model, cond, ref_mel, None, first_chunk_codes=12,
                                 generator=torch.Generator().manual_seed(7))
    streamed = np.concatenate(streamer.push(short[0].tolist()) + streamer.finish())
    snr = stream_snr_db(full, streamed)
    print(f"noise from the generator, 30 codes, first chunk 12: SNR {snr:.1f} dB")
    assert snr >= SNR_FLOOR_DB[12]


def test_bad_arguments(setup):
    model, codes, cond, ref_mel, noise, _ = setup
    mel = model.dit.cfg.mel_dim

    def make(**kwargs):
        args = {"cond": cond, "ref_mel": ref_mel, "noise": noise, **kwargs}
        return Token2WavStreamer(model, args.pop("cond"), args.pop("ref_mel"), args.pop("noise"), **args)

    for name, value in (("chunk_codes", 0), ("chunk_codes", 13), ("left_context_codes", 5),
                        ("right_context_codes", 7), ("left_context_codes", -12), ("first_chunk_codes", 0),
                        ("vocoder_context_frames", -1), ("num_steps", 1)):
        with pytest.raises(ValueError, match=name):
            make(**{name: value})
    with pytest.raises(TypeError, match="chunk_codes"):
        make(chunk_codes=48.0)
    with pytest.raises(ValueError, match="cond"):
        make(cond=cond[0])
    with pytest.raises(ValueError, match="ref_mel"):
        make(ref_mel=ref_mel[..., :-1])
    with pytest.raises(ValueError, match="noise"):
        make(noise=torch.randn(1, 100, mel + 1))

    streamer = make(noise=noise[:, :20])  # 10 codes of noise
    with pytest.raises(ValueError, match="noise"):
        streamer.push(list(range(11)))
    with pytest.raises(ValueError, match="codes"):
        streamer.push([model.dit.num_embeds])
    with pytest.raises(ValueError, match="codes"):
        streamer.push([-1])
    with pytest.raises(ValueError, match="1-D"):
        streamer.push(torch.zeros(2, 2, dtype=torch.long))
    streamer.finish()
    with pytest.raises(RuntimeError, match="finish"):
        streamer.push([1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_async_chunks_on_cuda(setup):
    """On CUDA chunks run on Token2Wav's own stream and their audio comes out of a later push or finish: pushed one
    code at a time, every sample still comes out once and in order, equal to one push of all codes, and close()
    leaves nothing running."""
    model, codes, cond, ref_mel, noise, full = setup
    model = model.cuda()
    try:
        at_once, _ = _stream_all(model, codes, cond, ref_mel, noise)
        streamer = Token2WavStreamer(model, cond, ref_mel, noise)
        pieces = [a for code in codes[0].tolist() for a in streamer.push([code])]
        pieces += streamer.finish()
        np.testing.assert_array_equal(np.concatenate(pieces), at_once)
        assert [c.index for c in streamer.chunks] == list(range(len(streamer.chunks)))
        assert all(c.dit_ms > 0 and c.vocoder_ms > 0 and c.ready_s >= c.launched_s for c in streamer.chunks)
        assert stream_snr_db(full, at_once) > 40.0
        early = Token2WavStreamer(model, cond, ref_mel, noise)
        early.push(codes[0, :100].tolist())
        early.close()
        assert not early.utterance.in_flight
    finally:
        model.cpu()
