"""Load an EmbeddingGemma checkpoint in the sentence-transformers layout.

Layout (what ``SentenceTransformer.save`` writes and the hub repo holds)::

    DIR/config.json, model.safetensors          Gemma3 text encoder (transformers)
    DIR/tokenizer.json [tokenizer.model ...]    tokenizer
    DIR/modules.json                            Transformer, Pooling, Dense, Dense, Normalize
    DIR/1_Pooling/config.json                   mean pooling
    DIR/2_Dense/, DIR/3_Dense/                  config.json + model.safetensors
    DIR/config_sentence_transformers.json       task prompts

We read the files directly rather than through ``SentenceTransformer(...)`` so
that every way a checkpoint can be broken gets its own message; the
sentence-transformers model is still the numerical reference in verification.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from gemma_edge.atomic_files import sha256_file
from gemma_edge.errors import CheckpointError, HubUnreachableError

SUPPORTED_MODEL_TYPES = ("gemma3_text",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
DEFAULT_PROMPTS = {"query": "task: search result | query: ", "document": "title: none | text: "}


@dataclass
class DenseLayer:
    """One sentence-transformers Dense module: y = act(W x + b); EmbeddingGemma's are linear."""

    weight: Any  # torch.Tensor [out, in]
    bias: Optional[Any]
    folder: str


@dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]
    prompts: dict[str, str]
    dense: list[DenseLayer]
    tokenizer_files: list[str]
    weights_path: Path
    source: str
    _sha256: Optional[str] = field(default=None, repr=False)

    @property
    def hidden_size(self) -> int:
        return int(self.config["hidden_size"])

    @property
    def output_dim(self) -> int:
        return int(self.dense[-1].weight.shape[0]) if self.dense else self.hidden_size

    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = sha256_file(self.weights_path)
        return self._sha256

    def state_dict(self) -> dict[str, Any]:
        """Encoder weights as float32 torch tensors, keys without any ``model.`` prefix."""
        import torch
        from safetensors.torch import load_file

        raw = load_file(str(self.weights_path))
        check_finite(self.weights_path, raw)
        return {k.removeprefix("model."): v.to(torch.float32) for k, v in raw.items()}


def check_finite(path: Path, tensors: dict[str, Any]) -> None:
    """Refuse NaN or infinite weights, naming the file and tensor.

    Such a checkpoint converts without complaint and gives NaN vectors (whose cosine
    checks a NaN passes unless written for it), or kills the int8 quantiser minutes later.
    """
    import torch

    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise CheckpointError(f"{path}: tensor {name!r} holds {bad} non-finite "
                                  f"value{'s' if bad > 1 else ''} (NaN or infinity) of "
                                  f"{tensor.numel()}; the checkpoint is corrupted or diverged "
                                  "in training: use another one")


def resolve_checkpoint(spec: str) -> Path:
    """A local directory as is; anything else is taken as a hub id and downloaded."""
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: is a file; pass the checkpoint DIRECTORY "
                                  "(sentence-transformers layout)")
        return path
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").replace("/", "", 1):
        raise CheckpointError(f"{spec}: no such directory")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise CheckpointError("huggingface_hub is not installed; pass a local checkpoint "
                              "directory instead") from exc
    try:
        return Path(snapshot_download(repo_id=spec))
    except Exception as exc:  # noqa: BLE001 - many network error types, one answer
        raise HubUnreachableError(
            f"{spec}: could not download from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). On an offline machine pass a "
            "local directory in the sentence-transformers layout, e.g. "
            "`--checkpoint ~/models/embeddinggemma-300m` (make export CHECKPOINT=DIR)") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: missing") from exc
    except ValueError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc


def check_safetensors(path: Path) -> None:
    """Fail early, with the file named, on a truncated or foreign safetensors file.

    safetensors' own error for a short file ("incomplete metadata") does not say
    which of the three files is broken, nor that the cause is an interrupted copy.
    """
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    try:
        with open(path, "rb") as handle:
            (header_len,) = struct.unpack("<Q", handle.read(8))
            if header_len > size - 8:
                raise ValueError("header longer than the file")
            header = json.loads(handle.read(header_len))
    except (struct.error, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc}); "
                              "download the checkpoint again") from exc
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    expected = 8 + header_len + (max(ends) if ends else 0)
    if size < expected:
        raise CheckpointError(f"{path}: truncated ({size} bytes, the header describes "
                              f"{expected}); download the checkpoint again")


def _load_dense(root: Path, folder: str) -> DenseLayer:
    from safetensors.torch import load_file

    cfg = _read_json(root / folder / "config.json")
    act = cfg.get("activation_function", "torch.nn.modules.linear.Identity")
    if not act.endswith("Identity"):
        raise CheckpointError(f"{root / folder}: activation {act!r} is not supported "
                              "(EmbeddingGemma's Dense layers are linear)")
    weights = root / folder / "model.safetensors"
    check_safetensors(weights)
    tensors = load_file(str(weights))
    check_finite(weights, tensors)
    if "linear.weight" not in tensors:
        raise CheckpointError(f"{weights}: no 'linear.weight' tensor")
    weight = tensors["linear.weight"].float()
    if tuple(weight.shape) != (cfg["out_features"], cfg["in_features"]):
        raise CheckpointError(f"{weights}: weight shape {tuple(weight.shape)} does not match "
                              f"config ({cfg['out_features']}, {cfg['in_features']})")
    bias = tensors.get("linear.bias")
    return DenseLayer(weight=weight, bias=None if bias is None else bias.float(), folder=folder)


def load_checkpoint(spec: str | Path) -> Checkpoint:
    root = resolve_checkpoint(str(spec))
    config = _read_json(root / "config.json")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(f"{root / 'config.json'}: model_type {model_type!r}; gemma-edge "
                              f"exports EmbeddingGemma ({', '.join(SUPPORTED_MODEL_TYPES)})")
    if not config.get("use_bidirectional_attention", False):
        raise CheckpointError(f"{root / 'config.json'}: use_bidirectional_attention is not true; "
                              "this is a causal Gemma 3 LM, not an EmbeddingGemma encoder")
    weights = root / "model.safetensors"
    check_safetensors(weights)

    modules = _read_json(root / "modules.json") if (root / "modules.json").exists() else None
    if modules is None:
        raise CheckpointError(f"{root}: no modules.json; expected the sentence-transformers "
                              "layout (Transformer, Pooling, Dense, Dense, Normalize)")
    kinds = [m["type"].rsplit(".", 1)[-1] for m in modules]
    pooling = [m for m in modules if m["type"].endswith("Pooling")]
    if not pooling:
        raise CheckpointError(f"{root / 'modules.json'}: no Pooling module")
    pool_cfg = _read_json(root / pooling[0]["path"] / "config.json")
    is_mean = pool_cfg.get("pooling_mode_mean_tokens") or pool_cfg.get("pooling_mode") == "mean"
    if not is_mean or not pool_cfg.get("include_prompt", True):
        raise CheckpointError(f"{root / pooling[0]['path']}: only mean pooling over all tokens "
                              "(prompt included) is supported")
    dense_folders = [m["path"] for m in modules if m["type"].endswith("Dense")]
    if not dense_folders:
        raise CheckpointError(f"{root / 'modules.json'}: no Dense modules; EmbeddingGemma "
                              "projects 768->3072->768 after pooling (2_Dense, 3_Dense)")
    for folder in dense_folders:
        if not (root / folder).is_dir():
            raise CheckpointError(f"{root / folder}: Dense layer folder missing; the checkpoint "
                                  "is incomplete")
    if "Normalize" not in kinds:
        raise CheckpointError(f"{root / 'modules.json'}: no Normalize module")
    dense = [_load_dense(root, f) for f in dense_folders]
    if dense[0].weight.shape[1] != config["hidden_size"]:
        raise CheckpointError(f"{root / dense_folders[0]}: input size {dense[0].weight.shape[1]} "
                              f"!= hidden_size {config['hidden_size']}")

    st_cfg_path = root / "config_sentence_transformers.json"
    prompts = dict(DEFAULT_PROMPTS)
    if st_cfg_path.exists():
        prompts.update(_read_json(st_cfg_path).get("prompts") or {})
    tok_files = [n for n in TOKENIZER_FILES if (root / n).is_file()]
    if "tokenizer.json" not in tok_files:
        raise CheckpointError(f"{root}: no tokenizer.json (the fast tokenizer file the device "
                              "runtime needs)")
    return Checkpoint(root=root, config=config, prompts=prompts, dense=dense,
                      tokenizer_files=tok_files, weights_path=weights, source=str(spec))
