"""The one thread that runs the Embedder for the server, and the batching in front of it.

Why one thread: the Embedder (its TFLite interpreters, LRU of open graphs and
stage counters) is not thread-safe, and on a 2-core board one packed graph run
uses the cores better than several small ones in parallel. Why coalescing: a
short query alone fills a 16- or 32-token bucket, while the Embedder packs up to
a slot count of short texts into one 256-token run for about the price of a few
single ones. So requests that arrive within ``batch_wait_ms`` of each other (or
pile up while a batch runs) are embedded by ONE ``encode`` call.

Why a bounded queue: under overload a board must say "busy, retry" (HTTP 503)
rather than queue work it will finish minutes after the client gave up.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import numpy as np

log = logging.getLogger("gemma_edge.device")

_STOP = object()
WARMUP_TEXT = "warm-up query for the gemma-edge server"


class QueueFullError(Exception):
    """More requests are waiting than the queue holds: the caller answers 503."""


class NotReadyError(Exception):
    """The graphs are not open yet, failed to open, or the server is shutting down."""


@dataclass
class Job:
    """One HTTP request's texts (prompt already prepended) and where its result goes."""

    texts: List[str]
    future: Future


@dataclass
class Result:
    """Full-dimension L2-normalised vectors [n, D] and the tokens each text used."""

    vectors: np.ndarray
    tokens: List[int]


class EmbeddingWorker:
    """Owns all Embedder calls: ``submit`` from any thread, results arrive as Futures.

    max_queue: requests waiting (beyond the batch being embedded) before
    ``submit`` raises QueueFullError. max_batch_texts: texts per ``encode`` call
    (a request larger than that still runs whole, alone). batch_wait_ms: how
    long the first request of a batch may wait for company when the queue is
    idle; it stops waiting as soon as as many requests have come as the previous
    batch had (N clients in lock-step come back together), so a steady load pays
    no wait and a lone client at most this.
    """

    def __init__(self, embedder: Any, max_queue: int = 64, max_batch_texts: int = 64,
                 batch_wait_ms: float = 10.0, warmup: bool = True):
        if max_queue < 1 or max_batch_texts < 1 or batch_wait_ms < 0:
            raise ValueError("max_queue and max_batch_texts must be >= 1, batch_wait_ms >= 0")
        self.embedder = embedder
        self.max_batch_texts = int(max_batch_texts)
        self.batch_wait = float(batch_wait_ms) / 1000.0
        self.warmup = warmup
        self._queue: queue.Queue = queue.Queue(maxsize=int(max_queue))
        self._carry: Optional[Job] = None
        self._last_batch = 1  # requests in the previous batch: how many to wait for
        self._stopping = False
        self._lock = threading.Lock()
        self.ready = threading.Event()
        self.error: Optional[str] = None
        # Counters for /health and the tests: requests vs encode calls shows the coalescing.
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "rejected": 0, "failed": 0}
        self._thread = threading.Thread(target=self._run, name="gemma-edge-embed", daemon=True)

    # -- control (any thread) -----------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, texts: List[str]) -> Future:
        """Queue one request; raises QueueFullError or NotReadyError instead of blocking."""
        if self._stopping:
            raise NotReadyError("the server is shutting down")
        if self.error is not None:
            raise NotReadyError(f"the model failed to load: {self.error}")
        job = Job(list(texts), Future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            with self._lock:
                self.stats["rejected"] += 1
            raise QueueFullError(f"{self._queue.maxsize} requests already waiting") from None
        return job.future

    def stop(self, timeout: float = 60.0) -> None:
        """Finish every queued request, then end the thread (graceful shutdown)."""
        self._stopping = True
        if self._thread.is_alive():
            self._queue.put(_STOP)  # blocks only while the queue is full, i.e. briefly
            self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    # -- the worker thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            if self.warmup:
                self._warm_up()
        except Exception as exc:  # noqa: BLE001 - reported by /ready and every request
            self.error = f"{type(exc).__name__}: {exc}"
            log.error("gemma-edge serve: warm-up failed: %s", self.error)
        self.ready.set()
        while True:
            jobs = self._next_batch()
            if not jobs:
                break
            self._embed(jobs)

    def _warm_up(self) -> None:
        """Open the graphs the traffic will use: a lone short text's bucket and a packed one."""
        started = time.monotonic()
        self.embedder.encode([WARMUP_TEXT], prompt="")
        self.embedder.encode([WARMUP_TEXT] * min(self.max_batch_texts, 16), prompt="")
        log.info("gemma-edge serve: graphs open in %.1f s", time.monotonic() - started)

    def _take(self, timeout: Optional[float]) -> Any:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        if timeout is None:
            return self._queue.get()
        if timeout <= 0:
            return self._queue.get_nowait()
        return self._queue.get(timeout=timeout)

    def _next_batch(self) -> List[Job]:
        """The next batch: the oldest request, plus what arrives within the wait window
        (or is already queued) up to max_batch_texts. Empty when stopping."""
        first = self._take(None)
        if first is _STOP:
            return []
        jobs, count = [first], len(first.texts)
        deadline = time.monotonic() + self.batch_wait
        expected = max(2, self._last_batch)
        while count < self.max_batch_texts:
            try:  # past `expected` (or the deadline) take only what is already queued
                wait = deadline - time.monotonic() if len(jobs) < expected else 0.0
                item = self._take(wait)
            except queue.Empty:
                break
            if item is _STOP:
                self._queue.put(_STOP)  # seen again once this batch is done
                break
            if count + len(item.texts) > self.max_batch_texts:
                self._carry = item  # the first of the next batch
                break
            jobs.append(item)
            count += len(item.texts)
        self._last_batch = len(jobs)
        return jobs

    def _embed(self, jobs: List[Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            outputs = self._encode([t for job in live for t in job.texts])
        except Exception as exc:  # noqa: BLE001 - retried one request at a time below
            if len(live) == 1:
                self._fail(live[0], exc)
                return
            for job in live:  # one bad request must not fail the others of its batch
                try:
                    self._deliver(job, *self._encode(job.texts))
                except Exception as one:  # noqa: BLE001 - handed to that request's Future
                    self._fail(job, one)
            return
        vectors, tokens = outputs
        start = 0
        for job in live:
            stop = start + len(job.texts)
            self._deliver(job, vectors[start:stop], tokens[start:stop])
            start = stop

    def _encode(self, texts: List[str]) -> Tuple[np.ndarray, List[int]]:
        """Vectors [n, D] and the tokens of each text as embedded (truncation included)."""
        with self._lock:
            self.stats["batches"] += 1
        # tokenised once (the counts are the response's usage), as encode() tokenises
        ids = self.embedder.tokenize(texts)
        vectors = self.embedder.embed_ids(ids)
        if not np.all(np.isfinite(vectors)):
            raise FloatingPointError("the model returned non-finite numbers; the artifacts "
                                     "are damaged: copy or export them again")
        return vectors, [len(x) for x in ids]

    def _deliver(self, job: Job, vectors: np.ndarray, tokens: List[int]) -> None:
        with self._lock:
            self.stats["requests"] += 1
            self.stats["texts"] += len(job.texts)
        job.future.set_result(Result(vectors, list(tokens)))

    def _fail(self, job: Job, exc: Exception) -> None:
        with self._lock:
            self.stats["failed"] += 1
        job.future.set_exception(exc)
