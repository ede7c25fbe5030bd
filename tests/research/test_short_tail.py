"""research/short_tail.py and short_recipe.py: the short-text diagnosis host loop and the
calibration variants of issue 20, on the tiny model."""

from __future__ import annotations

import math

import numpy as np
import pytest

BUCKET = 32  # the tiny export's segment bucket (conftest.tiny_artifacts)


def test_snr_is_nan_on_nan_and_exact_on_a_known_error():
    from research.short_tail import snr_db

    want = np.ones(100)
    assert math.isclose(snr_db(want, want + 0.1), 20.0, abs_tol=1e-9)  # 1 / 0.01 power
    assert math.isnan(snr_db(want, np.full(100, np.nan)))


def test_packed_in_order_keeps_order_room_and_slots():
    from research.short_recipe import packed_in_order

    ids = [[0] * n for n in (30, 20, 14, 10, 25, 5, 5, 5)]
    groups = packed_in_order(ids, 64, slots=3)
    assert [[len(t) for t in g] for g in groups] == [[30, 20, 14], [10, 25, 5], [5, 5]]
    assert [t for g in groups for t in g] == ids  # every text once, in order
    with pytest.raises(ValueError, match="does not fit"):
        packed_in_order([[0] * 65], 64, slots=3)


@pytest.fixture(scope="module")
def tiny_core(tiny_checkpoint):
    from gemma_edge.export.checkpoint import load_checkpoint
    from gemma_edge.export.encoder import build_encoder

    return build_encoder(load_checkpoint(str(tiny_checkpoint)))[0]


def test_hybrid_host_is_float_or_the_device_loop(tiny_core, tiny_artifacts):
    from gemma_edge.device import Embedder
    from gemma_edge.export.calibration import text_inputs
    from research.short_tail import KINDS, HybridHost, Trace, cosine

    host = Embedder(tiny_artifacts, backend="cpu", precision="float")
    device = Embedder(tiny_artifacts, backend="cpu", precision="full-int8", pack_tokens=0)
    ids, _ = host.tokenizer.encode(["a short one", "another one"], BUCKET)
    assert sum(len(t) for t in ids) <= BUCKET  # both fit one bucket
    hybrid = HybridHost.from_export(tiny_core, tiny_artifacts, BUCKET)
    every = [(i, k) for i in range(len(tiny_core.layers)) for k in KINDS]
    sample = text_inputs(host, ids, BUCKET)  # both texts packed in one bucket
    ref = hybrid.reference(sample)
    none = hybrid.run(sample, [])
    assert min(cosine(a, b) for a, b in zip(ref, none)) > 0.99999  # no segment in int8
    trace = Trace()
    full = hybrid.run(sample, every, trace)
    assert cosine(ref[0], full[0]) < 0.99999  # int8 changed something
    for t in ids:  # one text alone, the device's (int8) token table: its own loop's vector
        mine = hybrid.run(text_inputs(device, [t], BUCKET), every)[0]
        assert cosine(mine, device.embed_ids([t])[0]) > 0.9999
    assert set(trace.local_snr) == set(every)
    assert all(len(v) == 2 and all(np.isfinite(v)) for v in trace.local_snr.values())


def test_calibration_variant_packs_short_texts_of_every_length(tiny_artifacts):
    from gemma_edge.datasets import load_calibration_corpus
    from gemma_edge.device import Embedder
    from research.short_recipe import calibration_variant

    host = Embedder(tiny_artifacts, backend="cpu", precision="float")
    rows = load_calibration_corpus()
    export = calibration_variant(host, rows, 64, 8, "export")
    mixed = calibration_variant(host, rows, 64, 8, "packed-all")
    assert len(export) == len(mixed) == 8
    for a, b in zip(export[:4], mixed[:4]):  # the same single texts: the same channel scales
        assert np.array_equal(a["embeddings"], b["embeddings"])

    def packed_lengths(samples):
        return [int(n) for s in samples[4:] for n in s["pool"][0].sum(-1) if n > 0]

    # the export's packed half is the first first-fit-decreasing bin: the longest texts
    assert np.mean(packed_lengths(mixed)) < np.mean(packed_lengths(export))
    assert min(packed_lengths(mixed)) < min(packed_lengths(export))


def test_cli_refuses_unknown_texts_and_variants(capsys):
    from research.cli import main

    assert main(["short-tail", "--checkpoint", "unused", "--artifacts", "unused",
                 "--ids", "s-xx-999"]) != 0
    assert "no heldout-short text matches" in capsys.readouterr().err
    assert main(["short-recipe", "--checkpoint", "unused", "--artifacts", "unused",
                 "--variant", "export,bogus"]) != 0
    assert "--variant export,bogus" in capsys.readouterr().err


def test_probes_refuse_unknown_ids_and_missing_options(capsys):
    from research.short_probes import main

    assert main(["position", "--checkpoint", "unused", "--artifacts", "unused",
                 "--ids", "s-xx-999"]) != 0
    assert "s-xx-999 not in heldout/short.jsonl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["table", "--artifacts", "unused"])  # no --checkpoint / --ids
