"""A restart command that fails: `failing_restart.py PORT PIDFILE` starts nothing and exits 3."""

import sys

EXIT_CODE = 3


def main() -> int:
    port = sys.argv[1] if len(sys.argv) > 1 else "?"
    print(f"cannot restart the service on port {port}: unit is masked", file=sys.stderr)
    return EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
