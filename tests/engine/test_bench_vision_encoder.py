"""The vision encoder benchmark runs on CPU at the tiny preset and produces complete records: every contract field,
positive timings, the FLOPs counted from the config, and our encoder matching HF's (same weights, fp32) on every
input before it is timed."""

import importlib.util

import pytest
import torch

from omni_kernels.testing import RECORD_FIELDS

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
PROVIDERS = ("hf", "omni", "omni-torch")
REL_TOL = 1e-4  # the Thinker parity tests' criterion: max |ours - HF| <= 1e-4 * max |HF| in fp32


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_encoder_flops_by_hand():
    """The tiny ViT (depth 2: block 0 windowed, block 1 full; hidden 32, MLP 24, 4 x 4 merged-token windows) on a
    12 x 16 patch grid: windows of 64, 64, 32, 32 patches, one full slice of 192."""
    from omni_benchmarks.bench_vision_encoder import encoder_flops
    from omni_model.config import OmniConfig

    cfg = OmniConfig.preset("tiny").thinker_config.vision_config
    n, d, inter = 192, 32, 24
    expected = (2 * n * 1176 * d  # patch embed (3 x 2 x 14 x 14 -> 32)
                + 2 * 2 * n * (4 * d * d + 3 * d * inter)  # q, k, v, proj and the gated MLP, 2 blocks
                + 4 * (2 * 64**2 + 2 * 32**2) * d + 4 * 192**2 * d  # QK^T and PV inside the segments
                + 2 * 48 * 128 * (128 + 32))  # merger: 48 tokens of 4 x 32, two linears
    assert encoder_flops(cfg, [(1, 12, 16)]) == expected


def test_vision_encoder_bench_records(one_thread):
    from omni_benchmarks import bench_vision_encoder as mod

    rows = [r.to_dict() for r in mod.run(device="cpu", quick=True, preset="tiny")]
    shapes = sorted({d["shape"] for d in rows})
    assert len(shapes) == len(mod.INPUTS_QUICK) and len(rows) == len(PROVIDERS) * len(shapes), rows
    assert any("grid=1x12x16 (192 patches -> 48 tokens)" in s for s in shapes), shapes
    assert any("grid=2x6x8 (96 patches -> 24 tokens)" in s for s in shapes), shapes
    by = {(d["provider"], d["shape"]): d for d in rows}
    for shape in shapes:
        for p in PROVIDERS:
            assert (p, shape) in by, (p, shape)

    for d in rows:
        assert set(RECORD_FIELDS) <= set(d), set(RECORD_FIELDS) - set(d)
        assert d["bench"] == "vision_encoder" and d["dtype"] == "float32"
        if d["provider"] == "hf" and not HAS_TRANSFORMERS:
            assert "transformers" in d["error"]
            continue
        assert d.get("error") is None, d["error"]
        assert 0 < d["ms_p20"] <= d["ms_p50"] <= d["ms_p80"], d
        assert d["tflops"] > 0
        if d["provider"] == "hf":
            assert d["hf_attn_implementation"] == "sdpa"
            assert d["speedup"] == pytest.approx(1.0)
            continue
        assert d["attention_backend"] == "torch"  # the CPU default is the torch reference
        assert d["baseline"] == ("hf" if HAS_TRANSFORMERS else None)
        if HAS_TRANSFORMERS:
            hf = by[("hf", d["shape"])]
            assert d["speedup"] == pytest.approx(hf["ms_p50"] / d["ms_p50"])
            assert 0 <= d["max_rel_err_vs_hf"] <= REL_TOL, d
