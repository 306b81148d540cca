"""Tiny pure-Python wheels and scratch virtual environments, built offline for tests."""

from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

# Seconds to create a virtual environment or to install into one from local wheels.
VENV_TIMEOUT_S = 120


def build_wheel(name: str, version: str, dest: Path) -> Path:
    """Write a py3-none-any wheel of `name` holding one module that knows its version."""
    module = name.replace("-", "_").replace(".", "_").lower()
    dist_info = f"{module}-{version}.dist-info"
    files = {
        f"{module}/__init__.py": f'__version__ = "{version}"\n',
        f"{dist_info}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
            f"Summary: A package for caretaker's tests\n"
        ),
        f"{dist_info}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: caretaker-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
    }
    record = [
        f"{path},{_digest(text.encode())},{len(text.encode())}" for path, text in files.items()
    ]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"

    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


def _digest(data: bytes) -> str:
    encoded = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
    return "sha256=" + encoded.decode()


class ScratchEnv:
    """A virtual environment without pip, filled by this interpreter's pip from local wheels
    only, so nothing is downloaded."""

    def __init__(self, root: Path, wheels: Path) -> None:
        self.root = root
        self.wheels = wheels
        subprocess.run(
            [sys.executable, "-m", "venv", "--without-pip", str(root)],
            check=True,
            capture_output=True,
            timeout=VENV_TIMEOUT_S,
        )

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    def install(self, requirement: str) -> None:
        argv = [sys.executable, "-m", "pip", "--python", str(self.python), "install"]
        argv += ["--no-index", "--find-links", str(self.wheels), "--disable-pip-version-check"]
        done = subprocess.run(
            [*argv, "--quiet", requirement], capture_output=True, text=True, timeout=VENV_TIMEOUT_S
        )
        assert done.returncode == 0, done.stderr
