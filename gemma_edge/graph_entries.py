"""The manifest's graph entries, typed, and which role a precision runs.

``manifest.json`` lists its graphs as JSON objects (``manifest["graphs"]``); the device
side and the pre-flight read them through ``GraphEntry`` instead of raw dict keys. The
role names are the manifest format and stay as they are on disk (old manifests must
load, artifacts stay byte-identical), so their meaning is written down here:

- ``float``: the float32 graphs (one multi-signature file);
- ``int8``: the CPU int8 graphs, one file per bucket;
- ``int8-shared``: the same int8 graphs, every bucket in one file (weights shared),
  for LiteRT's CompiledModel with the weight cache;
- ``edgetpu``: the fully int8 graphs the Edge TPU needs (the per-layer segments). The
  CPU runs them too, as an emulation of what the Edge TPU computes
  (``precision="full-int8"``);
- ``edgetpu-compiled``: ``edgetpu_compiler``'s output for the ``edgetpu`` graphs, which
  only a Coral device runs.

Standard library only (the device imports it on a board).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

# precision (the Embedder's and the CLI's word) -> the role of the graphs it runs on the
# CPU; on an Edge TPU every 8-bit precision runs the "edgetpu-compiled" role
PRECISION_ROLE = {"float": "float", "int8": "int8", "full-int8": "edgetpu"}
EDGETPU_COMPILED = "edgetpu-compiled"
SEGMENTS = "segments"  # the layout of a per-layer segment entry


@dataclass(frozen=True)
class GraphEntry:
    """One entry of ``manifest["graphs"]``.

    ``path``: the graph file, or for a segment entry its host constants (host.npz);
    ``segments``: a segment entry's per-layer graph files, attention and MLP per layer;
    ``signatures``: bucket (as a string) -> signature name in a multi-signature file;
    ``io``: per signature, the inputs' and outputs' names, shapes and dtypes.
    """

    path: str
    role: str
    seq_lens: tuple[int, ...]
    pool_slots: int
    layout: str = "single"
    segments: tuple[str, ...] = ()
    signatures: dict[str, str] = field(default_factory=dict)
    io: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> GraphEntry:
        """The typed form of one manifest entry (``load_manifest`` checked its shape)."""
        lens = entry.get("seq_lens") or [entry["seq_len"]]
        return cls(path=str(entry["path"]), role=str(entry["role"]),
                   seq_lens=tuple(int(s) for s in lens), pool_slots=int(entry["pool_slots"]),
                   layout=str(entry.get("layout") or "single"),
                   segments=tuple(entry.get("segments") or ()),
                   signatures=dict(entry.get("signatures") or {}),
                   io=dict(entry.get("io") or {}))

    @property
    def is_segments(self) -> bool:
        """Per-layer segments (several graph files and a host loop), not one graph file."""
        return self.layout == SEGMENTS

    @property
    def graph_files(self) -> list[str]:
        """The TFLite files of the entry: its one file, or its segments."""
        return list(self.segments) if self.is_segments else [self.path]

    def signature_for(self, seq_len: int) -> Optional[str]:
        """The signature that runs ``seq_len`` in a multi-signature file (None: the
        file's only one)."""
        return self.signatures.get(str(seq_len))

    @property
    def float_io(self) -> bool:
        """Whether every input and output of every signature is float32 (the CPU graphs;
        LiteRT's CompiledModel path takes only these)."""
        tensors = [t for sig in self.io.values()
                   for t in sig.get("inputs", []) + sig.get("outputs", [])]
        return bool(tensors) and all(t.get("dtype") == "float32" for t in tensors)


def entries_for(manifest: dict[str, Any], role: str) -> list[GraphEntry]:
    """Every graph entry of ``role``, in manifest order."""
    return [GraphEntry.from_json(g) for g in manifest.get("graphs", []) if g.get("role") == role]


def entry_for(manifest: dict[str, Any], role: str, seq_len: int) -> Optional[GraphEntry]:
    """The entry of ``role`` that runs ``seq_len`` tokens, or None."""
    return next((e for e in entries_for(manifest, role) if seq_len in e.seq_lens), None)
