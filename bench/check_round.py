"""Benchmark: a full health round against the bare calls its checks make, in the same run.

For each check kind the bare baseline is what the check must do at the least: psutil readings,
an HTTP request over a new socket, a PostgreSQL connection and its queries, a Redis INFO. The
round adds validation, grading, thread deadlines and recording the result in PostgreSQL.
Needs PostgreSQL and Redis (CARETAKER_BENCH_PG, CARETAKER_BENCH_REDIS).
"""

from __future__ import annotations

import http.client
import http.server
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SERVER = os.environ.get("CARETAKER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("CARETAKER_BENCH_REDIS", "redis://127.0.0.1:6379/15")
DATABASE_URL = f"{SERVER}/caretaker_bench"
os.environ["CARETAKER_DATABASE_URL"] = DATABASE_URL
os.environ["CARETAKER_BENCH_DSN"] = DATABASE_URL

import psutil  # noqa: E402
import psycopg  # noqa: E402
import redis  # noqa: E402

from tasks.actions import run_check  # noqa: E402
from workers import health  # noqa: E402
from workers.config import CheckTarget, Config  # noqa: E402
from workers.db import migrate, transaction  # noqa: E402

ROUNDS = 20
CPU_SAMPLE_S = 0.05


class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: object) -> None:
        pass


def bare_system() -> None:
    psutil.cpu_percent(interval=CPU_SAMPLE_S)
    psutil.virtual_memory()
    psutil.disk_usage("/")
    os.getloadavg()


def bare_http(port: int) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/")
    conn.getresponse().read()
    conn.close()


def bare_postgres() -> None:
    with psycopg.connect(DATABASE_URL, connect_timeout=5) as conn:
        conn.execute("SHOW max_connections").fetchone()
        conn.execute("SELECT count(*) FROM pg_stat_activity").fetchone()
        conn.execute("SELECT pg_is_in_recovery()").fetchone()


def bare_redis() -> None:
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
    client.ping()
    client.info()
    client.close()


def targets(port: int) -> list[tuple[str, CheckTarget]]:
    return [
        ("host", CheckTarget(name="system", check="system", params={"cpu_sample_s": CPU_SAMPLE_S})),
        (
            "application",
            CheckTarget(name="web", check="http", params={"url": f"http://127.0.0.1:{port}/"}),
        ),
        (
            "database",
            CheckTarget(name="db", check="postgres", params={"dsn_env": "CARETAKER_BENCH_DSN"}),
        ),
        ("cache", CheckTarget(name="cache", check="redis", params={"url": REDIS_URL})),
    ]


def checked(group: str, target: CheckTarget) -> None:
    result = run_check(target.action, target.params).model_dump()
    assert result["status"] != "unknown", result["summary"]
    with transaction() as conn:
        health.record_result(conn, group, target, result, Config())


def median_ms(func: Callable[[], Any]) -> float:
    func()  # warm: imports, pools, first connections
    times = []
    for _ in range(ROUNDS):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    migrate(DATABASE_URL)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    bare = {
        "system": bare_system,
        "web": lambda: bare_http(port),
        "db": bare_postgres,
        "cache": bare_redis,
    }

    print(
        f"{'check':<8} {'bare ms':>9} {'check ms':>9} {'ratio':>6} {'+record ms':>11} {'ratio':>6}"
    )
    totals = [0.0, 0.0, 0.0]
    for group, target in targets(port):
        b = median_ms(bare[target.name])
        c = median_ms(lambda t=target: run_check(t.action, t.params))  # type: ignore[misc]
        r = median_ms(lambda g=group, t=target: checked(g, t))  # type: ignore[misc]
        totals = [totals[0] + b, totals[1] + c, totals[2] + r]
        print(f"{target.check:<8} {b:>9.2f} {c:>9.2f} {c / b:>6.2f} {r:>11.2f} {r / b:>6.2f}")
    b, c, r = totals
    print(f"{'round':<8} {b:>9.2f} {c:>9.2f} {c / b:>6.2f} {r:>11.2f} {r / b:>6.2f}")
    with psycopg.connect(DATABASE_URL, autocommit=True) as conn:
        conn.execute("TRUNCATE check_results, occurrences, events, incidents CASCADE")


if __name__ == "__main__":
    main()
