import pytest
import torch

from omni_model.layers.sampler import SamplingParams, mark_seen, process_logits, sample

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)


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


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(repetition_penalty=1.05),
        SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.8, repetition_penalty=1.05),
        SamplingParams(do_sample=True, temperature=0.7, top_p=0.5),
        SamplingParams(do_sample=True, top_k=3),
    ],
)
def test_matches_hf_processors(params):
    g = torch.Generator().manual_seed(0)
    vocab = 120
    logits = torch.randn(3, vocab, generator=g) * 4
    input_ids = torch.randint(0, vocab, (3, 17), generator=g)
    seen = torch.zeros(3, vocab, dtype=torch.bool)
    mark_seen(seen, input_ids)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[93] = False  # suppressed, like the talker's codec bos
    ours = process_logits(logits, params, seen=seen, allowed=allowed)
    hf = _hf_scores(input_ids, logits, params, suppress=(93,))
    assert torch.equal(torch.isinf(ours), torch.isinf(hf))
    finite = torch.isfinite(hf)
    torch.testing.assert_close(ours[finite], hf[finite], rtol=1e-6, atol=1e-6)
    if not params.do_sample:
        assert torch.equal(sample(logits, params, seen=seen, allowed=allowed), hf.argmax(-1))


def test_sampling_stays_inside_allowed_and_is_seeded():
    logits = torch.zeros(4, 50)
    allowed = torch.zeros(50, dtype=torch.bool)
    allowed[[3, 7, 11]] = True
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=40, top_p=0.95)
    draws = [sample(logits, params, allowed=allowed, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(set(d.tolist()) <= {3, 7, 11} for d in draws)
    again = sample(logits, params, allowed=allowed, generator=torch.Generator().manual_seed(5))
    assert torch.equal(again, draws[5])


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": 0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p"),
     ({"repetition_penalty": 0}, "repetition_penalty")],
)
def test_bad_params(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)
