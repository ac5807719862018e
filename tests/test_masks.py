"""Pattern tables, dense masks and Flex mask_mods against each other and the paper's definitions."""

import pytest
import torch

from ard_kernels import masks


def test_named_tables_for_four_blocks():
    t = lambda rows: torch.tensor(rows, dtype=torch.bool)  # noqa: E731
    assert torch.equal(masks.pattern_table("causal", 4), t([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert torch.equal(masks.pattern_table("diagonal", 4), torch.eye(4, dtype=torch.bool))
    assert torch.equal(masks.pattern_table("window", 4), t([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]))
    assert torch.equal(masks.pattern_table("first", 4), t([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]]))


@pytest.mark.parametrize("pattern", ["causal", "diagonal", "window", "first", "table"])
@pytest.mark.parametrize("lq,lk,block_size", [(10, 10, 3), (4, 10, 3), (1, 7, 7), (7, 7, 100)])
def test_flex_mask_mod_matches_dense_mask(pattern, lq, lk, block_size):
    nb = masks.num_blocks(lk, block_size)
    if pattern == "table":
        pattern = torch.rand(nb, nb) < 0.5
        pattern[:, 0] = True
    dense = masks.dense_mask(pattern, lq, lk, block_size)
    mod = masks.flex_mask_mod(pattern, lq, lk, block_size)
    r = torch.arange(lq).view(-1, 1).expand(lq, lk)
    c = torch.arange(lk).view(1, -1).expand(lq, lk)
    assert torch.equal(mod(0, 0, r, c), dense)


def test_dense_mask_block_structure():
    m = masks.dense_mask("causal", 5, 8, 3)  # queries are tokens 3..7 of 8: blocks 1, 1, 1, 2, 2
    assert m.shape == (5, 8)
    assert m[0, :6].all() and not m[0, 6:].any()
    assert m[4].all()


def test_allowed_block_pairs():
    assert masks.allowed_block_pairs("causal", 4) == 10
    assert masks.allowed_block_pairs("diagonal", 4) == 4
    assert masks.allowed_block_pairs("window", 4) == 7
    assert masks.allowed_block_pairs("first", 4) == 7


@pytest.mark.parametrize("pattern,nb,error,match", [
    ("block", 3, ValueError, "pattern: expected one of"),
    (torch.ones(2, 3, dtype=torch.bool), 3, ValueError, r"expected a table of shape \(3, 3\)"),
    (torch.ones(3, 3), 3, TypeError, "expected a bool tensor"),
    (torch.tensor([[True, False], [False, False]]), 2, ValueError, r"query block\(s\) \[1\] see no key block"),
    (3, 3, TypeError, "expected a str or a bool tensor"),
    ("causal", 0, ValueError, "nb: expected a positive"),
])
def test_pattern_errors(pattern, nb, error, match):
    with pytest.raises(error, match=match):
        masks.pattern_table(pattern, nb)


@pytest.mark.parametrize("lq,lk,block_size,match", [
    (3, 2, 1, "1 <= Lq <= Lk"), (0, 2, 1, "1 <= Lq <= Lk"), (1, 2, 0, "block_size"), (1, 2, 1.5, "block_size"),
])
def test_length_errors(lq, lk, block_size, match):
    with pytest.raises(ValueError, match=match):
        masks.dense_mask("causal", lq, lk, block_size)


@pytest.mark.parametrize("pattern", ["causal", "diagonal", "window", "first"])
def test_block_visible_matches_the_table(pattern):
    table = masks.pattern_table(pattern, 6)
    assert [[masks.block_visible(pattern, i, j) for j in range(6)] for i in range(6)] == table.tolist()
    assert masks.block_visible(table, 3, 1) == bool(table[3, 1])


@pytest.mark.cuda
def test_a_gpu_table_is_refused_inside_a_graph_capture(monkeypatch):
    """Outside a capture a CUDA table works (read on the host); inside one that read would be a sync."""
    table = masks.pattern_table("causal", 3).cuda()
    assert torch.equal(masks.pattern_table(table, 3), masks.pattern_table("causal", 3))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(ValueError, match="CPU tensor"):
        masks.pattern_table(table, 3)
