"""Write a word to a file, as a change a runbook makes and its rollback puts back; a word
`fail` exits 1 without writing, as a rollback that cannot put things back."""

import sys
from pathlib import Path

path, word = sys.argv[1], sys.argv[2]
if word == "fail":
    sys.exit(1)
Path(path).write_text(word)
