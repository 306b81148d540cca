"""The restart command of the update tests: `restart_app.py PIDFILE PORT TREE PYTHON` stops
the app whose pid is in PIDFILE, starts TREE/app.py with PYTHON detached, and exits 0 once
the new one answers on PORT (1 after 10 seconds)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


def wait(port: int, up: bool) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if answers(port) == up:
            return True
        time.sleep(0.05)
    return False


def stop(pidfile: Path, port: int) -> None:
    try:
        os.kill(int(pidfile.read_text()), signal.SIGTERM)
    except (OSError, ValueError):
        return
    # The port, not the pid: a killed process nobody reaps still has its pid.
    wait(port, up=False)


def main() -> int:
    pidfile, port, tree, python = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    stop(pidfile, port)
    subprocess.Popen(
        [python, os.path.join(tree, "app.py"), str(port), str(pidfile)],
        cwd=tree,
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return 0 if wait(port, up=True) else 1


if __name__ == "__main__":
    sys.exit(main())
