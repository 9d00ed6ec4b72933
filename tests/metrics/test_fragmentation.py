"""Fragmentation figures against hand-computed values (mm/vmstat.c's definition)."""

from __future__ import annotations

import pytest
from pkvm_sim.metrics.fragmentation import largest_free_order, unusable_free_index


def test_one_big_block_is_usable_for_every_order_up_to_its_own() -> None:
    blocks = [0, 0, 0, 1]  # one 8-page block
    assert [unusable_free_index(blocks, j) for j in range(4)] == [0.0, 0.0, 0.0, 0.0]
    assert unusable_free_index(blocks, 4) == 1.0  # nothing can serve 16 pages
    assert largest_free_order(blocks) == 3


def test_mixed_blocks() -> None:
    # 4 single pages + 1 pair + 1 block of 8: 4 + 2 + 8 = 14 free pages.
    blocks = [4, 1, 0, 1]
    assert unusable_free_index(blocks, 0) == 0.0
    assert unusable_free_index(blocks, 1) == pytest.approx(4 / 14)  # the singles are unusable
    assert unusable_free_index(blocks, 2) == pytest.approx(6 / 14)  # and the pair
    assert unusable_free_index(blocks, 3) == pytest.approx(6 / 14)  # no order-2 block exists
    assert largest_free_order(blocks) == 3


def test_no_free_page_is_wholly_unusable() -> None:
    # mm/vmstat.c: "No free memory is interpreted as all free memory is unusable".
    assert unusable_free_index([0, 0, 0], 0) == 1.0
    assert largest_free_order([0, 0, 0]) == -1
    assert largest_free_order([]) == -1
