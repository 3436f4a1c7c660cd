"""Data a user points the tool at (calibration and training data) fails in one
line when it is not what it claims to be, and a legacy export whose weights
pass through Identity nodes fine-tunes like any other."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main

DEFAULT = str(Path(__file__).resolve().parents[1] / "onnxprune" / "data" / "default_resnet.onnx")


def _run(capsys, argv) -> tuple[int, list[str]]:
    """Exit status and stderr lines of the CLI on ``argv``."""
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err.strip().splitlines()


def _pickled(path):
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)


@pytest.mark.parametrize("case,words", [
    ("not_images", "cannot read an image"),
    ("pickled_npy", "pickled Python objects"),
    ("text_npy", "not a .npy array of numbers"),
    ("broken_npz", "not an .npz archive of numbers"),
])
def test_bad_calibration_data_is_one_line(tmp_path, capsys, case, words):
    pytest.importorskip("torchvision")
    if case == "not_images":
        spec = tmp_path / "photos"
        spec.mkdir()
        for i in range(40):
            (spec / f"p{i}.png").write_text("not an image")
    elif case == "pickled_npy":
        spec = tmp_path / "x.npy"
        _pickled(spec)
    elif case == "text_npy":
        spec = tmp_path / "x.npy"
        spec.write_text("1 2 3")
    else:
        spec = tmp_path / "x.npz"
        spec.write_bytes(b"PK\x03\x04" + pickle.dumps("garbage"))
    rc, err = _run(capsys, [DEFAULT, "--ratios", '{"default": 0.3}', "--calib", spec, "--recover", "-o", tmp_path / "o.onnx"])
    assert rc == 1 and err and err[-1].startswith("onnxprune: error: ") and words in err[-1], err
    assert "this is a bug" not in err[-1]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("case,words", [
    ("nan_named", "NaN or infinite"),
    ("inf_x", "NaN or infinite"),
    ("nan_npy", "NaN or infinite"),
    ("short_source", "'source' has 5 entries for 8 samples"),
    ("strings", "not numbers"),
])
def test_calibration_arrays_with_bad_values_are_one_line(tmp_path, capsys, case, words):
    """NaN or infinite inputs, a 'source' array that does not give one id per
    sample, arrays that are no numbers: refused before anything runs."""
    x = np.random.default_rng(0).standard_normal((8, 3, 128, 128)).astype(np.float32)
    bad = x.copy()
    bad[2, 1, 5, 5] = np.nan if case != "inf_x" else np.inf
    spec = tmp_path / ("x.npy" if case == "nan_npy" else "x.npz")
    if case == "nan_npy":
        np.save(spec, bad)
    elif case == "inf_x":
        np.savez(spec, x=bad)
    elif case == "short_source":
        np.savez(spec, input=x, source=np.arange(5))
    elif case == "strings":
        np.savez(spec, input=np.full(x.shape, "a"))
    else:
        np.savez(spec, input=bad)
    rc, err = _run(capsys, [DEFAULT, "--ratios", '{"default": 0.3}', "--calib", spec, "--calib-batch-size", 4,
                            "--recover", "-o", tmp_path / "o.onnx"])
    assert rc == 1 and err and err[-1].startswith("onnxprune: error: ") and words in err[-1], err
    assert "this is a bug" not in err[-1]
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_calibration_arrays_of_another_number_type_are_converted(tmp_path, capsys, dtype):
    """An array named after a float input, saved as float64 (numpy's default),
    float16 or integers, is given to the model as the float32 it takes."""
    x = np.random.default_rng(0).standard_normal((8, 3, 128, 128)) * 3
    np.savez(tmp_path / "x.npz", input=x.astype(dtype))
    rc, err = _run(capsys, [DEFAULT, "--ratios", '{"default": 0.3}', "--calib", tmp_path / "x.npz", "--calib-batch-size", 4,
                            "--recover", "-o", tmp_path / "o.onnx"])
    assert rc == 0, err
    assert (tmp_path / "o.onnx").exists()


def test_float_token_ids_are_refused_in_one_line(tmp_path):
    """Token ids saved as floats for an integer input are not silently truncated."""
    from onnxprune.errors import UserError
    from onnxprune.plan.importance.calib import _as_input

    with pytest.raises(UserError, match="the model takes int64"):
        _as_input("t.npz", "input_ids", np.array([[1.0, 2.5]]), np.dtype(np.int64))
    got = _as_input("t.npz", "input_ids", np.array([[1, 2]], np.int32), np.dtype(np.int64))
    assert got.dtype == np.int64 and got.tolist() == [[1, 2]]


def test_pickled_training_data_is_one_line(tmp_path, capsys):
    pytest.importorskip("onnx2torch")
    _pickled(tmp_path / "x.npy")
    rc, err = _run(capsys, ["finetune", DEFAULT, "--data", tmp_path / "x.npy", "--teacher", DEFAULT, "-o", tmp_path / "t.onnx"])
    assert rc == 1 and err and err[-1].startswith("onnxprune: error: ") and "pickled Python objects" in err[-1], err
    assert "this is a bug" not in err[-1]
    assert not (tmp_path / "t.onnx").exists()


def test_weights_behind_identity_nodes_fine_tune(tmp_path, capsys):
    """The legacy exporter shares a weight through Identity nodes; the importer
    reads weights from initializers only, so they are made initializers first."""
    pytest.importorskip("onnx2torch")
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w", (8, 3, 3, 3)), ("b", (8,)), ("w2", (4, 8, 1, 1)))]
    nodes = [helper.make_node("Identity", ["b"], ["b_alias"]),
             helper.make_node("Conv", ["x", "w", "b_alias"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["p"]),
             helper.make_node("Flatten", ["p"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "m.onnx"))
    np.save(tmp_path / "x.npy", rng.standard_normal((40, 3, 8, 8)).astype(np.float32))
    rc = main(["finetune", str(tmp_path / "m.onnx"), "--data", str(tmp_path / "x.npy"), "--teacher", str(tmp_path / "m.onnx"),
               "-o", str(tmp_path / "t.onnx"), "--max-steps", "2", "--batch-size", "8", "--keep-worse", "-q"])
    assert rc == 0, capsys.readouterr().err
    out = onnx.load(str(tmp_path / "t.onnx"))
    assert not any(n.op_type == "Identity" for n in out.graph.node)
    assert {i.name for i in out.graph.initializer} >= {"w", "b", "w2"}


def test_saving_over_the_named_input_is_refused(tmp_path):
    """``save_pruned`` of a model pruned from a proto still refuses the input path it is told."""
    import shutil

    from onnxprune.api import prune, save_pruned
    from onnxprune.errors import UserError

    path = tmp_path / "m.onnx"
    shutil.copy(DEFAULT, path)
    before = path.read_bytes()
    res = prune(onnx.load(str(path)), {"default": 0.3})
    with pytest.raises(UserError, match="never overwrites its input"):
        save_pruned(res, str(path), in_path=str(path))
    assert path.read_bytes() == before
    save_pruned(res, str(tmp_path / "out.onnx"), in_path=str(path))
    assert (tmp_path / "out.onnx").exists()


def test_a_job_recovers_only_after_its_rewrite_and_saves_the_refitted_weights(tmp_path):
    from onnxprune.pipeline import Job
    from onnxprune.plan import Ratios
    from onnxprune.plan.importance.calib import load as load_calib

    job = Job.open(DEFAULT)
    plan = job.plan(Ratios.from_dict({"default": 0.3}))
    original = job.data_proto()
    calib = load_calib("synthetic", job.skeleton(), 4, 8)
    with pytest.raises(RuntimeError, match="follows rewrite"):
        job.recover(original, calib)
    job.rewrite(plan)
    pruned = {t.name: numpy_helper.to_array(t) for t in job.data_proto().graph.initializer}
    rows, _ = job.recover(original, calib, method="bias")
    refit = [r.node for r in rows if r.status == "refit"]
    assert refit
    job.save(str(tmp_path / "out.onnx"))
    saved = onnx.load(str(tmp_path / "out.onnx"))
    node = next(n for n in saved.graph.node if n.name == refit[0])
    out = {t.name: numpy_helper.to_array(t) for t in saved.graph.initializer}
    bias = node.input[2]
    assert bias in out and not np.array_equal(out[bias], pruned.get(bias, np.zeros_like(out[bias])))


def test_npz_arrays_named_after_inputs_are_checked_against_their_dims(tmp_path, capsys):
    m = onnx.load(DEFAULT, load_external_data=False)
    inp = m.graph.input[0]
    dims = [d.dim_value for d in inp.type.tensor_type.shape.dim][1:]
    wrong = [dims[0], dims[1] + 1, dims[2]]
    np.savez(tmp_path / "cal.npz", **{inp.name: np.zeros([32] + wrong, np.float32)})
    rc, err = _run(capsys, [DEFAULT, "--ratios", '{"default": 0.3}', "--calib", tmp_path / "cal.npz", "--recover",
                            "-o", tmp_path / "o.onnx"])
    assert rc == 1 and len(err) == 1 and f"'{inp.name}' samples have shape {wrong}, the model takes {dims}" in err[0], err
    assert not (tmp_path / "o.onnx").exists()
    np.savez(tmp_path / "ok.npz", **{inp.name: np.random.default_rng(0).standard_normal([32] + dims).astype(np.float32)})
    rc, err = _run(capsys, [DEFAULT, "--ratios", '{"default": 0.3}', "--calib", tmp_path / "ok.npz", "--recover",
                            "-o", tmp_path / "o.onnx"])
    assert rc == 0, err
