"""``SegmentRecipe``: how the full-int8 segments are built, with its validation.

One named recipe object, as ai-edge-quantizer names its recipes: the export builds
``SegmentRecipe()`` (its flags change the two splits), the research studies build others
(research/segment_study.py). Each field's measured effect is in docs/quantization.md.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional

from gemma_edge.errors import InputError


@dataclass(frozen=True)
class SegmentRecipe:
    """SmoothQuant migration strengths per place (0: none, 1: all into the weights) and
    the two-range int8 tensors of the segments.

    The strengths were chosen on the corpus at 128 tokens: the MLP wants less migration
    than the attention input. With the two-range GELU product (mlp_split) the product
    needs less of its range moved into up_proj: act 0.45 instead of 0.6 (64 tokens, both
    segment kinds: 0.9905 vs 0.9888 mean cosine, 24 texts).
    """

    attn_in: float = 0.75
    v: float = 0.75
    ff_in: float = 0.6
    act: float = 0.45
    # Where the MLP's partial down projections (the two ranges of mlp_split) are added:
    # in the graph (an int8 ADD, one per-tensor scale for the sum) or on the host in
    # float, the segment returning the partials [1, 2, T, C], each with its own
    # per-channel output scale. Measured (64 tokens, both kinds, 24 texts): 0.9913 /
    # 0.9845 against 0.9905 / 0.9835 with the ADD, for one more [T, C] int8 output per
    # MLP call.
    mlp_host_sum: bool = True
    # Two-range GELU product: the MUL is computed twice, once saturating at this fraction
    # of the product's calibrated absmax (fine steps for the bulk of the values) and once
    # at full range, from which only the part beyond the saturation level is kept (exact
    # zero elsewhere); down_proj runs on both and the two partials are added. Per-tensor
    # int8 gives the rare large products (set by a few tokens) and the common small ones
    # the same step; this gives the common ones 1/mlp_split finer steps. 0: one tensor.
    mlp_split: float = 0.125
    # Two-range softmax weights: exp(max - s) is in (0, 1] with its int8 steps of 1/255 set
    # by the row maximum, and most of a row's weights are small. With this fraction r > 0
    # the segment also computes min(exp(-y) / r, 1) = exp(-relu(y - ln(1/r))) (its own
    # LOGISTIC chain: 1/r finer steps for the small weights) and keeps of the coarse
    # exp(-y) only its excess beyond r (exact zero below); both weight v and the row sum.
    # 0: one tensor. The p*v products are rounded to int8 one by one before their sum
    # over the row, and the more keys a row has, the more of its weight is small.
    # Measured (attention segments only, 24 corpus texts held back from the calibration,
    # mean / min cosine): 256 tokens 0.9957 / 0.9923 with r = 1/8 against 0.9911 /
    # 0.9827 with one tensor; 64 tokens 0.9850 / 0.9705 against 0.9844 / 0.9693.
    # softmax_split_from: the smallest bucket (tokens) that uses it (0: all), for
    # trading the extra attention ops back in small buckets.
    softmax_split: float = 0.125
    softmax_split_from: int = 0
    # Buckets of at most this many tokens compute the attention core (q/k norms, RoPE,
    # scores, softmax, weights x V) on the host in float, between two int8 projection
    # segments (split_attention.py); 0: every bucket keeps it in its int8 segment. The
    # short-sentence tail (issue 20) came from that int8 softmax chain.
    host_attention_upto: int = 64

    def with_splits(self, mlp_split: Optional[float] = None,
                    softmax_split: Optional[float] = None,
                    host_attention_upto: Optional[int] = None) -> SegmentRecipe:
        """This recipe with the given splits (None: keep this recipe's)."""
        changes: dict[str, Any] = {}
        if host_attention_upto is not None:
            changes["host_attention_upto"] = host_attention_upto
        if mlp_split is not None:
            changes["mlp_split"] = mlp_split
        if softmax_split is not None:
            changes["softmax_split"] = softmax_split
        return replace(self, **changes) if changes else self

    def graphs_per_layer(self, seq_len: int) -> int:
        """Segment graphs per layer in a bucket: attention and MLP, or with the attention
        core on the host its two projections and the MLP."""
        return 3 if seq_len <= self.host_attention_upto else 2

    def validate(self, flag_prefix: str = "--") -> SegmentRecipe:
        """Return the recipe, or raise InputError naming the option that set the bad value
        (``flag_prefix`` + the field's flag: "--edgetpu-" for the export's flags, "--"
        for the research study's). NaN is refused like any value out of range."""
        alphas = (self.attn_in, self.v, self.ff_in, self.act)
        if not all(0.0 <= a <= 1.0 for a in alphas):
            raise InputError(f"{flag_prefix}smoothing {','.join(map(str, alphas))}: four "
                             "values in [0, 1] (attention input, V, MLP input, GELU product)")
        if not 0.0 <= self.mlp_split < 1.0:
            raise InputError(f"{flag_prefix}mlp-split {self.mlp_split}: a fraction in [0, 1) "
                             "of the GELU product's range (0: one int8 tensor)")
        if not 0.0 <= self.softmax_split < 1.0:
            raise InputError(f"{flag_prefix}softmax-split {self.softmax_split}: a fraction in "
                             "[0, 1) of the softmax row maximum (0: one int8 tensor)")
        if not (isinstance(self.softmax_split_from, int) and self.softmax_split_from >= 0):
            raise InputError(f"{flag_prefix}softmax-split-from {self.softmax_split_from}: a "
                             "bucket length in tokens, 0 or more (0: every bucket)")
        if not (isinstance(self.host_attention_upto, int) and self.host_attention_upto >= 0):
            raise InputError(f"{flag_prefix}host-attention-upto {self.host_attention_upto}: a "
                             "bucket length in tokens, 0 or more (0: no bucket)")
        return self

    def to_json(self) -> dict[str, Any]:
        """The recipe as the manifest records it (key "smoothing" of a segment entry)."""
        # "mlp_groups": a format field of the manifest (MLP channel groups, a study that
        # lost: research/lab-notes.md); the shipped recipe has one group
        return {"attn_in": self.attn_in, "v": self.v, "ff_in": self.ff_in, "act": self.act,
                "mlp_groups": 1, "mlp_host_sum": self.mlp_host_sum,
                "mlp_split": self.mlp_split, "softmax_split": self.softmax_split,
                "softmax_split_from": self.softmax_split_from,
                "host_attention_upto": self.host_attention_upto}


DEFAULT_RECIPE = SegmentRecipe()  # what `gemma-edge export` builds without split flags
