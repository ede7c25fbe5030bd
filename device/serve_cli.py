"""``gemma-edge serve ART`` and ``gemma-edge serve-bench ART``: the CLI of the server.

Imported to build the parser on a board, so only the standard library at module
level; starlette/uvicorn (the ``serve`` extra) are imported when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any, Optional

from gemma_edge.errors import GemmaEdgeError, InputError

TOKEN_ENV = "GEMMA_EDGE_SERVE_TOKEN"
DEFAULT_PORT = 8765
SERVE_PACK_TOKENS = 128  # serve-bench, 8 clients, quiet machine: 1.62x one-by-one, 1.44x at 256
log = logging.getLogger("gemma_edge.device")


def register(subparsers: Any) -> None:
    from gemma_edge.cli import _add_runtime_args

    p = subparsers.add_parser("serve", help="OpenAI-compatible embedding server (POST "
                              "/v1/embeddings) over the artifacts; needs the [serve] extra")
    p.add_argument("artifacts", type=Path, metavar="ART", help="artifacts directory")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 "
                        "opens it to the network, use --token then)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default {DEFAULT_PORT}")
    p.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on /v1 (or set ${TOKEN_ENV}; "
                        "the variable keeps it out of `ps`)")
    p.add_argument("--model-name", default=None,
                   help="model id in responses and /v1/models (default: the checkpoint's name)")
    p.add_argument("--default-input-type", default="query",
                   help="prompt when a request has no input_type: query (default), document, "
                        "none or a prompt name of the model")
    p.add_argument("--max-texts", type=int, default=256, help="texts per request (413 above)")
    p.add_argument("--max-chars", type=int, default=32768, help="characters per text (413 above)")
    p.add_argument("--max-body-mb", type=float, default=4.0, help="request body size (413 above)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for the model before new ones get 503 + Retry-After")
    p.add_argument("--max-batch-texts", type=int, default=64,
                   help="texts coalesced into one packed model call")
    p.add_argument("--batch-wait-ms", type=float, default=10.0,
                   help="at most this long a request waits for others to share its model call "
                        "(less once as many as last time have come)")
    p.add_argument("--pack-tokens", type=int, default=None,
                   help="pack a batch's short texts into buckets of at most this many tokens "
                        f"(default {SERVE_PACK_TOKENS}, or the Embedder's own if smaller: "
                        "a batch of short queries fills a 128-token bucket better than a "
                        "256-token one; docs/serve.md has the measurement)")
    p.add_argument("--no-warmup", action="store_true",
                   help="do not open the graphs before answering /ready")
    _add_runtime_args(p)
    p.set_defaults(func=run_serve)

    b = subparsers.add_parser("serve-bench", help="throughput of `gemma-edge serve` under N "
                              "concurrent clients vs one-by-one Embedder calls, same run")
    b.add_argument("artifacts", type=Path, metavar="ART", help="artifacts directory")
    b.add_argument("--queries", type=Path, default=None,
                   help="texts (.txt or .jsonl with 'text'; default: the held-out queries)")
    b.add_argument("--clients", type=int, default=8, help="concurrent HTTP clients")
    b.add_argument("--rounds", type=int, default=3,
                   help="alternations of one-by-one and server passes over the queries")
    b.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    b.add_argument("--pack-tokens", type=int, default=None,
                   help="passed to the server (gemma-edge serve --pack-tokens)")
    b.add_argument("--json", type=Path, default=None, help="also write the figures here")
    b.add_argument("--plot", type=Path, default=None,
                   help="also draw the latency distributions and rates here (PNG)")
    _add_runtime_args(b)
    b.set_defaults(func=run_serve_bench)


def serve_options(args: argparse.Namespace, manifest: dict) -> Any:
    from .serve import ServeOptions

    for name in ("max_texts", "max_chars", "max_queue", "max_batch_texts"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} {getattr(args, name)}: at least 1")
    if args.max_body_mb <= 0 or args.batch_wait_ms < 0:
        raise InputError("--max-body-mb must be > 0 and --batch-wait-ms >= 0")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port {args.port}: not a TCP port (0-65535)")
    token = args.token or os.environ.get(TOKEN_ENV) or None
    return ServeOptions(model_id=args.model_name or default_model_id(manifest),
                        default_input_type=args.default_input_type, token=token,
                        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                        max_texts=args.max_texts, max_chars=args.max_chars,
                        max_queue=args.max_queue, max_batch_texts=args.max_batch_texts,
                        batch_wait_ms=args.batch_wait_ms, warmup=not args.no_warmup)


def default_model_id(manifest: dict) -> str:
    """The checkpoint's name (google/embeddinggemma-300m -> embeddinggemma-300m)."""
    source = str(manifest.get("source", {}).get("checkpoint") or "embeddinggemma")
    return source.rstrip("/").split("/")[-1] or "embeddinggemma"


def _import_stack() -> Any:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise GemmaEdgeError(f"`gemma-edge serve` needs {exc.name}: pip install "
                             "'gemma-edge[serve]' (starlette and uvicorn)") from exc
    return uvicorn


def serve_pack_tokens(embedder: Any, requested: Optional[int]) -> int:
    """The server's packing limit: ``requested`` (at most the largest bucket), else
    SERVE_PACK_TOKENS, never above the Embedder's own (the full-int8 segments: 64)."""
    if requested is None:
        return min(int(embedder.pack_tokens), SERVE_PACK_TOKENS)
    if requested < 0:
        raise InputError(f"--pack-tokens {requested}: 0 (no packing) or more")
    return min(int(embedder.max_tokens), int(requested))


def run_serve(args: argparse.Namespace) -> int:
    from gemma_edge.cli import make_embedder

    uvicorn = _import_stack()
    from .serve import create_app

    if not args.artifacts.is_dir():
        raise InputError(f"{args.artifacts}: no such directory; pass the folder "
                         "`gemma-edge export` wrote")
    embedder = make_embedder(args)
    options = serve_options(args, embedder.manifest)
    embedder.pack_tokens = serve_pack_tokens(embedder, args.pack_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not options.token:
        log.warning("gemma-edge serve: listening on %s without a token: anyone who can reach "
                    "this port can use the model (set %s)", args.host, TOKEN_ENV)
    app = create_app(embedder, options)
    log.info("gemma-edge serve: %s (%s, %s) on http://%s:%d/v1", options.model_id,
             embedder.backend, embedder.graph_role, args.host, args.port)
    run_uvicorn(uvicorn, app, args.host, args.port)
    return 0


def run_uvicorn(uvicorn: Any, app: Any, host: str, port: int,
                graceful_s: Optional[int] = 30) -> None:
    """uvicorn.run, which stops on SIGTERM/SIGINT after in-flight requests finish
    (a port in use is reported by uvicorn in one line, exit 1)."""
    import inspect

    kwargs = {"host": host, "port": port, "log_level": "info", "access_log": False}
    if "timeout_graceful_shutdown" in inspect.signature(uvicorn.Config).parameters:
        kwargs["timeout_graceful_shutdown"] = graceful_s  # absent before uvicorn 0.23 (3.7)
    uvicorn.run(app, **kwargs)


def run_serve_bench(args: argparse.Namespace) -> int:
    from .bench_serve import run_bench

    _import_stack()
    if args.clients < 1 or args.rounds < 1:
        raise InputError("--clients and --rounds must be >= 1")
    from gemma_edge.reporting import check_report_paths

    check_report_paths(args.json, args.plot)
    return run_bench(args)
