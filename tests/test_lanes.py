"""The test lanes stay true as the suite changes: every lane assignment names a test path that
exists, and every lane is a marker that pyproject.toml declares (so `make check` can leave it
out by name)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from tests.conftest import LANES_BY_NODE_ID

REPO = Path(__file__).resolve().parent.parent


def declared_markers() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    lines = config["tool"]["pytest"]["ini_options"]["markers"]
    return {line.split(":", 1)[0] for line in lines}


def test_every_lane_assignment_names_an_existing_path() -> None:
    missing = [prefix for prefix in LANES_BY_NODE_ID
               if not (REPO / prefix.split("::", 1)[0]).exists()]
    assert not missing, missing


def test_every_single_test_assignment_names_a_test_of_its_file() -> None:
    """A renamed test would silently fall back into the fast lane: the name must still be
    defined (as a prefix: `test_x` covers `test_x_and_more` and parametrized ids)."""
    missing = []
    for prefix in LANES_BY_NODE_ID:
        path, _, name = prefix.partition("::")
        if name and not re.search(rf"^(async )?def {re.escape(name)}",
                                  (REPO / path).read_text(), re.M):
            missing.append(prefix)
    assert not missing, missing


def test_every_lane_is_a_declared_marker() -> None:
    used = {lane for lanes in LANES_BY_NODE_ID.values() for lane in lanes}
    assert used <= declared_markers()


def test_the_fast_lane_leaves_out_every_declared_marker() -> None:
    makefile = (REPO / "Makefile").read_text()
    [line] = [line for line in makefile.splitlines() if line.startswith("SLOW_LANES :=")]
    left_out = set(line.split(":=", 1)[1].replace(" or ", " ").split())
    assert left_out == declared_markers()
