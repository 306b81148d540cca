"""The console script's entry: bad settings end in one clear message, not a traceback."""

from __future__ import annotations

import sys

from workers.errors import ConfigError


def main() -> None:
    """Run the `caretaker` command line."""
    try:
        from workers.cli import main as cli_main
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    cli_main()
