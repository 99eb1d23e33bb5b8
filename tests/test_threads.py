"""``torch_threads``: the torch thread count for one block, restored after it (also on an exception)."""

from __future__ import annotations

import pytest
import torch

from gigapath_core.finetune import runner
from gigapath_core.stages import tile_embedding
from gigapath_core.threads import torch_threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_sets_and_restores_also_on_error(two_threads):
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), torch_threads(1):
        assert torch.get_num_threads() == 1
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_same_count_restores_what_the_block_changed(two_threads):
    with torch_threads(2):
        torch.set_num_threads(1)  # e.g. a library call inside the block
    assert torch.get_num_threads() == 2


def test_one_helper_for_both_users():
    assert tile_embedding.torch_threads is torch_threads and runner.torch_threads is torch_threads
