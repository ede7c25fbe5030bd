"""Every export verification fails on a non-finite number (issue 19).

A comparison with NaN is false, and Python's ``min(1.0, nan)`` is 1.0: the export used to
print "min cosine 1.000000" for NaN vectors and record NaN in the manifest, exit 0.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_edge.errors import QuantizationError, VerificationError


@pytest.fixture()
def nan_rows(monkeypatch):
    """The device Embedder returns NaN in the first row of every batch (the other rows are right)."""
    from gemma_edge.device import Embedder

    encode = Embedder.encode

    def poisoned(self, texts, *args, **kwargs):
        out = np.array(encode(self, texts, *args, **kwargs))
        out[0] = np.nan
        return out

    monkeypatch.setattr(Embedder, "encode", poisoned)


@pytest.mark.slow
@pytest.mark.parametrize("precision,threshold", [("float", 0.9999), ("int8", 0.97),
                                                 ("full-int8", -1.0)])
def test_verification_fails_on_nan_vectors(tiny_artifacts, tiny_checkpoint, nan_rows,
                                           precision, threshold):
    from gemma_edge.export.pipeline import verify_artifacts

    with pytest.raises(VerificationError, match=f"{precision}.*not finite"):
        verify_artifacts(tiny_artifacts, tiny_checkpoint, precision, threshold)


@pytest.mark.slow
def test_verification_still_passes_on_finite_vectors(tiny_artifacts, tiny_checkpoint):
    from gemma_edge.export.pipeline import verify_artifacts

    result = verify_artifacts(tiny_artifacts, tiny_checkpoint, "float", 0.9999)
    assert 0.9999 <= result["min_cosine"] <= 1.0 + 1e-6


@pytest.mark.slow
def test_nan_in_the_one_file_int8_graph_fails(tiny_artifacts, tiny_checkpoint, monkeypatch):
    """The one-file int8 graph must give the per-bucket files' vectors: a NaN difference
    is a difference, not a pass."""
    from gemma_edge.device import Embedder
    from gemma_edge.export.pipeline import verify_artifacts

    encode = Embedder.encode

    def shared_nan(self, texts, *args, **kwargs):
        out = np.array(encode(self, texts, *args, **kwargs))
        if self.graphs.weight_cache is not None:  # the one-file graph's CompiledModel path
            out[:, 0] = np.nan
        return out

    monkeypatch.setattr(Embedder, "encode", shared_nan)
    with pytest.raises(VerificationError, match="one-file int8 graph differs"):
        verify_artifacts(tiny_artifacts, tiny_checkpoint, "int8", 0.97)


def test_segment_float_check_fails_on_nan(monkeypatch):
    """The segmented rewrite's float check (export/segments/host.py) must not take NaN for
    a match, wherever the NaN sample comes in the list."""
    from gemma_edge.export.segments import host

    outputs = iter([torch.ones(1, 2, 4), torch.full((1, 2, 4), float("nan")), torch.ones(1, 2, 4)])

    class Reference:
        def __init__(self, core, seq_len):
            pass

        def eval(self):
            return lambda *args: torch.ones(1, 2, 4)

    monkeypatch.setattr(host, "BucketEncoder", Reference)
    monkeypatch.setattr(host, "torch_runner", lambda segments: None)
    monkeypatch.setattr(host, "host_forward", lambda *args: next(outputs))
    sample = {"embeddings": np.zeros((1, 8, 4), np.float32), "mask": np.ones((1, 8, 8), np.float32),
              "pool": np.ones((1, 2, 8), np.float32)}
    with pytest.raises(QuantizationError, match="nan"):
        host.check_float(None, [], [], [sample, sample, sample])
