"""nodes/lists.py: the one parser of list inputs (tags, prompts, seeds, strengths, per-block values)."""
from __future__ import annotations

from importlib import import_module

import pytest

import comfy_stubs
from trainer.errors import CrucibleError


@pytest.fixture(scope="module")
def lists():
    comfy_stubs.load_pack()
    return import_module(f"{comfy_stubs.PACK_NAME}.nodes.lists")


def test_items_split_on_lines_and_commas_and_blanks_go(lists):
    assert lists.split_list(" red hat,\r\nblue sky ,, \n\n smile ") == ("red hat", "blue sky", "smile")
    assert lists.lines("a photo, of sks\r\n\n  second prompt ") == ("a photo, of sks", "second prompt")
    assert lists.split_list("") == () and lists.lines(None) == ()


def test_numbers(lists):
    assert lists.numbers("0.5, 1;\n2", "x") == (0.5, 1.0, 2.0)
    assert lists.numbers("8, 8.0, 0", "x", whole=True) == (8, 8, 0)
    big = 2**64 - 1
    assert lists.numbers(str(big), "seeds", whole=True, lo=0, hi=big) == (big,)  # exact, not via float
    with pytest.raises(CrucibleError, match="'seeds' must be whole numbers separated by commas"):
        lists.numbers("1.5", "'seeds'", whole=True)
    with pytest.raises(CrucibleError, match="must be finite numbers between -100 and 100"):
        lists.numbers("0.5, 1e6", "'strengths'", lo=-100.0, hi=100.0)
    with pytest.raises(CrucibleError, match="must be finite numbers, not 'nan'"):
        lists.numbers("nan", "'block_alphas'")
    with pytest.raises(CrucibleError, match="'block_dims' must be whole numbers"):
        lists.numbers("4, four", "'block_dims'", whole=True)
