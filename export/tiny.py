"""Build a tiny random EmbeddingGemma-shaped checkpoint, entirely offline.

Used by the tests and by ``make demo``: the real checkpoint is 1.2 GB and the
hub is not always reachable, but the full pipeline (export, verify, embed,
search) must be exercised anyway. The result is a genuine sentence-transformers
directory (Gemma3 bidirectional encoder + mean pooling + two Dense + Normalize)
with a real trained BPE tokenizer, so loading code runs exactly as for the real
model. Weights are random but norm gains are perturbed away from zero so that
the (1 + w) handling is actually tested.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Optional

PROMPTS = {
    "query": "task: search result | query: ",
    "document": "title: none | text: ",
    "Classification": "task: classification | query: ",
    "STS": "task: sentence similarity | query: ",
}

_TOKENIZER_TEXT = [
    "task: search result | query: title: none | text: task: classification | query:",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Edge TPU accelerators run int8 graphs; the CPU runs the rest of the model.",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Le renard brun rapide saute par-dessus le chien paresseux.",
    "El zorro marrón salta sobre el perro perezoso en la orilla.",
    "素早い茶色の狐がのろまな犬を飛び越える。",
    "快速的棕色狐狸跳过了懒狗。",
    "def embed(texts): return model.encode(texts, normalize=True)",
    "Battery life, screen size, price and warranty of the new phone.",
    "Semantic search finds documents by meaning rather than by keywords.",
]


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TOKENIZER_TEXT * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", pair="<bos> $A <eos> $B <eos>",
        special_tokens=[("<bos>", tok.token_to_id("<bos>")), ("<eos>", tok.token_to_id("<eos>"))])
    return tok


def build_tiny_checkpoint(out_dir: str | Path, *, seed: int = 0, hidden_size: int = 96,
                          num_layers: int = 4, num_heads: int = 3, head_dim: int = 32,
                          intermediate_size: int = 144, sliding_window: int = 8,
                          dense_hidden: int = 256, output_dim: int = 256,
                          vocab_size: int = 600, dense_bias: bool = False, num_kv_heads: int = 1,
                          layer_types: Optional[list[str]] = None) -> Path:
    """Write a random EmbeddingGemma-shaped sentence-transformers checkpoint to ``out_dir``."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel, PreTrainedTokenizerFast

    try:
        from sentence_transformers.sentence_transformer import modules as st_modules
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers import models as st_modules
    from sentence_transformers import SentenceTransformer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tok = _train_tokenizer(vocab_size)
    real_vocab = tok.get_vocab_size()
    if layer_types is None:
        layer_types = (["sliding_attention", "sliding_attention", "full_attention"] * num_layers)
        layer_types = layer_types[:num_layers]
    config = Gemma3TextConfig(
        vocab_size=real_vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, sliding_window=sliding_window, layer_types=layer_types,
        use_bidirectional_attention=True, query_pre_attn_scalar=head_dim,
        max_position_embeddings=2048, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    model = Gemma3TextModel(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(0.0, 0.3)
            else:
                param.normal_(0.0, 0.5 if "embed_tokens" in name else 0.08)

    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "hf"
        model.save_pretrained(hf_dir, safe_serialization=True)
        tok.save(str(hf_dir / "tokenizer.json"))
        fast = PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"),
                                       bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                       unk_token="<unk>", model_max_length=2048)
        fast.save_pretrained(hf_dir)
        transformer = st_modules.Transformer(str(hf_dir))
        pooling = st_modules.Pooling(hidden_size, pooling_mode="mean")
        identity = torch.nn.Identity()
        dense1 = st_modules.Dense(hidden_size, dense_hidden, bias=dense_bias,
                                  activation_function=identity)
        dense2 = st_modules.Dense(dense_hidden, output_dim, bias=dense_bias,
                                  activation_function=identity)
        with torch.no_grad():
            for dense in (dense1, dense2):
                dense.linear.weight.normal_(0.0, dense.linear.weight.shape[1] ** -0.5)
                if dense_bias:
                    dense.linear.bias.normal_(0.0, 0.1)
        st = SentenceTransformer(
            modules=[transformer, pooling, dense1, dense2, st_modules.Normalize()],
            prompts=PROMPTS, device="cpu")
        staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=out_dir.parent
                                        if out_dir.parent.exists() else None))
        try:
            st.save(str(staging))
            meta = {"gemma_edge_tiny": True, "seed": seed}
            (staging / "gemma_edge_tiny.json").write_text(json.dumps(meta))
            if out_dir.exists():
                shutil.rmtree(out_dir)
            shutil.move(str(staging), str(out_dir))
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return out_dir
