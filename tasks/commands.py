"""Running allowlisted commands as argv lists, never through a shell."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from workers.app import app
from workers.config import Config, get_config
from workers.errors import NotAllowed

log = logging.getLogger(__name__)

# Output kept per stream; a chatty command must not bloat the step's row.
OUTPUT_LIMIT_BYTES = 64 * 1024


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


def ensure_allowed(argv0: str, config: Config) -> None:
    """Raise NotAllowed unless the executable is on the configured allowlist."""
    if argv0 not in config.actions.allowlist:
        raise NotAllowed(f"executable not on the allowlist: {argv0!r}")


def run_command(params: CommandParams, config: Config) -> CommandResult:
    """Run argv with a timeout; the whole process group is killed when it overruns."""
    ensure_allowed(params.argv[0], config)
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
    timed_out = False
    try:
        stdout, stderr = process.communicate(timeout=params.timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
    duration_s = round(time.monotonic() - started, 3)
    log.info(
        "command finished argv0=%s exit_code=%s duration_s=%.3f",
        params.argv[0],
        process.returncode,
        duration_s,
    )
    return CommandResult(
        argv=params.argv,
        exit_code=None if timed_out else process.returncode,
        stdout=_tail(stdout),
        stderr=_tail(stderr),
        duration_s=duration_s,
        timed_out=timed_out,
    )


def _tail(data: bytes) -> str:
    return data[-OUTPUT_LIMIT_BYTES:].decode(errors="replace")


@app.task(name="caretaker.commands.run_command")
def run_command_task(**params: Any) -> dict[str, Any]:
    """Run an allowlisted command once. Not idempotent, so never redelivered; not retried."""
    result = run_command(CommandParams.model_validate(params), get_config())
    return result.model_dump()
