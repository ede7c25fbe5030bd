"""``gemma-edge serve``: an OpenAI-compatible embedding endpoint over one Embedder.

One process on the board holds the model; every app on the device calls
``POST /v1/embeddings`` the way it would call OpenAI, llama.cpp's server or TEI.
The ASGI app (Starlette) only validates and answers; all embedding happens in
one worker thread that coalesces concurrent requests into packed ``encode``
calls (serve_worker.py).

Safe by default on a board: the CLI binds 127.0.0.1; an optional bearer token
guards ``/v1``; the body size, texts per request and characters per text are
bounded; every bad field gets a 4xx naming it, in OpenAI's error shape, and the
server keeps serving. ``GET /health`` is liveness, ``GET /ready`` readiness
(503 until the graphs are open), ``GET /v1/models`` names the model and the
artifacts. Needs the ``serve`` extra (starlette, uvicorn): the rest of the device
side does not import this module.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Dict, List, Optional

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gemma_edge.errors import InputError

from .serve_worker import EmbeddingWorker, NotReadyError, QueueFullError

INPUT_TYPES_BUILTIN = ("query", "document", "none")
REQUEST_FIELDS = ("input", "model", "dimensions", "encoding_format", "input_type", "user")
TOKEN_ARRAYS = ("token-id arrays are not accepted, send the texts as strings (LangChain's "
                "OpenAIEmbeddings: set check_embedding_ctx_length=False)")


@dataclass
class ServeOptions:
    """Limits and defaults of one server (the CLI's flags)."""

    model_id: str = "embeddinggemma"
    default_input_type: str = "query"
    token: Optional[str] = None
    max_body_bytes: int = 4 * 1024 * 1024
    max_texts: int = 256
    max_chars: int = 32768
    max_queue: int = 64
    max_batch_texts: int = 64
    batch_wait_ms: float = 10.0
    retry_after_s: int = 1
    warmup: bool = True


class HttpError(Exception):
    """A 4xx/5xx answer in OpenAI's error shape; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, param: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": None}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


@dataclass
class EmbeddingRequest:
    """A validated request: the texts with their prompt, and how to answer."""

    texts: List[str]
    dim: int
    encoding_format: str


def prompt_prefixes(prompts: Dict[str, str]) -> Dict[str, str]:
    """input_type -> the text put before each input: query, document, none, every prompt name."""
    out = dict(prompts)
    out.setdefault("query", "")
    out.setdefault("document", "title: none | text: ")
    out["none"] = ""
    return out


def parse_request(payload: Any, options: ServeOptions, prefixes: Dict[str, str],
                  dims: List[int], full_dim: int) -> EmbeddingRequest:
    """Check every field of an embeddings request; an HttpError(400/413) names the bad one."""
    if not isinstance(payload, dict):
        raise HttpError(400, "the body must be a JSON object like {\"input\": [\"text\"]}")
    unknown = sorted(set(payload) - set(REQUEST_FIELDS))
    if unknown:
        raise HttpError(400, f"unknown field {unknown[0]!r}; this endpoint takes "
                        f"{', '.join(REQUEST_FIELDS)}", param=unknown[0])
    if "input" not in payload:
        raise HttpError(400, "missing 'input': a string or a list of strings", param="input")
    texts = payload["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list):
        raise HttpError(400, "'input' must be a string or a list of strings", param="input")
    if not texts:
        raise HttpError(400, "'input' is an empty list; send at least one text", param="input")
    if len(texts) > options.max_texts:
        raise HttpError(413, f"'input' has {len(texts)} texts, at most {options.max_texts} per "
                        "request; split it", param="input")
    for i, text in enumerate(texts):
        if isinstance(text, (int, list)) and not isinstance(text, bool):
            raise HttpError(400, f"input[{i}]: {TOKEN_ARRAYS}", param="input")
        if not isinstance(text, str):
            raise HttpError(400, f"input[{i}] is {type(text).__name__}, expected a string",
                            param="input")
        if not text.strip():
            raise HttpError(400, f"input[{i}] is empty; send text to embed", param="input")
        if len(text) > options.max_chars:
            raise HttpError(413, f"input[{i}] has {len(text)} characters, at most "
                            f"{options.max_chars}; split it into chunks", param="input")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HttpError(400, f"input[{i}] contains a lone UTF-16 surrogate (an escape like "
                            "\\ud800 without its pair); send valid Unicode",
                            param="input") from None
    model = payload.get("model")
    if model is not None and not isinstance(model, str):
        raise HttpError(400, "'model' must be a string", param="model")
    user = payload.get("user")
    if user is not None and not isinstance(user, str):
        raise HttpError(400, "'user' must be a string", param="user")
    dim = payload.get("dimensions")
    if dim is None:
        dim = full_dim
    elif isinstance(dim, bool) or not isinstance(dim, int) or dim not in dims:
        raise HttpError(400, f"'dimensions' {json.dumps(dim)} is not supported; use one of "
                        f"{', '.join(str(d) for d in dims)} (Matryoshka truncation)",
                        param="dimensions")
    fmt = payload.get("encoding_format")
    fmt = "float" if fmt is None else fmt
    if fmt not in ("float", "base64"):
        raise HttpError(400, f"'encoding_format' {json.dumps(fmt)}: use \"float\" or \"base64\"",
                        param="encoding_format")
    kind = payload.get("input_type")
    kind = options.default_input_type if kind is None else kind
    if not isinstance(kind, str) or kind not in prefixes:
        raise HttpError(400, f"'input_type' {json.dumps(kind)}: use one of "
                        f"{', '.join(sorted(prefixes))}", param="input_type")
    prefix = prefixes[kind]
    return EmbeddingRequest([prefix + t for t in texts], int(dim), fmt)


def embedding_response(vectors: np.ndarray, tokens: List[int], request: EmbeddingRequest,
                       model_id: str) -> Dict[str, Any]:
    """OpenAI's response body: Matryoshka-truncated, re-normalised vectors and token usage."""
    cut = np.ascontiguousarray(vectors[:, :request.dim], dtype=np.float32)
    cut = cut / np.maximum(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12)
    data = []
    for i, row in enumerate(cut):
        value: Any = (base64.b64encode(row.astype("<f4").tobytes()).decode("ascii")
                      if request.encoding_format == "base64" else row.tolist())
        data.append({"object": "embedding", "index": i, "embedding": value})
    total = int(sum(tokens))
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": total, "total_tokens": total}}


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, f"bad Content-Length header {declared!r}")
        if int(declared) > limit:
            raise HttpError(413, f"request body of {declared} bytes, at most {limit}; send "
                            "fewer or shorter texts per request")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(413, f"request body over {limit} bytes; send fewer or shorter "
                            "texts per request")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(embedder: Any, options: Optional[ServeOptions] = None) -> Starlette:
    """The ASGI app; its lifespan starts the embedding worker and drains it at shutdown."""
    options = options or ServeOptions()
    if options.default_input_type not in prompt_prefixes(embedder.prompts):
        raise InputError(f"default input type {options.default_input_type!r}: use one of "
                         f"{', '.join(sorted(prompt_prefixes(embedder.prompts)))}")
    worker = EmbeddingWorker(embedder, options.max_queue, options.max_batch_texts,
                             options.batch_wait_ms, warmup=options.warmup)
    prefixes = prompt_prefixes(embedder.prompts)
    dims = [int(d) for d in embedder.mrl_dims]
    full_dim = int(embedder.output_dim)
    started = time.time()
    busy = {"Retry-After": str(options.retry_after_s)}

    def check_token(request: Request) -> None:
        if not options.token:
            return
        given = request.headers.get("authorization", "")
        expected = f"Bearer {options.token}"
        if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
            raise HttpError(401, "missing or wrong bearer token (Authorization: Bearer ...)",
                            kind="authentication_error",
                            headers={"WWW-Authenticate": "Bearer"})

    def errors(handler: Any) -> Any:
        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except HttpError as exc:
                return exc.response()
        return wrapped

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "uptime_s": round(time.time() - started, 1),
                             "queued": worker.queued, **worker.stats})

    async def ready(request: Request) -> Response:
        if worker.error is not None:
            return JSONResponse({"status": "failed", "error": worker.error}, status_code=503)
        if not worker.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503, headers=busy)
        return JSONResponse({"status": "ready", "model": options.model_id,
                             "artifact_id": embedder.artifact_id})

    async def models(request: Request) -> Response:
        check_token(request)
        card = {"id": options.model_id, "object": "model", "created": int(started),
                "owned_by": "gemma-edge", "artifact_id": embedder.artifact_id,
                "dimensions": dims, "max_tokens": int(embedder.max_tokens),
                "input_types": sorted(prefixes), "default_input_type": options.default_input_type}
        return JSONResponse({"object": "list", "data": [card]})

    async def embeddings(request: Request) -> Response:
        check_token(request)
        body = await read_body(request, options.max_body_bytes)
        try:
            payload = json.loads(body)
        except ValueError as exc:
            raise HttpError(400, f"the body is not valid JSON ({exc})") from None
        parsed = parse_request(payload, options, prefixes, dims, full_dim)
        if not worker.ready.is_set():
            raise HttpError(503, "the model is still loading; retry shortly", kind="server_error",
                            headers=busy)
        try:
            future = worker.submit(parsed.texts)
        except QueueFullError as exc:
            raise HttpError(503, f"server busy ({exc}); retry after {options.retry_after_s} s",
                            kind="server_error", headers=busy) from None
        except NotReadyError as exc:
            raise HttpError(503, str(exc), kind="server_error", headers=busy) from None
        try:
            result = await asyncio.wrap_future(future)
        except InputError as exc:
            raise HttpError(400, str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the worker lives on; the client sees why
            raise HttpError(500, f"embedding failed: {type(exc).__name__}: {exc}",
                            kind="server_error") from None
        return JSONResponse(embedding_response(result.vectors, result.tokens, parsed,
                                               options.model_id))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        worker.start()
        try:
            yield
        finally:  # uvicorn has let the in-flight requests finish; drain what is queued
            await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    routes = [Route("/health", errors(health), methods=["GET"]),
              Route("/ready", errors(ready), methods=["GET"]),
              Route("/v1/models", errors(models), methods=["GET"]),
              Route("/v1/embeddings", errors(embeddings), methods=["POST"]),
              Route("/embeddings", errors(embeddings), methods=["POST"])]
    async def http_error(request: Request, exc: Any) -> Response:
        return HttpError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                         headers=getattr(exc, "headers", None)).response()

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={StarletteHTTPException: http_error})
    app.state.worker = worker
    app.state.options = options
    return app
