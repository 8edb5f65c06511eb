"""The ``workbench`` command: ``workbench prepare`` converts the default model once.

>>> # shell: workbench prepare
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="steering-workbench command line")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="convert the embedded default model to an HF folder (once) and print its path")
    prep.add_argument("--force", action="store_true", help="convert again even if the cache is complete")
    sub.add_parser("version", help="print the version")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        from .models import prepare_default_model

        print(prepare_default_model(force=args.force))
    elif args.command == "version":
        from . import __version__

        print(__version__)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
