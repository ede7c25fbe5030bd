"""research/segment_study.py: the recipe studies (cosine and per-tensor SNR) on the tiny
model, and the research CLI's refusals of bad options."""

from __future__ import annotations

import numpy as np
import pytest

from research.cli import main

BUCKET = 32


@pytest.mark.slow
def test_segment_study_measures_one_recipe(tiny_checkpoint, tiny_artifacts):
    pytest.importorskip("litert_torch")
    from gemma_edge.export.segments import SegmentRecipe
    from research.segment_study import study

    exact = study(str(tiny_checkpoint), tiny_artifacts, BUCKET, SegmentRecipe(), 4, 4, [])
    assert exact["texts"] == 4 and exact["cosine_min"] > 0.99999  # nothing quantised
    mlp = study(str(tiny_checkpoint), tiny_artifacts, BUCKET, SegmentRecipe(), 4, 4, ["mlp"])
    assert 0.5 < mlp["cosine_min"] <= mlp["cosine_mean"] < 0.99999
    # judged on corpus texts held back from the calibration instead of the held-out set
    dev = study(str(tiny_checkpoint), tiny_artifacts, BUCKET, SegmentRecipe(), 4, 4, ["mlp"],
                eval_texts="corpus")
    assert dev["eval_texts"] == "corpus" and dev["texts"] == 4
    assert 0.5 < dev["cosine_min"] <= dev["cosine_mean"] < 0.99999


def test_corpus_split_holds_development_texts_back_from_the_calibration():
    from gemma_edge.datasets import load_calibration_corpus
    from research.segment_study import DEV_EVERY, split_corpus

    cal, dev = split_corpus()
    rows = load_calibration_corpus()
    assert len(cal) + len(dev) == len(rows) and len(dev) == -(-len(rows) // DEV_EVERY)
    assert not {r["id"] for r in cal} & {r["id"] for r in dev}
    assert len({r["lang"] for r in dev}) == len({r["lang"] for r in rows})  # every language


@pytest.mark.slow
def test_tensor_snr_follows_the_error_through_a_segment(tiny_checkpoint, tiny_artifacts):
    """segment-study --tensor-snr: every op output of the int8 segment against the float
    graph of the same segment; the error is small at the first projection and the
    report covers the whole chain down to the output."""
    pytest.importorskip("litert_torch")
    from gemma_edge.errors import InputError
    from gemma_edge.export.segments import SegmentRecipe
    from research.segment_study import tensor_study
    from research.tensor_snr import format_table

    tables = tensor_study(str(tiny_checkpoint), tiny_artifacts, BUCKET, SegmentRecipe(), 4, 4,
                          ["mlp"], [0])
    rows = tables["layer 00 / mlp"]
    ops = [r.op for r in rows]
    # the last op joins the two ranges' partial outputs for the host
    assert ops[0] == "CONV_2D" and ops.count("CONV_2D") == 5 and ops[-1] == "CONCATENATION"
    assert all(np.isfinite(r.snr_db) for r in rows)
    assert rows[0].snr_db > 25.0, rows[0]            # one int8 rounding of a projection
    assert 5.0 < rows[-1].snr_db < rows[0].snr_db    # the output carries the whole chain
    text = format_table("layer 00 / mlp", rows)
    assert "CONV_2D" in text and len(text.splitlines()) == len(rows) + 2
    with pytest.raises(InputError, match="layers 0-"):
        tensor_study(str(tiny_checkpoint), tiny_artifacts, BUCKET, SegmentRecipe(), 4, 4,
                     ["mlp"], [99])


def test_tensor_snr_needs_documents_that_fill_the_bucket(tiny_artifacts):
    """--tensor-snr compares tensors over held-out documents cut to the bucket; a bucket
    longer than every document is refused with what to do, not run on padding."""
    from gemma_edge.errors import InputError
    from research.segment_study import full_bucket_inputs

    inputs = full_bucket_inputs(tiny_artifacts, BUCKET, 2)
    assert len(inputs) == 2 and all(x["pool"][0, 0].sum() == BUCKET for x in inputs)
    with pytest.raises(InputError, match="no held-out document has 100000 tokens"):
        full_bucket_inputs(tiny_artifacts, 100000, 2)


@pytest.mark.parametrize("flag,value,message", [
    ("--smoothing", "0.5,x,0.5,0.5", "four values in [0, 1]"),
    ("--smoothing", "0.5,0.5,0.5", "four values in [0, 1]"),
    ("--kinds", "attn,mlps", "a comma list of attn, mlp"),
    ("--ladder", "64,2x6", "expected comma-separated integers"),
])
def test_segment_study_rejects_bad_options(tmp_path, capsys, flag, value, message):
    with pytest.raises(SystemExit) as exc:
        main(["segment-study", "--checkpoint", str(tmp_path), "--artifacts", str(tmp_path),
              flag, value])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("extra", [["--mlp-split", "1.5"], ["--mlp-split", "-0.1"]])
def test_segment_study_rejects_a_bad_mlp_split(tmp_path, capsys, extra):
    code = main(["segment-study", "--checkpoint", str(tmp_path), "--artifacts", str(tmp_path),
                 *extra])
    assert code != 0 and "a fraction in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["1.0", "-0.5"])
def test_segment_study_rejects_a_bad_softmax_split(tmp_path, capsys, value):
    code = main(["segment-study", "--checkpoint", str(tmp_path), "--artifacts", str(tmp_path),
                 "--softmax-split", value])
    assert code != 0 and "--softmax-split" in capsys.readouterr().err


@pytest.mark.parametrize("extra,flag", [(["--texts", "0"], "--texts"),
                                        (["--softmax-split-from", "-1"], "--softmax-split-from")])
def test_segment_study_rejects_bad_counts(tmp_path, capsys, extra, flag):
    code = main(["segment-study", "--checkpoint", str(tmp_path), "--artifacts", str(tmp_path),
                 *extra])
    assert code != 0 and flag in capsys.readouterr().err
