"""`pagedserve` command line: one sub-command per module in this package.

Each module defines ``register(subparsers)`` which adds its sub-parser and sets
``func=callable(args) -> int`` as the default; :func:`main` dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMAND_MODULES = ("run", "serve", "models", "bench")

EPILOG = """examples:
  pagedserve --version                         the version (-v too, as in Ollama)
  pagedserve run "Why is the sky blue?"        one answer from the bundled SmolLM2-135M
  pagedserve run                               interactive chat (/bye to leave)
  pagedserve serve --port 11434                OpenAI + Ollama APIs and /metrics
  pagedserve list                              models found in every store
  pagedserve bench compare                     paged vs static KV, plots in docs/
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedserve",
        description="Serve LLMs with a paged KV cache and continuous batching, "
        "behind the OpenAI and Ollama APIs, on CPU or CUDA.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from pagedserve.version import __version__

    parser.add_argument("-v", "--version", action="version",
                        version=f"pagedserve version {__version__}",
                        help="print the version and exit (-v as in Ollama)")
    parser.add_argument("--verbose", action="store_true",
                        help="log debug messages (and every HTTP request)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"pagedserve.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"pagedserve.cli.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:  # httpx logs every request at INFO (ps, pull, bench)
        logging.getLogger("httpx").setLevel(logging.WARNING)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
