"""The ``lightning-saliency`` command."""

from __future__ import annotations

import argparse

from lightning_saliency import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lightning-saliency")
    parser.add_argument("--version", action="version", version=f"lightning-saliency {__version__}")
    parser.parse_args(argv)
    print(f"lightning-saliency {__version__}")
    return 0
