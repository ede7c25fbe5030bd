"""Fixtures of the research tools' tests: the tiny model's encoder and corpus calibration."""

from __future__ import annotations

from pathlib import Path

import pytest

BUCKET = 32


@pytest.fixture(scope="module")
def tiny_core(tiny_checkpoint: Path):
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    core, _ = build_encoder(load_checkpoint(tiny_checkpoint))
    return core


@pytest.fixture(scope="module")
def calibration(tiny_artifacts: Path):
    from gemma_edge.export.calibration import calibration_set

    return calibration_set(tiny_artifacts, [BUCKET], 6)
