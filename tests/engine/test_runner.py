"""The paged engine: greedy decode through the runner equals recomputation without a cache, and a request
that no longer fits fails alone."""

from types import SimpleNamespace

import pytest
import torch

from omni_kernels import available
from omni_model.engine.block_manager import CacheFullError
from omni_model.engine.runner import DecoderRunner, RunnerConfig
from omni_model.layers.backend import use_backend
from omni_model.models.thinker import ThinkerTextModel

CFG = SimpleNamespace(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, intermediate_size=40, rms_norm_eps=1e-6,
                      mrope_section=[1, 1, 2], rope_theta=10000.0, hidden_act="silu")
OPS = ("apply_tmrope", "store_kv_cache", "paged_prefill_attention", "paged_decode_attention")
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        not all("triton" in available(op, "cpu") for op in OPS), reason="Triton (interpreter) not available")),
]


def _model(seed=0):
    torch.manual_seed(seed)
    model = ThinkerTextModel(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    head = torch.randn(CFG.vocab_size, CFG.hidden_size) * 0.5
    return model.eval(), head


def _positions(n_tokens, start=0):
    return torch.arange(start, start + n_tokens).expand(3, -1)


def _runner(model, num_blocks, **kwargs):
    return DecoderRunner(model, RunnerConfig(num_blocks=num_blocks, block_size=4, max_model_len=64, **kwargs),
                         dtype=torch.float32, device=torch.device("cpu"))


def _recompute_next(model, head, ids):
    """Greedy next token by a full forward over the whole sequence in a fresh transient cache."""
    runner = _runner(model, -(-len(ids) // 4))
    hidden = runner.prefill([runner.allocate(len(ids))], model.embed_tokens(torch.tensor(ids)), _positions(len(ids)))
    return int((hidden[-1] @ head.T).argmax())


@pytest.mark.parametrize("backend", BACKENDS)
def test_paged_greedy_equals_recomputation(backend):
    model, head = _model()
    prompts = [[1, 2, 3, 4, 5, 6, 7], [9, 8], [4, 4, 4, 4, 4]]
    steps = 6
    with use_backend(backend), torch.no_grad():
        expected = []
        for p in prompts:
            ids = list(p)
            for _ in range(steps):
                ids.append(_recompute_next(model, head, ids))
            expected.append(ids[len(p):])

        runner = _runner(model, 32)
        seqs = [runner.allocate(len(p)) for p in prompts]
        embeds = model.embed_tokens(torch.tensor([t for p in prompts for t in p]))
        positions = torch.cat([_positions(len(p)) for p in prompts], dim=1)
        hidden = runner.prefill(seqs, embeds, positions)
        last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        tokens = (hidden[last] @ head.T).argmax(-1)
        got = [[int(t)] for t in tokens]
        for _ in range(steps - 1):
            assert runner.reserve_decode(seqs) == []
            pos = torch.tensor([s.num_tokens - 1 for s in seqs]).expand(3, -1)
            hidden = runner.decode(seqs, model.embed_tokens(tokens), pos)
            tokens = (hidden @ head.T).argmax(-1)
            for g, t in zip(got, tokens):
                g.append(int(t))
        assert got == expected
        for s in seqs:
            runner.free(s)
        assert runner.blocks.num_free_blocks == 32


def test_full_cache_fails_only_the_overflowing_request():
    model, head = _model(1)
    with torch.no_grad():
        runner = _runner(model, 5)
        a = runner.allocate(8)  # 2 blocks, full
        b = runner.allocate(3)  # 1 block, 1 free slot
        with pytest.raises(CacheFullError):
            runner.allocate(20)
        seqs = [a, b]
        runner.prefill(seqs, model.embed_tokens(torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3])),
                       torch.cat([_positions(8), _positions(3)], dim=1))
        assert runner.reserve_decode(seqs) == []  # a: 9 tokens takes a 3rd block; b: 4 fills its block
        assert runner.reserve_decode([b]) == []  # b: 5 takes the last free block
        assert runner.reserve_decode([b, b, b]) == []  # b: 8 tokens, its 2nd block full
        assert runner.blocks.num_free_blocks == 0
        failed = runner.reserve_decode(seqs)  # a: 10 fits in its 3rd block; b: 9 needs a block: none left
        assert failed == [1]
        assert (a.num_tokens, b.num_tokens) == (10, 8), "the failed request is unchanged, the other advanced"
        runner.free(a)
        assert runner.reserve_decode([b]) == [], "after the failed request releases its blocks, others go on"
        runner.free(b)
        runner.blocks.check_invariants()
        assert runner.blocks.num_free_blocks == 5


def test_chunked_prefill_equals_one_prefill_and_stores_hidden():
    """A prompt prefilled in three chunks over its cached context gives the hidden states of one prefill, and the
    hidden store holds each token's final state at its slot."""
    model, _ = _model(2)
    ids = list(range(1, 12))
    with torch.no_grad():
        whole = _runner(model, 8)
        expected = whole.prefill([whole.allocate(len(ids))], model.embed_tokens(torch.tensor(ids)),
                                 _positions(len(ids)))
        runner = _runner(model, 8, store_hidden=True)
        seq = runner.allocate(len(ids))
        parts = []
        for a, b in ((0, 3), (3, 8), (8, 11)):
            parts.append(runner.prefill([seq], model.embed_tokens(torch.tensor(ids[a:b])), _positions(b - a, a),
                                        starts=[a], new_lens=[b - a]))
        torch.testing.assert_close(torch.cat(parts), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runner.cache.read_hidden(runner.slots(seq, 0, len(ids))), torch.cat(parts))
        with pytest.raises(ValueError, match="outside"):
            runner.prefill([seq], model.embed_tokens(torch.tensor([1, 2])), _positions(2, 10), starts=[10],
                           new_lens=[2])
