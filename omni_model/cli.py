"""The ``omni`` console script: ``omni demo``, ``omni run``, ``omni serve`` and ``omni bench``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import torch


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------------- bench


def cmd_bench(args: argparse.Namespace) -> int:
    from omni_benchmarks import SUITES
    from omni_benchmarks.cases import compile_limits
    from omni_kernels.testing import describe_device, write_records

    device = args.device or _default_device()
    quick = args.quick or torch.device(device).type != "cuda"
    suites = list(SUITES) if args.suite == "all" else [args.suite]
    info = describe_device(device)
    print(f"omni bench: {info['name']} | torch {info['torch']} | triton {info['triton']} | git {info['git']}")
    if quick:
        print("omni bench: running the small CPU suite (timings are CPU wall clock, not GPU numbers)"
              if torch.device(device).type != "cuda" else "omni bench: --quick: reduced shapes")
    records, failures = [], []
    with compile_limits():
        _run_benches(args, suites, device, quick, records, failures)
    if args.json:
        write_records(records, args.json)
        print(f"omni bench: wrote {len(records)} records to {args.json}")
    return 1 if failures else 0


def _run_benches(args, suites, device, quick, records, failures) -> None:
    from omni_benchmarks import SUITES
    from omni_kernels.testing import write_records

    for suite in suites:
        for name in SUITES[suite]:
            if args.only and name.removeprefix("bench_") not in args.only and name not in args.only:
                continue
            t0 = time.perf_counter()
            try:
                module = importlib.import_module(f"omni_benchmarks.{name}")
                rows = module.run(device=device, quick=quick, preset=args.preset)
            except Exception as exc:  # one broken bench must not hide the others' numbers
                failures.append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"  {name}: FAILED ({type(exc).__name__}: {exc})", file=sys.stderr)
                continue
            records.extend(rows)
            if args.json:  # after every bench: a later one that runs out of time must not lose these
                write_records(records, args.json)
            print(f"  {name}: {len(rows)} records in {time.perf_counter() - t0:.1f}s")
            for r in rows:
                d = r.to_dict() if hasattr(r, "to_dict") else r
                extra = "".join(
                    f" {k}={d[k]:.1f}" for k in ("gbps", "tflops") if d.get(k) is not None
                ) + (f" x{d['speedup']:.2f} vs {d['baseline']}" if d.get("speedup") else "")
                p50 = f"{d['ms_p50']:.4f} ms" if d.get("ms_p50") is not None else "-"
                if d.get("error"):  # a provider that failed says why
                    extra += f" error: {str(d['error']).splitlines()[0][:160]}"
                dtype = str(d.get("dtype", "")).removeprefix("torch.")
                print(f"    {d['provider']:>14} | {dtype:>8} | {d['shape']:<44} | {p50}{extra}")


# ----------------------------------------------------------------------------------------------- demo / run


def cmd_demo(args: argparse.Namespace) -> int:
    from omni_model.demo import run_demo

    return run_demo(out_dir=args.out, device=args.device or _default_device())


def cmd_run(args: argparse.Namespace) -> int:
    from omni_model.demo import run_checkpoint

    return run_checkpoint(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from omni_model.serve.cli import main as serve_main

    return serve_main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omni", description="Fast streaming inference for Qwen2.5-Omni.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="run the whole pipeline on an embedded tiny random-weight model")
    p.add_argument("--out", default=".", help="folder for reply.wav (default: the current folder)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("run", help="answer a prompt with a real checkpoint, streaming text and audio")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json, safetensors, spk_dict.pt)")
    p.add_argument("--text", default=None)
    p.add_argument("--audio", default=None, help="a .wav file")
    p.add_argument("--image", default=None)
    p.add_argument("--video", default=None)
    p.add_argument("--speaker", default="Chelsie")
    p.add_argument("--out", default="reply.wav")
    p.add_argument("--no-audio", action="store_true", help="text only: skip talker and vocoder")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", default=None)
    p.set_defaults(func=cmd_run)

    from omni_model.serve.cli import add_arguments as add_serve_arguments

    p = sub.add_parser("serve", help="an OpenAI-compatible server that streams speech (needs the [serve] extra)")
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("bench", help="benchmarks: kernels, model parts, end to end")
    p.add_argument("--suite", choices=("kernels", "model", "e2e", "all"), default="kernels")
    p.add_argument("--json", default=None, help="write the records to this file")
    p.add_argument("--preset", default="qwen2.5-omni-7b", choices=("qwen2.5-omni-7b", "qwen2.5-omni-3b"))
    p.add_argument("--device", default=None)
    p.add_argument("--quick", action="store_true", help="reduced shapes (always on CPU)")
    p.add_argument("--only", nargs="+", default=None, help="run only these benches (e.g. apply_tmrope thinker)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
