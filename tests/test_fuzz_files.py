"""Structure-aware fuzzing of the input file, fast subset: a tiny model built here,
one mutation at a time, the CLI in a subprocess. Every outcome is either a PASSED
prune or exactly one ``onnxprune: error:`` line with exit 1 and nothing written;
never a traceback, never an internal error."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

RATIOS = '{"default": 0.5}'


def tiny() -> onnx.ModelProto:
    """Conv -> Relu -> Conv on a 1x3x8x8 input; w1 (864 bytes) and w2 (1152) stay embedded."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 3, 3, 3)), ("b1", (8,)), ("w2", (4, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def init(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


def _dims(m, name, dims):
    t = init(m, name)
    del t.dims[:]
    t.dims.extend(dims)


def _dtype(m, name, dtype):
    init(m, name).data_type = dtype


def _drop(m, name):
    m.graph.initializer.remove(init(m, name))


def _duplicate(m, name):
    m.graph.initializer.append(init(m, name))


def _attr(m, node, attr):
    next(n for n in m.graph.node if n.name == node).attribute.append(attr)


def _cycle(m):
    m.graph.node[0].input[0] = "r"  # conv1 reads relu's output, which reads conv1's


def _outside(m, tmp):
    (tmp.parent / f"{tmp.name}-secret.bin").write_bytes(b"\x42" * 4096)
    t = init(m, "w2")
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", f"../{tmp.name}-secret.bin"), ("offset", "0"), ("length", "1152")):
        e = t.external_data.add()
        e.key, e.value = k, v


def _input_dims(m, dims):
    shape = m.graph.input[0].type.tensor_type.shape
    for d, v in zip(shape.dim, dims):
        d.dim_value = v


MUTATIONS = {
    "unchanged": lambda m, tmp: None,
    "flipped_dims": lambda m, tmp: _dims(m, "w1", [3, 8, 3, 3]),
    "dims_disagree_with_data": lambda m, tmp: _dims(m, "w1", [8, 3, 3, 4]),
    "huge_tensor_dims": lambda m, tmp: _dims(m, "w1", [1 << 40, 3, 3, 3]),
    "negative_dim": lambda m, tmp: _dims(m, "b1", [-8]),
    "dtype_double": lambda m, tmp: _dtype(m, "w1", TensorProto.DOUBLE),
    "dtype_int32": lambda m, tmp: _dtype(m, "w1", TensorProto.INT32),
    "dtype_undefined": lambda m, tmp: _dtype(m, "b1", TensorProto.UNDEFINED),
    "dropped_initializer": lambda m, tmp: _drop(m, "w2"),
    "duplicated_initializer": lambda m, tmp: _duplicate(m, "w1"),
    "bogus_attribute": lambda m, tmp: _attr(m, "conv1", helper.make_attribute("bogus", 3)),
    "wrong_group": lambda m, tmp: _attr(m, "conv2", helper.make_attribute("group", 3)),
    "external_outside": _outside,
    "cycle": lambda m, tmp: _cycle(m),
    "huge_input_dims": lambda m, tmp: _input_dims(m, [1, 3, 1 << 20, 1 << 20]),
}
TRUNCATE = (0.97, 0.5, 0.1)


def _files(root) -> dict[str, tuple]:
    """Every case's model file, written under ``root/CASE/``: the mutations and the truncations."""
    cases = {}
    for case, mutate in MUTATIONS.items():
        d = root / case
        d.mkdir()
        m = tiny()
        mutate(m, d)
        cases[case] = m.SerializeToString()
    data = tiny().SerializeToString()
    for keep in TRUNCATE:
        (root / f"truncated_{keep}").mkdir()
        cases[f"truncated_{keep}"] = data[: int(len(data) * keep)]
    out = {}
    for case, data in cases.items():
        path = root / case / "model.onnx"
        path.write_bytes(data)
        out[case] = (path, root / case / "out.onnx", sorted(os.listdir(path.parent)))
    return out


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Runs the CLI on every case, a few processes at a time (start-up dominates):
    ``{case: (rc, stdout, stderr, path, out, files before)}``."""
    cases = _files(tmp_path_factory.mktemp("fuzz"))
    results, running = {}, []
    for case, (path, out, before) in cases.items():
        cmd = [sys.executable, "-m", "onnxprune", str(path), "--ratios", RATIOS, "-o", str(out), "-q"]
        running.append((case, subprocess.Popen(cmd, cwd=path.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        while len(running) >= 4 or (running and len(results) + len(running) == len(cases)):
            name, p = running.pop(0)
            stdout, stderr = p.communicate(timeout=120)
            results[name] = (p.returncode, stdout, stderr, *cases[name])
    return results


def _outcome(outcomes, case: str) -> str:
    rc, stdout, stderr, path, out, before = outcomes[case]
    text = stdout + stderr
    assert "Traceback" not in text and "this is a bug" not in text, (case, text)
    if rc == 0:
        assert stdout.strip().splitlines()[-1].startswith("PASSED |"), (case, text)
        assert out.exists(), case
        return "passed"
    lines = stderr.strip().splitlines()
    assert rc == 1 and len(lines) == 1 and lines[0].startswith("onnxprune: error: "), (case, rc, text)
    assert sorted(os.listdir(path.parent)) == before, (case, "a refusal wrote files")
    return "refused"


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_mutated_model_passes_or_is_refused_in_one_line(outcomes, case):
    # only the unchanged model prunes; every mutation here makes the file invalid
    assert _outcome(outcomes, case) == ("passed" if case == "unchanged" else "refused")


@pytest.mark.parametrize("keep", TRUNCATE)
def test_truncated_file_is_refused_in_one_line(outcomes, keep):
    assert _outcome(outcomes, f"truncated_{keep}") == "refused"
