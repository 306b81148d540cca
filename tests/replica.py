"""Private PostgreSQL clusters with server settings of their own, and streaming replicas of them."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tests.conftest import free_port
from tests.services import PG_BIN, PrivatePostgres


class TunedPostgres(PrivatePostgres):
    """A private cluster whose postgresql.conf also holds the given settings."""

    def __init__(self, **settings: str) -> None:
        super().__init__()
        self.configure(**settings)

    def configure(self, **settings: str) -> None:
        """Append settings; they take effect at the next start."""
        lines = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
        # Appended as root, the file keeps its owner: the server can still read it.
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(lines)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"


class PrivateReplica(TunedPostgres):
    """A streaming replica of a running private cluster, from `pg_basebackup -R`."""

    def __init__(self, primary: PrivatePostgres) -> None:
        # Not the parent's __init__: the data directory is a copy of the primary's, not initdb's.
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="caretaker-pg-replica-"))
        self.data = self.dir / "data"
        self._as_owner = os.geteuid() == 0
        if self._as_owner:
            shutil.chown(self.dir, "postgres", "postgres")
        self._run(
            [
                *[str(PG_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port)],
                *["-U", "postgres", "-D", str(self.data), "-R", "-X", "stream"],
                *["--checkpoint", "fast", "--no-sync"],
            ]
        )
