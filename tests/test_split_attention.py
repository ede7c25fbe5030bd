"""The split attention of the short buckets (export/segments/split_attention.py): exact in
float, two fully int8 projection graphs, and the device's numpy core equal to the export's
torch one (tiny random model, no real checkpoint)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import SEGMENT_TEST_BUCKET as BUCKET

pytest.importorskip("litert_torch")


@pytest.fixture(scope="module")
def split(tiny_core, calibration):
    from gemma_edge.export import segments as seg
    from gemma_edge.export.segments.recipe import DEFAULT_RECIPE

    recipe = DEFAULT_RECIPE.with_splits(host_attention_upto=BUCKET)
    scales = seg.measure_scales(tiny_core, calibration[BUCKET], recipe)
    return scales, seg.layer_segments(tiny_core, BUCKET, scales)


def test_split_attention_is_exact_in_float(tiny_core, calibration, split):
    from gemma_edge.export import segments as seg
    from gemma_edge.export.segments.split_attention import SplitAttentionSegment

    scales, segments = split
    assert all(isinstance(attn, SplitAttentionSegment) for attn, _ in segments)
    assert [k for k, _ in seg.graph_parts(segments[0])] == ["attn_qkv", "attn_o", "mlp"]
    assert seg.check_float(tiny_core, scales, segments, calibration[BUCKET]) >= seg.FLOAT_EQUALITY
    # a bucket above host_attention_upto keeps the one-graph attention
    longer = seg.layer_segments(tiny_core, 2 * BUCKET, scales)
    assert not isinstance(longer[0][0], SplitAttentionSegment)


def test_the_device_core_computes_what_the_export_calibrates_with(tiny_core, calibration, split):
    """numpy (device/host_attention.py) against torch (SplitAttentionSegment.core), every
    layer: the sliding layers' band (the tiny model's window is 8 < 32 tokens), the global
    layers, a packed mask."""
    from gemma_edge.device.host_attention import HostAttention
    from gemma_edge.export.segments import host_constants

    scales, segments = split
    host = HostAttention(host_constants(tiny_core, scales), BUCKET, "host.npz")
    # two packed texts (tokens 0-11, 12-26) and padding: a block-diagonal mask
    mask = np.zeros((1, BUCKET, BUCKET), np.float32)
    mask[0, :12, :12] = mask[0, 12:27, 12:27] = 1.0
    inputs = torch.from_numpy(np.random.default_rng(0).normal(
        size=(1, 1, BUCKET, tiny_core.spec.hidden_size)).astype(np.float32))
    windows = set()
    for i, (attn, _) in enumerate(segments):
        qkv = attn.qkv(inputs)
        want = attn.core(qkv, torch.from_numpy(mask)).numpy().reshape(BUCKET, -1)
        got = host.core(i, qkv.detach().numpy(), mask)
        np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())
        windows.add(int(host.window[i]))
    assert len(windows) == 2  # sliding and global layers both checked


def test_a_host_file_without_the_split_constants_is_refused():
    from gemma_edge.device.host_attention import HostAttention
    from gemma_edge.errors import ArtifactError

    with pytest.raises(ArtifactError, match="host.npz: no q_norm_gain.*re-export"):
        HostAttention({"eps": np.float32(1e-6)}, 64, "art/edgetpu/host.npz")
