"""The service of the update tests, run from its working tree by its environment's python:
`app.py PORT PIDFILE` answers GET /health with the status code written in health.txt beside
it, and GET /version with the version of caretaker-demo installed in its environment."""

import http.server
import importlib.metadata
import os
import sys
from pathlib import Path

# Read on every request, by path: a checkout or a restore changes the answer at once.
HEALTH = Path(os.path.abspath(__file__)).parent / "health.txt"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/health":
            status = int(HEALTH.read_text().strip())
            body = b"ok\n" if status == 200 else b"broken\n"
        elif self.path == "/version":
            status, body = 200, importlib.metadata.version("caretaker-demo").encode()
        else:
            status, body = 404, b""
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    Path(sys.argv[2]).write_text(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main()
