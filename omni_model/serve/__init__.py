"""``omni serve``: an OpenAI-compatible HTTP server for Qwen2.5-Omni that streams speech.

Layout (each module small enough to read in one sitting):

* :mod:`~omni_model.serve.protocol`: pydantic models of the OpenAI chat request, response, stream chunk and error.
* :mod:`~omni_model.serve.media`: base64 / ``data:`` URLs / allowed local files -> decoded audio and images.
* :mod:`~omni_model.serve.prompt`: the checkpoint's chat template and tokenizer -> the engine's inputs, plus an
  incremental detokenizer for streamed text.
* :mod:`~omni_model.serve.async_engine`: the engine thread (the one owner of the device) and the asyncio side that
  feeds it and reads each request's outputs from its own queue.
* :mod:`~omni_model.serve.metrics`: the Prometheus metrics.
* :mod:`~omni_model.serve.app`: the FastAPI app: one handler per endpoint and one exception handler.
* :mod:`~omni_model.serve.cli`: ``omni serve``'s arguments, model loading and uvicorn with a draining SIGTERM.

The wire format, the error mapping and the metrics are described in ``docs/serving.md``. Nothing here imports
FastAPI at import time of :mod:`omni_model`: the server's dependencies are the ``[serve]`` extra.
"""
