"""Numerical verification of an export against sentence-transformers.

Every stage is checked against the reference the user would otherwise run
(``SentenceTransformer(checkpoint).encode``): the PyTorch re-implementation, then
the TFLite graph through the very device code path (``gemma_edge.device.Embedder``:
tokenizer, on-disk table, bucketing, graph, MRL).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from gemma_edge.errors import VerificationError

SAMPLE_TEXTS = [
    "How do I reset my router to factory settings?",
    "Die Katze schläft auf dem warmen Fensterbrett, während draußen der Regen fällt.",
    "La réunion du conseil municipal a été reportée à jeudi prochain en raison de la grève.",
    "¿Cuál es la mejor manera de conservar el pan fresco durante varios días?",
    "東京の天気は明日から週末にかけて晴れる見込みです。",
    "如何在Python中读取一个大型CSV文件而不耗尽内存？",
    "Привет! Ты не знаешь, во сколько сегодня закрывается аптека на углу?",
    "एक स्वस्थ जीवनशैली के लिए नियमित व्यायाम और संतुलित आहार आवश्यक है।",
    "ما هي أفضل الأوقات لزيارة المتاحف في المدينة القديمة؟",
    "SELECT name, COUNT(*) FROM orders GROUP BY name HAVING COUNT(*) > 3;",
    "",
]


def length_targeted_texts(count_tokens: Any, buckets: Sequence[int]) -> list[str]:
    """One text per bucket whose token count falls inside that bucket (not a smaller one)."""
    base = ("Edge devices embed text locally so that private notes never leave the machine; "
            "the encoder reads every token and the pooled vector is projected twice. ")
    out, low = [], 0
    for bucket in sorted(buckets):
        target = (low + bucket) // 2 + 1
        text = base
        while count_tokens(text) < target:
            text += base
        words = text.split(" ")
        while len(words) > 1 and count_tokens(" ".join(words)) > bucket - 12:
            words = words[:-1]
        if count_tokens(" ".join(words)) > low:
            out.append(" ".join(words))
        low = bucket
    return out


def reference_model(checkpoint_dir: Path, max_seq_len: int) -> Any:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(checkpoint_dir), device="cpu", local_files_only=True)
    model.max_seq_length = max_seq_len
    return model


def reference_embeddings(model: Any, texts: Sequence[str], prompt_name: Optional[str]
                         ) -> np.ndarray:
    return model.encode(list(texts), prompt_name=prompt_name, convert_to_numpy=True,
                        normalize_embeddings=True, batch_size=8, show_progress_bar=False)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def cosine_stats(a: np.ndarray, b: np.ndarray, dims: Sequence[int]) -> dict[str, Any]:
    """Per MRL dim: mean / min / 1st percentile of per-text cosine."""
    from gemma_edge.device.embedder import truncate_dim

    stats = {}
    for dim in dims:
        cos = cosine_rows(truncate_dim(a, dim), truncate_dim(b, dim))
        stats[str(dim)] = {"mean": float(cos.mean()), "min": float(cos.min()),
                           "p1": float(np.percentile(cos, 1)), "n": int(cos.size)}
    return stats


def tokenizers_agree(checkpoint_dir: Path, texts: Sequence[str]) -> tuple[bool, int]:
    """Does sentencepiece (tokenizer.model) give the fast tokenizer's ids on ``texts``?"""
    model_file = Path(checkpoint_dir) / "tokenizer.model"
    if not model_file.is_file():
        return False, 0
    import sentencepiece as spm
    from tokenizers import Tokenizer

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    fast = Tokenizer.from_file(str(Path(checkpoint_dir) / "tokenizer.json"))
    fast.no_truncation()
    mismatches = 0
    for text, enc in zip(texts, fast.encode_batch(list(texts), add_special_tokens=False)):
        if list(sp.encode(text)) != enc.ids:
            mismatches += 1
    return mismatches == 0, mismatches


def _shared_int8_embedder(emb: Any, cache_dir: Path) -> Optional[Any]:
    """An Embedder that runs the one-file int8 export (weight cache in ``cache_dir``), when
    ``emb`` (int8, Interpreter path) has one and LiteRT's CompiledModel runs here."""
    from gemma_edge.device import Embedder
    from gemma_edge.manifest import find_graph

    if emb.graph_role != "int8" or find_graph(emb.manifest, "int8-shared") is None:
        return None
    shared = Embedder(emb.art_dir, backend="cpu", precision="int8", weight_cache=cache_dir)
    return shared if shared.graphs.weight_cache is not None else None


def verify_artifacts(art_dir: Path, checkpoint_dir: Path, precision: str,
                     min_cosine: float, texts: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Embed sample texts through the device runtime and compare with sentence-transformers.

    Raises VerificationError when any text's cosine falls below ``min_cosine``
    at the full dimension.
    """
    from gemma_edge.device import Embedder

    # no XNNPACK weight cache: a one-off run on the workstation (and a staging folder)
    emb = Embedder(art_dir, backend="cpu", precision=precision, weight_cache=False)
    reference = reference_model(checkpoint_dir, emb.max_tokens)
    if texts is None:
        def count(text: str) -> int:
            return len(emb.tokenizer.encode([emb.prompts.get("document", "") + text],
                                            10**6)[0][0])

        texts = list(SAMPLE_TEXTS) + length_targeted_texts(count, emb.buckets)
    result: dict[str, Any] = {"texts": len(texts)}
    mins: list[float] = []
    with tempfile.TemporaryDirectory(prefix="gemma-edge-verify-") as cache:
        shared = _shared_int8_embedder(emb, Path(cache))
        for prompt_name in ("query", "document"):
            ours = emb.encode(texts, prompt_name=prompt_name)
            bad = int(np.count_nonzero(~np.isfinite(ours).all(axis=1)))
            if bad:
                raise VerificationError(
                    f"{precision} TFLite export: {bad} of {len(texts)} {prompt_name} vectors are "
                    "not finite (NaN or infinity); the conversion is wrong, nothing was written")
            theirs = reference_embeddings(reference, texts, prompt_name)
            stats = cosine_stats(ours, theirs, emb.mrl_dims)
            result[prompt_name] = stats
            mins.append(stats[str(emb.output_dim)]["min"])
            if shared is not None:  # the one-file int8 export must give the same vectors
                diff = float(np.abs(shared.encode(texts, prompt_name=prompt_name) - ours).max())
                result["shared_file_max_abs_diff"] = max(
                    diff, result.get("shared_file_max_abs_diff", 0.0))
                if not diff <= 1e-4:  # written so that NaN fails
                    raise VerificationError(
                        f"{precision}: the one-file int8 graph differs from the per-bucket "
                        f"graphs by {diff:.2e}; nothing was written")
    # np.min keeps a NaN (Python's min(1.0, nan) is 1.0) and the test below fails on it
    result["min_cosine"] = worst = float(np.min(mins))
    if not worst >= min_cosine:
        raise VerificationError(
            f"{precision} TFLite export disagrees with sentence-transformers: min cosine {worst:.6f} "
            f"< {min_cosine} over {len(texts)} texts ({result}). The conversion is wrong; "
            "nothing was written")
    return result
