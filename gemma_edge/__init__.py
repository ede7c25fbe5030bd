"""gemma-edge: EmbeddingGemma on the Coral Edge TPU, phone-class CPUs and offline laptops.

The package is split by where code runs:
- ``gemma_edge.export`` (workstation): checkpoint -> verified TFLite graphs.
- ``gemma_edge.compile`` (workstation): Edge TPU pre-flight mapping and ``edgetpu_compiler``.
- ``gemma_edge.device`` (board or laptop): text -> embeddings with numpy, a tokenizer and
  a TFLite runtime only.
"""

__version__ = "0.1.0"
