"""Shared fixtures, and the Triton interpreter on machines without a GPU."""

from __future__ import annotations

import os

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel is decorated, so it must be set before omni_kernels is imported:
# on CPU the Triton backend is tested through its interpreter; on a GPU machine Triton compiles for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The CPU tests run tiny shapes, where a second thread costs more in synchronisation than it gains (and a
    # loaded 2-core machine makes it much worse).
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory):
    """(path, hf_model): the tiny preset written by HF transformers 4.57.6's own ``save_pretrained`` (sharded
    safetensors + index, ``spk_dict.pt`` with Chelsie and Ethan) and the in-memory HF model holding exactly those
    weights (fp32, eval). Built once per session; treat both as read-only."""
    pytest.importorskip("transformers")
    from omni_model.hf_compat import build_tiny_hf_checkpoint

    return build_tiny_hf_checkpoint(tmp_path_factory.mktemp("tiny_hf_checkpoint"), seed=0)


@pytest.fixture
def shuffled_runner():
    """``make(decoder, num_blocks, block_size, seed, dtype=float32)``: a DecoderRunner on the CPU (no CUDA graphs,
    no prefix caching) whose free blocks come out in a random order, so sequences get shuffled pages."""
    from collections import deque

    from omni_model.engine.runner import DecoderRunner, RunnerConfig

    def make(decoder, num_blocks: int, block_size: int, seed: int, dtype=torch.float32) -> DecoderRunner:
        config = RunnerConfig(num_blocks=num_blocks, block_size=block_size, max_model_len=num_blocks * block_size,
                              cuda_graphs=False, enable_prefix_caching=False)
        runner = DecoderRunner(decoder, config, dtype=dtype, device=torch.device("cpu"))
        order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        runner.blocks.free = deque(order)
        return runner

    return make
