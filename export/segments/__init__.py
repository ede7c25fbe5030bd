"""The segmented full-int8 encoder: per-layer int8 graphs, residual stream on the host.

Why segments: a single fully int8 graph must carry the residual stream in int8
with one scale per tensor. On EmbeddingGemma that stream reaches 1e2-1e5 in a
few channels (sqrt(768)-scaled embeddings, large post-norm gains), and every
experiment with it in int8 lost the model (held-out cosine 0.50, see
docs/quantization.md). Here each layer is two graphs, both fully int8 (int8
inputs, activations, weights and outputs, Edge TPU-mappable ops only):

    attention segment  a [1, 1, T, C] int8, mask [1, T, T] int8 -> o [1, 1, T, C] int8
    MLP segment        b [1, 1, T, C] int8                      -> m [1, 2, T, C] int8

and the host does what 8 bits cannot: the residual adds and the four RMSNorms
of each layer in float32 (a few vector ops per token), the pooling, the Dense
head and the L2 norm. In the short buckets (``SegmentRecipe.host_attention_upto``,
64 tokens) the attention is split in two graphs, its q/k/v and o projections, and
the host computes the softmax attention between them in float (``split_attention``):
the int8 softmax chain was where short sentences lost (issue 20). Every encoder
weight is in the segments (99.7 % of the MACs at 256 tokens; only the Dense head runs
on the host); on a Coral board each segment is one Edge TPU call.

Exact rewrites that make per-tensor int8 work, all folded into weights or into
host-side per-channel vectors (checked equal in float by ``host.check_float``):

- segment inputs are ``rms(x) / s``: the pre-norm gain and a SmoothQuant
  per-channel scale ``s = A^alpha / W^(1 - alpha)`` go into the weight columns;
- segment outputs are divided per channel by their calibrated absmax (weight
  rows), the host multiplies back before its RMSNorm: per-channel output scales
  for free;
- V and the GELU product get SmoothQuant scales folded between v/o and up/down;
- q, k, v and gate, up are separate 1x1 convolutions: one output scale each;
- q and k are carried divided by their channel absmax ``u``; their RMSNorm's
  mean square is a 1x1 convolution of ``(q/u)^2`` with weights ``u^2 / D``
  (squaring raw q in int8 rounded most squares to 0);
- softmax without a mask penalty in any int8 tensor: the row max is taken over
  ``scores * mask`` and masking multiplies ``exp(max - s)`` by the 0/1 mask;
  normalisation is split as ``(sum_j (e_j / sqrt(S)) v_j) / sqrt(S)`` so the
  probabilities keep more than the 1/256 of an int8 softmax.

The package, in the order the export uses it:

- ``recipe``: ``SegmentRecipe``, the named recipe (migration strengths, two-range splits)
  and its validation;
- ``modules``: the torch modules ``AttentionSegment`` / ``MlpSegment`` and the
  per-channel ``LayerScales`` folded into them;
- ``split_attention``: ``SplitAttentionSegment``, the short buckets' attention (two
  projection graphs, the core on the host);
- ``host``: the host loop around the segments (``host_forward``), the float reference
  loop, ``check_float``;
- ``calibration``: ``measure_scales`` and each segment's calibration inputs;
- ``graph``: the float TFLite graph of a segment, converted or filled into a template;
- ``build``: ``SegmentBuild``, the worker processes that quantise every segment, and the
  files (segment graphs, ``host.npz``);
- ``sensitivity``: each int8 segment of an export against its float one
  (``gemma-edge eval --sensitivity``).
"""

from __future__ import annotations

from .build import (
    HOST_FILE,
    SEGMENT_DIR,
    SegmentBuild,
    build_segmented,
    host_constants,
    quantize_float_segment,
    quantize_segment,
    scales_from_host,
    segment_name,
)
from .calibration import measure_scales, segment_inputs
from .graph import build_template, fill_checked, float_segment, template_key
from .host import (
    FLOAT_EQUALITY,
    check_float,
    graph_parts,
    host_forward,
    layer_segments,
    part_feeds,
    reference_forward,
    sample_tensors,
    torch_runner,
)
from .modules import AttentionSegment, LayerScales, MlpSegment
from .recipe import DEFAULT_RECIPE, SegmentRecipe
from .split_attention import SplitAttentionSegment

__all__ = [
    "DEFAULT_RECIPE", "FLOAT_EQUALITY", "HOST_FILE", "SEGMENT_DIR", "AttentionSegment", "LayerScales",
    "MlpSegment", "SegmentBuild", "SegmentRecipe", "build_segmented", "build_template",
    "SplitAttentionSegment", "check_float", "fill_checked", "float_segment", "graph_parts",
    "host_constants", "host_forward", "layer_segments", "measure_scales", "part_feeds",
    "quantize_float_segment", "quantize_segment",
    "reference_forward", "sample_tensors", "scales_from_host", "segment_inputs",
    "segment_name", "template_key", "torch_runner",
]
