"""Token2Wav: codes -> mel (DiT, 36 passes at guidance batch 2) -> waveform (BigVGAN), per precision.

Cases (7B token2wav shapes, random weights): one streaming chunk as Qwen's low-VRAM code runs it (48 codes with
24 codes of left and 12 of right context = 84 codes = 168 mel frames; vocoder on the chunk's 96 frames with 20
frames of context on each side) and a 10 s utterance (500 codes, 1000 frames). On CPU (``quick``) the tiny
config only, one short utterance.

Parts timed: ``dit`` (the whole flow-matching sampler: 36 DiT passes), ``vocoder`` (BigVGAN on the fp32 mel),
``total`` (codes -> waveform). Providers: ``omni`` at dtype ``fp32`` (the default, HF's arithmetic), ``tf32`` and
``bf16``; ``hf`` = transformers 4.57.6 ``Qwen2_5OmniToken2WavModel`` with the same weights, run as HF runs it
(fp32 weights, torch's default TF32 flags, dense block mask), when transformers is importable (the baseline for
``speedup``, whatever our precision). Extra fields: ``mel_snr_db`` / ``wave_snr_db`` against our fp32 output for
the same codes and noise (``hf`` rows: HF's against ours, a parity figure), ``rtf`` (seconds per second of audio),
``peak_mib`` (CUDA). Random weights make the SNRs indicative only: real checkpoints should be measured too.
"""

from __future__ import annotations

import functools
import math
from functools import partial

import torch

from omni_benchmarks.cases import Case, CaseGroup, CaseKey, run_groups
from omni_kernels.testing import Record, bench_main
from omni_model.config import SAMPLE_RATE, OmniConfig
from omni_model.hf_compat import randomize_weights_
from omni_model.models.token2wav import HF_NOISE_FRAMES, Token2Wav

NUM_STEPS = 10
PASSES = (NUM_STEPS - 1) * 4  # RK4: 4 DiT evaluations per interval
# (label, codes through the DiT, mel frames through the vocoder)
CASES = (("chunk 48+24+12 codes", 84, 96 + 40), ("10 s utterance", 500, 1000))
CASES_QUICK = (("tiny 12 codes", 12, 24),)
PRECISIONS = ("fp32", "tf32", "bf16")
SEED = 0


@functools.cache
def _transformers_token2wav():
    try:
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniToken2WavConfig
        from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniToken2WavModel
    except ImportError:
        return None
    return Qwen2_5OmniToken2WavConfig, Qwen2_5OmniToken2WavModel


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """hf_compat's scaled random weights (unit-gain matrices, a damped vocoder so that the wave is not clamped to
    +-1, where SNRs would mean nothing); its gains are keyed by checkpoint names, hence the ``token2wav`` holder."""
    holder = torch.nn.Module()
    holder.token2wav = model
    randomize_weights_(holder, seed=seed)


def _snr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().flatten(), ref.double().flatten().to(x.device)
    noise = (x - ref).pow(2).sum().item()
    return math.inf if noise == 0 else 10 * math.log10(ref.pow(2).sum().item() / noise)


def _dit_flops(cfg, frames: int, seqs: int) -> float:
    """Matmul FLOPs of one guided sampling (36 passes at S sequences): projections, MLPs, visible attention."""
    d = cfg.dit
    tokens = seqs * frames
    inner, ff = d.num_attention_heads * d.head_dim, int(d.hidden_size * d.ff_mult)
    per_layer = 2 * tokens * (d.hidden_size * 3 * inner + inner * d.hidden_size + 2 * d.hidden_size * ff)
    blocks = -(-frames // d.block_size)
    attn = 0.0
    for layer in range(d.num_hidden_layers):
        window = 1 + int(layer in d.look_backward_layers) + int(layer in d.look_ahead_layers)
        attn += 4 * seqs * frames * min(window * d.block_size, blocks * d.block_size) * inner
    io = 2 * tokens * (d.mel_dim * d.hidden_size + d.hidden_size * d.mel_dim)
    return PASSES * (d.num_hidden_layers * per_layer + attn + io)


def _inputs(cfg, codes_n: int, dev: torch.device):
    d = cfg.dit
    gen = torch.Generator().manual_seed(SEED + 1)
    codes = torch.randint(0, d.num_embeds, (1, codes_n), generator=gen)
    cond = torch.randn(1, d.enc_emb_dim, generator=gen)
    ref_mel = torch.randn(1, 300, d.mel_dim, generator=gen) - 5.0
    # HF's draw (a CPU randn of 30000 frames from a seeded generator), so that HF and we start from one noise.
    noise = torch.randn([1, HF_NOISE_FRAMES, d.mel_dim], generator=torch.Generator().manual_seed(_noise_seed(codes_n)))
    return codes.to(dev), cond.to(dev), ref_mel.to(dev), noise


def _shapes(cfg, label: str, codes_n: int, voc_frames: int) -> dict[str, str]:
    frames = cfg.dit.repeats * codes_n
    return {"dit": f"dit x{PASSES} {label} ({frames} frames)", "vocoder": f"vocoder {label} ({voc_frames} frames)",
            "total": f"total {label} ({frames} frames)"}


def _keys(cfg, label: str, codes_n: int, voc_frames: int, precisions: tuple[str, ...], hf: bool) -> list[CaseKey]:
    shapes = _shapes(cfg, label, codes_n, voc_frames)
    rows = [CaseKey("token2wav", "omni", shapes[part], p) for p in precisions for part in shapes]
    return rows + ([CaseKey("token2wav", "hf", shapes[part], "fp32") for part in shapes] if hf else [])


def _models(cfg, precisions: tuple[str, ...],
            dev: torch.device) -> tuple[dict[str, Token2Wav], torch.nn.Module | None]:
    """Ours at every precision and HF's (None without transformers), with the same random weights."""
    hf_classes = _transformers_token2wav()
    hf = None
    if hf_classes is not None:
        hf_cfg_cls, hf_cls = hf_classes
        hf_cfg = hf_cfg_cls(**cfg._to_json())
        hf_cfg._attn_implementation = "sdpa"
        hf = hf_cls(hf_cfg).float().eval()
        _randomize(hf, SEED)
        state = {"token2wav." + k: v for k, v in hf.state_dict().items()}
        hf = hf.to(dev)
    models: dict[str, Token2Wav] = {}
    for p in precisions:
        m = Token2Wav(cfg, precision=p)
        if hf is not None:
            m.load_weights(state)
        elif models:
            m.load_state_dict(models["fp32"].state_dict())  # copy_ casts to this precision
        else:
            _randomize(m, SEED)
        models[p] = m.to(dev)
    return models, hf


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """One group per case (a chunk, an utterance); the models are built with the first group and shared."""
    dev = torch.device(device)
    on_cpu = dev.type != "cuda"
    cfg = OmniConfig.preset("tiny" if on_cpu else preset).token2wav_config
    cases = CASES_QUICK if on_cpu else CASES
    # TF32 does not exist on CPU: the tf32 rows would repeat the fp32 ones.
    precisions = tuple(p for p in PRECISIONS if not (on_cpu and p == "tf32"))
    has_hf = _transformers_token2wav() is not None
    models = functools.cache(lambda: _models(cfg, precisions, dev))

    def build(label: str, codes_n: int, voc_frames: int) -> list[Case]:
        return _cases(cfg, *models(), label, codes_n, voc_frames, dev, quick)

    return [CaseGroup(_keys(cfg, label, codes_n, voc_frames, precisions, has_hf),
                      partial(build, label, codes_n, voc_frames)) for label, codes_n, voc_frames in cases]


def _cases(cfg, models: dict[str, Token2Wav], hf, label: str, codes_n: int, voc_frames: int,
           dev: torch.device, quick: bool) -> list[Case]:
    cases: list[Case] = []
    codes, cond, ref_mel, noise = _inputs(cfg, codes_n, dev)
    frames = cfg.dit.repeats * codes_n
    ref = models["fp32"]
    mel32 = ref.mel(codes, cond, ref_mel, noise, num_steps=NUM_STEPS)
    wave32 = ref.vocode(mel32)
    # The vocoder case: the first voc_frames frames of the fp32 mel (tiled when the utterance is shorter).
    voc_mel = mel32.repeat(1, 1, -(-voc_frames // frames))[..., :voc_frames]
    voc_wave32 = ref.vocode(voc_mel)
    shapes = _shapes(cfg, label, codes_n, voc_frames)
    hop = cfg.bigvgan.hop_length
    audio_s = {"dit": frames * hop / SAMPLE_RATE, "vocoder": voc_frames * hop / SAMPLE_RATE,
               "total": frames * hop / SAMPLE_RATE}
    flops = _dit_flops(cfg, frames, 2)

    def rtf(rec: Record, part: str) -> None:
        rec.extra["rtf"] = rec.ms_p50 / 1e3 / audio_s[part]

    def add(part, provider, dtype, fn, **extra):
        # speedup: HF's p50 (fp32, as HF runs) over ours, whatever our precision; HF's rows have none.
        cases.append(Case("token2wav", provider, shapes[part], dtype, fn, flops=flops if part == "dit" else None,
                          baseline="hf" if provider != "hf" else None, baseline_dtype="fp32", extra=extra,
                          finish=partial(rtf, part=part), warmup=1, rep=3 if quick else 5,
                          max_seconds=2 if quick else 10, peak_memory=True))

    for p, m in models.items():
        mel = m.mel(codes, cond, ref_mel, noise, num_steps=NUM_STEPS)
        add("dit", "omni", p, lambda m=m: m.mel(codes, cond, ref_mel, noise, num_steps=NUM_STEPS),
            mel_snr_db=_snr_db(mel, mel32))
        add("vocoder", "omni", p, lambda m=m: m.vocode(voc_mel), wave_snr_db=_snr_db(m.vocode(voc_mel), voc_wave32))
        add("total", "omni", p, lambda m=m: m(codes, cond, ref_mel, noise, num_steps=NUM_STEPS),
            mel_snr_db=_snr_db(mel, mel32), wave_snr_db=_snr_db(m.vocode(mel), wave32))
    if hf is None:
        return cases
    seed = _noise_seed(codes_n)

    @torch.no_grad()
    def hf_mel():
        torch.manual_seed(seed)  # HF's sample draws its noise from the global CPU generator: this gives ours
        return hf.code2wav_dit_model.sample(cond, ref_mel, codes, num_steps=NUM_STEPS)

    @torch.no_grad()
    def hf_total():
        torch.manual_seed(seed)
        return hf(codes, cond, ref_mel, num_steps=NUM_STEPS)

    @torch.no_grad()
    def hf_vocoder():
        return hf.code2wav_bigvgan_model(voc_mel)

    add("dit", "hf", "fp32", hf_mel, mel_snr_db=_snr_db(hf_mel(), mel32))
    add("vocoder", "hf", "fp32", hf_vocoder, wave_snr_db=_snr_db(hf_vocoder().reshape(1, -1), voc_wave32))
    add("total", "hf", "fp32", hf_total, wave_snr_db=_snr_db(hf_total().reshape(1, -1), wave32))
    return cases


def _noise_seed(codes_n: int) -> int:
    return SEED + codes_n


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
