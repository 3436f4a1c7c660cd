"""The file boundary: external data stays inside the model's folder, malformed files
are refused in one line at load, outputs are only the files asked for (with the
umask's mode), stale shapes do not break a run with fixed input shapes, and an
original with non-finite outputs is named as such by the oracle."""
from __future__ import annotations

import os
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.cli import main

RATIOS = '{"default": 0.5}'
SECRET = np.full(1024, 1234.5678, np.float32).tobytes()  # 4 KB whose float pattern is easy to find


def model(c: int = 8, tail: str | None = None, dims=(1, 3, 8, 8), value_info=()) -> onnx.ModelProto:
    """Conv(3->c) -> Relu -> Conv(c->4) [-> tail op]."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (c, 3, 3, 3)), ("b1", (c,)), ("w2", (4, c, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["c" if tail else "y"], name="conv2", pads=[1, 1, 1, 1])]
    if tail:
        nodes.append(helper.make_node(tail, ["c"], ["y"], name="tail"))
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits, value_info=list(value_info))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def save_external(m: onnx.ModelProto, path, data="m.data") -> None:
    onnx.save(m, str(path), save_as_external_data=True, location=data, size_threshold=0)


def cli(capsys, *args) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def assert_refused(capsys, folder, args, words: str) -> str:
    """Runs the CLI in ``folder``; asserts one error line containing ``words``, exit 1,
    and no file added to ``folder``. Returns the line."""
    before = sorted(os.listdir(folder))
    rc, out, err = cli(capsys, *args)
    lines = err.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("onnxprune: error: "), (rc, out, err)
    assert words in lines[0], lines[0]
    assert "this is a bug" not in err and "Traceback" not in err + out
    assert sorted(os.listdir(folder)) == before
    return lines[0]


# -- external data ---------------------------------------------------------------------------

def _pointing(path, location: str) -> None:
    """``path`` (saved with external data) with every location replaced by ``location``."""
    m = onnx.load(str(path), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(m, str(path))


@pytest.fixture
def planted(tmp_path):
    """``(model folder, secret path)``: a model saved with external data in
    ``tmp_path/model/``, and a file outside that folder the attacks point at."""
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "secret.bin"
    secret.write_bytes(SECRET)
    save_external(model(), folder / "m.onnx")
    return folder, secret


ATTACKS = {
    "dotdot": lambda folder, secret: "../secret.bin",
    "absolute": lambda folder, secret: str(secret),
    "symlink": lambda folder, secret: (os.symlink(secret, folder / "link.bin"), "link.bin")[1],
    "dotdot_inside": lambda folder, secret: "sub/../../secret.bin",
}
WORDS = {"dotdot": "contains '..'", "absolute": "an absolute path", "symlink": "resolves outside the model's folder",
         "dotdot_inside": "contains '..'"}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("command", ["prune", "analyze", "verify", "bench"])
def test_external_data_outside_the_folder_is_refused_before_it_is_read(planted, capsys, attack, command):
    folder, secret = planted
    path = folder / "m.onnx"
    _pointing(path, ATTACKS[attack](folder, secret))
    opened = []
    hook_on = [True]

    def hook(event, args):  # every file this process opens, while the CLI runs
        if hook_on[0] and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.path.realpath(os.fsdecode(args[0])))

    sys.addaudithook(hook)
    try:
        args = {"prune": [path, "--ratios", RATIOS, "-o", folder / "out.onnx", "--report", folder / "r.json"],
                "analyze": ["analyze", path, "--json", folder / "g.json"],
                "verify": ["verify", path, "--ratios", RATIOS],
                "bench": ["bench", path, "--runs", "1", "--warmup", "0"]}[command]
        line = assert_refused(capsys, folder, args, WORDS[attack])
    finally:
        hook_on[0] = False
    assert "external data of tensor 'w1'" in line
    assert str(secret.resolve()) not in opened  # refused before a byte of it was read


@pytest.mark.parametrize("command", ["finetune", "finetune-teacher", "gohsp", "gohsp-teacher", "recover-original"])
def test_training_and_recovery_commands_keep_to_the_folder_too(planted, capsys, command):
    """The commands that hand a model to PyTorch or re-read the original load it
    through the same boundary as prune."""
    pytest.importorskip("torch")
    pytest.importorskip("onnx2torch")
    folder, secret = planted
    path = folder / "m.onnx"
    good = folder / "good.onnx"
    onnx.save(model(), str(good))
    np.save(folder / "x.npy", np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32))
    _pointing(path, "../secret.bin")
    out = folder / "out.onnx"
    args = {"finetune": ["finetune", path, "--data", folder / "x.npy", "--teacher", good, "-o", out, "--max-steps", "1"],
            "finetune-teacher": ["finetune", good, "--data", folder / "x.npy", "--teacher", path, "-o", out,
                                 "--max-steps", "1"],
            "gohsp": ["gohsp", path, "--data", folder / "x.npy", "--sparsity", "0.5", "-o", out, "--max-steps", "1"],
            "gohsp-teacher": ["gohsp", good, "--data", folder / "x.npy", "--sparsity", "0.5", "--teacher", path, "-o", out,
                              "--max-steps", "1"],
            "recover-original": [path, "--ratios", RATIOS, "-o", out, "--recover", "--calib", folder / "x.npy"],
            }[command]
    line = assert_refused(capsys, folder, args, WORDS["dotdot"])
    assert "external data of tensor 'w1'" in line


def test_external_data_inside_the_folder_still_loads(tmp_path, capsys):
    (tmp_path / "weights").mkdir()
    save_external(model(), tmp_path / "m.onnx", data="weights/m.data")
    os.symlink("weights/m.data", tmp_path / "link.data")  # a symlink that stays inside is fine
    _pointing(tmp_path / "m.onnx", "link.data")
    rc, out, err = cli(capsys, tmp_path / "m.onnx", "--ratios", RATIOS, "-o", tmp_path / "out.onnx", "-q")
    assert rc == 0 and out.startswith("PASSED"), err


def test_no_byte_of_a_planted_outside_file_reaches_any_output(planted, capsys):
    folder, secret = planted
    pattern = SECRET[:16]
    attacks = ["../secret.bin", str(secret), "./../secret.bin", "link.bin"]
    os.symlink(secret, folder / "link.bin")
    for loc in attacks:
        _pointing(folder / "m.onnx", loc)
        cli(capsys, folder / "m.onnx", "--ratios", RATIOS, "-o", folder / "out.onnx", "--report", folder / "r.json",
            "--save-plan", folder / "plan.json", "--verify")
    written = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name not in ("m.onnx", "m.data")]
    assert not written  # every attack was refused: nothing written at all
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert pattern not in p.read_bytes(), p


# -- malformed files ---------------------------------------------------------------------------

def _with(mutate):
    m = model()
    mutate(m)
    return m


def _init(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def _set_dims(t, dims):
    del t.dims[:]
    t.dims.extend(dims)


def _short(t):
    t.CopyFrom(helper.make_tensor("extra", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0]))
    del t.float_data[-1]


def _as_input(m, name, dtype, dims):
    m.graph.input.append(helper.make_tensor_value_info(name, dtype, dims))


MALFORMED = {
    "dims_vs_data": (lambda m: _set_dims(_init(m, "w2"), [4, 8, 3, 4]), "tensor 'w2': FLOAT[4,8,3,4] needs 1536 bytes, its data has 1152"),
    "typed_data_count": (lambda m: _short(m.graph.initializer.add()), "tensor 'extra': FLOAT[3] has 3 elements, its data has 2"),
    "cycle": (lambda m: m.graph.node[0].input.__setitem__(0, "r"), "the graph has a cycle"),
    "self_loop": (lambda m: m.graph.node[1].input.__setitem__(0, "r"), "the graph has a cycle"),
    "duplicate_initializer": (lambda m: m.graph.initializer.append(_init(m, "b1")), "the name 'b1' is defined twice"),
    "duplicate_output": (lambda m: m.graph.node[1].output.__setitem__(0, "a"), "the name 'a' is defined twice"),
    "output_shadows_input": (lambda m: m.graph.node[0].output.__setitem__(0, "x"), "the name 'x' is defined twice"),
    "declared_dtype": (lambda m: _as_input(m, "w1", TensorProto.INT64, [8, 3, 3, 3]), "initializer 'w1' is FLOAT[8,3,3,3] but declared INT64"),
    "declared_dims": (lambda m: _as_input(m, "b1", TensorProto.FLOAT, [9]), "initializer 'b1' is FLOAT[8] but declared FLOAT[9]"),
    "op_dtype": (lambda m: setattr(_init(m, "b1"), "data_type", TensorProto.INT32), "input 'b1' is tensor(int32)"),
    "ir_version_2": (lambda m: setattr(m, "ir_version", 2), "IR version 2 with opset imports is not a valid model"),
    "ir_version_3_loose_initializer": (lambda m: setattr(m, "ir_version", 3),
                                       "IR version 3 needs every initializer among the graph inputs; 'w1' is not"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_file_is_one_user_error(tmp_path, capsys, case):
    mutate, words = MALFORMED[case]
    onnx.save(_with(mutate), str(tmp_path / "m.onnx"))
    assert_refused(capsys, tmp_path, [tmp_path / "m.onnx", "--ratios", RATIOS, "-o", tmp_path / "out.onnx"], words)


def test_a_file_onnxruntime_cannot_run_is_the_files_fault(tmp_path, capsys):
    """Consistent to onnx's checks but not runnable (weight channels swapped): one line
    naming onnxruntime's complaint, not an internal error."""
    onnx.save(_with(lambda m: _set_dims(_init(m, "w1"), [3, 8, 3, 3])), str(tmp_path / "m.onnx"))
    assert_refused(capsys, tmp_path, [tmp_path / "m.onnx", "--ratios", RATIOS, "-o", tmp_path / "out.onnx"],
            "the model does not run in onnxruntime either")


@pytest.mark.parametrize("ir", [3, 7])
def test_weights_listed_among_the_inputs_are_pruned_as_constants(tmp_path, capsys, ir):
    """IR 3 (and torch's ``keep_initializers_as_inputs``) lists every initializer
    among the graph inputs: the pruned model has them as constants only, each
    once and pruned (no unused full-size input beside it), and is IR 4 at least."""
    m = _with(lambda m: [setattr(m, "ir_version", ir)] + [m.graph.input.append(
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))) for t in m.graph.initializer])
    m.graph.output[0].CopyFrom(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]))
    onnx.checker.check_model(m, full_check=True)
    onnx.save(m, str(tmp_path / "m.onnx"))
    rc, out, err = cli(capsys, tmp_path / "m.onnx", "--ratios", RATIOS, "--verify", "-o", tmp_path / "out.onnx")
    assert rc == 0 and "PASS" in out, (out, err)
    got = onnx.load(str(tmp_path / "out.onnx"))
    assert got.ir_version == max(ir, 4)
    onnx.checker.check_model(got, full_check=True)
    assert [i.name for i in got.graph.input] == ["x"]
    assert {t.name: list(t.dims) for t in got.graph.initializer} == {"w1": [4, 3, 3, 3], "b1": [4], "w2": [4, 4, 3, 3]}


def test_a_float16_model_takes_its_calibration_in_float16(tmp_path, capsys):
    """Images (here the built-in synthetic ones) are float32; a float16 model's
    input gets them as float16, and --recover says which layers it leaves as
    they are (its fits are float32 only)."""
    m = model()
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    m.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    onnx.save(m, str(tmp_path / "m.onnx"))
    rc, out, err = cli(capsys, tmp_path / "m.onnx", "--ratios", RATIOS, "--recover", "--calib", "synthetic",
                       "-o", tmp_path / "out.onnx")
    assert rc == 0, (out, err)
    assert "weight dtype float16 (only float32)" in out + err
    got = onnx.load(str(tmp_path / "out.onnx"))
    assert got.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16


# -- outputs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(tmp_path, capsys, mask):
    save_external(model(c=64), tmp_path / "m.onnx")  # w2 is 9 KB: the output gets a .data file too
    old = os.umask(mask)
    try:
        rc, out, err = cli(capsys, tmp_path / "m.onnx", "--ratios", RATIOS, "-o", tmp_path / "out.onnx", "--report",
                           tmp_path / "r.json", "-q")
    finally:
        os.umask(old)
    assert rc == 0, err
    for name in ("out.onnx", "out.onnx.data", "r.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_small_output_gets_no_empty_data_file(tmp_path, capsys):
    save_external(model(c=8), tmp_path / "m.onnx")  # every tensor under 4 KB
    rc, out, err = cli(capsys, tmp_path / "m.onnx", "--ratios", RATIOS, "-o", tmp_path / "out.onnx", "-q")
    assert rc == 0, err
    assert sorted(os.listdir(tmp_path)) == ["m.data", "m.onnx", "out.onnx"]
    assert onnx.load(str(tmp_path / "out.onnx")).graph.initializer  # weights embedded


@pytest.mark.parametrize("flag", ["-o", "--report", "--save-plan"])
def test_output_into_a_missing_folder_is_refused(tmp_path, capsys, flag):
    onnx.save(model(), str(tmp_path / "m.onnx"))
    args = [tmp_path / "m.onnx", "--ratios", RATIOS, "-o", tmp_path / "out.onnx"]
    args += [flag, tmp_path / "nowhere" / "x.json"] if flag != "-o" else []
    if flag == "-o":
        args[-1] = tmp_path / "nowhere" / "out.onnx"
    assert_refused(capsys, tmp_path, args, f"output folder does not exist: {tmp_path / 'nowhere'}")
    assert not (tmp_path / "nowhere").exists()


# -- stale shapes, non-finite originals -------------------------------------------------------------

@pytest.mark.parametrize("dims", [["N", 3, "H", "W"], [-1, 3, -1, -1]])
def test_fixed_input_shape_overrides_stale_value_info(tmp_path, capsys, dims):
    m = model(tail="Identity", dims=dims, value_info=[
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 4, -1, -1]),
        helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 8, "H", "W"]),
        helper.make_tensor_value_info("c", TensorProto.FLOAT, [5, 4, 7, 7])])
    m.graph.output[0].type.tensor_type.shape.dim.extend([onnx.TensorShapeProto.Dimension(dim_value=-1)] * 4)
    onnx.save(m, str(tmp_path / "m.onnx"))
    out = tmp_path / "out.onnx"
    rc, stdout, err = cli(capsys, tmp_path / "m.onnx", "--ratios", RATIOS, "--input-shape", "x:1,3,32,32", "-o", out, "--verify", "-q")
    assert rc == 0 and stdout.startswith("PASSED"), err
    y = onnx.load(str(out)).graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in y] == [1, 4, 32, 32]


def test_oracle_names_an_original_whose_outputs_are_not_finite(tmp_path, capsys):
    onnx.save(model(tail="Sqrt"), str(tmp_path / "m.onnx"))  # sqrt of a conv output: NaN on random input
    for args in (["verify", tmp_path / "m.onnx", "--ratios", RATIOS],
                 [tmp_path / "m.onnx", "--ratios", RATIOS, "--verify", "-o", tmp_path / "out.onnx"]):
        before = sorted(os.listdir(tmp_path))
        rc, out, err = cli(capsys, *args)
        assert rc == 1 and err.strip().startswith("onnxprune: error: the original model's outputs are not finite on "), err
        assert len(err.strip().splitlines()) == 1 and "FAIL" not in out
        assert sorted(os.listdir(tmp_path)) == before


def test_shape_inference_leaves_no_file_in_the_working_directory(tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference, when some shape stays unknown (a
    custom op here), saves ``sym_shape_infer_temp.onnx`` and its weights into
    the working directory: loading a model must write nothing there, and keeps
    the shapes it did infer."""
    from onnxprune.pipeline import Job

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv"),
             helper.make_node("Mystery", ["a"], ["u"], name="custom", domain="my.ops"),
             helper.make_node("Shape", ["u"], ["s"]),
             helper.make_node("Slice", ["s", "z", "one"], ["s1"]),
             helper.make_node("Concat", ["s1", "m1"], ["tgt"], axis=0),
             helper.make_node("Reshape", ["u", "tgt"], ["f"]),
             helper.make_node("MatMul", ["f", "w2"], ["y"], name="fc")]
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8, 1)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b1"),
             numpy_helper.from_array(np.array([0], np.int64), "z"), numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "m1"),
             numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "w2")]
    g = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12), helper.make_opsetid("my.ops", 1)])
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    job = Job.open(m)
    assert os.listdir(work) == []
    conv = next(n for n in job.model.graph if n.name == "conv")
    assert conv.outputs[0].shape is not None and list(conv.outputs[0].shape)[1:] == [8, 4]
