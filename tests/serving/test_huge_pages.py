"""Large CPU tensors in 2 MB-aligned private mappings (rahf_serve/huge_pages.py)."""

from __future__ import annotations

import gc
import sys

import pytest
import torch

from rahf_serve import huge_pages

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="2 MB pages are asked of Linux only")


def mapped(address: int) -> bool:
    for line in open("/proc/self/maps"):
        start, end = (int(a, 16) for a in line.split()[0].split("-"))
        if start <= address < end:
            return True
    return False


@linux
def test_a_large_tensor_starts_on_a_huge_page_and_its_mapping_goes_with_its_last_view():
    t = huge_pages.empty((50, 576, 48), torch.float32)  # 5.5 MB
    assert t.shape == (50, 576, 48) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % huge_pages.HUGE_PAGE == 0
    t.copy_(torch.arange(t.numel(), dtype=torch.float32).view(t.shape))
    view, address = t[2:4], t.data_ptr()
    del t
    gc.collect()
    assert mapped(address) and view[0, 0, 0].item() == 2 * 576 * 48  # the view keeps the memory
    del view
    gc.collect()
    assert not mapped(address)


def test_small_tensors_and_the_switch_off_are_ordinary_ones(monkeypatch):
    small = huge_pages.empty((3, 4), torch.bfloat16)
    assert small.shape == (3, 4) and small.dtype == torch.bfloat16
    monkeypatch.setenv("RAHF_HUGE_PAGES", "0")
    plain = huge_pages.empty((50, 576, 48), torch.float32)
    assert plain.shape == (50, 576, 48) and plain.untyped_storage().nbytes() == plain.numel() * 4  # no spare page
