"""The device side must import without torch, transformers or tensorflow."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import gemma_edge.device
from gemma_edge.device import Embedder
import gemma_edge.device.embedder, gemma_edge.device.runtime, gemma_edge.device.edgetpu
from gemma_edge.cli import build_parser
build_parser()
heavy = sorted(m for m in ("torch", "transformers", "tensorflow", "litert_torch",
                           "sentence_transformers") if m in sys.modules)
print(",".join(heavy))
"""


def test_device_and_cli_import_no_heavy_frameworks():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "", f"device side imported {out.stdout.strip()}"
