"""Issue 19, device side: the device never hands out a wrong or non-finite vector silently.

Files are checked against the manifest's SHA-256 at their first open (then remembered by
their stat), the XNNPACK weight cache is keyed by the verified hash and checked against
its own record, NaN output is an error, and bad input is a one-line error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from gemma_edge.atomic_files import atomic_write_json
from gemma_edge.device import Embedder, verify
from gemma_edge.device.weight_cache import compiled_model_api
from gemma_edge.errors import ArtifactError, InputError
from gemma_edge.manifest import describe_files

needs_compiled = pytest.mark.skipif(compiled_model_api() is None,
                                    reason="this LiteRT runtime has no CompiledModel API")
QUERIES = ["hello", "a longer query about embedded retrieval on boards"]


@pytest.fixture
def art(tiny_artifacts, tmp_path, monkeypatch):
    """A private copy of the tiny artifacts and a private cache folder (verified records)."""
    monkeypatch.setenv("GEMMA_EDGE_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "art"
    shutil.copytree(tiny_artifacts, copy)
    return copy


@pytest.fixture
def hashed(monkeypatch):
    """The artifact files hashed by device/verify.py, in order."""
    names = []
    real = verify.sha256_file

    def counting(path, *args):
        names.append(Path(path).name)
        return real(path, *args)

    monkeypatch.setattr(verify, "sha256_file", counting)
    return names


def flip(path: Path, at: float = 0.5, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of ``path`` in place (size unchanged)."""
    data = bytearray(path.read_bytes())
    start = int(len(data) * at)
    data[start:start + count] = bytes(b ^ 0xFF for b in data[start:start + count])
    with open(path, "r+b") as handle:
        handle.write(data)


def rehash(art: Path, *names: str) -> None:
    """Record ``names``' current content in the manifest (a consistent but bad export)."""
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["files"].update(describe_files(art, list(names)))
    atomic_write_json(art / "manifest.json", manifest)


def edit_manifest(art: Path, change) -> None:
    """Apply ``change`` (in place) to manifest.json; None writes a JSON list instead."""
    manifest = json.loads((art / "manifest.json").read_text())
    if change is None:
        manifest = []
    else:
        change(manifest)
    (art / "manifest.json").write_text(json.dumps(manifest))


# -- corrupted files ---------------------------------------------------------------------------
@pytest.mark.parametrize("name,precision,weight_cache", [
    ("token_embeddings.i8.npy", "int8", None),
    ("token_embeddings.f16.npy", "float", False),
    ("encoder_float.tflite", "float", None),
    ("encoder_int8_all.tflite", "int8", None),     # CompiledModel path: the one-file export
    ("encoder_int8_16.tflite", "int8", False),     # Interpreter path: per-bucket files
    ("edgetpu/attn_qkv_32_01.tflite", "full-int8", None),
    ("edgetpu/host.npz", "full-int8", None),
    ("tokenizer.json", "int8", None),
])
def test_a_flipped_byte_in_any_file_is_refused(art, name, precision, weight_cache):
    flip(art / name)
    with pytest.raises(ArtifactError) as info:
        emb = Embedder(art, backend="cpu", precision=precision, weight_cache=weight_cache)
        emb.encode_query(QUERIES)
        for bucket in emb.buckets:  # every graph file of this precision
            emb.runner(bucket)
    message = str(info.value)
    assert f"{art / name}: SHA-256" in message and "differs from the manifest" in message
    assert "\n" not in message


def test_a_wrong_hash_in_the_manifest_is_noticed(art):
    edit_manifest(art, lambda m: m["files"]["encoder_int8_all.tflite"].update(sha256="0" * 64))
    with pytest.raises(ArtifactError, match="encoder_int8_all.tflite: SHA-256 .* differs"):
        Embedder(art, backend="cpu", precision="int8").encode_query(QUERIES)


def test_verified_once_then_remembered_by_stat(art, tmp_path, hashed):
    listing = sorted(p.name for p in art.rglob("*"))
    reference = Embedder(art, backend="cpu", precision="int8").encode_query(QUERIES)
    # lazily: what int8 opens, not the float graph, its table or the segments
    assert sorted(hashed) == sorted(["tokenizer.json", "token_embeddings.i8.npy",
                                     "token_embeddings.i8_scales.npy", "encoder_int8_all.tflite"])
    hashed.clear()
    again = Embedder(art, backend="cpu", precision="int8").encode_query(QUERIES)
    assert hashed == [] and np.array_equal(again, reference)
    # the record lives in the cache folder; the artifacts folder is unchanged
    assert sorted(p.name for p in art.rglob("*")) == listing
    records = list((tmp_path / "cache" / "verified").iterdir())
    assert len(records) == 1 and not [p for p in records[0].parent.iterdir() if ".tmp" in p.name]
    # a file whose stat changed is hashed again (only that one)
    os.utime(art / "token_embeddings.i8.npy")
    Embedder(art, backend="cpu", precision="int8")
    assert hashed == ["token_embeddings.i8.npy"]


def test_corruption_that_restores_the_mtime_is_still_caught(art):
    Embedder(art, backend="cpu", precision="int8").encode_query(QUERIES)  # remembered
    graph = art / "encoder_int8_all.tflite"
    st = graph.stat()
    flip(graph)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime; ctime moved
    with pytest.raises(ArtifactError, match="encoder_int8_all.tflite: SHA-256"):
        Embedder(art, backend="cpu", precision="int8").encode_query(QUERIES)


def test_a_record_that_does_not_match_is_ignored(art, tmp_path, hashed):
    Embedder(art, backend="cpu", precision="int8")
    record = next((tmp_path / "cache" / "verified").iterdir())
    data = json.loads(record.read_text())
    data["files"]["tokenizer.json"]["stamp"][1] += 1  # another mtime: not this file
    record.write_text(json.dumps(data))
    hashed.clear()
    Embedder(art, backend="cpu", precision="int8")
    assert hashed == ["tokenizer.json"]
    record.write_text("{half a rec")  # unreadable: everything is hashed again
    hashed.clear()
    Embedder(art, backend="cpu", precision="int8")
    assert len(hashed) == 3


def test_no_verify_hashes_nothing(art, hashed):
    flip(art / "token_embeddings.i8.npy")
    vectors = Embedder(art, backend="cpu", precision="int8",
                       verify_files=False).encode_query(QUERIES)
    assert hashed == [] and vectors.shape == (2, 256)


def test_cli_no_verify_reaches_the_embedder(monkeypatch):
    from gemma_edge import cli, device

    seen = {}
    monkeypatch.setattr(device, "Embedder", lambda *a, **k: seen.update(k))
    for argv, expected in ((["--no-verify"], False), ([], True)):
        args = cli.build_parser().parse_args(["embed", "--artifacts", "a", "--input", "i",
                                              "--output", "o.npy", *argv])
        cli.make_embedder(args)
        assert seen["verify_files"] is expected


def test_cli_embed_of_a_corrupted_graph_is_one_line_and_nonzero(art, tmp_path, capsys):
    from gemma_edge.cli import main

    flip(art / "encoder_float.tflite")
    (tmp_path / "in.txt").write_text("hello\nworld\n")
    code = main(["embed", "--artifacts", str(art), "--input", str(tmp_path / "in.txt"),
                 "--output", str(tmp_path / "out.npy"), "--precision", "float"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not (tmp_path / "out.npy").exists() and "Traceback" not in err
    last = err.splitlines()[-1]  # (INFO lines may precede it when logging goes to stderr)
    assert last.startswith("gemma-edge embed: error: ") and "encoder_float.tflite: SHA-256" in last


# -- the XNNPACK weight cache ------------------------------------------------------------------
@needs_compiled
def test_warm_weight_cache_does_not_hide_a_corrupted_graph(art, tmp_path):
    cache = tmp_path / "wc"
    Embedder(art, backend="cpu", precision="int8", weight_cache=cache).encode_query(QUERIES)
    flip(art / "encoder_int8_all.tflite")
    with pytest.raises(ArtifactError, match="encoder_int8_all.tflite: SHA-256"):
        Embedder(art, backend="cpu", precision="int8", weight_cache=cache).encode_query(QUERIES)


@needs_compiled
@pytest.mark.parametrize("damage", ["flip", "no-record"])
def test_damaged_weight_cache_is_deleted_and_repacked(art, tmp_path, damage, caplog):
    cache = tmp_path / "wc"
    reference = Embedder(art, backend="cpu", precision="int8",
                         weight_cache=False).encode_query(QUERIES)
    emb = Embedder(art, backend="cpu", precision="int8", weight_cache=cache)
    np.testing.assert_allclose(emb.encode_query(QUERIES), reference, atol=1e-6)
    packed = next(cache.glob("*.xnnpack"))
    record = json.loads((cache / (packed.name + ".json")).read_text())
    assert record["bytes"] == packed.stat().st_size and len(record["sha256"]) == 64
    if damage == "flip":  # payload bytes, header intact: XNNPACK itself accepts it
        flip(packed, at=0.6, count=4096)
    else:
        (cache / (packed.name + ".json")).unlink()
    got = Embedder(art, backend="cpu", precision="int8",
                   weight_cache=cache).encode_query(QUERIES)
    np.testing.assert_allclose(got, reference, atol=1e-6)
    assert "deleted, packing it again" in caplog.text
    fresh = json.loads((cache / (packed.name + ".json")).read_text())
    assert fresh["stamp"] == verify.stat_stamp(packed.stat())


@needs_compiled
def test_unverified_graphs_get_their_own_weight_cache(art, tmp_path):
    """verify_files=False and no remembered hash: the cache is named "unverified" and by
    the file's stat; a verified open never maps it."""
    cache = tmp_path / "wc"
    Embedder(art, backend="cpu", precision="int8", weight_cache=cache,
             verify_files=False).encode_query(QUERIES)
    names = [p.name for p in cache.glob("*.xnnpack")]
    assert len(names) == 1 and "-unverified-" in names[0]
    emb = Embedder(art, backend="cpu", precision="int8", weight_cache=cache)
    emb.encode_query(QUERIES)
    sha = emb.manifest["files"]["encoder_int8_all.tflite"]["sha256"]
    assert emb.graphs.weight_cache.cache_path(sha).exists()
    # now remembered: a --no-verify open uses the verified cache, packs nothing new
    Embedder(art, backend="cpu", precision="int8", weight_cache=cache,
             verify_files=False).encode_query(QUERIES)
    assert len(list(cache.glob("*.xnnpack"))) == 2


# -- non-finite output -------------------------------------------------------------------------
def test_nan_weights_in_a_graph_raise_instead_of_nan_vectors(art):
    graph = art / "encoder_float.tflite"
    data = bytearray(graph.read_bytes())
    middle = len(data) // 2  # inside the weight buffers: 0xFFFFFFFF is a float32 NaN
    data[middle:middle + 4096] = b"\xff" * 4096
    graph.write_bytes(bytes(data))
    rehash(art, graph.name)
    for weight_cache in (None, False):
        emb = Embedder(art, backend="cpu", precision="float", weight_cache=weight_cache)
        with pytest.raises(ArtifactError) as info:
            emb.encode_query(QUERIES)
        message = str(info.value)
        assert message.startswith(f"{art}: the float graph encoder_float.tflite (bucket ")
        assert "returned NaN or inf for 2 of 2 texts" in message


def test_nan_rows_in_the_table_raise(art):
    table = art / "token_embeddings.f16.npy"
    rows = np.load(table)
    rows[:] = np.nan
    np.save(table, rows)
    rehash(art, table.name)
    with pytest.raises(ArtifactError, match=r"token_embeddings.f16.npy: the rows of token ids \[.*"
                                            r"hold NaN or inf"):
        Embedder(art, backend="cpu", precision="float").encode_query(QUERIES)


def test_finite_check_fails_on_nan(art):
    """The check itself: one NaN in one text's vector is enough."""
    emb = Embedder(art, backend="cpu", precision="int8")
    emb.encode_query(QUERIES)
    bucket = next(iter(emb.graphs.runners))
    result = np.full((2, 4), 0.5, dtype=np.float32)  # unit rows
    emb._check_finite(result, bucket)
    result[1, 3] = np.nan
    with pytest.raises(ArtifactError, match="for 1 of 2 texts"):
        emb._check_finite(result, bucket)


def test_an_all_zero_vector_is_refused(art, monkeypatch):
    """tflite-runtime's int8 graph on an emulated arm64 board returned all-zero vectors
    (docs/board-check.md): a vector that is not unit length was not computed."""
    emb = Embedder(art, backend="cpu", precision="int8")
    emb.encode_query(QUERIES)
    runner = next(iter(emb.graphs.runners.values()))
    monkeypatch.setattr(runner, "run", lambda *a: np.zeros((emb.slots, emb.output_dim), np.float32))
    with pytest.raises(ArtifactError, match="2 of 2 vectors that are not unit length"):
        emb.encode_query(QUERIES)


# -- damaged artifacts and bad input: one-line errors ------------------------------------------
def test_truncated_tokenizer_is_an_artifact_error(art):
    path = art / "tokenizer.json"
    path.write_bytes(path.read_bytes()[:5000])
    rehash(art, "tokenizer.json")  # the manifest agrees: the file is still not loadable
    with pytest.raises(ArtifactError, match=r"tokenizer.json: cannot load the tokenizers "
                                            r"tokenizer \(EOF while parsing"):
        Embedder(art, backend="cpu")


@pytest.mark.parametrize("change,expected", [
    (None, r"manifest.json: a JSON list, not the object"),
    (lambda m: m["model"].pop("mrl_dims"), r"manifest.json: 'model' has no 'mrl_dims' entry"),
    (lambda m: m["model"].update(mrl_dims="256"), r"'model' 'mrl_dims' is '256', not a non-empty"),
    (lambda m: m["files"]["tokenizer.json"].pop("bytes"),
     r"manifest.json: file 'tokenizer.json' has no 'bytes' entry"),
    (lambda m: m["graphs"][0].pop("pool_slots"), r"graph 0 has no 'pool_slots' entry"),
    (lambda m: m["tokenizer"].update(file="../../etc/passwd"),
     r"'tokenizer' 'file' is '../../etc/passwd', not a path inside the artifacts folder"),
    (lambda m: m.pop("embedding_tables"), r"the manifest has no 'embedding_tables' entry"),
])
def test_malformed_manifest_names_the_key(art, change, expected):
    edit_manifest(art, change)
    with pytest.raises(ArtifactError, match=expected):
        Embedder(art, backend="cpu")


@pytest.mark.parametrize("kwargs,expected", [
    ({"max_open_graphs": -1}, "max_open_graphs -1: at least 1 (None: no limit)"),
    ({"max_open_graphs": 0}, "max_open_graphs 0: at least 1"),
    ({"pack_tokens": -5}, "pack_tokens -5: at least 0 (0: no packing)"),
    ({"pack_tokens": "64"}, "pack_tokens must be an int, got str '64'"),
    ({"num_threads": 2.5}, "num_threads must be an int, got float 2.5"),
])
def test_bad_options_are_input_errors(tiny_artifacts, kwargs, expected):
    with pytest.raises(InputError) as info:
        Embedder(tiny_artifacts, backend="cpu", **kwargs)
    assert expected in str(info.value)


def test_bad_texts_and_dims_are_input_errors(tiny_artifacts):
    emb = Embedder(tiny_artifacts, backend="cpu", precision="int8")
    with pytest.raises(InputError, match="texts must be a string or a sequence of strings, got "
                                         "NoneType"):
        emb.encode(None)
    with pytest.raises(InputError, match=r"text 1: not valid Unicode \(lone surrogate '\\ud800' "
                                         r"at character 2\)"):
        emb.encode_query(["fine", "ab\ud800cd"])
    with pytest.raises(InputError, match=r"text 0: not valid Unicode"):
        emb.encode_document(["x\udfff"])
    with pytest.raises(InputError, match=r"dim must be an int, got str '128'; the Matryoshka dims "
                                         r"of this model are 256, 128"):
        emb.encode_query(["x"], dim="128")
    assert emb.encode_query(["x"], dim=np.int64(128)).shape == (1, 128)
    assert emb.max_open_graphs is None and emb.pack_tokens == 64  # the defaults still work


def test_cli_jsonl_with_a_lone_surrogate_names_file_and_line(tmp_path, capsys):
    from gemma_edge.cli import main

    source = tmp_path / "in.jsonl"
    source.write_text('{"text": "ok"}\n{"text": "bad \\ud800 here"}\n')
    code = main(["embed", "--artifacts", str(tmp_path), "--input", str(source),
                 "--output", str(tmp_path / "o.npy")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err == (f"gemma-edge embed: error: {source}:2: 'text' is not valid "
                                 "Unicode (lone surrogate '\\ud800' at character 4); fix that line")


def test_cli_output_that_is_a_directory(tmp_path, capsys):
    from gemma_edge.cli import main

    (tmp_path / "in.txt").write_text("hello\n")
    for out in (tmp_path / "outdir", tmp_path / "named.npy"):
        out.mkdir()
        code = main(["embed", "--artifacts", str(tmp_path), "--input", str(tmp_path / "in.txt"),
                     "--output", str(out)])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 2 and err == (f"gemma-edge embed: error: --output {out}: is a directory; "
                                     "pass a file path ending in .npy")
