"""onnxruntime's fused ops (``com.microsoft``), as its transformer optimizer emits them.

* ``SkipLayerNormalization`` / ``SkipSimplifiedLayerNormalization``: the residual
  join (input + skip (+ bias)) and a norm over the stream in one op; the sum
  output is the stream itself. Approximate (``norm``), like the unfused pair.
* ``EmbedLayerNormalization``: embedding tables summed and normalised; the
  tables' width is the stream.
* ``LayerNormalization`` / ``SimplifiedLayerNormalization``: as ONNX LayerNorm.
* ``Gelu``, ``QuickGelu``, ``FastGelu``, ``BiasGelu``, ``BiasAdd``: element-wise
  (a bias is a member; ``BiasAdd``'s skip is a residual join).
* ``Attention``: packed weight ``[C, q+k+v]`` = concat of (heads x head dim)
  for q, k and v; heads tied, q/k head dims tied. ``num_heads`` and
  ``qkv_hidden_sizes`` (made explicit at load) follow the plan, and the default
  scale is pinned at load (``io.pin_attention_scale``).
* ``MultiHeadAttention`` (3-D q/k/v) and ``GroupQueryAttention`` (heads pruned as
  whole KV groups). KV caches, packed/4-D layouts and rotary embeddings over
  head dims are frozen with a reason.
"""
from __future__ import annotations

import onnx_ir as ir

from onnxprune.core.analysis import IN, OUT, PARAM, RuleContext
from onnxprune.core.registry import Registry
from onnxprune.rules import elementwise, norm

RULES = Registry()

MS = "com.microsoft"


def _present(node: ir.Node, slot: int) -> bool:
    return slot < len(node.inputs) and node.inputs[slot] is not None


def _cache_used(node: ir.Node, in_slots, out_slots) -> bool:
    return any(_present(node, s) for s in in_slots) or any(
        s < len(node.outputs) and (node.outputs[s].uses() or node.outputs[s].is_graph_output()) for s in out_slots)


def _scale_pinned(ctx: RuleContext, node: ir.Node) -> bool:
    return float(ctx.attr(node, "scale", 0.0) or 0.0) != 0.0


# -- normalisations ------------------------------------------------------------------------
RULES.add(norm.layer_norm, "LayerNormalization", "SimplifiedLayerNormalization", domain=MS)
RULES.add(norm.layer_norm, "SimplifiedLayerNormalization")  # ORT also registers it in the ONNX domain


@RULES.rule("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", domain=MS)
@RULES.rule("SkipSimplifiedLayerNormalization")
def skip_layer_norm(ctx: RuleContext, node: ir.Node) -> None:
    x, skip = ctx.layout(node, 0), ctx.layout(node, 1)
    dskip = ctx.dims(node.inputs[1]) if _present(node, 1) else None
    if x is None or skip is None or dskip is None or len(skip) > len(x):
        ctx.freeze_node(node, "SkipLayerNormalization input of unknown rank")
        return
    params = (2, 3, 4) if node.op_type == "SkipLayerNormalization" else (2, 3)  # gamma, beta, bias / gamma, bias
    if any(_present(node, s) and ctx.const(node.inputs[s]) is None for s in params):
        ctx.freeze_node(node, "SkipLayerNormalization parameters are not constants")
        return
    out = list(x)
    skip_const = ctx.const(node.inputs[1]) is not None
    for back in range(len(skip)):
        i, j = len(x) - 1 - back, len(skip) - 1 - back
        if dskip[j] == 1 or (out[i] is None and skip[j] is None):
            continue
        if out[i] is None and skip_const:  # e.g. a position table's token axis
            ctx.freeze([skip[j]], node, "constant axis is not a channel axis")
            continue
        out[i] = ctx.tie(out[i], skip[j], node, " (skip connection)")
    c = out[-1]
    if not skip_const:
        ctx.spaces.tag(c, "residual")  # input + skip joins two activation paths
    ctx.spaces.tag(c, "norm")
    for s in params:
        if _present(node, s):
            ctx.member(node, s, 0, c, PARAM)
    ctx.set_layout(node.outputs[0], out)
    for k in (1, 2):  # mean, inverse std-dev: the channel axis is reduced
        if k < len(node.outputs):
            ctx.set_layout(node.outputs[k], out[:-1] + [None])
    if len(node.outputs) > 3:  # input + skip + bias: the residual stream itself
        ctx.set_layout(node.outputs[3], out)


@RULES.rule("EmbedLayerNormalization", domain=MS)
def embed_layer_norm(ctx: RuleContext, node: ir.Node) -> None:
    ids = ctx.layout(node, 0)
    tables = [s for s in (2, 3, 4) if _present(node, s)]
    params = tables + [s for s in (5, 6) if _present(node, s)]
    if ids is None or any(ctx.const(node.inputs[s]) is None for s in params) or 2 not in tables:
        ctx.freeze_node(node, "EmbedLayerNormalization with computed tables or unknown ids")
        return
    width = ctx.const(node.inputs[2]).shape[1]
    c = ctx.spaces.atom(width, origin=node.name)
    ctx.spaces.tag(c, "residual")  # word + position (+ segment) embeddings: the stream
    ctx.spaces.tag(c, "norm")
    for s in params:
        ctx.member(node, s, 1 if s in tables else 0, c, PARAM)
    out = tuple(ids) + (c,)
    ctx.set_layout(node.outputs[0], out)
    if len(node.outputs) > 2:
        ctx.set_layout(node.outputs[2], out)


# -- element-wise ----------------------------------------------------------------------------
RULES.add(elementwise.unary, "Gelu", "QuickGelu", domain=MS)
RULES.add(elementwise.broadcast, "BiasGelu", "FastGelu", domain=MS)


@RULES.rule("BiasAdd", domain=MS)
def bias_add(ctx: RuleContext, node: ir.Node) -> None:
    """X + bias + skip: a residual join on the channel axis."""
    elementwise.broadcast(ctx, node)
    out = ctx.known(node.outputs[0])
    if out and out[-1] is not None and all(ctx.const(node.inputs[s]) is None for s in (0, 2) if _present(node, s)):
        ctx.spaces.tag(out[-1], "residual")


# -- attention ----------------------------------------------------------------------------
def _tie_bias_heads(ctx: RuleContext, node: ir.Node, slot: int, heads) -> None:
    """An additive attention bias ``[B|1, H|1, S, T]``: its head axis follows the heads."""
    if not _present(node, slot):
        return
    lay, d = ctx.layout(node, slot), ctx.dims(node.inputs[slot])
    if lay is None or d is None or len(lay) != 4:
        ctx.freeze([heads], node, "attention bias of unknown layout")
        return
    if d[1] != 1:
        ctx.tie(heads, lay[1], node, " (attention bias per head)")
    rest = [s for s in (lay[0], lay[2], lay[3]) if s is not None]
    if ctx.const(node.inputs[slot]) is not None:
        for s in rest:  # a table's batch/sequence axes: never channels
            ctx.freeze([s], node, "constant axis is not a channel axis")
    else:
        ctx.freeze(rest, node, "channels on the sequence axes of an attention bias")


@RULES.rule("Attention", domain=MS)
def ms_attention(ctx: RuleContext, node: ir.Node) -> None:
    """Packed-weight attention: x [B,S,C] @ W [C, q+k+v] (+ bias), heads split inside."""
    x, w = ctx.layout(node, 0), ctx.const(node.inputs[1]) if _present(node, 1) else None
    if x is None or len(x) != 3 or w is None or w.ndim != 2 or (_present(node, 2) and ctx.const(node.inputs[2]) is None):
        ctx.freeze_node(node, "Attention with computed weights or input not [B,S,C]")
        return
    if _cache_used(node, (4, 6), (1,)):
        ctx.freeze_node(node, "Attention with a KV cache (past/present)")
        return
    if ctx.attr(node, "do_rotary", 0):
        ctx.freeze_node(node, "Attention with rotary embedding over head dims")
        return
    nh = int(ctx.attr(node, "num_heads", 0))
    sizes = ctx.attr(node, "qkv_hidden_sizes")
    sizes = [int(s) for s in sizes] if sizes is not None else [w.shape[1] // 3] * 3
    if not nh or sum(sizes) != w.shape[1] or sizes[0] != sizes[1] or sizes[0] % nh or sizes[2] % nh:
        ctx.freeze_node(node, "Attention with inconsistent num_heads / qkv_hidden_sizes")
        return
    t = ctx.spaces
    heads = t.atom(nh, origin=node.name)
    qd = t.atom(sizes[0] // nh, origin=node.name)
    explicit = ctx.attr(node, "qkv_hidden_sizes") is not None
    vd = t.atom(sizes[2] // nh, origin=node.name) if explicit else qd  # without the attribute q, k, v share D
    q, k, v = t.product([heads, qd]), t.product([heads, qd]), t.product([heads, vd])
    qkv = t.concat([q, k, v], origin=node.name)
    ctx.member(node, 1, 0, x[2], IN)
    ctx.member(node, 1, 1, qkv, OUT)
    if _present(node, 2):
        ctx.member(node, 2, 0, qkv, PARAM)
    t.tag(heads, "heads")
    t.tag(qd, "head_dim")
    t.tag(vd, "head_dim")
    ctx.attr_entry(node, "num_heads", [heads])
    if explicit:
        for i, s in enumerate((q, k, v)):
            ctx.attr_entry(node, "qkv_hidden_sizes", [s], index=i)
    if not _scale_pinned(ctx, node):
        ctx.freeze([qd], node, "default scale 1/sqrt(head dim) is not pinned")
    # mask_index (slot 3) is [B], [B,S], [B,S,T] or [B,1,S,T]: no channel axis
    _tie_bias_heads(ctx, node, 5, heads)
    ctx.extent(node, "q", q)
    ctx.extent(node, "v", v)
    ctx.set_layout(node.outputs[0], (x[0], x[1], t.product([heads, vd], origin=node.name)))


def _factor_width(ctx: RuleContext, node: ir.Node, slot: int, sizes):
    lay, d = ctx.layout(node, slot), ctx.dims(node.inputs[slot])
    if lay is None or d is None or len(lay) != 3 or d[2] is None or lay[2] is None:
        return None
    return ctx.spaces.factor(lay[2], sizes, origin=node.name)


@RULES.rule("MultiHeadAttention", domain=MS)
def multi_head_attention(ctx: RuleContext, node: ir.Node) -> None:
    """Separate q [B,S,H*D], k [B,T,H*D], v [B,T,H*Dv] (+ packed bias [q+k+v])."""
    if not (_present(node, 1) and _present(node, 2)) or any(ctx.rank(node.inputs[s]) != 3 for s in range(3)):
        ctx.freeze_node(node, "MultiHeadAttention with packed or 4-D q/k/v")
        return
    if _cache_used(node, (6, 7, 8, 9), (1, 2)):
        ctx.freeze_node(node, "MultiHeadAttention with a KV cache (past/present)")
        return
    nh = int(ctx.attr(node, "num_heads", 0))
    widths = [ctx.dims(node.inputs[s])[2] for s in range(3)]
    if not nh or any(w is None or w % nh for w in widths) or widths[0] != widths[1]:
        ctx.freeze_node(node, "MultiHeadAttention widths do not split into num_heads")
        return
    parts = [_factor_width(ctx, node, s, [nh, widths[s] // nh]) for s in range(3)]
    if any(p is None for p in parts):
        ctx.freeze_node(node, "MultiHeadAttention q/k/v widths are not tracked")
        return
    (qh, qd), (kh, kd), (vh, vd) = parts
    t = ctx.spaces
    heads = ctx.tie(ctx.tie(qh, kh, node, " (heads)"), vh, node, " (heads)")
    qd = ctx.tie(qd, kd, node, " (q/k head dim)")
    lk, lv = ctx.layout(node, 1), ctx.layout(node, 2)
    if lk[1] is not None or lv[1] is not None:
        ctx.tie(lk[1], lv[1], node, " (key/value length)")
    t.tag(heads, "heads")
    t.tag(qd, "head_dim")
    t.tag(vd, "head_dim")
    ctx.attr_entry(node, "num_heads", [heads])
    if _present(node, 3):
        if ctx.const(node.inputs[3]) is None:
            ctx.freeze_node(node, "MultiHeadAttention bias is not a constant")
            return
        qkv = t.concat([t.product([heads, qd]), t.product([heads, qd]), t.product([heads, vd])], origin=node.name)
        ctx.member(node, 3, 0, qkv, PARAM)
    if not _scale_pinned(ctx, node):
        ctx.freeze([qd], node, "default scale 1/sqrt(head dim) is not pinned")
    # key_padding_mask (slot 4) has no channel axis
    _tie_bias_heads(ctx, node, 5, heads)
    q = ctx.layout(node, 0)
    ctx.set_layout(node.outputs[0], (q[0], q[1], t.product([heads, vd], origin=node.name)))


@RULES.rule("GroupQueryAttention", domain=MS)
def group_query_attention(ctx: RuleContext, node: ir.Node) -> None:
    """q [B,S,Hq*D], k/v [B,T,Hkv*D]: each KV head serves Hq/Hkv query heads, so heads
    go only as whole KV groups; q, k and v share D."""
    if not (_present(node, 1) and _present(node, 2)):
        ctx.freeze_node(node, "GroupQueryAttention with packed QKV")
        return
    if _cache_used(node, (3, 4), (1, 2)):
        ctx.freeze_node(node, "GroupQueryAttention with a KV cache (past/present)")
        return
    nq, nkv = int(ctx.attr(node, "num_heads", 0)), int(ctx.attr(node, "kv_num_heads", 0))
    dims = [ctx.dims(node.inputs[s]) for s in range(3)]
    if not nq or not nkv or nq % nkv or any(d is None or len(d) != 3 or d[2] is None for d in dims) or dims[0][2] % nq:
        ctx.freeze_node(node, "GroupQueryAttention widths do not split into heads")
        return
    d = dims[0][2] // nq
    if dims[1][2] != nkv * d or dims[2][2] != nkv * d:
        ctx.freeze_node(node, "GroupQueryAttention k/v widths differ from kv_num_heads x head dim")
        return
    g = nq // nkv
    q = _factor_width(ctx, node, 0, [nkv, g, d])
    k = _factor_width(ctx, node, 1, [nkv, d])
    v = _factor_width(ctx, node, 2, [nkv, d])
    if q is None or k is None or v is None:
        ctx.freeze_node(node, "GroupQueryAttention q/k/v widths are not tracked")
        return
    t = ctx.spaces
    kv_heads = ctx.tie(ctx.tie(q[0], k[0], node, " (KV groups)"), v[0], node, " (KV groups)")
    hd = ctx.tie(ctx.tie(q[2], k[1], node, " (head dim)"), v[1], node, " (head dim)")
    ctx.freeze([q[1]], node, "query heads of one KV group go only with the group")
    lk, lv = ctx.layout(node, 1), ctx.layout(node, 2)
    if lk[1] is not None or lv[1] is not None:
        ctx.tie(lk[1], lv[1], node, " (key/value length)")
    t.tag(kv_heads, "heads")
    t.tag(hd, "head_dim")
    # onnxruntime checks head_size % 8 == 0 (and rotary pairs dims): head dims stay whole
    ctx.freeze([hd], node, "GroupQueryAttention head size must stay a multiple of 8")
    q_heads = t.product([kv_heads, q[1]], origin=node.name)
    ctx.attr_entry(node, "num_heads", [q_heads])
    ctx.attr_entry(node, "kv_num_heads", [kv_heads])
    _tie_bias_heads(ctx, node, 10, q_heads)
    if _present(node, 11):  # head_sink: one value per query head
        sink = ctx.layout(node, 11)
        ctx.tie(q_heads, sink[0] if sink else None, node, " (head sink)")
    lq = ctx.layout(node, 0)
    ctx.set_layout(node.outputs[0], (lq[0], lq[1], t.product([kv_heads, q[1], hd], origin=node.name)))
