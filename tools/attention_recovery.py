"""Attention logits in `--recover`: q and k re-fitted separately vs jointly for q.k^T.

    python tools/attention_recovery.py [--data DIR] [--calib-batches 4] [--batch 32]
                                       [--out tools/results/attention_recovery.md]

``models/ref_vit.onnx`` (the 4-block ViT trained here on synthetic glyphs) is
pruned with each ratios line below, then recovered by ridge (``--recover``'s
method) twice from the same plan: with ``attention_logits`` off (every kept q
and k column re-fitted to its own original column) and on (the default: per
head, q and k fitted together so that the kept dims reproduce the original
logits). Calibration: unlabelled *train* images; evaluation: the *val* split
(other images). Top-1 on val / top-1 agreement with the unpruned model, %, and
KL(original || pruned) on val; seconds of recovery.

``--graphs`` also runs the same weights with the attention written as one op,
converted here from the exported file: ``attention`` (the ONNX ``Attention``
op, opset 23, 4-D q/k/v: what torch's dynamo exporter writes for
``scaled_dot_product_attention`` at opset 23), ``mha`` (onnxruntime's
``MultiHeadAttention``, 3-D q/k/v) and ``packed`` (onnxruntime's ``Attention``
with the qkv layer's weight and bias inside the op, as its transformer
optimizer fuses BERT-style encoders).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import onnx

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxprune import runtime  # noqa: E402
from onnxprune.api import prune  # noqa: E402
from onnxprune.plan.importance.calib import Calibration, load  # noqa: E402
from common import md, write_results  # noqa: E402
from recovery_table import val_set  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402

RATIOS = [
    {"kinds": {"head_dim": 0.25}, "scope": "local"},
    {"kinds": {"head_dim": 0.5}, "scope": "local"},
    {"kinds": {"head_dim": 0.5, "mlp": 0.5}, "scope": "local"},
    {"kinds": {"head_dim": 0.5, "heads": 0.34, "mlp": 0.5}, "scope": "local"},
    # what --recover plans under a MACs budget (scope damage, l2 ranks): where the budget goes is measured
    {"target_macs": 0.7, "scope": "damage", "importance": "l2"},
    {"target_macs": 0.5, "scope": "damage", "importance": "l2"},
]


SUBSET = [0, 1, 4]  # the ratios lines run on the converted graphs


def _producer(g, name):
    return next((n for n in g.node if name in n.output), None)


def _scalar(inits, name):
    a = inits.get(name)
    return float(a.reshape(-1)[0]) if a is not None and a.size == 1 else None


def as_attention_op(proto: onnx.ModelProto, kind: str) -> onnx.ModelProto:
    """``proto`` with every ``softmax(q*s1 @ k^T*s2) @ v`` (the exporter's
    decomposed scaled_dot_product_attention) replaced by one op: ``attention``
    (ONNX Attention, 4-D) or ``mha`` (com.microsoft MultiHeadAttention, 3-D,
    with transposes and reshapes around it). The same function, other graph."""
    from onnx import helper, numpy_helper, shape_inference

    m = onnx.ModelProto()
    m.CopyFrom(proto)
    g = m.graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in shape_inference.infer_shapes(proto).graph.value_info}
    new, drop, extra = {}, set(), []
    for sm in [n for n in g.node if n.op_type == "Softmax"]:
        qk = _producer(g, sm.input[0])
        av = next(n for n in g.node if n.op_type == "MatMul" and n.input[0] == sm.output[0])
        sides, scale = [], 1.0
        for v in qk.input:
            p = _producer(g, v)
            if p is not None and p.op_type == "Mul" and _scalar(inits, p.input[1]) is not None:
                scale *= _scalar(inits, p.input[1])
                drop.add(p.name)
                v = p.input[0]
            sides.append(v)
        q, kt = sides
        k = kt
        while _producer(g, k).op_type in ("Reshape", "Transpose"):  # k^T as the exporter builds it, back to k
            k = _producer(g, k).input[0]
        v = av.input[1]
        heads = shapes[q][1]
        out = av.output[0]
        drop |= {qk.name, sm.name, av.name}
        name = sm.name + "_as_op"
        if kind == "attention":
            new[av.name] = [helper.make_node("Attention", [q, k, v], [out], name=name, scale=scale)]
            continue
        if kind == "packed":  # the qkv layer behind q, and the head merge after the output, go into the op
            t, bias = q, None
            while _producer(g, t).op_type != "MatMul":
                p = _producer(g, t)
                bias = next((i for i in p.input if i in inits), bias) if p.op_type == "Add" else bias
                t = p.input[0]
            mm = _producer(g, t)
            merge = next(n for n in g.node if n.op_type == "Transpose" and n.input[0] == out)
            merged = next(n for n in g.node if n.op_type == "Reshape" and n.input[0] == merge.output[0])
            drop |= {merge.name}
            new[merged.name] = [helper.make_node("Attention", [mm.input[0], mm.input[1], bias], [merged.output[0]],
                                                 name=name, domain="com.microsoft", num_heads=int(heads), scale=scale)]
            continue
        flat = name + "_flat"
        extra += [numpy_helper.from_array(np.array([0, 0, -1], np.int64), flat),
                  numpy_helper.from_array(np.array([0, 0, heads, -1], np.int64), name + "_split")]
        nodes = []
        for t in (q, k, v):
            nodes += [helper.make_node("Transpose", [t], [f"{name}_{t}_t"], name=f"{name}_{t}_t", perm=[0, 2, 1, 3]),
                      helper.make_node("Reshape", [f"{name}_{t}_t", flat], [f"{name}_{t}_3"], name=f"{name}_{t}_3")]
        nodes += [helper.make_node("MultiHeadAttention", [f"{name}_{t}_3" for t in (q, k, v)], [name + "_o3"],
                                   name=name, domain="com.microsoft", num_heads=int(heads), scale=scale),
                  helper.make_node("Reshape", [name + "_o3", name + "_split"], [name + "_o4"], name=name + "_o4"),
                  helper.make_node("Transpose", [name + "_o4"], [out], name=name + "_out", perm=[0, 2, 1, 3])]
        new[av.name] = nodes
    kept = []
    for n in g.node:
        kept += new.get(n.name, []) if n.name in new else [] if n.name in drop else [n]
    while True:  # drop what only fed the removed nodes (k^T's reshapes, their shape arithmetic)
        used = {i for n in kept for i in n.input} | {o.name for o in g.output}
        live = [n for n in kept if any(o in used for o in n.output)]
        if len(live) == len(kept):
            break
        kept = live
    del g.node[:]
    g.node.extend(kept)
    g.initializer.extend(extra)
    del g.value_info[:]
    for op in m.opset_import:
        if op.domain in ("", "ai.onnx"):
            op.version = 23
    if kind in ("mha", "packed"):
        m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.checker.check_model(m)
    return m


def logits(proto, x, batch=100):
    s = runtime.session(proto, threads=os.cpu_count() or 1)
    name = s.get_inputs()[0].name
    return np.concatenate([s.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def kl(p_logits, q_logits) -> float:
    lp = p_logits - p_logits.max(1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(1, keepdims=True))
    lq = q_logits - q_logits.max(1, keepdims=True)
    lq = lq - np.log(np.exp(lq).sum(1, keepdims=True))
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--calib-batches", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--graphs", default="matmul,attention,mha,packed",
                    help="matmul (the exported file), attention (ONNX Attention op), mha (MultiHeadAttention), "
                         "packed (com.microsoft Attention with the q/k/v projection inside)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "attention_recovery.md"))
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    x, y = val_set(data)
    path = os.path.join(MODELS, "ref_vit.onnx")
    orig = onnx.load(path)
    l0 = logits(orig, x)
    p0 = l0.argmax(1)
    cal = load(data, orig, args.calib_batches, args.batch)
    nolabels = Calibration(cal.batches, None, cal.source + ", labels dropped")

    def score(proto):
        lg = logits(proto, x)
        p = lg.argmax(1)
        return 100 * (p == y).mean(), 100 * (p == p0).mean(), kl(l0, lg)

    files = {"matmul": path}
    for kind in args.graphs.split(","):
        if kind != "matmul":
            files[kind] = os.path.join(tmp, f"ref_vit_{kind}.onnx")
            onnx.save(as_attention_op(orig, kind), files[kind])
    label = {"matmul": "MatMul + Softmax (as exported)", "attention": "ONNX Attention op",
             "mha": "MultiHeadAttention (com.microsoft)", "packed": "packed-weight Attention (com.microsoft)"}
    rows, raw = [], []
    for kind, path in [(k, files[k]) for k in args.graphs.split(",")]:
        for ratios in RATIOS if kind == "matmul" else [RATIOS[i] for i in SUBSET]:
            res = prune(path, ratios, calib=nolabels if ratios.get("scope") == "damage" else None)
            macs = res.after["macs"] / res.before["macs"]
            what = json.dumps(ratios["kinds"]) + " (local)" if "kinds" in ratios else \
                f"target_macs {ratios['target_macs']:.0%} (damage, l2: --recover's plan)"
            cells = [label[kind], what, f"{100 * macs:.1f}%", "%.1f / %.1f / %.3f" % score(res.proto)]
            entry = {"graph": kind, "ratios": ratios, "macs_kept": macs, "pruned": score(res.proto)}
            for joint in (False, True):
                r = prune(path, plan=res.plan_json, calib=nolabels, recover="ridge",
                          recover_options={"attention_logits": joint})
                s = score(r.proto)
                heads = [lr for lr in r.recovery if lr.method == "qk-logits"]
                cells += ["%.1f / %.1f / %.3f" % s, f"{r.timings['recover']:.1f}s"]
                entry["joint" if joint else "separate"] = {"score": s, "seconds": r.timings["recover"],
                                                           "logit_rows": [lr.as_dict() for lr in heads]}
                if joint:
                    cells.append(", ".join(lr.outputs_kept for lr in heads if lr.status != "skipped") or "none")
            rows.append(cells)
            raw.append(entry)
            print(" | ".join(cells), flush=True)
    head = ["attention in the file", "ratios", "MACs kept", "pruned", "q, k separate", "time", "q, k joint (default)", "time",
            "heads fitted jointly per block"]
    text = ("# Attention logits in the re-fit\n\nref_vit (4 blocks, 3 heads of 64, trained here on synthetic glyphs); "
            f"calibration {args.calib_batches} x {args.batch} unlabelled train images, evaluation {len(x)} val images. "
            "Cells: top-1 on val / top-1 agreement with the original, % / KL(original || model). Ridge recovery from "
            "the same plan, with q and k re-fitted column by column or jointly for the logits. CPU, "
            f"{os.cpu_count()} threads.\n\n" + md(head, rows) + "\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()
