"""Before/after table of two ``gemma-edge eval --json`` reports: the short held-out
sentences per language and token band, for one precision, prompt and dimension.

The table docs/quantization.md shows for issue 20 comes from here::

    python -m research.eval_compare BEFORE.json AFTER.json --precision full-int8 --dim 768

Markdown on stdout; a row where either report lacks the group prints "-".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from gemma_edge.errors import GemmaEdgeError, InputError


def short_figures(report_path: Path, precision: str, prompt: Optional[str], dim: int
                  ) -> dict[str, Any]:
    """The short-sentence entry of one report for ``precision``/``prompt``/``dim``."""
    try:
        report = json.loads(Path(report_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"{report_path}: not a readable eval report ({exc})") from exc
    short = report.get("short") if isinstance(report, dict) else None
    if not short:
        raise InputError(f"{report_path}: no short-sentence figures; run `gemma-edge eval` "
                         "with --short-prompts")
    per_prompt = short["precisions"].get(precision)
    if per_prompt is None:
        raise InputError(f"{report_path}: no precision {precision!r} (has "
                         f"{', '.join(short['precisions'])})")
    prompt = prompt or next(iter(per_prompt))
    entry = per_prompt.get(prompt, {}).get(str(dim))
    if entry is None:
        raise InputError(f"{report_path}: no {prompt!r} prompt at {dim}-d")
    return entry


def rows(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(group, before figures, after figures): all, each language, each token band."""
    out = [("all", before["all"], after["all"])]
    for key in ("per_language", "per_band"):
        names = list(dict.fromkeys([*before.get(key, {}), *after.get(key, {})]))
        out += [(name, before.get(key, {}).get(name), after.get(key, {}).get(name))
                for name in names]
    return out


def _cell(figures: Optional[dict[str, Any]]) -> str:
    if not figures:
        return "- | - | - | -"
    return (f"{figures['mean']:.4f} | {figures['min']:.4f} | {figures['p1']:.4f} | "
            f"{figures['below']}")


def table(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = ["| group | n | before mean | min | p1 | below | after mean | min | p1 | below |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, b, a in rows(before, after):
        n = (a or b or {}).get("n", "-")
        label = f"{name} tok" if name[0].isdigit() or name.startswith("<") else name
        lines.append(f"| {label} | {n} | {_cell(b)} | {_cell(a)} |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m research.eval_compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--precision", default="full-int8")
    p.add_argument("--prompt", default=None, help="default: the reports' first")
    p.add_argument("--dim", type=int, default=768)
    args = p.parse_args(argv)
    try:
        print(table(short_figures(args.before, args.precision, args.prompt, args.dim),
                    short_figures(args.after, args.precision, args.prompt, args.dim)))
    except GemmaEdgeError as exc:
        print(f"python -m research.eval_compare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
