"""Time and peak memory of pruning, file to file: onnxprune vs Torch-Pruning.

For each timm model (random weights, one seed), in one run:
  * onnxprune: ``onnxprune MODEL.onnx --ratios R -o OUT.onnx`` in a fresh process
    (dynamo export; load, analyse, plan, rewrite, write, checker + ORT validation);
  * Torch-Pruning 1.6: a fresh process loads the checkpoint into the timm model, builds its
    dependency graph, prunes with its documented recipe (MetaPruner, group L2 magnitude; for
    ViTs ``num_heads`` + ``prune_num_heads`` and the attention modules' head counts reset
    afterwards), runs one forward pass and saves the model;
  * the stages of onnxprune's own run (in-process, same model) to show where the time goes.
Ratios: CNNs every group 0.5 (Torch-Pruning: pruning_ratio 0.5); ViTs embed, MLP and heads 0.5.

    python tools/prune_speed.py [--models resnet50,convnext_tiny,deit_base_patch16_224,vit_large_patch16_224]
                                [--huge] [--workdir DIR]

Prints a markdown table and writes tools/results/prune_speed.{md,json}.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import md, write_results  # noqa: E402

VIT = {"kinds": {"embed": 0.5, "mlp": 0.5, "heads": 0.5}}
CNN = {"default": 0.5}
MODELS = ["resnet50", "convnext_tiny", "deit_base_patch16_224", "vit_large_patch16_224"]

# VmHWM: this process's own peak (ru_maxrss would carry over the parent's size across exec)
PEAK = "print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], flush=True)"

ONNXPRUNE = """
import sys
from onnxprune.cli import main
rc = main(sys.argv[1:] + ['-q'])
{peak}
sys.exit(rc)
""".format(peak=PEAK)

TORCH_PRUNING = """
import sys, torch, timm, torch_pruning as tp
name, ckpt, out, vit = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == '1'
model = timm.create_model(name, pretrained=False)
model.load_state_dict(torch.load(ckpt, map_location='cpu', weights_only=True))
model.eval()
x = torch.randn(1, 3, 224, 224)
kw = {{}}
attn = [m for m in model.modules() if hasattr(m, 'qkv') and hasattr(m, 'num_heads')]
if vit:
    kw = dict(num_heads={{m.qkv: m.num_heads for m in attn}}, prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.5)
pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.5,
                              ignored_layers=[model.get_classifier()], **kw)
pruner.step()
for m in attn:  # the recipe: reset head counts and sizes after pruning
    m.num_heads = pruner.num_heads[m.qkv]
    m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    if hasattr(m, 'attn_dim'):
        m.attn_dim = m.num_heads * m.head_dim
with torch.no_grad():
    y = model(x)
assert y.shape == (1, 1000)
torch.save(model, out)
{peak}
""".format(peak=PEAK)

STAGES = """
import sys, time
t = time.perf_counter()
from onnxprune import io
from onnxprune.pipeline import Job
from onnxprune.validate.checks import validate
from onnxprune.plan import Ratios
import json
stages = {}
def mark(k):
    global t
    now = time.perf_counter(); stages[k] = round(now - t, 3); t = now
mark('import')
job = Job.open(sys.argv[1]); mark('load+analyse')
plan = job.plan(Ratios.from_dict(json.loads(sys.argv[2]))); mark('plan (importance)')
job.counts(); job.counts(plan); mark('params/MACs')
job.rewrite(plan); mark('rewrite')
io.save_model(job.model, sys.argv[3]); mark('write')
validate(sys.argv[3]); mark('validate')
stages['shape_inference_runs'] = io.STATS['shape_inference']
print('STAGES', json.dumps(stages))
"""


def child(code: str, args: list[str], cwd: str) -> tuple[float, float, str]:
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise RuntimeError(f"{args[0]}: exit {p.returncode}\n{p.stderr[-3000:]}")
    peak = int(p.stdout.split("PEAK_KB")[1].split()[0]) * 1024 if "PEAK_KB" in p.stdout else float("nan")
    return wall, peak, p.stdout


def prepare(name: str, workdir: str) -> tuple[str, str]:
    import torch
    import timm

    from onnxprune.torchbridge.export import export_timm

    onnx_path, ckpt = os.path.join(workdir, f"{name}.onnx"), os.path.join(workdir, f"{name}.pt")
    if not (os.path.exists(onnx_path) and os.path.exists(ckpt)):
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).eval()
        torch.save(model.state_dict(), ckpt)
        print(f"exporting {name} ...", file=sys.stderr, flush=True)
        export_timm(name, onnx_path, model=model)
        del model
    return onnx_path, ckpt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--huge", action="store_true", help="add vit_huge_patch14_224 (2.5 GB; needs ~15 GB to export)")
    ap.add_argument("--workdir", default=os.path.join(HERE, ".cache", "prune_speed"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    names = [m for m in args.models.split(",") if m] + (["vit_huge_patch14_224"] if args.huge else [])
    rows, js = [], []
    for name in names:
        onnx_path, ckpt = prepare(name, args.workdir)
        vit = "vit" in name or "deit" in name
        ratios = json.dumps(VIT if vit else CNN)
        size = os.path.getsize(onnx_path) + (os.path.getsize(onnx_path + ".data") if os.path.exists(onnx_path + ".data") else 0)
        out = os.path.join(args.workdir, f"{name}.pruned.onnx")
        print(f"{name}: onnxprune ...", file=sys.stderr, flush=True)
        op_wall, op_peak, _ = child(ONNXPRUNE, [onnx_path, "--ratios", ratios, "-o", out], args.workdir)
        print(f"{name}: Torch-Pruning ...", file=sys.stderr, flush=True)
        tp_wall, tp_peak, _ = child(TORCH_PRUNING, [name, ckpt, os.path.join(args.workdir, f"{name}.tp.pt"), "1" if vit else "0"],
                                    args.workdir)
        _, _, out_text = child(STAGES, [onnx_path, ratios, out + ".stages.onnx"], args.workdir)
        stages = json.loads(out_text.split("STAGES", 1)[1])
        os.remove(out + ".stages.onnx")
        r = {"model": name, "file_mb": size / 1e6, "ratios": ratios, "onnxprune_s": op_wall, "onnxprune_peak_mb": op_peak / 1e6,
             "tp_s": tp_wall, "tp_peak_mb": tp_peak / 1e6, "stages": stages}
        js.append(r)
        rows.append([name, f"{size / 1e6:.0f} MB", "0.5 all" if not vit else "embed/mlp/heads 0.5",
                     f"{op_wall:.1f}s", f"{op_peak / 1e6:.0f} MB", f"{op_peak / size:.2f}x",
                     f"{tp_wall:.1f}s", f"{tp_peak / 1e6:.0f} MB", f"{op_wall / tp_wall:.2f}",
                     ", ".join(f"{k} {v:.2f}" for k, v in stages.items() if k != "shape_inference_runs"),
                     stages["shape_inference_runs"]])
        print(f"{name}: onnxprune {op_wall:.1f}s {op_peak / 1e6:.0f} MB | Torch-Pruning {tp_wall:.1f}s {tp_peak / 1e6:.0f} MB",
              file=sys.stderr, flush=True)
    head = ["model", "file", "ratios", "onnxprune", "peak RSS", "peak / file", "Torch-Pruning", "peak RSS", "time vs TP",
            "onnxprune stages (s)", "shape inferences"]
    write_results(os.path.join(HERE, "results", "prune_speed.md"), md(head, rows), js)


if __name__ == "__main__":
    main()
