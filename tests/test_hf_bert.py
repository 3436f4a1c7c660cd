"""A BERT encoder from the installed `transformers` (random weights, tiny
config), exported by both torch exporters with both attention implementations
(eager builds the mask from computed shapes; sdpa hands it to
scaled_dot_product_attention): heads, head dims and MLP units are pruned and
ranked by GOHSP's graph criterion from an .npz of calibration tokens, and the
oracle passes on every exact group."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from onnxprune.cli import main  # noqa: E402

NAMES = ["input_ids", "attention_mask", "token_type_ids"]
SEQ = 16


def _export(path: str, exporter: str, attn: str, classifier: bool = False) -> None:
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, attn_implementation=attn, num_labels=3)
    torch.manual_seed(0)
    bert = (transformers.BertForSequenceClassification if classifier else transformers.BertModel)(cfg).eval()

    class Encoder(torch.nn.Module):  # positional inputs, named outputs
        def __init__(self):
            super().__init__()
            self.bert = bert

        def forward(self, ids, mask, tt):
            o = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=tt)
            return o.logits if classifier else (o.last_hidden_state, o.pooler_output)

    ids = torch.randint(0, 100, (2, SEQ))
    args = (ids, torch.ones_like(ids), torch.zeros_like(ids))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "legacy":
            torch.onnx.export(Encoder().eval(), args, path, dynamo=False, opset_version=17, input_names=NAMES,
                              output_names=["logits"] if classifier else ["last_hidden_state", "pooler_output"],
                              dynamic_axes={n: {0: "batch", 1: "seq"} for n in NAMES})
        else:
            torch.onnx.export(Encoder().eval(), args, path, dynamo=True, opset_version=20, input_names=NAMES,
                              external_data=False)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_transformers_bert_heads_ranked_by_gohsp_from_npz(tmp_path, capsys, exporter, attn):
    path = str(tmp_path / "bert.onnx")
    _export(path, exporter, attn)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 100, (32, SEQ)),
             attention_mask=(rng.random((32, SEQ)) > 0.2).astype(np.int64), token_type_ids=np.zeros((32, SEQ), np.int64))
    shapes = [a for n in NAMES for a in ("--input-shape", f"{n}:N,{SEQ}")] if exporter == "legacy" else []
    ratios = '{"kinds": {"heads": 0.5, "head_dim": 0.25, "mlp": 0.5}, "importance": {"heads": "gohsp"}}'
    rc = main([path, "--ratios", ratios, "--calib", str(tmp_path / "calib.npz"), "--calib-batch-size", "8",
               "-o", str(tmp_path / "p.onnx"), "--verify", "--report", str(tmp_path / "r.json"), "-q"] + shapes)
    err = capsys.readouterr().err
    assert rc == 0, err
    rep = json.loads((tmp_path / "r.json").read_text())
    by_kind: dict = {}
    for g in rep["groups"]:
        by_kind.setdefault(g["kind"], []).append(g)
    # every layer's heads (4 -> 2), head dims (8 -> 6, q.k and v.o) and MLP (64 -> 32) were pruned
    assert sorted(g["width_after"] for g in by_kind["heads"]) == [2, 2], by_kind.get("heads")
    assert sum(g["width_after"] for g in by_kind["mlp"]) == 64  # half of 2 x 64, ranked across the isomorphic set
    assert sorted(g["width_after"] for g in by_kind["head_dim"]) == [6, 6, 6, 6]
    for g in by_kind["heads"]:  # ranked by GOHSP's stationary distribution over all 32 calibration samples
        assert g["criterion"] == "gohsp" and g["gohsp"]["samples"] == 32
        assert sorted(g["kept"]) == sorted(np.argsort(g["scores"])[-2:].tolist())
    rows = [r for r in rep["oracle"] if r["max_rel_err"] is not None]
    assert len(rows) == 5 and all(r["status"] == "PASS" for r in rows)  # 4 sets and all of them together
    assert rows[-1]["scope"] == "all exact groups" and rows[-1]["groups"] == 8 and rows[-1]["max_rel_err"] < 1e-5


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_classifier_gets_its_residual_stream_pruned_too(tmp_path, capsys, exporter):
    """Where the stream does not reach a graph output (a classification head reads
    it), the embed channels prune with heads and MLP."""
    path = str(tmp_path / "cls.onnx")
    _export(path, exporter, "sdpa", classifier=True)
    shapes = [a for n in NAMES for a in ("--input-shape", f"{n}:N,{SEQ}")] if exporter == "legacy" else []
    rc = main([path, "--ratios", '{"kinds": {"embed": 0.25, "heads": 0.5, "mlp": 0.5}}', "-o", str(tmp_path / "p.onnx"),
               "--verify", "--report", str(tmp_path / "r.json"), "-q"] + shapes)
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    embed = [g for g in rep["groups"] if g["kind"] == "embed"]
    assert len(embed) == 1 and embed[0]["width"] == 32 and embed[0]["width_after"] == 24 and not embed[0]["frozen"]
    assert sum(g["width_after"] for g in rep["groups"] if g["kind"] == "heads") == 4  # half of 2 x 4, ranked across the set
    rows = {r["kind"]: r for r in rep["oracle"]}
    assert rows["heads"]["status"] == "PASS" and rows["*"]["status"] == "PASS"


def test_recover_refits_separate_q_and_k_projections_jointly(tmp_path):
    """BERT's q and k are two Linear layers (not one fused qkv): with half the
    head dims gone, --recover's joint fit finds both and lowers the logit error."""
    import onnx

    from onnxprune.api import prune
    from onnxprune.recover import format_rows, recover

    path = str(tmp_path / "bert.onnx")
    _export(path, "dynamo", "eager")  # static batch 2, sequence 16
    m = onnx.load(path)
    res = prune(m, {"kinds": {"head_dim": 0.5}, "scope": "local"})
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, 100, (2, SEQ)), "attention_mask": np.ones((2, SEQ), np.int64),
              "token_type_ids": np.zeros((2, SEQ), np.int64)} for _ in range(16)]
    _, rows = recover(m, res.proto, res.analyzed.ctx, res.plan.keep, calib, progress=False)
    logits = [r for r in rows if r.method == "qk-logits"]
    assert len(logits) == 2, format_rows(rows)  # one per layer
    for r in logits:
        assert r.status == "refit" and r.outputs_kept == "4/4 heads", format_rows(rows)
        assert r.err_after < 0.6 * r.err_before and r.held_after < r.held_before, format_rows(rows)


def test_recover_from_an_npz_of_named_inputs_feeds_every_input(tmp_path, capsys):
    """`--recover` from an .npz with one array per input (token ids, mask, token
    types): every level of the sequential calibration runs with all three
    inputs, including those only the embeddings read (once, a run asked for
    token_type_ids after it had been dropped and stopped with an internal error)."""
    path = str(tmp_path / "cls.onnx")
    _export(path, "legacy", "sdpa", classifier=True)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", input_ids=rng.integers(0, 100, (64, SEQ)),
             attention_mask=(rng.random((64, SEQ)) > 0.2).astype(np.int64),
             token_type_ids=rng.integers(0, 2, (64, SEQ)), source=np.arange(64) // 4)
    shapes = [a for n in NAMES for a in ("--input-shape", f"{n}:N,{SEQ}")]
    rc = main([path, "--ratios", '{"kinds": {"embed": 0.25, "heads": 0.5, "mlp": 0.5}}', "--calib",
               str(tmp_path / "calib.npz"), "--calib-batch-size", "16", "--recover", "-o", str(tmp_path / "p.onnx"),
               "--report", str(tmp_path / "r.json"), "-q"] + shapes)
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "r.json").read_text())
    refit = [r for r in rep["recovery"] if r["status"] == "refit"]
    assert len(refit) >= 4, rep["recovery"]
    assert rep["recovery_stats"]["held_out"]["samples"] > 0


def test_groups_recon_cannot_score_take_activation_from_the_same_pass_over_the_data(tmp_path, monkeypatch):
    """BERT's q and k head dims end in q.k^T (no constant weight): recon
    leaves them to activation. Their activations are summed in recon's own
    pass over the calibration data (one capture session), and equal what a
    separate activation pass gives."""
    import onnx

    import onnxprune.plan.importance.criteria as C
    from onnxprune.api import analyze
    from onnxprune.plan.importance.calib import Calibration

    path = str(tmp_path / "bert.onnx")
    _export(path, "dynamo", "eager")  # static batch 2, sequence 16
    m = onnx.load(path)
    job = analyze(m)
    rng = np.random.default_rng(0)
    feeds = [{"input_ids": rng.integers(0, 100, (2, SEQ)), "attention_mask": np.ones((2, SEQ), np.int64),
              "token_type_ids": np.zeros((2, SEQ), np.int64)} for _ in range(4)]
    cal = Calibration([f["input_ids"] for f in feeds], None, "test", feeds)
    sessions = []
    real = C._capture

    def counted(proto, names, calib, threads=None):
        sessions.append(list(names))
        yield from real(proto, names, calib, threads)

    monkeypatch.setattr(C, "_capture", counted)
    rc = C.score_groups(job.ctx, job.groups, {"default": "recon"}, proto=m, calib=cal)
    live = [g for g in job.groups if not g.frozen]
    fell = [g for g in live if rc.used[g.id] == "activation"]
    assert fell and any(rc.used[g.id] == "recon" for g in live), rc.used
    assert {g.kind for g in fell} == {"head_dim"}
    assert all(rc.notes[g.id] == "no linear consumer where the channels end; activation used" for g in fell)
    assert len(sessions) == 1
    sessions.clear()
    act = C.score_groups(job.ctx, fell, {"default": "activation"}, proto=m, calib=cal)
    assert len(sessions) == 1
    for g in fell:
        np.testing.assert_allclose(rc.values[g.id], act.values[g.id], rtol=1e-12)
