"""Make the repository root importable, so tests can `import tests.<helper>` however pytest
is started (`pytest`, `python -m pytest`, any --import-mode)."""

import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)
