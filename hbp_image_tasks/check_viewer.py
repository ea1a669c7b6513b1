"""The `check_viewer` command (not implemented yet)."""
from __future__ import annotations

import argparse
import sys

from . import cli, errors


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parses the command line of `check_viewer`."""
    parser = argparse.ArgumentParser(prog="check_viewer", description=__doc__,
                                     epilog=errors.EXIT_CODES_HELP,
                                     formatter_class=cli.HelpFormatter)
    cli.add_logging_options(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Runs `check_viewer`; returns the exit code."""
    parse_command_line(argv)
    print("ingest: not implemented yet", file=sys.stderr)
    return errors.EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
