"""Talker decode: codes/s and % of the weight-bytes roofline at batch 1 and 8, against HF ``generate``.

The Talker (random weights at the preset's shapes, bf16 on CUDA) prefills a 64-position prompt (random summed
Thinker states, with the codec pad / bos embeddings added to the last two positions as HF's talker does), then
runs N greedy decode steps through the engine's :class:`~omni_model.engine.runner.DecoderRunner`; each step's
input is ``thinker_to_talker_proj(embed(previous code) + reply element)``, the reply elements being random
Thinker states. Bytes a step must read: every decoder layer, the final norm, ``thinker_to_talker_proj``,
``codec_head`` and one codec-embedding row per sequence (the 8448 x 3584 table is not read whole; 7B: 2.6 GB,
0.79 ms at 3.35 TB/s), plus each sequence's cached keys and values.

Providers, timing and extra fields: as in ``bench_thinker`` (whose helpers this module uses). The HF peer is
``Qwen2_5OmniTalkerForConditionalGeneration`` with our weights, called as HF's ``Qwen2_5OmniForConditionalGeneration
.generate`` calls it (``input_ids`` = codec mask ids + pad + bos, ``input_text_ids``, ``inputs_embeds``,
``thinker_reply_part``, ``suppress_tokens=[codec bos]``), greedy, ``min_new_tokens = max_new_tokens = N + 1``;
our loop bans the same ids (codec bos always, the stop ids pad / end until the last step).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from omni_benchmarks.bench_thinker import (
    SEED,
    DecodeSetup,
    DecodeSpec,
    allowed_mask,
    build_random,
    copy_into_hf,
    decode_groups,
    device_roofline,
    hf_build_context,
    param_bytes,
    plan_for,
    preset_for,
    safe_ids,
    short_name,
)
from omni_benchmarks.cases import CaseGroup, run_groups
from omni_kernels.testing import Record, bench_main
from omni_model.config import OmniConfig
from omni_model.models.talker import Talker


def _hf_talker(cfg: OmniConfig, ours: Talker, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniTalkerConfig
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniTalkerForConditionalGeneration

    with hf_build_context(dtype, device):
        hf = Qwen2_5OmniTalkerForConditionalGeneration(Qwen2_5OmniTalkerConfig(**cfg.to_dict()["talker_config"]))
    hf = hf.requires_grad_(False).eval()
    copy_into_hf(ours, hf, what="HF talker")
    return hf


def case_groups(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[CaseGroup]:
    """The decode groups of ``bench_thinker.decode_groups`` for the Talker; the model is built with the first."""
    dev = torch.device(device)
    plan = plan_for(dev, quick)
    preset = preset_for(dev, preset)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    cfg = OmniConfig.preset(preset)
    tk = cfg.talker_config

    @functools.cache
    def setup() -> DecodeSetup:
        thinker = cfg.thinker_config
        talker = build_random(lambda: Talker(tk), dtype=dtype, device=dev, seed=SEED + 2)
        elem = torch.empty((), dtype=dtype).element_size()
        dense_bytes = param_bytes(talker, skip=(talker.model.embed_tokens,))
        roof = device_roofline(dev, lambda b: dense_bytes + b * tk.embedding_size * elem,
                               2 * tk.num_hidden_layers * tk.kv_size * elem)

        batch = max(plan.batches)
        gen = torch.Generator().manual_seed(SEED + 3)
        special = {getattr(thinker, n) for n in thinker._SPECIAL} | set(thinker.stop_token_ids)
        text_ids = [safe_ids(thinker.text_config.vocab_size, special, plan.prompt, gen) for _ in range(batch)]
        # Summed Thinker states (hidden + token embedding) for the prompt and one reply element per decode step.
        base = torch.randn(batch, plan.prompt, tk.embedding_size, generator=gen).to(dev, dtype)
        reply = torch.randn(batch, plan.steps + 1, tk.embedding_size, generator=gen).to(dev, dtype)
        pad, bos = tk.tts_codec_pad_token_id, tk.tts_codec_start_token_id
        codec_tail = torch.tensor([pad, bos], device=dev)

        def prefill_inputs(b: int) -> torch.Tensor:
            x = base[:b].clone()
            x[:, -2:] += talker.embed_codes(codec_tail)  # HF's talker forward: += embed(pad), += embed(bos)
            return talker.project(x.reshape(-1, tk.embedding_size))

        spec = DecodeSpec(
            decoder=talker,
            prompt_ids=lambda b: text_ids[:b],
            prefill_inputs=prefill_inputs,
            step_inputs=lambda ids, step: talker.project(talker.step_embeds(ids, reply[: len(ids), step])),
            logits=talker.logits,
            allowed=allowed_mask(tk.vocab_size, {bos, *tk.stop_token_ids}, dev),
        )

        def hf_kwargs(b: int) -> Callable[[], dict]:
            codes = torch.full((b, plan.prompt), tk.tts_codec_mask_token_id, device=dev)
            codes[:, -2], codes[:, -1] = pad, bos
            ids = torch.tensor(text_ids[:b], device=dev)
            # inputs_embeds is cloned per call: HF's talker adds the codec embeddings to it in place.
            return lambda: dict(input_ids=codes, input_text_ids=ids, inputs_embeds=base[:b].clone(),
                                thinker_reply_part=reply[:b], attention_mask=torch.ones_like(ids),
                                suppress_tokens=[bos], eos_token_id=list(tk.stop_token_ids), pad_token_id=pad)

        return DecodeSetup(spec=spec, max_model_len=tk.max_position_embeddings, roof=roof,
                           hf_factory=lambda: _hf_talker(cfg, talker, dtype, dev), hf_kwargs=hf_kwargs)

    name = short_name(preset)
    return decode_groups(bench="talker_decode",
                         label=lambda b: f"talker-{name} B={b} prompt={plan.prompt} steps={plan.steps}",
                         plan=plan, dtype=dtype, device=dev, setup=setup)


def run(device: str = "cuda", quick: bool = False, preset: str = "qwen2.5-omni-7b") -> list[Record]:
    return run_groups(case_groups(device, quick, preset), device)


if __name__ == "__main__":
    bench_main(run, __doc__)
