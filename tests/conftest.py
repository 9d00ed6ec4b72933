"""Make the repository root importable, so tests can `import tests.<helper>` however pytest
is started (`pytest`, `python -m pytest`, any --import-mode)."""

import os
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

# Under CI the property tests replay a fixed sequence of examples (reproducible runs);
# on developers' machines they explore new random examples every time.
if os.environ.get("CI"):
    from hypothesis import settings

    settings.register_profile("ci", derandomize=True, print_blob=True)
    settings.load_profile("ci")
