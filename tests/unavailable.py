"""What a test does when a tool it drives is missing here: skip on a developer's machine,
fail under CI (CI=true), where .ci/run installs everything and every test must run."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason}, and CI must run every test (.ci/run installs it)", pytrace=False)
    pytest.skip(reason)
