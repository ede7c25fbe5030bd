"""The tail of the evaluation: short sentences per language and length band, the
held-out minimum per precision and dimension, and the checks built on it (issue 20)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from gemma_edge.cli import main
from gemma_edge.export.eval_tail import (
    manifest_short,
    select_short,
    short_entry,
    tail_failures,
    tail_summary,
    tail_warnings,
)
from gemma_edge.export.metrics import cosine_summary, grouped_summary, length_band


def test_length_bands():
    assert [length_band(n) for n in (3, 16, 17, 20, 21, 24, 25, 32, 33, 64, 65, 128, 129, 900)] == [
        "<=16", "<=16", "17-20", "17-20", "21-24", "21-24", "25-32", "25-32", "33-64", "33-64",
        "65-128", "65-128", ">128", ">128"]


def test_cosine_summary_counts_and_nan():
    cos = np.array([0.99, 0.96, 0.98, 0.5])
    s = cosine_summary(cos, 0.97)
    assert s["n"] == 4 and s["below"] == 2 and s["min"] == 0.5
    assert s["mean"] == pytest.approx(cos.mean()) and s["p1"] == pytest.approx(np.percentile(cos, 1))
    broken = cosine_summary(np.array([0.99, np.nan]), 0.97)
    assert math.isnan(broken["min"]) and math.isnan(broken["mean"]) and broken["below"] == 1
    groups = grouped_summary(cos, ["a", "b", "a", "b"], 0.97)
    assert groups["a"]["below"] == 0 and groups["b"]["min"] == 0.5 and groups["b"]["n"] == 2


def test_tail_summary_status_per_dimension_and_nan():
    ok = {"int8": {768: [np.array([0.999, 0.998])], 128: [np.array([0.997]), np.array([0.99])]}}
    tail = tail_summary(ok, 0.97)["int8"]
    assert tail["status"] == "ok" and tail["min"] == pytest.approx(0.99)
    assert tail["per_dim"]["128"]["texts"] == 2 and tail["below"] == 0
    assert tail_failures({"int8": tail}) == [] and tail_warnings({"tail": {"int8": tail}}) == []
    # one dimension below is enough; a stricter limit than the recorded one can be asked for
    assert tail_failures({"int8": tail}, 0.995) and "128-d 0.9900" in tail_failures({"int8": tail}, 0.995)[0]
    low = tail_summary({"full-int8": {768: [np.array([0.99, 0.95, 0.96])],
                                      128: [np.array([0.99, 0.98, 0.975])]}}, 0.97)["full-int8"]
    assert low["status"] == "below target" and low["below"] == 2 and low["min"] == pytest.approx(0.95)
    [line] = tail_failures({"full-int8": low})
    assert "768-d 0.9500" in line and "128-d" not in line
    assert tail_warnings({"tail": {"full-int8": low}})[0].startswith("WARNING: full-int8")
    broken = tail_summary({"int8": {768: [np.array([0.999, np.nan])]}}, 0.97)["int8"]
    assert broken["status"] == "below target" and math.isnan(broken["min"])
    assert tail_failures({"int8": broken})


def test_select_short_keeps_every_language():
    rows = [{"lang": lang, "id": f"{lang}{i}"} for lang in ("ar", "en") for i in range(5)]
    assert [r["id"] for r in select_short(rows, 2)] == ["ar0", "ar2", "ar4", "en0", "en2", "en4"]
    assert select_short(rows, 1) == rows
    with pytest.raises(ValueError):
        select_short(rows, 0)


def test_short_entry_worst_first_and_nan_worst():
    rows = [{"id": f"s-{i}", "lang": "ar" if i < 3 else "tr", "text": f"t{i}"} for i in range(5)]
    entry = short_entry(np.array([0.99, 0.95, np.nan, 0.98, 0.97]), rows, [15, 18, 22, 30, 40],
                        0.97, worst=3)
    assert [w["id"] for w in entry["worst"]] == ["s-2", "s-1", "s-4"]
    assert list(entry["per_band"]) == ["<=16", "17-20", "21-24", "25-32", "33-64"]  # in order
    assert entry["per_language"]["tr"]["below"] == 0 and entry["per_language"]["ar"]["below"] == 2
    assert entry["all"]["below"] == 2 and len(entry["cosines"]) == 5
    short = {"texts": 5, "every": 1, "prompts": ["document"], "threshold": 0.97,
             "precisions": {"int8": {"document": {"768": entry, "128": entry}}}}
    compact = manifest_short(short)["precisions"]["int8"]["document"]
    assert "cosines" not in compact["768"] and len(compact["768"]["worst"]) == 3
    assert "worst" not in compact["128"]


def test_eval_reports_short_sentences_and_tail(tiny_artifacts, tiny_checkpoint):
    from gemma_edge.datasets import load_short_heldout
    from gemma_edge.export.evaluate import evaluate
    from gemma_edge.manifest import load_manifest

    report = evaluate(tiny_artifacts, tiny_checkpoint, ["float", "int8"], dims=[256, 128],
                      short_prompts=["document", "query"], short_every=23)
    short = report["short"]
    expected = select_short(load_short_heldout(), 23)
    assert short["texts"] == len(expected) and short["ids"] == [r["id"] for r in expected]
    assert len(short["languages"]) == 23  # every language kept in the subset
    for precision in ("float", "int8"):
        for prompt in ("document", "query"):
            entry = short["precisions"][precision][prompt]["256"]
            assert sum(s["n"] for s in entry["per_language"].values()) == short["texts"]
            assert sum(s["n"] for s in entry["per_band"].values()) == short["texts"]
            worst = [w["cosine"] for w in entry["worst"]]
            assert worst == sorted(worst) and worst[0] == entry["all"]["min"]
    assert short["precisions"]["float"]["document"]["256"]["all"]["min"] > 0.9999
    assert short["precisions"]["int8"]["query"]["128"]["all"]["mean"] < 0.99999
    # the tail: every Matryoshka dim of the model, the retrieval texts and both prompts'
    # short sentences; its minimum is no higher than either part's
    mrl = [str(d) for d in load_manifest(tiny_artifacts)["model"]["mrl_dims"]]
    tail = report["tail"]["int8"]
    assert sorted(tail["per_dim"], key=int) == sorted(mrl, key=int)
    assert tail["per_dim"]["256"]["texts"] == report["queries"] + report["documents"] + 2 * short["texts"]
    assert tail["per_dim"]["256"]["min"] <= min(report["precisions"]["int8"]["256"]["cosine"]["min"],
                                               short["precisions"]["int8"]["query"]["256"]["all"]["min"])
    assert report["tail"]["float"]["status"] == "ok" and report["tail"]["float"]["min"] > 0.9999


def test_eval_cli_fail_below_exits_after_writing_the_report(tiny_artifacts, tiny_checkpoint,
                                                            tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", "--artifacts", str(tiny_artifacts), "--checkpoint", str(tiny_checkpoint),
                 "--precisions", "int8", "--dims", "128", "--short-every", "36",
                 "--short-prompts", "document", "--json", str(out), "--plot", str(tmp_path / "e.png"),
                 "--fail-below", "0.99999"])
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert "int8: held-out minimum cosine to float below 0.99999" in captured.err
    report = json.loads(out.read_text())  # written before the check fails
    assert report["tail"]["int8"]["status"] == "ok"  # the recorded target stays 0.97
    assert "tail int8: OK" in captured.out and "worst at 128" in captured.out
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_evaluation_records_the_tail(tiny_artifacts):
    from gemma_edge.manifest import load_manifest

    ev = load_manifest(tiny_artifacts)["evaluation"]
    mrl = {str(d) for d in load_manifest(tiny_artifacts)["model"]["mrl_dims"]}
    for precision in ("int8", "full-int8"):
        tail = ev["tail"][precision]
        assert set(tail["per_dim"]) == mrl and tail["status"] in ("ok", "below target")
        assert (tail["status"] == "ok") == (tail["min"] >= tail["threshold"] == 0.97)
    assert ev["short"]["prompts"] == ["document"] and ev["short"]["texts"] >= 1000


@pytest.mark.parametrize("args,message", [
    (["--fail-below", "1.5"], "--fail-below 1.5"),
    (["--short-every", "0"], "--short-every 0"),
    (["--short-prompts", "nope"], "prompts ['nope'] unknown"),
])
def test_eval_cli_rejects_bad_tail_options(tiny_artifacts, tiny_checkpoint, tmp_path, capsys,
                                          args, message):
    code = main(["eval", "--artifacts", str(tiny_artifacts), "--checkpoint", str(tiny_checkpoint),
                 "--json", str(tmp_path / "e.json"), *args])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
