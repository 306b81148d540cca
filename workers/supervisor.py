"""`caretaker run`'s supervisor: webhook, worker and beat started, watched and stopped together."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

import click

log = logging.getLogger("caretaker")

# A worker told to stop finishes the step it is running first (a recover step may be halfway
# through a restart), so `run` waits this many seconds before it kills what is still running.
SHUTDOWN_GRACE_S = 90.0
# Seconds between the supervisor's looks at its children and, until it answers, the webhook.
SUPERVISE_POLL_S = 0.5
# Seconds one /healthz probe may take: the supervisor must keep noticing signals and exits.
READY_PROBE_TIMEOUT_S = 1.0
# Seconds to wait for a child to vanish after SIGKILL, which it cannot refuse.
KILL_WAIT_S = 5.0
# A webhook listening on every address is probed, and announced, on loopback.
_WILDCARD_HOSTS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def catch_stop_signals(received: list[int]) -> None:
    def note(signum: int, _frame: Any) -> None:
        received.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, note)


def start(argv: list[str]) -> subprocess.Popen[bytes]:
    # Each child leads its own process group: Ctrl-C reaches the supervisor alone, which stops
    # the children in order, and a kill takes a worker's pool processes with it.
    return subprocess.Popen(argv, process_group=0)


def supervise(
    children: dict[str, subprocess.Popen[bytes]], host: str, port: int, received: list[int]
) -> int:
    """Watch the children until a signal arrives or one exits, then stop all; the exit code."""
    # When one process ends, the others go too: a half-running caretaker is worse than none.
    exited = _watch(children, host, port, received)
    if exited is None:
        log.info(
            "stopping on signal=%s; a worker finishes its current step first, waiting up to"
            " grace_s=%.0f (a second signal kills at once)",
            signal.Signals(received[0]).name,
            SHUTDOWN_GRACE_S,
        )
    else:
        child = children[exited]
        log.error(
            "%s exited on its own %s pid=%s; stopping the others",
            exited,
            _exit_status(child.returncode),
            child.pid,
        )

    killed = _stop(children, received)
    return 0 if exited is None and not killed else 1


def _watch(
    children: dict[str, subprocess.Popen[bytes]], host: str, port: int, received: list[int]
) -> str | None:
    """Poll until a signal arrives (None) or a child exits (its name); say when ready, once."""
    url = _base_url(_WILDCARD_HOSTS.get(host, host), port)
    ready = False
    while not received:
        exited = [name for name, child in children.items() if child.poll() is not None]
        if exited:
            return exited[0]
        if not ready and _answers(f"{url}/healthz"):
            ready = True
            click.echo(f"caretaker ready: webhook on {url}/api/v1/alerts")
            sys.stdout.flush()
        time.sleep(SUPERVISE_POLL_S)
    return None


def _base_url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _answers(url: str) -> bool:
    import httpx

    try:
        # Our own webhook on this host: never through a proxy from the environment.
        return httpx.get(url, timeout=READY_PROBE_TIMEOUT_S, trust_env=False).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(children: dict[str, subprocess.Popen[bytes]], received: list[int]) -> list[str]:
    """TERM every child, wait out the grace (or a further signal), KILL the rest; their names."""
    for child in children.values():
        if child.poll() is None:
            child.terminate()

    signals_seen = len(received)
    deadline = time.monotonic() + SHUTDOWN_GRACE_S
    while _running(children) and time.monotonic() < deadline and len(received) == signals_seen:
        time.sleep(SUPERVISE_POLL_S)

    survivors = _running(children)
    if len(received) > signals_seen:
        why = "told again to stop"
    else:
        why = f"still running {SHUTDOWN_GRACE_S:.0f}s after SIGTERM"
    for name in survivors:
        log.error("killing %s pid=%s: %s", name, children[name].pid, why)
        _kill_group(children[name])
    for name, child in children.items():
        _reap(name, child)
    return survivors


def _running(children: dict[str, subprocess.Popen[bytes]]) -> list[str]:
    return [name for name, child in children.items() if child.poll() is None]


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)
    except OSError:
        # Not a group leader after all (or already gone): the process alone, then.
        child.kill()


def _reap(name: str, child: subprocess.Popen[bytes]) -> None:
    try:
        code = child.wait(timeout=KILL_WAIT_S)
    except subprocess.TimeoutExpired:
        log.error("%s pid=%s did not exit even after SIGKILL", name, child.pid)
        return
    log.info("%s stopped %s", name, _exit_status(code))


def _exit_status(code: int) -> str:
    if code >= 0:
        return f"code={code}"
    try:
        return f"signal={signal.Signals(-code).name}"
    except ValueError:
        return f"signal={-code}"
