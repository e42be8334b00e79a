"""The ``upop`` command line (``upop.cli:main``; ``python -m upop.cli`` under torchrun)."""

from upop.cli.app import main
from upop.cli.flags import build_parser

__all__ = ["build_parser", "main"]
