"""Running allowlisted commands as argv lists, never through a shell."""

from __future__ import annotations

import logging
import os
import selectors
import signal
import subprocess
import threading
import time
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, Field

from workers.app import app
from workers.config import Config, get_config
from workers.errors import NotAllowed

log = logging.getLogger(__name__)

# Output kept per stream; a chatty command must not bloat the step's row.
OUTPUT_LIMIT_BYTES = 64 * 1024
# Seconds to keep reading after the command exits, for output still in the pipes.
OUTPUT_GRACE_S = 0.5


class CommandParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    argv: list[str] = Field(min_length=1)
    timeout_s: float = Field(default=60.0, gt=0, le=86400)
    cwd: str | None = None


class CommandResult(BaseModel):
    argv: list[str]
    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


def _drain(pipes: list[IO[bytes]]) -> None:
    selector = selectors.DefaultSelector()
    for pipe in pipes:
        selector.register(pipe, selectors.EVENT_READ)
    while selector.get_map():
        for key, _ in selector.select():
            if not os.read(key.fd, 65536):
                selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    selector.close()


def ensure_allowed(argv0: str, config: Config) -> None:
    """Raise NotAllowed unless the executable is on the configured allowlist."""
    if argv0 not in config.actions.allowlist:
        raise NotAllowed(f"executable not on the allowlist: {argv0!r}")


def run_command(params: CommandParams, config: Config) -> CommandResult:
    """Run argv with a timeout on the command itself; its process group is killed on overrun.

    The command is done when its process exits, not when its pipes close: a restart command
    whose daemon inherits stdout must not hold the step (or be killed with it).
    """
    ensure_allowed(params.argv[0], config)
    return execute(params)


def execute(params: CommandParams) -> CommandResult:
    """Run argv as run_command does, for an executable the configuration already names (a
    target's interpreter, caretaker's own tools); callers check it."""
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            params.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            cwd=params.cwd,
            start_new_session=True,
        )
    except OSError as exc:
        return CommandResult(
            argv=params.argv,
            exit_code=None,
            stdout="",
            stderr=f"cannot start: {exc}",
            duration_s=0.0,
        )
    assert process.stdout is not None and process.stderr is not None
    output = _Output([process.stdout, process.stderr])
    try:
        timed_out = output.collect(process, started + params.timeout_s)
    except BaseException:
        # The task's own time limit struck first: the command must not outlive its step.
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        raise
    if timed_out:
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    duration_s = round(time.monotonic() - started, 3)
    log.info(
        "command finished argv0=%s exit_code=%s duration_s=%.3f",
        params.argv[0],
        process.returncode,
        duration_s,
    )
    stdout, stderr = output.text()
    return CommandResult(
        argv=params.argv,
        exit_code=None if timed_out else process.returncode,
        stdout=stdout,
        stderr=stderr,
        duration_s=duration_s,
        timed_out=timed_out,
    )


class _Output:
    """The last OUTPUT_LIMIT_BYTES of each pipe, read without blocking on either."""

    def __init__(self, pipes: list[IO[bytes]]) -> None:
        self.pipes = pipes
        self.fds = [pipe.fileno() for pipe in pipes]
        self.tails = {fd: bytearray() for fd in self.fds}
        self.selector = selectors.DefaultSelector()
        for pipe in pipes:
            self.selector.register(pipe.fileno(), selectors.EVENT_READ)

    def collect(self, process: subprocess.Popen[bytes], deadline: float) -> bool:
        """Read until the process exits (plus a short grace for its last output) or the
        deadline passes; True when the deadline passed first."""
        exited_at: float | None = None
        while True:
            now = time.monotonic()
            if exited_at is None and process.poll() is not None:
                exited_at = now
            if exited_at is not None and (
                not self.selector.get_map() or now > exited_at + OUTPUT_GRACE_S
            ):
                self._release()
                return False
            if exited_at is None and now > deadline:
                self._release()
                return True
            self._read(timeout_s=0.05)

    def _release(self) -> None:
        # A daemon the command started may still hold the pipes: they are drained in the
        # background until it lets go, so its writes never fail (SIGPIPE would kill it).
        lingering = [pipe for pipe in self.pipes if pipe.fileno() in self.selector.get_map()]
        self.selector.close()
        for pipe in self.pipes:
            if pipe not in lingering:
                pipe.close()
        if lingering:
            threading.Thread(target=_drain, args=(lingering,), name="drain", daemon=True).start()

    def _read(self, timeout_s: float) -> None:
        if not self.selector.get_map():
            time.sleep(timeout_s)
            return
        for key, _ in self.selector.select(timeout=timeout_s):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                self.selector.unregister(key.fd)
                continue
            tail = self.tails[key.fd]
            tail += chunk
            del tail[:-OUTPUT_LIMIT_BYTES]

    def text(self) -> tuple[str, str]:
        out, err = (bytes(self.tails[fd]) for fd in self.fds)
        return out.decode(errors="replace"), err.decode(errors="replace")


@app.task(name="caretaker.commands.run_command")
def run_command_task(**params: Any) -> dict[str, Any]:
    """Run an allowlisted command once. Not idempotent, so never redelivered; not retried."""
    result = run_command(CommandParams.model_validate(params), get_config())
    return result.model_dump()
