"""Text -> token ids on the device, exactly as the checkpoint's tokenizer does it.

Two implementations, picked by the manifest (export checks that they agree):
- sentencepiece over ``tokenizer.model``: ~60 MB of RSS for Gemma's 262k vocab;
- HF ``tokenizers`` over ``tokenizer.json``: exact by construction but ~370 MB of
  RSS for the same vocab, too much for the <200 MB device budget. Used when there
  is no sentencepiece model (e.g. the tiny test checkpoints).
Both add BOS/EOS and truncate to ``max_len`` keeping them, as transformers does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from gemma_edge.errors import ArtifactError

from .runtime import first_line


class TextTokenizer:
    def __init__(self, art_dir: Path, spec: dict[str, Any]):
        self.kind = spec["kind"]
        self.bos_id = spec.get("bos_id")
        self.eos_id = spec.get("eos_id")
        self.add_bos, self.add_eos = bool(spec.get("add_bos")), bool(spec.get("add_eos"))
        path = Path(art_dir) / spec["file"]
        try:
            if self.kind == "sentencepiece":
                import sentencepiece as spm

                self._sp = spm.SentencePieceProcessor(model_file=str(path))
            elif self.kind == "tokenizers":
                from tokenizers import Tokenizer

                self._tok = Tokenizer.from_file(str(path))
                self._tok.no_truncation()
                self._tok.no_padding()
            else:
                raise ArtifactError(f"{art_dir}/manifest.json: unknown tokenizer kind {self.kind!r}")
        except ImportError as exc:
            package = "sentencepiece" if self.kind == "sentencepiece" else "tokenizers"
            raise ArtifactError(f"tokenizer needs the {package!r} package: pip install "
                                f"{package}") from exc
        except ArtifactError:
            raise
        except Exception as exc:  # noqa: BLE001 - both libraries raise bare Exception/RuntimeError
            raise ArtifactError(f"{path}: cannot load the {self.kind} tokenizer ({first_line(exc)}); the "
                                "file is damaged or incomplete, copy the artifacts again") from exc

    def _raw(self, texts: Sequence[str]) -> list[list[int]]:
        if self.kind == "sentencepiece":
            return [list(ids) for ids in self._sp.encode(list(texts))]
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def encode(self, texts: Sequence[str], max_len: int) -> tuple[list[list[int]], list[bool]]:
        """Token ids with BOS/EOS, at most ``max_len`` each, and which texts were truncated."""
        special = int(self.add_bos) + int(self.add_eos)
        out, truncated = [], []
        for ids in self._raw(texts):
            cut = len(ids) + special > max_len
            ids = ids[:max_len - special]
            if self.add_bos:
                ids = [self.bos_id] + ids
            if self.add_eos:
                ids = ids + [self.eos_id]
            out.append(ids)
            truncated.append(cut)
        return out, truncated
