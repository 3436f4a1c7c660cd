"""GOHSP soft pruning: the masked-entries norm falls toward zero under ADMM, the
hard-pruned model matches the soft one, the projection keeps the kappa
largest columns, and without the penalty nothing is imposed."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytestmark = pytest.mark.slow  # ADMM training runs: the full suite

torch = pytest.importorskip("torch")
timm = pytest.importorskip("timm")
pytest.importorskip("onnx2torch")

from onnxprune.core import metrics  # noqa: E402
from onnxprune.cli import main  # noqa: E402
from onnxprune.torchbridge.export import export_timm  # noqa: E402
from onnxprune.methods.gohsp import ADMM, Piece, Structure, erdos_renyi  # noqa: E402
from onnxprune.torchbridge.data import make_synthetic  # noqa: E402
from timm_models import randomize  # noqa: E402

RATIOS = {"kinds": {"heads": 0.34, "head_dim": 0.25, "mlp": 0.5}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("gohsp")
    data = str(d / "data")
    make_synthetic(data, classes=4, train=32, val=8, size=64, seed=2, progress=False)
    m = randomize(timm.create_model("deit_tiny_patch16_224", img_size=64, depth=3, num_classes=4), seed=3)
    path = str(d / "vit.onnx")
    export_timm("x", path, exporter="dynamo", dynamic_batch=True, model=m, img_size=64)
    return d, data, path


def _run(setup, tag, lam, rho):
    d, data, path = setup
    out = str(d / f"{tag}.onnx")
    rc = main(["gohsp", path, "--data", data, "--ratios", json.dumps(RATIOS), "-o", out, "--admm-epochs", "4", "--batch-size", "16",
               "--lambda", str(lam), "--rho", str(rho), "--admm-interval", "2", "--finetune-epochs", "0", "--workers", "0", "-q"])
    assert rc == 0
    return json.load(open(str(d / f"{tag}.gohsp.json"))), out


def test_soft_pruning_drives_masked_entries_to_zero_and_hard_matches_soft(setup):
    r, out = _run(setup, "soft", 0.2, 0.1)
    norms = [h["masked_norm"] for h in r["history"]]
    assert norms[-1] < 0.01 * norms[0]
    assert all(b <= a * 1.01 for a, b in zip(norms, norms[1:]))  # falls every epoch
    wz = [h["w_minus_z"] for h in r["history"]]
    assert wz[-1] < wz[0] or wz[0] == 0
    assert r["soft_vs_hard_max_rel"] < 0.05
    hard = onnx.load(out)
    onnx.checker.check_model(hard, full_check=True)
    assert metrics.count(hard)["macs"] == r["macs"]["after"] < 0.7 * r["macs"]["before"]
    assert all(v in (2, 48, 384) for v in r["kept"].values())  # heads 3->2, head_dim 64->48, mlp 768->384


def test_without_penalties_nothing_is_imposed(setup):
    r, _ = _run(setup, "plain", 0.0, 0.0)
    norms = [h["masked_norm"] for h in r["history"]]
    assert norms[-1] > 0.5 * norms[0]
    assert r["soft_vs_hard_max_rel"] > 0.05  # so the first test's match is the penalties' doing


def test_projection_keeps_the_kappa_largest_columns():
    w = torch.nn.Parameter(torch.tensor([[3.0, 0.1, 2.0, 0.5], [1.0, 0.2, 2.0, 0.4]]))
    st = Structure(gid=0, kind="mlp", width=4, keep_n=2, pieces=[Piece(w, 1, np.arange(4))])
    admm = ADMM([st], rho=0.5, lam=0.0)
    z = admm.Z[id(w)]
    assert torch.equal(z[:, 1], torch.zeros(2)) and torch.equal(z[:, 3], torch.zeros(2))
    assert torch.equal(z[:, [0, 2]], w.detach()[:, [0, 2]])
    admm.penalty_step()  # W -= rho * (W - Z + U): dropped columns shrink by half, kept ones stay
    assert torch.allclose(w.detach()[:, 1], torch.tensor([0.05, 0.1])) and torch.allclose(w.detach()[:, 0], torch.tensor([3.0, 1.0]))
    admm.dual()
    assert torch.allclose(admm.U[id(w)][:, 1], torch.tensor([0.05, 0.1]))
    assert sorted(admm.final_keep()[0].tolist()) == [0, 2]


def _st(gid, width, per_col, kind="mlp"):
    w = torch.nn.Parameter(torch.zeros(width, per_col))
    return Structure(gid=gid, kind=kind, width=width, keep_n=width, pieces=[Piece(w, 0, np.arange(width))])


def test_erdos_renyi_allocation():
    """Density proportional to (sum of dims) / (prod of dims), capped at 1, and
    the kept parameters are (1 - sparsity) of the total up to column rounding."""
    small, a, b, c = _st(0, 16, 4), _st(1, 64, 64), _st(2, 64, 64), _st(3, 128, 256, "head_dim")
    structs = [small, a, b, c]
    dens = erdos_renyi(structs, 0.5)
    assert dens[0] == 1.0  # a narrow layer would need density > 1: kept dense
    assert dens[1] == dens[2]  # same shape, same density
    score = lambda r, k: (r + k) / (r * k)
    assert abs(dens[1] / dens[3] - score(64, 64) / score(128, 256)) < 0.05  # proportional to the ER score
    total = sum(st.width * st.pieces[0].param.shape[1] for st in structs)
    kept = sum(st.keep_n * st.pieces[0].param.shape[1] for st in structs)
    assert abs(kept / total - 0.5) < 256 / total  # within one column of the budget
    erdos_renyi(structs, 0.9, round_to=8)
    assert all(st.keep_n % 8 == 0 for st in structs[1:]) and small.keep_n in (8, 16)
    with pytest.raises(Exception):
        erdos_renyi(structs, 1.0)


def test_gohsp_with_one_overall_sparsity(setup):
    d, data, path = setup
    out = str(d / "er.onnx")
    rc = main(["gohsp", path, "--data", data, "--ratios", '{"kinds": {"heads": 0.34}}', "--sparsity", "0.5", "-o", out,
               "--admm-epochs", "2", "--batch-size", "16", "--admm-interval", "2", "--finetune-epochs", "0", "--workers", "0", "-q"])
    assert rc == 0
    r = json.load(open(str(d / "er.gohsp.json")))
    er = {int(k): v for k, v in r["erdos_renyi"].items()}
    assert er and all(0 < v <= 1 for v in er.values())
    assert any(v < 0.9 for v in er.values())  # columns were actually cut
    hard = onnx.load(out)
    onnx.checker.check_model(hard, full_check=True)
    assert metrics.count(hard)["macs"] < 0.8 * r["macs"]["before"]


def test_quick_admm_recipe_distils_and_still_imposes_the_structure(setup):
    d, data, path = setup
    out = str(d / "quick.onnx")
    rc = main(["gohsp", path, "--data", data, "--ratios", json.dumps(RATIOS), "-o", out, "--admm-epochs", "4", "--batch-size", "16",
               "--lambda", "0.5", "--rho", "0.3", "--admm-interval", "2", "--finetune-epochs", "0", "--workers", "0",
               "--admm-recipe", "quick", "--teacher", path, "-q"])
    assert rc == 0
    r = json.load(open(str(d / "quick.gohsp.json")))
    from onnxprune.torchbridge.recipes import get

    assert r["admm_recipe"] == "quick" and r["admm_kd"] and r["lr"] == get("quick").lr_for(16)  # finetune's lr at this batch
    norms = [h["masked_norm"] for h in r["history"]]
    assert norms[-1] < 0.01 * norms[0]
    assert r["soft_vs_hard_max_rel"] < 0.05
