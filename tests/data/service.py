"""A tiny HTTP service for end-to-end tests: `service.py PORT [PIDFILE]` serves GET / with 200.

Started detached, the way a restart command brings a real service back.
"""

import http.server
import os
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    port = int(sys.argv[1])
    server = http.server.HTTPServer(("127.0.0.1", port), Handler)
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as pidfile:
            pidfile.write(str(os.getpid()))
    server.serve_forever()


if __name__ == "__main__":
    main()
