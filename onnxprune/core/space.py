"""Channel spaces: the algebra that says which initializer axes shrink together.

Every prunable activation axis is described by a *space*. A space is either
an **atom** (a set of channels that can be pruned independently), **fixed**
(an extent that must never change: image channels, spatial sizes, the 3 of a
fused qkv), or **derived** from other spaces as a **concat** (Concat, Split,
Slice offsets) or a **product** (row-major: Flatten before Gemm, a Reshape of
width into heads x head_dim, grouped convolutions).

Spaces are unified with union-find when the graph ties two axes together
(residual Add, a MatMul contraction). An atom that later has to be split or
factorised is *refined* in place, so every axis that referenced it follows.
The atoms that remain (union-find roots of kind ``atom``) are the prunable
groups; a plan keeps a subset of each atom's indices, and :meth:`SpaceTable.kept`
expands that to the indices kept along any axis.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

import numpy as np

ATOM, FIXED, CONCAT, PRODUCT = "atom", "fixed", "concat", "product"


@dataclass(eq=False)
class Space:
    id: int
    size: int
    kind: str = ATOM
    children: list["Space"] = field(default_factory=list)
    parent: "Space | None" = None
    origin: str = ""  # human hint: the node that created it
    frozen: list[str] = field(default_factory=list)  # reasons, on roots
    tags: set[str] = field(default_factory=set)  # e.g. residual, norm, reduced

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"Space#{self.id}({self.kind},{self.size})"


class LayoutError(Exception):
    """Two layouts could not be reconciled; the caller freezes what it touched."""


class SpaceTable:
    """Owns every space of one analysis and the operations on them."""

    def __init__(self) -> None:
        self.spaces: list[Space] = []

    # -- creation -----------------------------------------------------------------
    def _new(self, size: int, kind: str, children=(), origin: str = "") -> Space:
        s = Space(len(self.spaces), None if size is None else int(size), kind, list(children), origin=origin)
        self.spaces.append(s)
        return s

    def atom(self, size: int, origin: str = "") -> Space:
        return self._new(size, ATOM, origin=origin)

    def fixed(self, size: int | None, origin: str = "") -> Space:
        """An extent that never changes; ``None`` is a dynamic one (a batch)."""
        return self._new(size, FIXED, origin=origin)

    def concat(self, parts: list[Space], origin: str = "") -> Space:
        if len(parts) == 1:
            return parts[0]
        return self._new(sum(p.size for p in parts), CONCAT, parts, origin)

    def product(self, parts: list[Space], origin: str = "") -> Space:
        parts = [p for p in parts if p.size != 1]
        if not parts:
            return self.fixed(1, origin)
        if len(parts) == 1:
            return parts[0]
        size = None if any(p.size is None for p in parts) else prod(p.size for p in parts)
        return self._new(size, PRODUCT, parts, origin)

    # -- union-find ---------------------------------------------------------------
    def find(self, s: Space) -> Space:
        root = s
        while root.parent is not None:
            root = root.parent
        while s.parent is not None and s.parent is not root:
            s.parent, s = root, s.parent
        return root

    def leaves(self, s: Space) -> list[Space]:
        """Atom/fixed roots that make up ``s``, outermost first."""
        r = self.find(s)
        if r.kind in (ATOM, FIXED):
            return [r]
        out: list[Space] = []
        for c in r.children:
            out.extend(self.leaves(c))
        return out

    def prunable(self, s: Space | None) -> bool:
        return s is not None and any(
            leaf.kind == ATOM and not leaf.frozen for leaf in self.leaves(s)
        )

    def freeze(self, s: Space | None, reason: str) -> None:
        if s is None:
            return
        for leaf in self.leaves(s):
            if leaf.kind == ATOM and reason not in leaf.frozen:
                leaf.frozen.append(reason)

    def tag(self, s: Space | None, tag: str) -> None:
        if s is None:
            return
        for leaf in self.leaves(s):
            leaf.tags.add(tag)

    def _merge(self, keep: Space, gone: Space) -> None:
        gone.parent = keep
        if keep.kind in (ATOM, FIXED):
            keep.frozen.extend(r for r in gone.frozen if r not in keep.frozen)
            keep.tags |= gone.tags
        else:
            for r in gone.frozen:
                self.freeze(keep, r)
            for t in gone.tags:
                self.tag(keep, t)

    def unify(self, a: Space, b: Space) -> Space:
        """Tie two spaces: the same index removed from one is removed from both."""
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return ra
        if ra.size != rb.size:
            if ra.size is None or rb.size is None:
                raise LayoutError("channels merged with a dynamic dimension")
            raise LayoutError(f"cannot tie widths {ra.size} and {rb.size}")
        if ra.kind == FIXED or rb.kind == FIXED:
            fixed, other = (ra, rb) if ra.kind == FIXED else (rb, ra)
            if other.kind != FIXED:
                self.freeze(other, "tied to a fixed extent")
            # keep the structured side as root so leaves stay reachable
            self._merge(other, fixed)
            return other
        if ra.kind == ATOM:
            self._merge(rb, ra)
            return rb
        if rb.kind == ATOM:
            self._merge(ra, rb)
            return ra
        if ra.kind == rb.kind and [c.size for c in ra.children] == [c.size for c in rb.children]:
            kids = list(zip(ra.children, rb.children))
            self._merge(ra, rb)
            for x, y in kids:
                self.unify(x, y)
            return ra
        # different structure over the same width: use the finer common refinement
        la, lb = self._flat_concat(ra), self._flat_concat(rb)
        if la is not None and lb is not None:
            cuts = sorted(set(np.cumsum(la).tolist()) | set(np.cumsum(lb).tolist()))
            sizes = np.diff([0] + cuts).tolist()
            for x, y in zip(self.split(ra, sizes), self.split(rb, sizes)):
                self.unify(x, y)
            return self.find(ra)
        raise LayoutError("incompatible channel layouts")

    # -- refinement -----------------------------------------------------------------
    def _flat_concat(self, r: Space) -> list[int] | None:
        if r.kind == CONCAT:
            out: list[int] = []
            for c in r.children:
                sub = self._flat_concat(self.find(c))
                if sub is None:
                    return None
                out.extend(sub)
            return out
        if r.kind in (ATOM, FIXED):
            return [r.size]
        return [r.size]  # a product is opaque: only cut at its borders

    def split(self, s: Space, sizes: list[int], origin: str = "") -> list[Space]:
        """Cut ``s`` into consecutive pieces of the given sizes (Split, Slice)."""
        if sum(sizes) != s.size:
            raise LayoutError(f"split sizes {sizes} do not cover width {s.size}")
        r = self.find(s)
        if len(sizes) == 1:
            return [r]
        if r.kind == FIXED:
            return [self.fixed(n, origin) for n in sizes]
        if r.kind == ATOM:
            kids = [self.atom(n, origin or r.origin) for n in sizes]
            for k in kids:
                k.frozen = list(r.frozen)
                k.tags = set(r.tags)
            r.kind, r.children, r.frozen, r.tags = CONCAT, kids, [], set()
            return kids
        if r.kind == PRODUCT:
            outer = self.find(r.children[0])
            inner = r.size // outer.size
            if all(n % inner == 0 for n in sizes):
                pieces = self.split(outer, [n // inner for n in sizes], origin)
                return [self.product([p] + r.children[1:], origin) for p in pieces]
            raise LayoutError("split inside a factorised axis")
        # concat: walk children, refining the one a cut falls into
        out: list[Space] = []
        kids = list(r.children)
        i = 0
        for n in sizes:
            part: list[Space] = []
            need = n
            while need > 0:
                c = kids[i]
                if c.size <= need:
                    part.append(c)
                    need -= c.size
                    i += 1
                else:
                    first, rest = self.split(c, [need, c.size - need], origin)
                    kids[i] = rest
                    part.append(first)
                    need = 0
            out.append(self.concat(part, origin))
        return out

    def factor(self, s: Space, sizes: list[int], origin: str = "", scales: list[int] | None = None) -> list[Space]:
        """View ``s`` as a row-major product of the given extents (a Reshape split).
        ``scales[j]``, for a dynamic extent (``None``): the static factor it
        carries (``12 * batch``: the legacy exporter folds the heads into the
        batch, ``[L, batch, E] -> [L, 12 * batch, E / 12]``); it is taken from
        the leading factor of the next static part."""
        dynamic = s.size is None or any(n is None for n in sizes)
        if not dynamic and prod(sizes) != s.size:
            raise LayoutError(f"factors {sizes} do not multiply to {s.size}")
        r = self.find(s)
        if dynamic and r.kind != PRODUCT:
            raise LayoutError("channels merged with a dynamic dimension")
        scales = list(scales) if scales is not None else [1] * len(sizes)
        real = [n for n in sizes if n != 1]
        extra = [m or 1 for n, m in zip(sizes, scales) if n != 1]
        if len(real) <= 1:
            return [r if n != 1 else self.fixed(1) for n in sizes]
        if r.kind == FIXED:
            return [self.fixed(n, origin) for n in sizes]
        if r.kind == ATOM:
            kids = [self.atom(n, origin or r.origin) for n in real]
            for k in kids:
                k.frozen = list(r.frozen)
                k.tags = set(r.tags)
            r.kind, r.children, r.frozen, r.tags = PRODUCT, kids, [], set()
            it = iter(kids)
            return [next(it) if n != 1 else self.fixed(1) for n in sizes]
        if r.kind == PRODUCT:
            kids = [self.find(c) for c in r.children]
            if [k.size for k in kids] == real and all(m == 1 for m in extra):
                it = iter(kids)
                return [next(it) if n != 1 else self.fixed(1) for n in sizes]
            # regroup: e.g. product(A, B) viewed as (A, b1, b2) when B factors
            out: list[list[Space]] = []
            j, carry = 0, 1  # carry: the static factor the last dynamic extent still needs
            for k in kids:
                need = k.size
                take = []
                if k.size is None:  # a dynamic extent stays whole
                    if j >= len(real) or real[j] is not None or carry != 1:
                        raise LayoutError("reshape crosses factor borders")
                    out.append([k])
                    carry = extra[j]
                    j += 1
                    continue
                lead = carry
                if carry != 1:
                    if need % carry:
                        raise LayoutError("reshape crosses factor borders")
                    need //= carry
                    carry = 1
                while need > 1 and j < len(real):
                    if real[j] is None or need % real[j] != 0:
                        raise LayoutError("reshape crosses factor borders")
                    take.append(real[j])
                    need //= real[j]
                    j += 1
                if need != 1:
                    raise LayoutError("reshape crosses factor borders")
                pieces = self.factor(k, [lead] * (lead != 1) + take, origin)
                if lead != 1:  # the leading piece joins the dynamic extent before it
                    out[-1].append(pieces[0])
                    pieces = pieces[1:]
                out.extend([p] for p in pieces)
            if carry != 1 or j != len(real):
                raise LayoutError("reshape crosses factor borders")
            it = iter(self.product(p, origin) for p in out)
            return [next(it) if n != 1 else self.fixed(1) for n in sizes]
        raise LayoutError("reshape of a concatenated axis")

    # -- expansion ------------------------------------------------------------------
    def kept(self, s: Space, plan: dict[int, np.ndarray]) -> np.ndarray:
        """Indices kept along an axis laid out as ``s`` under ``plan`` (atom id -> kept)."""
        r = self.find(s)
        if r.kind == ATOM:
            k = plan.get(r.id)
            return np.arange(r.size) if k is None else np.asarray(k, dtype=np.int64)
        if r.kind == FIXED:
            return np.arange(r.size)
        if r.kind == CONCAT:
            out, off = [], 0
            for c in r.children:
                out.append(self.kept(c, plan) + off)
                off += c.size
            return np.concatenate(out)
        sizes = [c.size for c in r.children]
        parts = [self.kept(c, plan) for c in r.children]
        grids = np.meshgrid(*parts, indexing="ij")
        return np.ravel_multi_index(tuple(g.ravel() for g in grids), sizes)

    def size_after(self, s: Space, plan: dict[int, np.ndarray]) -> int:
        r = self.find(s)
        if r.kind == ATOM:
            k = plan.get(r.id)
            return r.size if k is None else len(k)
        if r.kind == FIXED:
            return r.size
        vals = [self.size_after(c, plan) for c in r.children]
        return sum(vals) if r.kind == CONCAT else prod(vals)

    def leaf_map(self, s: Space, leaf: Space, n: int | None = None) -> np.ndarray:
        """For each of the ``n`` positions (default: its width) of an axis laid out as
        ``s``: the channel of ``leaf`` it belongs to, or -1. Used to score channels
        from any member tensor or captured activation; ``n`` resolves one dynamic
        (None-sized) factor of a product (batch x heads merged by dynamo)."""
        r = self.find(s)
        n = r.size if n is None else n
        if r is leaf:
            return np.arange(n)
        if r.kind in (ATOM, FIXED):
            return np.full(n, -1)
        sizes = [c.size for c in r.children]
        if r.kind == CONCAT:
            if None in sizes:
                return np.full(n, -1)
            return np.concatenate([self.leaf_map(c, leaf) for c in r.children])
        if sum(x is None for x in sizes) == 1:
            known = prod(x for x in sizes if x is not None)
            sizes = [n // known if x is None else x for x in sizes]
        if None in sizes or prod(sizes) != n:
            return np.full(n, -1)
        maps = [self.leaf_map(c, leaf, k) for c, k in zip(r.children, sizes)]
        hit = [i for i, m in enumerate(maps) if (m >= 0).any()]
        if not hit:
            return np.full(n, -1)
        i = hit[0]
        idx = np.indices(sizes).reshape(len(sizes), -1)
        return maps[i][idx[i]]
