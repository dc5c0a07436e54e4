"""Where the time of bench_serving's CPU burst goes: the same 16 requests together and one after another through the
engine, with the time of each stage (Thinker, Talker, DiT solves, vocoder) summed over the run; and the vocoder on
16 chunks one by one against one batch of 16. Prints a table (committed under benchmarks/results/).

    python scripts/cpu_burst_breakdown.py [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch

from omni_benchmarks import bench_serving as bs
from omni_model import EngineConfig, OmniConfig, OmniModel
from omni_model.streaming import Token2WavRunner


def timed(totals: dict, name: str, owner, attr: str) -> None:
    fn = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - t

    setattr(owner, attr, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg, dev = OmniConfig.preset("tiny"), torch.device("cpu")
    model = OmniModel.from_config(cfg, device=dev, dtype=torch.float32, engine_config=EngineConfig(max_num_seqs=64))
    engine = model.engine
    totals: dict[str, float] = defaultdict(float)
    timed(totals, "thinker", engine, "_run_thinker")
    timed(totals, "talker", engine, "_run_talker")
    timed(totals, "dit", Token2WavRunner, "_solve")
    timed(totals, "vocoder", Token2WavRunner, "_vocode")
    bs.serve_engine(model, bs.make_requests(cfg, bs.CPU, 3, dev, torch.float32, seed=10_000), [0.0] * 3)  # warm-up
    requests = bs.make_requests(cfg, bs.CPU, 16, dev, torch.float32, seed=20_000)
    print(f"torch {torch.__version__}, {args.threads} thread(s), tiny model fp32, 16 requests "
          f"(reply <= {bs.CPU.thinker_tokens} ids, {bs.CPU.talker_codes} codes)")
    print(f"{'run':<22}{'wall s':>8}" + "".join(f"{k:>10}" for k in ("thinker", "talker", "dit", "vocoder")))
    for name, times in (("together", [0.0] * 16), ("one after another", None)):
        engine.reset_prefix_cache()
        totals.clear()
        t0 = time.perf_counter()
        if times is not None:
            bs.serve_engine(model, requests, times)
        else:
            for request in requests:
                bs.serve_engine(model, [request], [0.0])
        wall = time.perf_counter() - t0
        print(f"{name:<22}{wall:>8.2f}" + "".join(f"{totals[k]:>10.2f}" for k in ("thinker", "talker", "dit",
                                                                                 "vocoder")))
    mel = torch.randn(16, cfg.token2wav_config.dit.mel_dim, 136)
    with torch.no_grad():
        model.token2wav.vocode(mel[:1])
        t0 = time.perf_counter()
        for i in range(16):
            model.token2wav.vocode(mel[i:i + 1])
        alone = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.token2wav.vocode(mel)
        batch = time.perf_counter() - t0
    print(f"vocoder, 16 chunks of 136 mel frames: one by one {alone:.2f} s, one batch {batch:.2f} s")


if __name__ == "__main__":
    main()
