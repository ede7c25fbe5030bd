"""`gemma-edge serve`: OpenAI client, curl, bad input, batching, back-pressure, shutdown."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from gemma_edge.device.bench_serve import free_port  # noqa: E402
from gemma_edge.device.serve import ServeOptions, create_app  # noqa: E402


class CountingEmbedder:
    """The real Embedder, counting model calls (``encode``, ``embed_ids``); ``gate`` (when
    set up) holds each call until released, so tests can keep the worker busy on purpose."""

    def __init__(self, embedder: Any):
        self._embedder = embedder
        self.encode_calls = 0
        self.gate: Optional[threading.Event] = None
        self.entered = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._embedder, name)

    def _enter(self) -> None:
        self.encode_calls += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(30), "test gate never opened"

    def encode(self, *args: Any, **kwargs: Any) -> np.ndarray:  # the worker's warm-up
        self._enter()
        return self._embedder.encode(*args, **kwargs)

    def embed_ids(self, *args: Any, **kwargs: Any) -> np.ndarray:  # the worker's batches
        self._enter()
        return self._embedder.embed_ids(*args, **kwargs)


@pytest.fixture(scope="module")
def embedder(tiny_artifacts: Path) -> Any:
    from gemma_edge.device import Embedder

    return Embedder(tiny_artifacts, backend="cpu")


@contextlib.contextmanager
def serving(app: Any, wait_ready: bool = True) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    while wait_ready and httpx.get(base + "/ready").status_code != 200:
        assert time.monotonic() < deadline, "server never became ready"
        time.sleep(0.02)
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(60)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def server(embedder: Any) -> Iterator[tuple]:
    counting = CountingEmbedder(embedder)
    app = create_app(counting, ServeOptions(model_id="tiny-gemma", max_texts=8, max_chars=200,
                                            max_body_bytes=4096, batch_wait_ms=50))
    with serving(app) as base:
        yield base, counting, app


def test_openai_client_gets_the_embedders_vectors(server: tuple, embedder: Any) -> None:
    openai = pytest.importorskip("openai")
    base, _, _ = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
    texts = ["how do I flash the board", "Coral Dev Board"]
    result = client.embeddings.create(model="tiny-gemma", input=texts)  # base64 on the wire
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert got.shape == (2, embedder.output_dim)
    assert np.allclose(got, embedder.encode_query(texts), atol=1e-5)
    ids, _ = embedder.tokenizer.encode([embedder.prompts["query"] + t for t in texts],
                                       embedder.max_tokens)
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(map(len, ids))
    assert result.model == "tiny-gemma"

    small = min(embedder.mrl_dims)
    floats = client.embeddings.create(model="x", input="Coral Dev Board", dimensions=small,
                                      encoding_format="float")
    assert np.allclose(floats.data[0].embedding,
                       embedder.encode_query(["Coral Dev Board"], dim=small)[0], atol=1e-5)
    docs = client.embeddings.create(model="x", input=texts, extra_body={"input_type": "document"})
    assert np.allclose([d.embedding for d in docs.data], embedder.encode_document(texts),
                       atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="'dimensions' 100 is not supported"):
        client.embeddings.create(model="x", input="a", dimensions=100)
    card = client.models.list().data[0]
    assert card.id == "tiny-gemma" and card.model_extra["artifact_id"] == embedder.artifact_id


def test_curl(server: tuple, embedder: Any) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    base, _, _ = server
    out = subprocess.run([curl, "-sS", "-f", base + "/v1/embeddings", "-H",
                          "Content-Type: application/json", "-d",
                          json.dumps({"input": ["apples and bread"], "dimensions": embedder.mrl_dims[-1]})],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    vector = np.array(body["data"][0]["embedding"])
    assert vector.shape == (embedder.mrl_dims[-1],) and abs(np.linalg.norm(vector) - 1) < 1e-5
    assert body["object"] == "list" and body["usage"]["total_tokens"] > 0


BAD = [  # (body, content type, status, words in the message)
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"[1, 2]", "application/json", 400, "must be a JSON object"),
    (b'{"model": "x"}', "application/json", 400, "missing 'input'"),
    (b'{"input": []}', "application/json", 400, "empty list"),
    (b'{"input": 5}', "application/json", 400, "string or a list of strings"),
    (b'{"input": [[1, 2, 3]]}', "application/json", 400, "token-id arrays"),
    (b'{"input": [101, 102]}', "application/json", 400, "token-id arrays"),
    (b'{"input": ["ok", null]}', "application/json", 400, "input[1] is NoneType"),
    (b'{"input": "  "}', "application/json", 400, "input[0] is empty"),
    (b'{"input": "\\ud800 lone"}', "application/json", 400, "lone UTF-16 surrogate"),
    (json.dumps({"input": ["a"] * 9}).encode(), "application/json", 413, "at most 8 per request"),
    (json.dumps({"input": "x" * 201}).encode(), "application/json", 413, "at most 200"),
    (json.dumps({"input": ["y" * 150] * 30}).encode(), "application/json", 413, "at most 4096"),
    (b'{"input": "a", "dimensions": 100}', "application/json", 400, "use one of"),
    (b'{"input": "a", "dimensions": "64"}', "application/json", 400, "'dimensions' \"64\""),
    (b'{"input": "a", "dimensions": true}', "application/json", 400, "'dimensions' true"),
    (b'{"input": "a", "encoding_format": "hex"}', "application/json", 400, "float\" or \"base64"),
    (b'{"input": "a", "input_type": "passage"}', "application/json", 400, "'input_type'"),
    (b'{"input": "a", "model": 7}', "application/json", 400, "'model' must be a string"),
    (b'{"input": "a", "truncate": true}', "application/json", 400, "unknown field 'truncate'"),
    (b"\xff\xfe garbage", "text/plain", 400, "not valid JSON"),
]


def test_bad_requests_get_clear_4xx_and_the_server_keeps_serving(server: tuple) -> None:
    base, counting, app = server
    calls = counting.encode_calls
    with httpx.Client(base_url=base) as client:
        for body, kind, status, words in BAD:
            response = client.post("/v1/embeddings", content=body, headers={"Content-Type": kind})
            assert response.status_code == status, (body[:60], response.text)
            error = response.json()["error"]
            assert words in error["message"], (body[:60], error)
            assert error["type"] == "invalid_request_error"
        assert client.get("/v1/embeddings").status_code == 405
        missing = client.get("/v2/nothing")
        assert missing.status_code == 404 and "Not Found" in missing.json()["error"]["message"]
        assert counting.encode_calls == calls  # nothing bad reached the model
        good = client.post("/v1/embeddings", json={"input": "still alive"})
        assert good.status_code == 200 and len(good.json()["data"]) == 1
    assert app.state.worker.stats["failed"] == 0


def test_concurrent_requests_are_coalesced(server: tuple, embedder: Any) -> None:
    base, counting, _ = server
    texts = [f"query number {i} about boards" for i in range(32)]
    calls = counting.encode_calls
    barrier = threading.Barrier(8)

    def client(worker: int) -> list:
        """Four rounds; in each, the eight clients send one request at the same moment."""
        out = []
        with httpx.Client(base_url=base, timeout=60) as http:
            http.get("/health")  # connect before the rounds start
            for i in range(worker, len(texts), 8):
                barrier.wait(30)
                response = http.post("/v1/embeddings", json={"input": texts[i],
                                                             "encoding_format": "base64"})
                assert response.status_code == 200, response.text
                vector = base64.b64decode(response.json()["data"][0]["embedding"])
                out.append((i, np.frombuffer(vector, "<f4")))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = dict(pair for part in pool.map(client, range(8)) for pair in part)
    got = np.stack([results[i] for i in range(len(texts))])
    used = counting.encode_calls - calls
    assert 1 <= used < len(texts) // 2, f"{used} encode calls for {len(texts)} requests"
    alone = np.concatenate([embedder.encode_query([t]) for t in texts])
    assert np.min(np.sum(got * alone, axis=1)) > 0.995  # packed with others = embedded alone


def test_full_queue_answers_503_with_retry_after(embedder: Any) -> None:
    gated = CountingEmbedder(embedder)
    app = create_app(gated, ServeOptions(max_queue=1, batch_wait_ms=0, warmup=False))
    with serving(app) as base, ThreadPoolExecutor(2) as pool:
        gated.gate = threading.Event()
        first = pool.submit(httpx.post, base + "/v1/embeddings", json={"input": "one"}, timeout=60)
        assert gated.entered.wait(10)  # the worker is inside encode, holding request one
        second = pool.submit(httpx.post, base + "/v1/embeddings", json={"input": "two"},
                             timeout=60)
        deadline = time.monotonic() + 10
        while app.state.worker.queued < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        third = httpx.post(base + "/v1/embeddings", json={"input": "three"}, timeout=60)
        assert third.status_code == 503 and third.headers["retry-after"] == "1"
        assert "busy" in third.json()["error"]["message"]
        gated.gate.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
        assert httpx.get(base + "/health").json()["rejected"] == 1


def test_ready_only_when_the_graphs_are_open(embedder: Any) -> None:
    gated = CountingEmbedder(embedder)
    gated.gate = threading.Event()  # holds the warm-up
    app = create_app(gated, ServeOptions())
    with serving(app, wait_ready=False) as base:
        assert gated.entered.wait(10)
        assert httpx.get(base + "/health").status_code == 200
        assert httpx.get(base + "/ready").json() == {"status": "loading"}
        early = httpx.post(base + "/v1/embeddings", json={"input": "too soon"})
        assert early.status_code == 503 and "still loading" in early.json()["error"]["message"]
        gated.gate.set()
        assert app.state.worker.ready.wait(30)
        ready = httpx.get(base + "/ready")
        assert ready.status_code == 200 and ready.json()["artifact_id"] == embedder.artifact_id


def test_bearer_token(embedder: Any) -> None:
    app = create_app(embedder, ServeOptions(token="s3cret", warmup=False))
    with serving(app) as base:
        assert httpx.post(base + "/v1/embeddings", json={"input": "x"}).status_code == 401
        wrong = httpx.get(base + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        good = httpx.post(base + "/v1/embeddings", json={"input": "x"},
                          headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        assert httpx.get(base + "/health").status_code == 200  # probes need no token


def test_shutdown_finishes_in_flight_requests(embedder: Any) -> None:
    gated = CountingEmbedder(embedder)
    app = create_app(gated, ServeOptions(warmup=False, batch_wait_ms=0))
    with ThreadPoolExecutor(1) as pool:
        with serving(app) as base:
            gated.gate = threading.Event()
            pending = pool.submit(httpx.post, base + "/v1/embeddings", json={"input": "last one"},
                                  timeout=60)
            assert gated.entered.wait(10)
            threading.Timer(0.5, gated.gate.set).start()
        # leaving `serving` asked uvicorn to exit (what SIGTERM does) and waited for it
        response = pending.result(10)
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    assert not app.state.worker._thread.is_alive()


def test_cli_serves_and_stops_on_sigterm(tiny_artifacts: Path) -> None:
    port = free_port()
    env = dict(os.environ, GEMMA_EDGE_SERVE_TOKEN="tok")
    proc = subprocess.Popen([sys.executable, "-m", "gemma_edge.cli", "serve", str(tiny_artifacts),
                             "--port", str(port), "--backend", "cpu", "--model-name", "tiny"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            assert time.monotonic() < deadline, "server not ready in 120 s"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        response = httpx.post(f"http://127.0.0.1:{port}/v1/embeddings", json={"input": "hi"},
                              headers={"Authorization": "Bearer tok"})
        assert response.status_code == 200 and response.json()["model"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        # uvicorn >= 0.29 re-raises the signal after its graceful shutdown (systemd: success)
        assert proc.wait(60) in (0, -signal.SIGTERM)
        log = proc.stdout.read() if proc.stdout else ""
        assert "Finished server process" in log and "Traceback" not in log, log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_bad_arguments(tiny_artifacts: Path, capsys) -> None:
    from gemma_edge.cli import main

    assert main(["serve", str(tiny_artifacts.parent / "missing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["serve", str(tiny_artifacts), "--backend", "cpu", "--default-input-type",
                 "passage"]) == 2
    assert "default input type 'passage'" in capsys.readouterr().err
    assert main(["serve", str(tiny_artifacts), "--backend", "cpu", "--max-queue", "0"]) == 2
    assert "--max-queue 0" in capsys.readouterr().err
    assert main(["serve", str(tiny_artifacts), "--backend", "cpu", "--pack-tokens", "-1"]) == 2
    assert "--pack-tokens -1" in capsys.readouterr().err


def test_parser_does_not_import_the_server_stack() -> None:
    code = ("import sys; from gemma_edge.cli import build_parser; build_parser(); "
            "print(sorted(m for m in ('starlette', 'uvicorn') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_serve_bench_reports_one_by_one_the_bound_and_the_server(tiny_artifacts: Path,
                                                                 tmp_path: Path) -> None:
    """`gemma-edge serve-bench` end to end on the tiny export: every pass embeds every query,
    none fails, the server's vectors are the one-by-one ones, the JSON has the bound."""
    queries = tmp_path / "queries.txt"
    queries.write_text("".join(f"how do I flash board number {i}?\n" for i in range(12)))
    report, plot = tmp_path / "serve-bench.json", tmp_path / "serve-bench.png"
    run = subprocess.run([sys.executable, "-m", "gemma_edge.cli", "serve-bench",
                          str(tiny_artifacts), "--queries", str(queries), "--clients", "4",
                          "--rounds", "2", "--json", str(report), "--plot", str(plot)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "batches of 4, no HTTP" in run.stdout and "the graphs' bound" in run.stdout
    got = json.loads(report.read_text())
    for row in ("one_by_one", "batched_in_process", "server"):
        assert got[row]["requests"] == 24 and got[row]["failures"] == 0, row
        assert got[row]["req_per_s"] > 0 and len(got[row]["latencies_ms"]) == 24, row
    assert got["batching_bound"] > 0 and got["speedup"] > 0
    assert got["pack_tokens"] == 64  # the tiny export's largest bucket (below 128)
    assert got["min_cosine_server_vs_direct"] > 0.99
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
