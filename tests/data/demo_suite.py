"""A service's test command: passes while the environment's demo package is usable, fails when
a file `tests-fail` beside the environment says the new version breaks the service."""

import subprocess
import sys
from pathlib import Path

venv = Path(sys.argv[1])
if (venv.parent / "tests-fail").exists():
    print("FAILED test_checkout: the new version breaks checkout", file=sys.stderr)
    sys.exit(1)
done = subprocess.run([str(venv / "bin" / "python"), "-c", "import caretaker_demo"], check=False)
sys.exit(done.returncode)
