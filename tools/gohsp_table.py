"""README table: GOHSP soft pruning (ADMM) vs hard pruning with the same total
epochs, at two sparsities, and rho sensitivity (GOHSP, Fig. 3 and Fig. 5),
on the trained reference ViT.

    python tools/gohsp_table.py [--admm-epochs 2] [--ft-epochs 1] [--rhos 0.0001,0.001,0.01]

Also: the Erdos-Renyi allocation of one overall column sparsity (0.3, 0.5).

* soft: ``onnxprune gohsp`` (GOHSP head ranking -> mask, ADMM for
  ``--admm-epochs`` with SGD lr 0.01, then hard prune and ``--ft-epochs`` of
  fine-tuning, recipe ``quick``, KD from the unpruned model);
* soft, matched: the same, but the ADMM phase trains with the fine-tuning
  recipe (AdamW lr 1e-3, label smoothing, KD from the unpruned model:
  ``--admm-recipe quick``), so that it differs from hard only by ADMM;
* hard: prune at once with the same plan criteria (GOHSP for heads, l1 for
  columns, the paper's hard-pruning ablation) and fine-tune for
  ``admm + ft`` epochs with the same recipe and teacher.
Writes tools/results/gohsp_table.md and a plot of the ADMM curves.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from onnxprune import io  # noqa: E402
from onnxprune.api import analyze, prune  # noqa: E402
from onnxprune.methods.gohsp import GohspOptions, gohsp, plot_history  # noqa: E402
from onnxprune.torchbridge.train import Options, evaluate_onnx, finetune  # noqa: E402
from onnxprune.plan.importance.calib import load  # noqa: E402
from common import md, write_results  # noqa: E402
from train_reference import MODELS, glyph_data  # noqa: E402

SPARSITIES = {
    "30%": {"kinds": {"heads": 0.34, "head_dim": 0.25, "mlp": 0.3}},
    "50%": {"kinds": {"heads": 0.34, "head_dim": 0.5, "mlp": 0.5}},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data")
    ap.add_argument("--admm-epochs", type=int, default=2)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--rho", type=float, default=1e-3)
    ap.add_argument("--lam", type=float, default=1e-2)
    ap.add_argument("--rhos", default="0.0001,0.001,0.01")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "gohsp_table.md"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    data = glyph_data(args.data, tmp)
    src = os.path.join(MODELS, "ref_vit.onnx")
    base = evaluate_onnx(src, data, 64)
    t0 = time.perf_counter()
    rows, raw = [], {}

    def soft(tag, ratios, rho, recipe="paper", sparsity=None):
        out = os.path.join(tmp, f"soft_{tag}.onnx")
        r = gohsp(src, GohspOptions(data=data, output=out, ratios=ratios, rho=rho, lam=args.lam, admm_epochs=args.admm_epochs,
                                    finetune_epochs=args.ft_epochs, teacher=src, progress=False, admm_recipe=recipe,
                                    sparsity=sparsity))
        return r

    for name, ratios in SPARSITIES.items():
        r = soft(name, ratios, args.rho)
        raw[f"soft {name}"] = r
        q = soft(f"{name}_quick", ratios, args.rho, "quick")
        raw[f"soft matched {name}"] = q
        # hard: same plan criteria, pruned at once, same total epochs of fine-tuning
        rd = dict(ratios, importance={"heads": "gohsp", "default": "l1"}, scope="local")
        res = prune(src, rd, calib=load(data, io.read_proto(src), 4, 32))
        hp = os.path.join(tmp, f"hard_{name}.onnx")
        io.save(res.proto, hp)
        acc_hard0 = evaluate_onnx(hp, data, 64)
        h = finetune(hp, Options(data=data, output=os.path.join(tmp, f"hard_{name}_ft.onnx"), teacher=src, recipe="quick",
                                 epochs=args.admm_epochs + args.ft_epochs, lr=1e-3, batch_size=64, workers=2, progress=False))
        raw[f"hard {name}"] = {"top1_pruned": acc_hard0, "top1_final": h["top1_after"], "macs": [res.before["macs"], res.after["macs"]]}
        mac = f"{r['macs']['after'] / r['macs']['before']:.3f}"
        rows.append([name, json.dumps(ratios["kinds"]), mac, f"{base:.1f}",
                     f"{r['top1_hard']:.1f} -> {r['top1_final']:.1f}", f"{q['top1_hard']:.1f} -> {q['top1_final']:.1f}",
                     f"{acc_hard0:.1f} -> {h['top1_after']:.1f}",
                     f"{r['history'][0]['masked_norm']:.3g} -> {r['history'][-1]['masked_norm']:.3g}", f"{r['soft_vs_hard_max_rel']:.2e}"])
        print(rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
        if name == "50%":
            plot_history(r["history"], os.path.join(HERE, "results", "gohsp_admm.png"), f"ref_vit, {name}, rho {args.rho}, lambda {args.lam}")
    rho_rows = []
    for rho in [float(x) for x in args.rhos.split(",")]:
        r = soft(f"rho{rho}", SPARSITIES["50%"], rho)
        raw[f"rho {rho}"] = r
        rho_rows.append([f"{rho:g}", f"{r['history'][-1]['w_minus_z']:.3g}", f"{r['soft_vs_hard_max_rel']:.2e}", f"{r['top1_soft']:.1f}",
                         f"{r['top1_hard']:.1f}", f"{r['top1_final']:.1f}"])
        print(rho_rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    # one overall column sparsity distributed by Erdos-Renyi (the paper's allocation)
    kind = {g.id: g.kind for g in analyze(src).groups}
    er_rows = []
    for sp in (0.3, 0.5):
        r = soft(f"er{sp}", {"kinds": {"heads": 0.34}}, args.rho, sparsity=sp)
        raw[f"er {sp}"] = r
        dens = {}
        for gid, d in r["erdos_renyi"].items():
            dens.setdefault(kind[int(gid)], set()).add(round(d, 3))
        er_rows.append([f"{sp:g}", ", ".join(f"{k} {'/'.join(f'{v:.2f}' for v in sorted(vs))}" for k, vs in sorted(dens.items())),
                        f"{r['macs']['after'] / r['macs']['before']:.3f}", f"{r['top1_hard']:.1f} -> {r['top1_final']:.1f}"])
        print(er_rows[-1], f"({time.perf_counter() - t0:.0f}s)", flush=True)
    head = ["sparsity", "ratios", "MACs kept", "top-1 original", f"soft: hard-pruned -> after {args.ft_epochs} ft epoch(s)",
            f"soft, matched recipe: hard-pruned -> after {args.ft_epochs} ft epoch(s)",
            f"hard: pruned -> after {args.admm_epochs + args.ft_epochs} ft epochs", "masked norm (1-M)*W during ADMM", "soft vs hard (max rel)"]
    text = md(head, rows)
    text += f"\n\nrho sensitivity (50% row, lambda {args.lam}, {args.admm_epochs} ADMM epochs)\n\n"
    h2 = ["rho", "final norm W-Z", "soft vs hard", "top-1 soft", "top-1 hard-pruned", "top-1 after ft"]
    text += md(h2, rho_rows)
    text += f"\n\nErdos-Renyi allocation (`--sparsity S`, heads 0.34, rho {args.rho}; kept fraction per kind and block)\n\n"
    text += md(["S", "column density kept", "MACs kept", f"soft: hard-pruned -> after {args.ft_epochs} ft epoch(s)"], er_rows)
    text += f"\n\n{time.perf_counter() - t0:.0f}s on {os.cpu_count()} CPU cores\n"
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()
