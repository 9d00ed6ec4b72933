from collections.abc import Iterator
from typing import Any

import pytest

from tests.service.fixtures import channel, raw_vm, service, stub  # noqa: F401


@pytest.fixture
def clients() -> Iterator[list[Any]]:
    """The clients a test opens (anything with `close()`), closed when it ends."""
    made: list[Any] = []
    yield made
    for client in made:
        client.close()
