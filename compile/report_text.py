"""Human-readable rendering of a pre-flight ``MapperReport`` (``gemma-edge check``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .mapper import GraphReport, MapperReport


def si(n: float) -> str:
    """1234567 -> '1.23M': op and MAC counts at a glance."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:.0f}"


def mib(n: float) -> str:
    """Bytes in the compiler's own units (B, KiB, MiB), so reports read side by side."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if abs(n) >= 1 << shift:
            return f"{n / (1 << shift):.2f} {unit}"
    return f"{n:.0f} B"


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def format_report(r: MapperReport, target: Optional[str] = None,
                  clock: Optional[str] = None) -> str:
    lines = [f"{r.model}: {mib(r.size)}, edgetpu_compiler 16 rules, runtime >= "
             f"{r.min_runtime}{', -a (multiple subgraphs)' if r.multiple_subgraphs else ''}"]
    if r.fatal:
        lines.append("WILL NOT COMPILE (the compiler stops before mapping anything):")
        lines += [f"  {m}" for m in r.fatal]
    lines += [f"warning: {w}" for w in r.warnings]
    for g in r.graphs:
        lines.append("")
        lines += _graph(g, target, clock)
    return "\n".join(lines)


def _graph(g: GraphReport, target: Optional[str], clock: Optional[str]) -> list[str]:
    n = len(g.ops)
    lines = [f"subgraph {g.index} ({g.name}): {n} ops"]
    lines.append(f"{'#':>5}  {'op':<24}{'v':>2}  {'output':<28}{'MACs':>8}  {'where':<5} reason")
    for o in g.ops:
        out = (o.outputs[0] if o.outputs else "")[:27]
        where = "TPU" if o.mapped else "CPU"
        lines.append(f"{o.index:>5}  {o.op[:23]:<24}{o.version:>2}  {out:<28}{si(o.macs):>8}  "
                     f"{where:<5} {o.reason}")
    lines.append("")
    lines.append(f"{'Operator':<30} {'Count':<10} Status")
    for op, count, status in sorted(g.status_counts()):
        lines.append(f"{op:<30} {count:<10} {status}")
    lines.append("")
    if g.cut:
        lines.append(f"cut: op {g.cut['index']} {g.cut['op']} ({g.cut['reason']}); it and "
                     "every op after it run on the CPU")
    lines.append(f"Edge TPU: {g.tpu_ops}/{n} ops ({_pct(g.tpu_ops, n)}), "
                 f"{si(g.tpu_macs)}/{si(g.total_macs)} MACs ({_pct(g.tpu_macs, g.total_macs)}), "
                 f"{g.tpu_subgraphs} Edge TPU subgraph(s)")
    lines.append(f"parameters on the Edge TPU: {mib(g.param_bytes)} = {mib(g.cached_bytes)} "
                 f"cached on chip + {mib(g.streamed_bytes)} streamed every inference; "
                 f"{mib(g.cpu_param_bytes)} used on the CPU only; "
                 f"{mib(g.io_bytes)} of activations cross the link")
    lines.append(f"{'target':<10}{'clock':<7}{'total':>10}{'compute':>10}{'stream':>10}"
                 f"{'CPU part':>11}  bound")
    for e in g.estimates:
        if (target and e.target != target) or (clock and e.clock != clock):
            continue
        lines.append(f"{e.target:<10}{e.clock:<7}{ms(e.total_s):>10}{ms(e.compute_s):>10}"
                     f"{ms(e.stream_s):>10}{ms(e.cpu_s):>11}  {e.bound}")
    return lines


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"
