"""The export-friendly encoder computes what transformers/sentence-transformers compute."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gemma_edge.device.packing import bucket_inputs
from gemma_edge.export.checkpoint import load_checkpoint
from gemma_edge.export.encoder import BucketEncoder, EncoderSpec, build_encoder


def _run(core, table, ids_list, seq_len, slots=4):
    enc = BucketEncoder(core, seq_len).eval()
    rows = np.zeros((1, seq_len, table.shape[1]), np.float32)
    start = 0
    for ids in ids_list:
        rows[0, start:start + len(ids)] = table[ids].numpy()
        start += len(ids)
    mask, pool = bucket_inputs([len(i) for i in ids_list], seq_len, slots)
    with torch.no_grad():
        out = enc(torch.from_numpy(rows), torch.from_numpy(mask), torch.from_numpy(pool))
    return out[0, :len(ids_list)].numpy()


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from sentence_transformers import SentenceTransformer

    ck = load_checkpoint(tiny_checkpoint)
    core, table = build_encoder(ck)
    st = SentenceTransformer(str(tiny_checkpoint), device="cpu")
    return ck, core, table, st


TEXTS = ["short one", "The quick brown fox jumps over the lazy dog near the river bank. " * 2,
         "Der schnelle braune Fuchs springt über den faulen Hund.", ""]


@pytest.mark.parametrize("prompt_name", ["query", "document"])
def test_matches_sentence_transformers(tiny, prompt_name):
    ck, core, table, st = tiny
    ref = st.encode(TEXTS, prompt_name=prompt_name, normalize_embeddings=True)
    for text, expected in zip(TEXTS, ref):
        ids = st.tokenizer(ck.prompts[prompt_name] + text)["input_ids"]
        seq_len = 64 if len(ids) > 16 else 16
        ours = _run(core, table, [ids], seq_len)[0]
        assert float(ours @ expected) >= 0.99999, (text, len(ids))


def test_sliding_window_is_exercised_and_exact(tiny):
    """Texts much longer than the tiny window radius (5) must still match exactly."""
    ck, core, table, st = tiny
    assert core.spec.window_radius == 5
    text = "Edge devices embed text locally so private notes stay private. " * 3
    ids = st.tokenizer(text)["input_ids"][:60]
    assert len(ids) > 4 * core.spec.window_radius
    ref = st.encode([st.tokenizer.decode(ids[1:-1])], normalize_embeddings=True)[0]
    ids2 = st.tokenizer(st.tokenizer.decode(ids[1:-1]))["input_ids"]
    ours = _run(core, table, [ids2], 64)[0]
    assert float(ours @ ref) >= 0.99999


def test_packed_equals_one_by_one(tiny):
    ck, core, table, st = tiny
    ids = [st.tokenizer(t)["input_ids"] for t in ("alpha beta", "the lazy dog sleeps", "x")]
    together = _run(core, table, ids, 64)
    for i, one in enumerate(ids):
        alone = _run(core, table, [one], 64)[0]
        np.testing.assert_allclose(together[i], alone, atol=2e-5)


def test_dense_bias_uses_true_mean(tmp_path):
    """With a Dense bias, sum pooling would be wrong: the encoder must divide by the count."""
    from sentence_transformers import SentenceTransformer

    from gemma_edge.export.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "biased", dense_bias=True, num_layers=2, seed=3)
    ck = load_checkpoint(path)
    core, table = build_encoder(ck)
    assert core.dense_has_bias
    st = SentenceTransformer(str(path), device="cpu")
    ids = st.tokenizer("bias matters here")["input_ids"]
    ref = st.encode(["bias matters here"], normalize_embeddings=True)[0]
    assert float(_run(core, table, [ids], 16)[0] @ ref) >= 0.99999


@pytest.mark.parametrize("heads,kv_heads", [(3, 3), (4, 2)])
def test_multi_kv_head_path(tmp_path, heads, kv_heads):
    """The grouped-query path (more than one KV head, groups of 1 and 2) is exact too."""
    from sentence_transformers import SentenceTransformer

    from gemma_edge.export.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "mha", num_heads=heads, num_kv_heads=kv_heads,
                                 num_layers=3, seed=5)
    ck = load_checkpoint(path)
    core, table = build_encoder(ck)
    assert (core.spec.num_heads, core.spec.num_kv_heads) == (heads, kv_heads)
    st = SentenceTransformer(str(path), device="cpu")
    text = "grouped query attention with several heads " * 2
    ids = st.tokenizer(text)["input_ids"]
    ref = st.encode([text], normalize_embeddings=True)[0]
    assert float(_run(core, table, [ids], 64)[0] @ ref) >= 0.99999


def test_window_radius_follows_transformers():
    """transformers maps a bidirectional window W to |i - j| < W // 2 + 1 (512 -> 257)."""
    from transformers import Gemma3TextConfig

    base = {"num_hidden_layers": 2, "hidden_size": 768, "intermediate_size": 1152,
            "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 256,
            "vocab_size": 1000, "model_type": "gemma3_text", "use_bidirectional_attention": True,
            "sliding_window": 512}
    spec = EncoderSpec.from_config(base)
    assert spec.window_radius == 257
    hf = Gemma3TextConfig(**{k: v for k, v in base.items() if k != "model_type"})
    assert hf.sliding_window == spec.window_radius
