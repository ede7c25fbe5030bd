"""Work, memory and latency arithmetic for the Edge TPU pre-flight.

Every number the estimate rests on lives in ``Assumptions`` with its source, so a
reader can see which figures are Coral's, which are measured by others, and which
are our guesses, and can override any of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .tflite_reader import Graph, Operator

MiB = 1 << 20


@dataclass(frozen=True)
class Target:
    """One way a Coral Edge TPU hangs off a host."""

    name: str
    description: str
    link_bytes_per_s: float  # parameters and activations cross this link each inference
    invoke_overhead_s: float  # fixed cost of one Edge TPU subgraph call
    host_cpu_ops_per_s: float  # int8 ops/s of the host CPU running the CPU part
    source: str


@dataclass(frozen=True)
class Assumptions:
    """Every constant the estimate uses.  Change one with ``dataclasses.replace``."""

    # coral.ai/docs/edgetpu/faq: "4 trillion (fixed-point) operations per second (4 TOPS),
    # using only 2 watts" (2 TOPS/W).  An op is half a MAC.
    peak_ops_per_s: float = 4.0e12
    # libedgetpu1-max runs the Edge TPU at its maximum clock, libedgetpu1-std at a reduced
    # one (coral.ai/docs/accelerator/get-started).  The clock registers select 500 MHz or
    # 250 MHz (libedgetpu's USB driver), so std = half of the 4 TOPS roof.  Assumption.
    clock_hz: dict[str, float] = field(default_factory=lambda: {"max": 500e6, "std": 250e6})
    # Share of the roof the systolic array reaches on these layers.  Our guess; matrix x
    # vector work (one token at a time) reaches far less.
    utilization: float = 0.5
    # Parameter cache: "~8 MB" of SRAM (coral.ai/docs/edgetpu/pipeline); compiler 16 reports
    # "On-chip memory remaining for caching model parameters: 7.88MiB" for a model that
    # caches nothing, and less when activations need room.  We budget 7.75 MiB.
    param_cache_bytes: int = int(7.75 * MiB)
    # The compiler caches whole parameter tensors in graph order while they fit and
    # streams the rest every inference (a 64 MiB FC weight: 0 B cached, 64 MiB streamed,
    # in compiler 16 logs).  A model of approximation, not the compiler's algorithm.
    cache_policy: str = "whole tensors, graph order, first fit"
    targets: tuple[Target, ...] = (
        Target("usb", "USB Accelerator on USB 3 (5 Gb/s)", 350e6, 0.3e-3, 50e9,
               "USB 3 realistic 300-400 MB/s; ~0.3 ms per invoke measured on a Jetson Nano "
               "(qiita.com/iwatake2222, 2019); host: Raspberry Pi 5-class CPU, ~50 GOPS int8 "
               "with XNNPACK (guess)"),
        Target("pcie", "M.2 / Mini PCIe Accelerator (PCIe Gen2 x1)", 450e6, 0.1e-3, 100e9,
               "PCIe Gen2 x1: 500 MB/s after 8b/10b, ~400-500 MB/s realistic; host: x86 "
               "mini PC, ~100 GOPS int8 (guess)"),
        Target("devboard", "Dev Board / SoM (Edge TPU on the i.MX 8M's PCIe Gen2 x1)", 400e6,
               0.1e-3, 15e9,
               "same PCIe link, sharing LPDDR4 with the CPU (guess 400 MB/s); host: 4x "
               "Cortex-A53 @ 1.5 GHz, ~15 GOPS int8 (guess)"),
    )

    def target(self, name: str) -> Target:
        for t in self.targets:
            if t.name == name:
                return t
        raise KeyError(f"unknown target {name!r}; known: {[t.name for t in self.targets]}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def op_macs(op: Operator, g: Graph) -> int:
    """Multiply-accumulates of ``op``; other ops count one per output element."""
    outs = g.op_outputs(op)
    out_elems = sum(t.elements for t in outs)
    ins = g.op_inputs(op)
    if not ins or not outs:
        return out_elems
    weights = g.tensor(op.inputs[1]) if len(op.inputs) > 1 else None
    if op.op in ("CONV_2D", "FULLY_CONNECTED") and weights is not None and weights.shape:
        per_output = 1  # CONV_2D filter [O, kh, kw, I]; FC weights [O, K]
        for d in weights.shape[1:]:
            per_output *= d
        return out_elems * per_output
    if op.op == "DEPTHWISE_CONV_2D" and weights is not None and weights.rank == 4:
        return out_elems * weights.shape[1] * weights.shape[2]
    if op.op == "TRANSPOSE_CONV" and len(op.inputs) > 2:
        filt, x = g.tensor(op.inputs[1]), g.tensor(op.inputs[2])
        if filt is not None and x is not None and filt.rank == 4:
            return x.elements * filt.shape[0] * filt.shape[1] * filt.shape[2]
    if op.op == "BATCH_MATMUL" and ins[0].rank >= 2:
        k = ins[0].shape[-2] if op.options.get("adjX") else ins[0].shape[-1]
        return out_elems * k
    return out_elems


def split_cache(param_sizes: list[int], budget: int) -> tuple[int, int]:
    """(cached, streamed) bytes for parameter tensors in graph order under ``budget``."""
    cached = streamed = 0
    for size in param_sizes:
        if cached + size <= budget:
            cached += size
        else:
            streamed += size
    return cached, streamed


@dataclass
class LatencyEstimate:
    target: str
    clock: str
    compute_s: float  # Edge TPU MACs at the clock's roof x utilization
    stream_s: float  # streamed parameters over the host link
    io_s: float  # activations crossing between CPU and Edge TPU
    cpu_s: float  # ops left on the host CPU
    overhead_s: float  # per-invoke cost x Edge TPU subgraphs
    cache_fill_s: float  # once per model load: cached parameters over the link
    total_s: float
    bound: str  # "compute" or "stream": which side of the max() wins

    def to_json(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def estimate_latency(a: Assumptions, target: str, clock: str, tpu_macs: int, cpu_macs: int,
                     cached_bytes: int, streamed_bytes: int, io_bytes: int,
                     tpu_subgraphs: int) -> LatencyEstimate:
    """latency = max(compute, streamed / link) + io / link + CPU part + invoke overhead.

    The max() holds because the Edge TPU computes on streamed weights as they
    arrive; with all parameters cached the link only carries activations.
    """
    t = a.target(target)
    roof = a.peak_ops_per_s * a.clock_hz[clock] / max(a.clock_hz.values()) * a.utilization
    compute = 2 * tpu_macs / roof if tpu_macs else 0.0
    stream = streamed_bytes / t.link_bytes_per_s
    io = io_bytes / t.link_bytes_per_s if tpu_subgraphs else 0.0
    cpu = 2 * cpu_macs / t.host_cpu_ops_per_s
    overhead = t.invoke_overhead_s * tpu_subgraphs
    total = max(compute, stream) + io + cpu + overhead
    return LatencyEstimate(target=target, clock=clock, compute_s=compute, stream_s=stream,
                           io_s=io, cpu_s=cpu, overhead_s=overhead,
                           cache_fill_s=cached_bytes / t.link_bytes_per_s, total_s=total,
                           bound="stream" if stream > compute else "compute")


def cocompiled_summary(graphs: list[dict[str, Any]], host_macs: int = 0,
                       a: Assumptions = Assumptions()) -> dict[str, Any]:
    """One inference over several co-compiled models run one after another.

    ``graphs``: the mappers' per-graph JSON (``GraphReport.to_json()``), in call
    order. Co-compiled models share the one parameter cache (coral.ai/docs/edgetpu/
    compiler, "Parameter data caching": the cache is divided among the models, the
    first model gets priority); we cache in model order while they fit and stream the
    rest (the same
    first-fit approximation as ``split_cache``, per model instead of per tensor).
    ``host_macs``: work the host does outside every graph (e.g. pooling and the
    Dense head of the segmented encoder), counted as CPU work and in the MAC share.
    """
    tpu = sum(g["tpu_macs"] for g in graphs)
    cpu = sum(g["total_macs"] - g["tpu_macs"] for g in graphs) + host_macs
    params = [g["param_bytes"] for g in graphs]
    cached, streamed = split_cache(params, a.param_cache_bytes)
    calls = sum(g["tpu_subgraphs"] for g in graphs)
    io = sum(g["io_bytes"] for g in graphs)
    estimates = [estimate_latency(a, t.name, clock, tpu, cpu, cached, streamed, io, calls)
                 .to_json() for t in a.targets for clock in a.clock_hz]
    ops, tpu_ops = sum(g["ops"] for g in graphs), sum(g["tpu_ops"] for g in graphs)
    return {"models": len(graphs), "ops": ops, "tpu_ops": tpu_ops,
            "op_share": tpu_ops / ops if ops else 0.0, "tpu_macs": tpu, "cpu_macs": cpu,
            "mac_share": tpu / (tpu + cpu) if tpu + cpu else 0.0, "param_bytes": sum(params),
            "cached_bytes": cached, "streamed_bytes": streamed, "edgetpu_calls": calls,
            "io_bytes": io, "estimates": estimates}
