"""Dimension tokens: symbolic tensor sizes as (static factor, symbols) products.

A dimension is a *token* ``(n, syms)``: a static integer factor ``n`` times the
product of the symbolic names in ``syms``, a sorted tuple (a multiset: a name
may occur more than once). ``8`` is ``(8, ())``, ``batch`` is
``(1, ("batch",))``, ``3 * batch`` is ``(3, ("batch",))``. Tokens multiply by
multiplying the factors and merging the symbol lists (:func:`tprod`); ``a``
divides ``b`` when ``a``'s factor divides ``b``'s and ``a``'s symbols are a
sub-multiset of ``b``'s (:func:`divides`, :func:`tdiv`). A token with no symbol
has a known :func:`size`.

This is what lets a Reshape be matched axis by axis when sizes are symbolic:
``[batch, H, N, D] -> [-1, N, D]`` has input tokens
``(1,(batch,)), (H,()), (N,()), (D,())``; the ``-1`` is the total divided by the
known output dims, ``(H,(batch,))``, and :func:`axis_groups` pairs runs of
axes with equal products: ``([0, 1], [0])``, ``([2], [1])``, ``([3], [2])``
(batch*H -> one axis, N -> N, D -> D). A symbol shape inference invented for
such a product (``unk__2`` for ``batch*3``) is read back through
``Analysis.sym_alias``; dims measured by probing inference at two batch sizes
(``Analysis.dim_tokens``) take precedence.

Pure arithmetic, no rule registration: rules import from here, never the reverse.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import onnx_ir as ir

if TYPE_CHECKING:
    from onnxprune.core.analysis import Analysis

Token = tuple  # (int, tuple[str, ...]): static factor, sorted symbolic names

ONE: Token = (1, ())


def tokens(v: ir.Value, ctx: Analysis | None = None) -> list[Token] | None:
    """Dims of ``v`` as tokens; symbols a Reshape resolved earlier (``batch*3``
    named ``unk__2`` by shape inference) are replaced by what they stand for."""
    alias = ctx.sym_alias if ctx is not None else {}
    probed = ctx.dim_tokens.get(v.name) if ctx is not None else None
    if v.shape is None:
        c = v.const_value
        return None if c is None else [(int(d), ()) for d in c.shape]
    out = []
    for i, d in enumerate(v.shape.dims):
        if isinstance(d, int):
            out.append((d, ()))
        elif probed is not None and i < len(probed) and probed[i] is not None:
            out.append(probed[i])  # k * batch, measured by probing inference
        else:
            name = getattr(d, "value", None)
            out.append(alias.get(name) or (1, (name if name else f"?{v.name}:{i}",)))
    return out


def tprod(toks) -> Token:
    """Product of tokens."""
    n, syms = 1, []
    for t in toks:
        n *= t[0]
        syms.extend(t[1])
    return (n, tuple(sorted(syms)))


def divides(a: Token, b: Token) -> bool:
    """Whether ``a`` divides ``b`` (factor divides, symbols a sub-multiset)."""
    return b[0] % a[0] == 0 and not (Counter(a[1]) - Counter(b[1]))


def tdiv(a: Token, b: Token) -> Token:
    """``a / b``; only meaningful when ``divides(b, a)``."""
    return (a[0] // b[0], tuple(sorted((Counter(a[1]) - Counter(b[1])).elements())))


def size(t: Token) -> int | None:
    """The static size of a token, ``None`` when it has a symbol."""
    return None if t[1] else t[0]


def axis_groups(tin: list[Token], tout: list[Token]):
    """Pair runs of input and output axes with equal products (size-1 axes ignored):
    a list of ``(input axes, output axes)``, or ``None`` when they cannot be matched."""
    a = [(i, t) for i, t in enumerate(tin) if t != ONE]
    b = [(j, t) for j, t in enumerate(tout) if t != ONE]
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        ia, ja = [a[i][0]], [b[j][0]]
        pa, pb = a[i][1], b[j][1]
        i, j = i + 1, j + 1
        while pa != pb:
            # the side whose product divides the other's, else (an 8 x 7 grid read as
            # 7 x 8: neither divides) the side with the smaller static factor, takes its next axis
            grow_a = divides(pa, pb) or (not divides(pb, pa) and pa[1] == pb[1] and pa[0] < pb[0])
            if grow_a and i < len(a):
                pa = tprod([pa, a[i][1]])
                ia.append(a[i][0])
                i += 1
            elif not grow_a and j < len(b) and (divides(pb, pa) or (pa[1] == pb[1] and pb[0] < pa[0])):
                pb = tprod([pb, b[j][1]])
                ja.append(b[j][0])
                j += 1
            else:
                return None
        groups.append((ia, ja))
    if i < len(a) or j < len(b):
        return None
    return groups


def einsum_terms(equation: str, n_inputs: int):
    """``"bhid,bhjd->bhij"`` as ``(["bhid", "bhjd"], "bhij")`` (spaces ignored), or
    None for what the rules do not follow: an ellipsis, an implicit output, an
    index repeated within one operand, an output index no input has."""
    eq = equation.replace(" ", "")
    if "..." in eq or "->" not in eq:
        return None
    lhs, out = eq.split("->")
    ins = lhs.split(",")
    if len(ins) != n_inputs or any(len(set(t)) != len(t) for t in ins + [out]) or set(out) - set("".join(ins)):
        return None
    return ins, out


__all__ = ["Token", "ONE", "tokens", "tprod", "divides", "tdiv", "size", "axis_groups", "einsum_terms"]
