"""``omni serve``: arguments, model resolution and loading, and uvicorn with a draining SIGTERM.

``--model`` is a checkpoint directory, a Hugging Face hub id (resolved through huggingface_hub's cache, so it works
offline with ``HF_HUB_OFFLINE=1`` once the model is cached) or ``tiny``: the embedded tiny random-weight model with
its tiny tokenizer and chat template (speakers Chelsie and Ethan), to try the server without weights.

SIGTERM (or Ctrl-C): the server stops accepting connections and answers 503 to new requests on open ones, lets the
running requests finish for at most ``--shutdown-timeout`` seconds, then stops the engine thread and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omni_model import OmniModel
    from omni_model.serve.app import ServerContext
    from omni_model.serve.prompt import PromptBuilder

log = logging.getLogger("omni.serve")

DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory, hub id (e.g. Qwen/Qwen2.5-Omni-7B) or 'tiny'")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: --model)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="requests the engine runs at once")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096, help="tokens per engine step")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV-cache size in tokens (default: a fraction of free device memory)")
    p.add_argument("--kv-cache-memory-fraction", type=float, default=None)
    p.add_argument("--no-cuda-graphs", action="store_true", help="run decode steps eagerly")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="do not share equal prompt prefixes (a conversation's earlier turns) between requests")
    p.add_argument("--no-audio", action="store_true", help="text only: the Talker and Token2Wav are not loaded")
    p.add_argument("--max-waiting-requests", type=int, default=256,
                   help="requests that may wait beyond --max-num-seqs; one more gets 429 at once")
    p.add_argument("--allowed-local-media-path", default=None,
                   help="allow image and video URLs that are local paths under this folder (default: data: URLs only)")
    p.add_argument("--max-image-pixels", type=int, default=7680 * 4320,
                   help="larger images (and video frames) are refused with a 400 before decoding")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds running requests get to finish after SIGTERM")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))


def resolve_model(spec: str) -> Path | None:
    """``tiny`` -> None; an existing directory -> itself; otherwise a hub id -> its snapshot folder in the local
    huggingface_hub cache (downloaded when missing and online; offline it must be cached)."""
    if spec == "tiny":
        return None
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.is_absolute() or spec.startswith(".") or spec.count("/") != 1:
        raise ValueError(f"--model {spec!r}: no such directory, and not a hub id of the form owner/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(repo_id=spec))
    except HFValidationError as exc:
        raise ValueError(f"--model {spec!r}: not a valid hub id ({exc})") from exc
    except Exception as exc:  # offline and not cached, unknown repo, network: say which
        raise ValueError(f"--model {spec!r}: not a local directory, and the hub could not provide it "
                         f"({type(exc).__name__}: {exc})") from exc


def _engine_config(args: argparse.Namespace):
    from omni_model import EngineConfig

    kwargs = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                  kv_cache_tokens=args.kv_cache_tokens, cuda_graphs=not args.no_cuda_graphs,
                  enable_prefix_caching=not args.no_prefix_caching)
    if args.kv_cache_memory_fraction is not None:
        kwargs["kv_cache_memory_fraction"] = args.kv_cache_memory_fraction
    return EngineConfig(**kwargs)


def load(args: argparse.Namespace, workdir: Path) -> tuple[OmniModel, PromptBuilder]:
    """(model, prompt builder) for ``args.model``; the tiny model's processor files go to ``workdir``."""
    import torch

    from omni_model import OmniConfig, OmniModel
    from omni_model.serve.prompt import PromptBuilder

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = args.dtype
    if dtype == "auto":
        dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    dtype = getattr(torch, dtype)
    path = resolve_model(args.model)
    engine_config = _engine_config(args)
    if path is None:
        from omni_model.hf_compat import save_tiny_processor

        config = OmniConfig.preset("tiny")
        model = OmniModel.from_config(config, device=device, dtype=dtype, engine_config=engine_config,
                                      enable_audio_output=not args.no_audio)
        path = save_tiny_processor(workdir / "tiny-processor", config)
    else:
        model = OmniModel.from_pretrained(path, device=device, dtype=dtype, engine_config=engine_config,
                                          enable_audio_output=not args.no_audio)
    return model, PromptBuilder.from_pretrained(path, model.config.thinker_config)


def build_context(args: argparse.Namespace, model, builder) -> ServerContext:
    """The server's state for a loaded model: the engine thread's front, metrics, voices and the media policy."""
    from omni_model.serve.app import ServerContext
    from omni_model.serve.async_engine import AsyncEngine
    from omni_model.serve.media import MediaPolicy
    from omni_model.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    engine = AsyncEngine(model.engine, max_num_seqs=args.max_num_seqs, max_waiting=args.max_waiting_requests,
                         metrics=metrics)
    root = Path(args.allowed_local_media_path) if args.allowed_local_media_path else None
    if root is not None and not root.is_dir():
        raise ValueError(f"--allowed-local-media-path {root}: no such directory")
    speakers = list(model.speakers) if not args.no_audio else []
    if not args.no_audio and not speakers:
        raise ValueError(f"--model {args.model}: the checkpoint has no speakers (spk_dict.pt); serve it with "
                         "--no-audio")
    return ServerContext(model_name=args.served_model_name or args.model, engine=engine, builder=builder,
                         metrics=metrics, speakers=speakers, audio_output=not args.no_audio,
                         policy=MediaPolicy(local_root=root, max_image_pixels=args.max_image_pixels))


def serve(app, ctx, *, host: str, port: int, shutdown_timeout: float, log_level: str = "info") -> None:
    """Runs ``app`` under uvicorn until SIGTERM / SIGINT, then drains (see the module docstring)."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            ctx.draining = True  # new requests on connections still open get 503 from now on
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own version raises the signal again once shut down, so the process would die of SIGTERM
            # (exit status -15) after a clean drain; this one ends normally, with exit status 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            original = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout,
                            lifespan="on")
    DrainingServer(config).run()


def main(args: argparse.Namespace) -> int:
    """``omni serve``."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        print("omni serve: needs the server's packages: pip install 'omni[serve]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from omni_model.serve.app import build_app

    with tempfile.TemporaryDirectory(prefix="omni-serve-") as tmp:
        try:
            model, builder = load(args, Path(tmp))
            ctx = build_context(args, model, builder)
        except (ValueError, FileNotFoundError, OSError) as exc:
            print(f"omni serve: {exc}", file=sys.stderr)
            return 2
        log.info("serving %s on http://%s:%d (voices: %s)", ctx.model_name, args.host, args.port,
                 ", ".join(ctx.speakers) or "none, text only")
        serve(build_app(ctx), ctx, host=args.host, port=args.port, shutdown_timeout=args.shutdown_timeout,
              log_level=args.log_level)
    return 0
