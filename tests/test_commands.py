"""Tests of tasks.commands: allowlisted argv lists, timeouts on the process group, no shell."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tasks.commands import OUTPUT_LIMIT_BYTES, CommandParams, run_command
from tests.conftest import wait_for
from workers.config import ActionsConfig, Config
from workers.errors import NotAllowed

PYTHON = sys.executable
CONFIG = Config(actions=ActionsConfig(allowlist=[PYTHON, "/nonexistent/bin/tool"]))


def python(code: str, *args: str, timeout_s: float = 30.0) -> CommandParams:
    return CommandParams(argv=[PYTHON, "-c", code, *args], timeout_s=timeout_s)


def gone(pid: int) -> bool:
    """True once pid has exited; an unreaped zombie counts, it no longer runs."""
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def leftovers() -> Iterator[list[int]]:
    """Pids a test started indirectly; killed afterwards if they outlived it."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_exit_zero_with_output_captured() -> None:
    result = run_command(
        python("print('hello'); import sys; print('note', file=sys.stderr)"), CONFIG
    )

    assert result.exit_code == 0
    assert result.ok
    assert not result.timed_out
    assert result.stdout == "hello\n"
    assert result.stderr == "note\n"
    assert result.argv[0] == PYTHON
    assert 0 < result.duration_s < 30


def test_nonzero_exit_code_is_recorded() -> None:
    result = run_command(python("import sys; sys.stderr.write('boom'); sys.exit(3)"), CONFIG)

    assert result.exit_code == 3
    assert not result.ok
    assert not result.timed_out
    assert result.stderr == "boom"


def test_an_executable_off_the_allowlist_is_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    params = CommandParams(argv=["/usr/bin/touch", str(marker)])

    with pytest.raises(NotAllowed) as raised:
        run_command(params, CONFIG)

    assert "'/usr/bin/touch'" in str(raised.value)
    assert not marker.exists()


def test_the_allowlist_compares_argv0_exactly() -> None:
    with pytest.raises(NotAllowed) as raised:
        run_command(CommandParams(argv=[PYTHON + " ", "-c", "pass"]), CONFIG)

    assert repr(PYTHON + " ") in str(raised.value)


def test_an_allowlisted_executable_that_cannot_start() -> None:
    result = run_command(CommandParams(argv=["/nonexistent/bin/tool"]), CONFIG)

    assert result.exit_code is None
    assert not result.ok
    assert result.stderr.startswith("cannot start: ")


def test_timeout_kills_the_whole_process_group(leftovers: list[int]) -> None:
    code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    timeout_s = 1.0
    started = time.monotonic()

    result = run_command(python(code, timeout_s=timeout_s), CONFIG)

    elapsed_s = time.monotonic() - started
    child_pid = int(result.stdout)
    leftovers.append(child_pid)
    assert result.timed_out
    assert result.exit_code is None
    assert not result.ok
    assert timeout_s <= elapsed_s < timeout_s + 3
    wait_for(lambda: gone(child_pid), timeout_s=5, what=f"child pid={child_pid} to be killed")


def test_a_detached_descendant_holding_stdout_does_not_hold_the_command(
    leftovers: list[int],
) -> None:
    # Like a restart script that starts a daemon without redirecting its output: the script
    # exits at once, the daemon (in its own session) keeps the stdout pipe open.
    code = (
        "import subprocess, sys\n"
        "daemon = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(8)'],\n"
        "                          start_new_session=True)\n"
        "print(daemon.pid, flush=True)\n"
    )
    timeout_s = 1.0
    started = time.monotonic()

    result = run_command(python(code, timeout_s=timeout_s), CONFIG)

    leftovers.append(int(result.stdout))
    assert time.monotonic() - started < timeout_s + 2
    assert result.exit_code == 0
    assert not result.timed_out


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_is_cut_to_its_last_bytes(stream: str) -> None:
    code = f"import sys; sys.{stream}.write('x' * {OUTPUT_LIMIT_BYTES * 3} + 'END')"

    result = run_command(python(code), CONFIG)

    output = getattr(result, stream)
    assert len(output) == OUTPUT_LIMIT_BYTES
    assert output.endswith("xxxEND")
    assert result.exit_code == 0


@pytest.mark.parametrize(
    "args",
    [
        ["; rm -rf /"],
        ["$(id)", "`id`", "${HOME}"],
        ["a && b", "c || d", "e | f", "> /tmp/out", "< /etc/passwd"],
        ["*", "~", "'single'", '"double"', "back\\slash", "line\nbreak", ""],
    ],
)
def test_shell_metacharacters_reach_the_child_verbatim(args: list[str]) -> None:
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"

    result = run_command(python(code, *args), CONFIG)

    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == args


class TimeLimit(Exception):
    """Stands for Celery's soft time limit, raised by a signal in the waiting thread."""


def test_a_task_time_limit_while_waiting_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    code = f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); time.sleep(60)"

    def strike(signum: int, frame: object) -> None:
        raise TimeLimit

    previous = signal.signal(signal.SIGALRM, strike)
    signal.setitimer(signal.ITIMER_REAL, 1.0)
    try:
        with pytest.raises(TimeLimit):
            run_command(python(code), CONFIG)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)

    assert gone(int(pidfile.read_text()))


def test_a_daemon_writing_after_the_command_ended_keeps_running(
    tmp_path: Path, leftovers: list[int]
) -> None:
    marker = tmp_path / "still-alive"
    daemon = (
        "import sys, time\n"
        "time.sleep(1.0)\n"
        "sys.stdout.write('x' * 200000); sys.stdout.flush()\n"
        f"open({str(marker)!r}, 'w').write('ok')\n"
    )
    code = (
        "import subprocess, sys\n"
        f"d = subprocess.Popen([sys.executable, '-c', {daemon!r}], start_new_session=True)\n"
        "print(d.pid, flush=True)\n"
    )

    result = run_command(python(code, timeout_s=5), CONFIG)
    leftovers.append(int(result.stdout))

    # Its writes land in a pipe still drained, so it is not killed by SIGPIPE.
    assert result.exit_code == 0
    wait_for(marker.exists, timeout_s=10, what="the daemon to write past its output")
    assert marker.read_text() == "ok"
