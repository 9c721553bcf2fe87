"""The prefix index: the set of valid identifiers as tensors, for constrained beam search.

CART (Fang et al., ACL 2025) decodes identifiers with a beam search constrained by a prefix
tree of the valid identifiers, so that every generated sequence names a real candidate. Public
generative retrievers walk a Python trie once per beam per step; here the tree is a set of flat
per-level tables built once, and every query over a batch of states is one gather (dense levels) or
one gather + one ``searchsorted`` (sparse levels), identical on CPU and GPU.

States. A state at level ``l`` is the id of a node of depth ``l`` (a distinct prefix of length
``l``), numbered ``0..n_l-1`` in lexicographic order of the prefixes; the root is node 0 of level 0
and the leaves (depth ``L``) are the rows of the lexicographically sorted code table. ``-1`` is the
dead state: every query on it answers "nothing allowed" / ``-1``.

Tables per level ``l`` (choosing code ``l``, ``K_l`` codes, ``n_l`` parents, ``n_{l+1}`` children;
children are numbered in (parent, code) order, so a parent's children are contiguous):

- CSR, always: ``ptr (n_l + 1,)`` (children of ``s`` are ``ptr[s]..ptr[s+1]-1``), ``child_code
  (n_{l+1},)`` and ``child_key (n_{l+1},) = parent * K_l + code``, sorted, for ``searchsorted``.
- a dense bool ``mask (n_l + 1, K_l)`` (last row all False: the dead state) when ``n_l * K_l`` bytes
  stay within ``dense_mask_bytes`` (default 32 N + 1 MiB): ``allowed`` is one row gather.
  Otherwise ``allowed`` gathers up to ``fanout`` children per state from the CSR and scatters them.
- a dense int32 child ``table (n_l, K_l)`` (child id or -1) when ``n_l * K_l`` is within
  ``dense_table_entries`` (default 4 N + 65536): ``advance`` is one gather. Otherwise ``advance``
  is one ``searchsorted`` of ``parent * K_l + code`` in ``child_key``.

Build is one lexicographic sort plus linear passes: O(N log N) time; memory O(N L) (the dense
tables exist only while their size stays within a constant times N).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["PrefixIndex", "LevelTables", "DEAD"]

DEAD = -1  # the sentinel state: an invalid step, or a beam that was never alive


class LevelTables(NamedTuple):
    """Child tables of one level (see the module docstring)."""

    ptr: Tensor  # (n_l + 1,) int64
    child_code: Tensor  # (n_{l+1},) int64
    child_key: Tensor  # (n_{l+1},) int64, parent * K_l + code, strictly increasing
    table: Tensor | None  # (n_l, K_l) int32 child id or -1; None where too large
    mask: Tensor | None  # (n_l + 1, K_l) bool, last row False (dead); gathering bytes is fast
    fanout: int  # max children of one parent (python int: no device sync when used)


class PrefixIndex:
    """All valid identifiers as a prefix tree of flat tensors (CART, Fang et al., ACL 2025: constrained decoding).

    Build with :meth:`PrefixIndex.build`; the constructor only assembles already built tables.
    """

    def __init__(
        self,
        *,
        level_sizes: tuple[int, ...],
        levels: tuple[LevelTables, ...],
        n_nodes: tuple[int, ...],
        perm: Tensor,
    ) -> None:
        self.level_sizes = tuple(int(k) for k in level_sizes)
        self.levels = tuple(levels)
        self.n_nodes = tuple(n_nodes)  # nodes per depth 0..L (depth 0 = root, depth L = items)
        self.perm = perm  # (N,) leaf id -> row of the code table given to build()

    # ------------------------------------------------------------------ build
    @classmethod
    def build(
        cls,
        codes: Tensor,
        level_sizes: Sequence[int],
        *,
        dense_table_entries: int | None = None,
        dense_mask_bytes: int | None = None,
    ) -> "PrefixIndex":
        """Build the index from ``codes (N, L)`` (level-local codes, rows unique).

        ``dense_table_entries`` / ``dense_mask_bytes``: size limits of the dense child table and
        dense mask of a level (see the module docstring; the defaults keep memory O(N)); 0 forces
        the CSR path (the tests use it to cover both paths).
        """
        codes = torch.as_tensor(codes)
        if codes.dim() != 2:
            raise ValueError(f"codes must be (N, L), got shape {tuple(codes.shape)}")
        if codes.dtype.is_floating_point or codes.dtype == torch.bool:
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        codes = codes.long()
        n, depth = codes.shape
        sizes = tuple(int(k) for k in level_sizes)
        if len(sizes) != depth:
            raise ValueError(f"level_sizes has {len(sizes)} levels but codes has L={depth} columns")
        if n == 0 or depth == 0:
            raise ValueError("cannot build a prefix index over no identifiers (N = 0 or L = 0)")
        if any(k < 1 for k in sizes):
            raise ValueError(f"level sizes must be >= 1, got {sizes}")
        lo = codes.amin(dim=0)
        hi = codes.amax(dim=0)
        bad = (lo < 0) | (hi >= torch.tensor(sizes, device=codes.device))
        if bool(bad.any()):
            level = int(bad.nonzero()[0, 0])
            raise ValueError(
                f"codes of level {level} lie in [{int(lo[level])}, {int(hi[level])}], "
                f"outside 0..{sizes[level] - 1}"
            )
        if dense_table_entries is None:
            dense_table_entries = 4 * n + 65536
        if dense_mask_bytes is None:
            dense_mask_bytes = 32 * n + 2**20

        perm = _lexsort_rows(codes, sizes)
        srt = codes[perm]  # (N, L) rows in lexicographic order

        # new_node[l][i]: row i starts a new prefix of length l+1 (differs from row i-1 in 0..l)
        differs = torch.zeros(n, dtype=torch.bool, device=codes.device)
        differs[0] = True
        node_of_row = [torch.zeros(n, dtype=torch.long, device=codes.device)]  # depth 0: the root
        first_rows = [torch.zeros(1, dtype=torch.long, device=codes.device)]
        n_nodes = [1]
        for l in range(depth):
            step = torch.ones(n, dtype=torch.bool, device=codes.device)
            step[1:] = srt[1:, l] != srt[:-1, l]
            differs = differs | step
            node_of_row.append(torch.cumsum(differs, 0) - 1)  # (N,) node id at depth l+1
            first = differs.nonzero().squeeze(1)  # (n_{l+1},) first row of each node
            first_rows.append(first)
            n_nodes.append(int(first.numel()))
        if n_nodes[-1] != n:
            raise ValueError(
                f"identifiers are not unique: {n - n_nodes[-1]} duplicate rows "
                "(the last level must make every identifier unique)"
            )

        levels = []
        for l in range(depth):
            k = sizes[l]
            first = first_rows[l + 1]
            parent = node_of_row[l][first]  # (n_{l+1},) parent id at depth l
            code = srt[first, l]  # (n_{l+1},)
            counts = torch.bincount(parent, minlength=n_nodes[l])
            ptr = torch.zeros(n_nodes[l] + 1, dtype=torch.long, device=codes.device)
            ptr[1:] = torch.cumsum(counts, 0)
            table = mask = None
            if n_nodes[l] * k <= dense_table_entries:
                idt = torch.int32 if n_nodes[l + 1] < 2**31 else torch.long
                table = torch.full((n_nodes[l], k), DEAD, dtype=idt, device=codes.device)
                table[parent, code] = torch.arange(n_nodes[l + 1], dtype=idt, device=codes.device)
            if n_nodes[l] * k <= dense_mask_bytes:
                mask = torch.zeros(n_nodes[l] + 1, k, dtype=torch.bool, device=codes.device)
                mask[parent, code] = True
            levels.append(
                LevelTables(
                    ptr=ptr,
                    child_code=code,
                    child_key=parent * k + code,
                    table=table,
                    mask=mask,
                    fanout=int(counts.max()),
                )
            )
        return cls(level_sizes=sizes, levels=tuple(levels), n_nodes=tuple(n_nodes), perm=perm)

    # ------------------------------------------------------------- properties
    @property
    def depth(self) -> int:
        """L, the identifier length."""
        return len(self.level_sizes)

    @property
    def n_items(self) -> int:
        """N, the number of valid identifiers."""
        return self.n_nodes[-1]

    @property
    def device(self) -> torch.device:
        return self.perm.device

    def to(self, device: torch.device | str) -> "PrefixIndex":
        """A copy of the index on ``device`` (tables are moved, python ints kept)."""
        levels = tuple(
            LevelTables(
                ptr=t.ptr.to(device),
                child_code=t.child_code.to(device),
                child_key=t.child_key.to(device),
                table=None if t.table is None else t.table.to(device),
                mask=None if t.mask is None else t.mask.to(device),
                fanout=t.fanout,
            )
            for t in self.levels
        )
        return PrefixIndex(
            level_sizes=self.level_sizes, levels=levels, n_nodes=self.n_nodes, perm=self.perm.to(device)
        )

    def __repr__(self) -> str:
        kinds = [
            f"{'mask' if t.mask is not None else 'csr'}/{'table' if t.table is not None else 'search'}"
            for t in self.levels
        ]
        return (
            f"PrefixIndex(n_items={self.n_items}, level_sizes={self.level_sizes}, "
            f"nodes={self.n_nodes}, tables={kinds})"
        )

    # ---------------------------------------------------------------- queries
    def root(self, batch: int) -> Tensor:
        """``(batch,)`` root states (depth 0)."""
        return torch.zeros(batch, dtype=torch.long, device=self.device)

    def allowed(self, states: Tensor, level: int) -> Tensor:
        """``(B, K_level)`` bool: which codes of ``level`` extend each depth-``level`` state."""
        tab = self._level(level)
        k = self.level_sizes[level]
        alive = states >= 0
        if tab.mask is not None:
            # one gather; dead states read the all-False last row
            return tab.mask.index_select(0, torch.where(alive, states, self.n_nodes[level]))
        s = states.clamp(min=0)
        # CSR: gather up to `fanout` children per state, scatter them into a (B, K+1) mask whose
        # extra column absorbs the padding slots (so duplicate indices never collide with real ones).
        start = tab.ptr[s]
        count = torch.where(alive, tab.ptr[s + 1] - start, 0)
        j = torch.arange(tab.fanout, device=states.device)
        slot_ok = j[None, :] < count[:, None]  # (B, F)
        idx = (start[:, None] + j[None, :]).clamp(max=max(tab.child_code.numel() - 1, 0))
        cols = torch.where(slot_ok, tab.child_code[idx], k)  # (B, F)
        mask = torch.zeros(states.shape[0], k + 1, dtype=torch.bool, device=states.device)
        mask.scatter_(1, cols, True)
        return mask[:, :k]

    def advance(self, states: Tensor, level: int, codes: Tensor) -> Tensor:
        """``(B,)`` depth-``level+1`` child of each state along ``codes (B,)``; -1 where invalid."""
        tab = self._level(level)
        k = self.level_sizes[level]
        codes = codes.long()
        ok = (states >= 0) & (codes >= 0) & (codes < k)
        s = states.clamp(min=0)
        c = codes.clamp(0, k - 1)
        if tab.table is not None:
            child = tab.table.view(-1)[s * k + c].long()  # one gather; -1 where c is no child of s
            return torch.where(ok, child, DEAD)
        key = s * k + c
        pos = torch.searchsorted(tab.child_key, key).clamp(max=tab.child_key.numel() - 1)
        ok = ok & (tab.child_key[pos] == key)
        return torch.where(ok, pos, DEAD)

    def item_index(self, final_states: Tensor) -> Tensor:
        """Row of the code table for each depth-L state; -1 for dead states."""
        alive = final_states >= 0
        return torch.where(alive, self.perm[final_states.clamp(min=0)], DEAD)

    def lookup(self, codes: Tensor) -> Tensor:
        """Row index of each identifier ``codes (B, L)``; -1 where it is not valid."""
        states = self.root(codes.shape[0])
        for l in range(self.depth):
            states = self.advance(states, l, codes[:, l])
        return self.item_index(states)

    def _level(self, level: int) -> LevelTables:
        if not 0 <= level < self.depth:
            raise ValueError(f"level must be in 0..{self.depth - 1}, got {level}")
        return self.levels[level]


def _lexsort_rows(codes: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Permutation that sorts the rows of ``codes (N, L)`` lexicographically.

    One sort of a mixed-radix key when prod(K_l) fits in int64, else LSD stable sorts per column.
    """
    if math.prod(sizes) < 2**62:
        key = torch.zeros(codes.shape[0], dtype=torch.long, device=codes.device)
        for l, k in enumerate(sizes):
            key = key * k + codes[:, l]
        return torch.sort(key).indices  # keys are distinct for distinct rows
    perm = torch.arange(codes.shape[0], device=codes.device)
    for l in reversed(range(codes.shape[1])):
        perm = perm[torch.sort(codes[perm, l], stable=True).indices]
    return perm
