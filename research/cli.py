"""``python -m research``: the studies' subcommands, with ``gemma-edge``'s error handling.

Kept out of ``gemma-edge --help``, which lists what users run; these are run from a
checkout (the repository root on ``sys.path``) to re-measure the recipe.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

from gemma_edge.errors import GemmaEdgeError

from . import coral_graph, int4_gptq, int4_graph, segment_study, short_recipe, short_tail


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m research",
                                     description="gemma-edge research tools (research/README.md)")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (segment_study, coral_graph, short_tail, short_recipe, int4_gptq,
                   int4_graph):
        module.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv``, run the subcommand; a GemmaEdgeError prints one line and exits with
    its code (as ``gemma-edge`` does)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return int(args.func(args) or 0)
    except GemmaEdgeError as exc:
        print(f"python -m research {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
