"""A LangChain ``Embeddings`` over the Embedder, for RAG apps running in the same process.

``embed_documents`` uses EmbeddingGemma's document prompt and ``embed_query`` its
query prompt: the model is asymmetric, and a retriever that embeds both sides the
same way ranks worse. Apps in other processes (or other languages) use the
server instead (``gemma-edge serve``; docs/serve.md).

Needs ``langchain-core`` (not a dependency of gemma-edge); nothing else in the
device package imports this module.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, List, Optional, Union

try:
    from langchain_core.embeddings import Embeddings
except ImportError as exc:  # pragma: no cover - exercised only without langchain-core
    raise ImportError("gemma_edge.device.langchain_embeddings needs langchain-core: "
                      "pip install langchain-core") from exc


class GemmaEdgeEmbeddings(Embeddings):
    """LangChain embeddings from exported EmbeddingGemma artifacts.

    Pass an ``Embedder`` (shared with other code) or ``artifacts`` plus Embedder
    keyword arguments (backend, precision, num_threads, ...). ``dim``: a Matryoshka
    dimension (default the model's full one). ``batch_size``: documents per encode
    call (the Embedder packs short ones together). Calls are serialised with a lock
    because the Embedder is not thread-safe and LangChain's async methods run the
    sync ones in a thread pool.
    """

    def __init__(self, embedder: Any = None, artifacts: Union[str, Path, None] = None,
                 dim: Optional[int] = None, batch_size: int = 32, **embedder_kwargs: Any):
        if (embedder is None) == (artifacts is None):
            raise ValueError("pass either an Embedder or artifacts=<artifacts directory>")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size}: at least 1")
        if embedder is None:
            from .embedder import Embedder

            embedder = Embedder(artifacts, **embedder_kwargs)
        if dim is not None and int(dim) not in [int(d) for d in embedder.mrl_dims]:
            raise ValueError(f"dim {dim}: the model's Matryoshka dims are "
                             f"{', '.join(str(d) for d in embedder.mrl_dims)}")
        self.embedder = embedder
        self.dim = dim
        self.batch_size = int(batch_size)
        self._lock = threading.Lock()

    def embed_documents(self, texts: List[str]) -> List[List[float]]:
        """Document vectors ("title: none | text: ..." prompt), one list per text."""
        out: List[List[float]] = []
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start:start + self.batch_size])
            with self._lock:
                vectors = self.embedder.encode_document(batch, dim=self.dim)
            out.extend(vector.tolist() for vector in vectors)
        return out

    def embed_query(self, text: str) -> List[float]:
        """The query vector ("task: search result | query: ..." prompt)."""
        with self._lock:
            return self.embedder.encode_query([text], dim=self.dim)[0].tolist()
