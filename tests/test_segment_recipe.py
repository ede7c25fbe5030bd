"""SegmentRecipe: the segments' named recipe, validated in one place for the export's
flags (--edgetpu-...) and the research study's (--...)."""

from __future__ import annotations

import math

import pytest

from gemma_edge.errors import InputError
from gemma_edge.export.segments.recipe import DEFAULT_RECIPE, SegmentRecipe


def test_the_shipped_recipe_is_valid_and_recorded_in_the_manifest_format():
    assert DEFAULT_RECIPE.validate() is DEFAULT_RECIPE
    recorded = DEFAULT_RECIPE.to_json()
    # the manifest's "smoothing" keys, mlp_groups included (a format field: one group)
    assert set(recorded) == {"attn_in", "v", "ff_in", "act", "mlp_groups", "mlp_host_sum",
                             "mlp_split", "softmax_split", "softmax_split_from",
                             "host_attention_upto"}
    assert recorded["mlp_groups"] == 1 and recorded["mlp_split"] == 0.125
    # the short buckets' attention core on the host (issue 20); larger ones keep theirs
    assert DEFAULT_RECIPE.graphs_per_layer(64) == 3 and DEFAULT_RECIPE.graphs_per_layer(128) == 2


def test_with_splits_changes_only_what_is_given():
    assert DEFAULT_RECIPE.with_splits() is DEFAULT_RECIPE
    one = DEFAULT_RECIPE.with_splits(mlp_split=0.0)
    assert one.mlp_split == 0.0 and one.softmax_split == DEFAULT_RECIPE.softmax_split
    both = DEFAULT_RECIPE.with_splits(0.25, 0.0)
    assert (both.mlp_split, both.softmax_split) == (0.25, 0.0)
    none = DEFAULT_RECIPE.with_splits(host_attention_upto=0)
    assert none.host_attention_upto == 0 and none.graphs_per_layer(16) == 2


@pytest.mark.parametrize("recipe,prefix,message", [
    (SegmentRecipe(mlp_split=1.0), "--edgetpu-", "--edgetpu-mlp-split 1.0: a fraction in [0, 1)"),
    (SegmentRecipe(mlp_split=math.nan), "--", "--mlp-split nan: a fraction in [0, 1)"),
    (SegmentRecipe(softmax_split=-0.1), "--edgetpu-", "--edgetpu-softmax-split -0.1"),
    (SegmentRecipe(softmax_split=math.nan), "--", "--softmax-split nan"),
    (SegmentRecipe(softmax_split_from=-1), "--", "--softmax-split-from -1: a bucket length"),
    (SegmentRecipe(host_attention_upto=-64), "--edgetpu-",
     "--edgetpu-host-attention-upto -64: a bucket length"),
    (SegmentRecipe(host_attention_upto=64.5), "--", "--host-attention-upto 64.5"),
    (SegmentRecipe(attn_in=1.5), "--", "--smoothing 1.5,0.75,0.6,0.45: four values in [0, 1]"),
    (SegmentRecipe(act=math.nan), "--", "four values in [0, 1]"),
])
def test_bad_values_name_the_flag_that_set_them(recipe, prefix, message):
    with pytest.raises(InputError) as exc:
        recipe.validate(prefix)
    assert message in str(exc.value)


def test_the_export_options_validate_through_the_recipe():
    from gemma_edge.export.pipeline import ExportOptions

    options = ExportOptions(edgetpu_mlp_split=0.0, edgetpu_softmax_split=0.25)
    assert options.segment_recipe() == DEFAULT_RECIPE.with_splits(0.0, 0.25)
    with pytest.raises(InputError, match="--edgetpu-softmax-split 1.5"):
        ExportOptions(edgetpu_softmax_split=1.5).segment_recipe()
