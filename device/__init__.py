"""Device runtime: text -> embeddings with numpy, a tokenizer and a TFLite runtime only.

Importing this package must not pull in torch, transformers or tensorflow (tested).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Embedder", "truncate_dim"]


def __getattr__(name: str) -> Any:  # PEP 562: keep `import gemma_edge.device` cheap
    if name in __all__:
        from . import embedder

        return getattr(embedder, name)
    raise AttributeError(name)
