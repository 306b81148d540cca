"""The restart command of the end-to-end tests: `restart_service.py PORT PIDFILE`.

Starts tests/data/service.py detached on PORT and exits 0 once it answers.
"""

import os
import socket
import subprocess
import sys
import time


def main() -> int:
    port, pidfile = sys.argv[1], sys.argv[2]
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "service.py")
    subprocess.Popen(
        [sys.executable, script, port, pidfile],
        start_new_session=True,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=0.5).close()
            return 0
        except OSError:
            time.sleep(0.1)
    return 1


if __name__ == "__main__":
    sys.exit(main())
