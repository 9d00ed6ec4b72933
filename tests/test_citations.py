"""The repository says things in its own words: no file cites a document it does not contain
(the project's original specification, its performance notes, or the private version codes
they used). Kernel functions and plain kernel versions (v5.14, v6.2) are how a fact is
sourced; the project's own docs/ say the rest."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# A citation that points outside the repository: a spec section ("SEMANTICS 2.2"), the
# performance notes by their file name, or a version code ("V14") instead of "v5.14".
OUTSIDE = re.compile(r"SEMANTICS|(?<!docs/)PERFORMANCE\.md|\bV(13|14|15|17|62)\b")
THIS_FILE = Path(__file__).resolve()


def tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    paths = [REPO / name for name in names]
    return [path for path in paths if path.is_file() and path.resolve() != THIS_FILE
            and path.suffix not in {".png", ".pkvm", ".jsonl", ".json"}]


def test_no_file_cites_a_document_the_repository_does_not_contain() -> None:
    found = []
    for path in tracked_text_files():
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not found, "\n".join(found)
