"""research/eval_compare.py: the before/after table of two eval reports' short sentences."""

from __future__ import annotations

import json

import pytest

from gemma_edge.errors import InputError


def _report(path, mean, below, langs=("ar", "he")):
    fig = {"n": 72, "mean": mean, "min": mean - 0.05, "p1": mean - 0.02, "below": below}
    entry = {"all": fig, "per_language": {lang: fig for lang in langs},
             "per_band": {"17-20": fig, "<=16": fig}}
    path.write_text(json.dumps({"short": {"precisions": {"full-int8": {"document": {
        "768": entry}}}}}))
    return path


def test_the_table_has_every_language_and_band_of_either_report(tmp_path, capsys):
    from research.eval_compare import main

    before = _report(tmp_path / "a.json", 0.9920, 9)
    after = _report(tmp_path / "b.json", 0.9960, 0, langs=("ar", "th"))
    assert main([str(before), str(after)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2] == "| all | 72 | 0.9920 | 0.9420 | 0.9720 | 9 | 0.9960 | 0.9460 | 0.9760 | 0 |"
    he = next(line for line in out if line.startswith("| he "))
    th = next(line for line in out if line.startswith("| th "))
    assert he.endswith("| - | - | - | - |") and "| - | - | - | - | 0.9960" in th
    assert any(line.startswith("| 17-20 tok |") for line in out)
    assert any(line.startswith("| <=16 tok |") for line in out)


def test_bad_reports_are_named(tmp_path):
    from research.eval_compare import short_figures

    with pytest.raises(InputError, match="not a readable eval report"):
        short_figures(tmp_path / "missing.json", "full-int8", None, 768)
    (tmp_path / "plain.json").write_text('{"queries": 1}')
    with pytest.raises(InputError, match="no short-sentence figures; run `gemma-edge eval`"):
        short_figures(tmp_path / "plain.json", "full-int8", None, 768)
    report = _report(tmp_path / "r.json", 0.99, 0)
    with pytest.raises(InputError, match="no precision 'int8' \\(has full-int8\\)"):
        short_figures(report, "int8", None, 768)
    with pytest.raises(InputError, match="no 'document' prompt at 128-d"):
        short_figures(report, "full-int8", None, 128)
