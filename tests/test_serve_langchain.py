"""The LangChain adapter: document and query prompts, Matryoshka dims, a vector store round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("langchain_core")

from langchain_core.embeddings import Embeddings  # noqa: E402

from gemma_edge.device.langchain_embeddings import GemmaEdgeEmbeddings  # noqa: E402


@pytest.fixture(scope="module")
def embedder(tiny_artifacts: Path):
    from gemma_edge.device import Embedder

    return Embedder(tiny_artifacts, backend="cpu")


def test_documents_and_queries_use_their_prompts(embedder) -> None:
    lc = GemmaEdgeEmbeddings(embedder, batch_size=2)
    assert isinstance(lc, Embeddings)
    docs = ["Flash Mendel Linux onto the board.", "Apples, bread, cheese.", "Call grandmother."]
    got = np.array(lc.embed_documents(docs), dtype=np.float32)
    assert got.shape == (3, embedder.output_dim)
    assert np.allclose(got, embedder.encode_document(docs), atol=1e-5)
    query = np.array(lc.embed_query("how do I flash the board"), dtype=np.float32)
    assert np.allclose(query, embedder.encode_query(["how do I flash the board"])[0], atol=1e-5)
    assert not np.allclose(query, embedder.encode_document(["how do I flash the board"])[0],
                           atol=1e-3)  # the two prompts really differ
    small = min(embedder.mrl_dims)
    short = GemmaEdgeEmbeddings(embedder, dim=small)
    assert len(short.embed_query("board")) == small
    assert short.embed_documents([]) == []


def test_in_memory_vector_store_round_trip(embedder) -> None:
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(GemmaEdgeEmbeddings(embedder))
    texts = ["Flash Mendel Linux onto the Coral board.", "Shopping list: apples and bread."]
    store.add_texts(texts)
    hits = store.similarity_search("Shopping list: apples and bread.", k=2)
    assert len(hits) == 2 and {h.page_content for h in hits} == set(texts)


def test_bad_arguments(embedder, tiny_artifacts: Path) -> None:
    with pytest.raises(ValueError, match="either an Embedder or artifacts"):
        GemmaEdgeEmbeddings()
    with pytest.raises(ValueError, match="Matryoshka dims"):
        GemmaEdgeEmbeddings(embedder, dim=7)
    own = GemmaEdgeEmbeddings(artifacts=tiny_artifacts, backend="cpu")
    assert np.allclose(own.embed_query("x"), embedder.encode_query(["x"])[0], atol=1e-5)


def test_device_package_does_not_import_langchain() -> None:
    code = ("import sys, gemma_edge.device, gemma_edge.device.embedder; "
            "print('langchain_core' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
