"""PrefixIndex (CART, constrained decoding) against a brute-force set-of-prefixes oracle."""
from __future__ import annotations

import itertools

import pytest
import torch

from cartlib.ids.prefix import DEAD, PrefixIndex

# both storage regimes: default (dense where small) and forced CSR + searchsorted
MODES = {
    "dense": {},
    "csr": {"dense_table_entries": 0, "dense_mask_bytes": 0},
    "mask+search": {"dense_table_entries": 0},
}


def random_table(n: int, sizes: tuple[int, ...], seed: int) -> torch.Tensor:
    """``n`` distinct random rows (n must not exceed prod(sizes))."""
    g = torch.Generator().manual_seed(seed)
    total = 1
    for k in sizes:
        total *= k
    flat = torch.randperm(total, generator=g)[:n]
    cols = []
    for k in reversed(sizes):
        cols.append(flat % k)
        flat = flat // k
    return torch.stack(cols[::-1], 1)


def check_against_oracle(codes: torch.Tensor, sizes: tuple[int, ...], index: PrefixIndex) -> None:
    rows = [tuple(r) for r in codes.tolist()]
    depth = len(sizes)
    prefixes = [{r[:l] for r in rows} for l in range(depth + 1)]
    assert index.n_items == len(rows)
    assert index.n_nodes == tuple(len(p) for p in prefixes)

    # walk every valid prefix from the root; same prefix -> same state, distinct -> distinct
    state_of: dict[tuple, int] = {(): 0}
    for l in range(depth):
        parents = sorted(prefixes[l])
        states = torch.tensor([state_of[p] for p in parents], dtype=torch.long)
        mask = index.allowed(states, l)
        assert mask.shape == (len(parents), sizes[l]) and mask.dtype == torch.bool
        expect = torch.tensor([[p + (c,) in prefixes[l + 1] for c in range(sizes[l])] for p in parents])
        assert torch.equal(mask, expect), f"allowed differs at level {l}"
        # advance along every (parent, code) pair, valid or not
        ps = states.repeat_interleave(sizes[l])
        cs = torch.arange(sizes[l]).repeat(len(parents))
        child = index.advance(ps, l, cs)
        assert torch.equal(child >= 0, expect.flatten())
        valid_children = child[child >= 0]
        assert valid_children.unique().numel() == valid_children.numel() == len(prefixes[l + 1])
        assert int(valid_children.min()) >= 0 and int(valid_children.max()) < index.n_nodes[l + 1]
        for (p, c), s in zip(itertools.product(parents, range(sizes[l])), child.tolist()):
            if s >= 0:
                state_of[p + (c,)] = s
    # leaves map back to their rows
    leaves = torch.tensor([state_of[r] for r in rows])
    assert torch.equal(index.item_index(leaves), torch.arange(len(rows)))
    assert torch.equal(index.lookup(codes), torch.arange(len(rows)))


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize(
    "n,sizes,seed",
    [(1, (3, 4, 2), 0), (7, (2, 3, 2), 1), (40, (4, 3, 5), 2), (60, (3, 5, 2, 4), 3), (24, (2, 3, 4), 4)],
)
def test_random_tables_match_oracle(mode: str, n: int, sizes: tuple[int, ...], seed: int) -> None:
    codes = random_table(n, sizes, seed)
    check_against_oracle(codes, sizes, PrefixIndex.build(codes, sizes, **MODES[mode]))


@pytest.mark.parametrize("mode", list(MODES))
def test_single_item(mode: str) -> None:
    codes = torch.tensor([[2, 0, 1]])
    index = PrefixIndex.build(codes, (3, 1, 2), **MODES[mode])
    check_against_oracle(codes, (3, 1, 2), index)
    assert index.allowed(index.root(1), 0).tolist() == [[False, False, True]]


@pytest.mark.parametrize("mode", list(MODES))
def test_every_item_shares_one_prefix(mode: str) -> None:
    # all items share (1, 3); only the last level differs
    codes = torch.tensor([[1, 3, u] for u in (4, 0, 2, 5)])
    sizes = (2, 4, 6)
    index = PrefixIndex.build(codes, sizes, **MODES[mode])
    check_against_oracle(codes, sizes, index)
    assert index.n_nodes == (1, 1, 1, 4)


@pytest.mark.parametrize("mode", list(MODES))
def test_maximal_fanout(mode: str) -> None:
    # every code of every level is used under every parent: the full product
    sizes = (3, 4, 2)
    codes = torch.tensor(list(itertools.product(*(range(k) for k in sizes))))
    codes = codes[torch.randperm(codes.shape[0], generator=torch.Generator().manual_seed(0))]
    index = PrefixIndex.build(codes, sizes, **MODES[mode])
    check_against_oracle(codes, sizes, index)
    assert [t.fanout for t in index.levels] == list(sizes)


@pytest.mark.parametrize("mode", list(MODES))
def test_dead_states_and_invalid_codes(mode: str) -> None:
    codes = random_table(10, (3, 3, 3), 5)
    index = PrefixIndex.build(codes, (3, 3, 3), **MODES[mode])
    dead = torch.full((4,), DEAD)
    assert not index.allowed(dead, 1).any()
    assert torch.equal(index.advance(dead, 1, torch.zeros(4, dtype=torch.long)), dead)
    root = index.root(3)
    # out-of-range codes are invalid steps, never an index error
    assert index.advance(root, 0, torch.tensor([-1, 3, 99])).tolist() == [DEAD] * 3
    assert index.item_index(dead).tolist() == [DEAD] * 4
    assert index.lookup(torch.tensor([[0, 0, 0]] * 2 + codes[:1].tolist())).tolist()[-1] == 0


def test_build_is_insensitive_to_row_order_and_keeps_row_ids() -> None:
    codes = random_table(30, (4, 4, 3), 6)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(1))
    a, b = PrefixIndex.build(codes, (4, 4, 3)), PrefixIndex.build(codes[perm], (4, 4, 3))
    assert torch.equal(b.lookup(codes[perm]), torch.arange(30))
    assert torch.equal(perm[b.lookup(codes)], a.lookup(codes))


def test_large_level_product_uses_lsd_sort() -> None:
    # prod(level sizes) >= 2^62: the mixed-radix key would overflow, LSD sorting takes over
    sizes = (2**21, 2**21, 2**21)
    g = torch.Generator().manual_seed(0)
    codes = torch.stack([torch.randint(0, 3, (50,), generator=g) * (2**19) for _ in sizes], 1)
    codes = torch.unique(codes, dim=0)
    index = PrefixIndex.build(codes, sizes)
    assert torch.equal(index.lookup(codes), torch.arange(codes.shape[0]))


def test_to_device_keeps_answers() -> None:
    codes = random_table(20, (3, 4, 3), 7)
    index = PrefixIndex.build(codes, (3, 4, 3)).to("cpu")
    assert index.device == torch.device("cpu")
    assert torch.equal(index.lookup(codes), torch.arange(20))


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="not unique"):
        PrefixIndex.build(torch.tensor([[0, 1], [0, 1]]), (2, 2))
    with pytest.raises(ValueError, match="outside"):
        PrefixIndex.build(torch.tensor([[0, 2]]), (2, 2))
    with pytest.raises(ValueError, match="outside"):
        PrefixIndex.build(torch.tensor([[-1, 0]]), (2, 2))
    with pytest.raises(ValueError, match="levels"):
        PrefixIndex.build(torch.tensor([[0, 1]]), (2, 2, 2))
    with pytest.raises(ValueError, match="N = 0"):
        PrefixIndex.build(torch.zeros(0, 2, dtype=torch.long), (2, 2))
    with pytest.raises(ValueError, match="integers"):
        PrefixIndex.build(torch.zeros(1, 2), (2, 2))
    index = PrefixIndex.build(torch.tensor([[0, 1]]), (2, 2))
    with pytest.raises(ValueError, match="level"):
        index.allowed(index.root(1), 2)
