"""The batched sampler: per-row settings equal HF 4.57.6's logits processors, inverse-CDF draws follow the
processed distribution, and the counter-based uniforms are a pure function of (seed, counter, stream)."""

import numpy as np
import pytest
import torch

from omni_model.layers.sampler import SamplingParams, SamplingRows, counter_uniforms, mark_seen, process_logits, sample

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

PARAMS = [
    SamplingParams(),
    SamplingParams(repetition_penalty=1.05),
    SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05),
    SamplingParams(do_sample=True, temperature=0.7, top_p=0.5),
    SamplingParams(do_sample=True, top_k=3),
    SamplingParams(do_sample=True, temperature=1.3),
]


def _hf_scores(input_ids, logits, params, suppress=()):
    procs = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if suppress:
        procs.append(SuppressTokensLogitsProcessor(list(suppress), device="cpu"))
    if params.do_sample:
        if params.temperature != 1.0:
            procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k is not None:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p is not None:
            procs.append(TopPLogitsWarper(params.top_p))
    return procs(input_ids, logits.clone())


def _rows(params, uniforms=None, vocab=120):
    uniforms = [0.5] * len(params) if uniforms is None else uniforms
    return SamplingRows.build(params, uniforms, vocab, torch.device("cpu"))


def test_mixed_rows_match_hf_processors():
    """Every row of one batch gets its own settings, exactly as HF processes it alone."""
    g = torch.Generator().manual_seed(0)
    vocab = 120
    logits = torch.randn(len(PARAMS), vocab, generator=g) * 4
    input_ids = torch.randint(0, vocab, (len(PARAMS), 17), generator=g)
    seen = torch.zeros(len(PARAMS), vocab, dtype=torch.bool)
    mark_seen(seen, input_ids)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[93] = False  # suppressed, like the talker's codec bos
    ours = process_logits(logits, _rows(PARAMS), seen=seen, allowed=allowed)
    ids = sample(logits, _rows(PARAMS), seen=seen, allowed=allowed)
    for i, params in enumerate(PARAMS):
        hf = _hf_scores(input_ids[i:i + 1], logits[i:i + 1], params, suppress=(93,))[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(hf)), params
        finite = torch.isfinite(hf)
        torch.testing.assert_close(ours[i][finite], hf[finite], rtol=1e-6, atol=1e-6)
        assert torch.isfinite(hf[ids[i]]), "a drawn id must be one HF's processors keep"
        if not params.do_sample:
            assert ids[i] == hf.argmax()


def test_inverse_cdf_follows_the_distribution():
    """Stratified uniforms (i + 0.5) / N draw each id with frequency within 1 / N of its processed probability."""
    g = torch.Generator().manual_seed(1)
    vocab, n = 50, 4000
    logits = (torch.randn(1, vocab, generator=g) * 2).expand(n, -1)
    params = [SamplingParams(do_sample=True, temperature=0.8, top_k=20, top_p=0.9)] * n
    uniforms = ((np.arange(n) + 0.5) / n).tolist()
    ids = sample(logits, _rows(params, uniforms, vocab))
    probs = process_logits(logits[:1], _rows(params[:1], None, vocab)).softmax(-1)[0]
    freq = torch.bincount(ids, minlength=vocab).float() / n
    assert (freq - probs).abs().max() <= 1.0 / n + 1e-6
    assert set(ids.tolist()) <= set(torch.nonzero(probs).flatten().tolist())


def test_sampling_stays_inside_allowed():
    logits = torch.zeros(4, 50)
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    params = [SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)] * 4
    for seed in range(20):
        uniforms = counter_uniforms([seed] * 4, [0, 1, 2, 3], 0).tolist()
        ids = sample(logits, _rows(params, uniforms, 50), allowed=allowed)
        assert set(ids.tolist()) <= {3, 7, 11}


def test_counter_uniforms():
    a = counter_uniforms([7, 7, 8], [0, 1, 0], 0)
    assert np.array_equal(a, counter_uniforms([7, 7, 8], [0, 1, 0], 0)), "a pure function of its arguments"
    assert np.array_equal(a[1:2], counter_uniforms([7], [1], 0)), "a row does not depend on its neighbours"
    assert len(set(a.tolist())) == 3
    assert counter_uniforms([7], [0], 1)[0] != a[0], "the two decoders draw different streams"
    many = counter_uniforms([3] * 20000, list(range(20000)), 0)
    assert many.min() > 0 and many.max() <= 1
    # Uniform: the empirical CDF stays within a Kolmogorov-Smirnov bound (1.63 / sqrt(n): 1% level).
    ks = np.abs(np.sort(many) - (np.arange(1, many.size + 1) / many.size)).max()
    assert ks < 1.63 / np.sqrt(many.size)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
     ({"repetition_penalty": 0}, "repetition_penalty")],
)
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
