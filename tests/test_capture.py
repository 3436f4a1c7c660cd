"""The sequential frontier (runtime.capture): values equal a full run, every
node runs once over a sequence of requests, edits between requests are seen
downstream, spilled values are the same values."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.runtime import session
from onnxprune.runtime.capture import Frontier, capture, exposed


def _chain(depth=6, width=8, seed=0):
    """x -> (MatMul -> Relu -> Add skip) x depth, plus a Shape/Reshape side chain."""
    rng = np.random.default_rng(seed)
    nodes, inits, cur = [], [], "x"
    for i in range(depth):
        w = f"W{i}"
        inits.append(numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), w))
        nodes += [helper.make_node("MatMul", [cur, w], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"], name=f"relu{i}"),
                  helper.make_node("Add", [f"r{i}", cur], [f"a{i}"], name=f"add{i}")]
        cur = f"a{i}"
    nodes += [helper.make_node("Shape", ["x"], ["s"], name="shape"),
              helper.make_node("Reshape", [cur, "s"], ["y"], name="reshape")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", width])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", width])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _full(model, names, feed):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    s = session(m)
    return dict(zip(names, s.run(names, feed)))


def _feeds(n=3, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((4, 8)).astype(np.float32)} for _ in range(n)]


def test_values_equal_a_full_run_and_each_node_runs_once():
    model, feeds = _chain(), _feeds()
    f = Frontier(model, feeds)
    asked = ["m0", "m2", "a3", "m5", "y"]
    got = {}
    for name in asked:  # one request per "level", in graph order
        got[name] = f.get([name])[name]
    assert f.nodes_run == len(model.graph.node)  # nothing ran twice
    for bi, fd in enumerate(feeds):
        ref = _full(model, asked, fd)
        for name in asked:
            np.testing.assert_allclose(got[name][bi], ref[name], rtol=1e-6, atol=1e-6)
    # the frontier only holds what nodes still to run read (here nothing) and the graph's outputs
    assert list(f.held) == ["y"]
    n = f.nodes_run
    np.testing.assert_array_equal(f.get(["y"])["y"][0], got["y"][0])
    assert f.nodes_run == n  # asked for again: held, not run again


def test_an_edit_between_requests_is_seen_downstream():
    model, feeds = _chain(), _feeds()
    f = Frontier(model, feeds)
    f.get(["a1"])  # the input of mm2, which has not run yet: its weight may still change
    w = next(t for t in model.graph.initializer if t.name == "W2")
    w.CopyFrom(numpy_helper.from_array(np.zeros((8, 8), np.float32), "W2"))
    y = f.get(["y"])["y"]
    ref = _full(model, ["y"], feeds[0])["y"]  # the edited model, from the input
    np.testing.assert_allclose(y[0], ref, rtol=1e-6, atol=1e-6)
    untouched = _full(_chain(), ["y"], feeds[0])["y"]
    assert np.abs(y[0] - untouched).max() > 1e-3  # the edit mattered


def test_spilled_values_are_the_same_and_the_folder_is_removed():
    model, feeds = _chain(), _feeds()
    ref = capture(model, ["a1", "a4"], feeds)
    f = Frontier(model, feeds, budget=0)
    a1 = f.get(["a1"])["a1"]
    assert isinstance(a1[0], np.memmap)
    folder = f.spill
    assert folder and os.listdir(folder)
    a4 = f.get(["a4"])["a4"]
    for b in range(len(feeds)):
        np.testing.assert_array_equal(a1[b], ref["a1"][b])
        np.testing.assert_array_equal(a4[b], ref["a4"][b])
    f.close()
    assert not os.path.exists(folder)


def test_unknown_value_is_an_error():
    with pytest.raises(KeyError):
        Frontier(_chain(), _feeds()).get(["nope"])


def test_exposed_returns_intermediate_values_computed_by_hand():
    model = _chain(depth=2)
    x = _feeds(1)[0]["x"]
    w = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    a0 = np.maximum(x @ w["W0"], 0) + x  # by hand: the first block's output
    m1 = a0 @ w["W1"]
    n_out = len(model.graph.output)
    got = exposed(model, ["a0", "m1"]).run(["a0", "m1"], {"x": x})
    assert np.allclose(got[0], a0, atol=1e-5) and np.allclose(got[1], m1, atol=1e-5)
    assert len(model.graph.output) == n_out  # a copy was cut down
    before = len(model.graph.node)
    exposed(model, ["a0", "a0"], copy=False)
    assert [o.name for o in model.graph.output] == ["a0"]  # the model itself, each value once
    made = {o for n in model.graph.node for o in n.output}
    assert "a0" in made and "m1" not in made and len(model.graph.node) < before  # nothing after a0 runs
    assert {t.name for t in model.graph.initializer} == {"W0"}  # nor keeps its weights


def test_a_subgraph_that_reads_an_outer_value_keeps_it_alive_until_it_runs():
    """An If whose branches read ``h`` (computed before it) from the enclosing scope: ``h`` is held
    until the If has run, even when nothing else reads it, and the values equal a full run."""
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((4, 4))).astype(np.float32)
    then_g = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("ReduceSum", ["x"], ["s"], name="sum", keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("Sigmoid", ["x"], ["g"], name="sig"),
             helper.make_node("If", ["c"], ["b"], name="if", then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["b", "g"], ["y"], name="add")]
    g = helper.make_graph(nodes, "if", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    feeds = [{"x": rng.standard_normal((2, 4)).astype(np.float32)} for _ in range(3)]
    with Frontier(m, feeds, threads=1) as f:
        first = f.get(["h"])  # runs only the MatMul; no node input reads h any more, the If's body does
        assert f.nodes_run == 1 and "h" in f.held
        later = f.get(["y", "b"])
        assert f.nodes_run == len(nodes)  # every node ran once
    for k, fd in enumerate(feeds):
        want = _full(m, ["h", "y", "b"], fd)
        assert np.allclose(first["h"][k], want["h"])
        assert np.allclose(later["y"][k], want["y"]) and np.allclose(later["b"][k], want["b"])


# -- sessions whose weights are handed to ORT as arrays ----------------------------------------

def test_a_session_on_weights_handed_over_as_arrays_computes_the_same(tmp_path):
    """``io.session_parts``: a proto without the large tensors' bytes (they are
    data-less external references) and those tensors as arrays, which
    ``session(externals=...)`` hands to ORT; the outputs equal a session on the
    full proto, also for weights read from a file's external data, and no
    placeholder is ever read from disk."""
    import onnx_ir as ir

    from onnxprune import io

    m = _chain(depth=3, width=64)  # 16 KB weights: above the inline limit
    x = {"x": np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)}
    want = session(m).run(None, x)[0]
    in_memory = ir.serde.deserialize_model(onnx.ModelProto.FromString(m.SerializeToString()))
    onnx.save(m, str(tmp_path / "m.onnx"), save_as_external_data=True, location="m.data", size_threshold=0)
    for model in (in_memory, ir.load(str(tmp_path / "m.onnx"))):
        proto, arrays = io.session_parts(model)
        assert sorted(arrays) == ["W0", "W1", "W2"]
        assert proto.ByteSize() < 4096  # the weights are not in it
        assert all(t.data_location == TensorProto.EXTERNAL for t in proto.graph.initializer if t.name in arrays)
        got = session(proto, externals=arrays).run(None, x)[0]
        np.testing.assert_array_equal(got, want)
    with pytest.raises(Exception):  # without the arrays the placeholders point at nothing
        session(proto).run(None, x)


def test_exposed_keeps_what_a_branch_reads_from_outside_and_drops_the_rest():
    """A value read only inside an If's branch is still computed; a side branch nothing asked for is not."""
    then_g = helper.make_graph([helper.make_node("Identity", ["v"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, ["N", 4])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, ["N", 4])])
    nodes = [helper.make_node("Add", ["x", "c"], ["v"], name="add"),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g, name="if"),
             helper.make_node("Mul", ["x", "c"], ["side"], name="side")]
    g = helper.make_graph(nodes, "branch", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                            helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
                           helper.make_tensor_value_info("side", TensorProto.FLOAT, ["N", 4])],
                          [numpy_helper.from_array(np.full(4, 2.0, np.float32), "c")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    (y,) = exposed(model, ["y"]).run(["y"], {"x": x, "cond": np.array(True)})
    assert np.allclose(y, x + 2.0)
    exposed(model, ["y"], copy=False)
    assert [n.name for n in model.graph.node] == ["add", "if"]


def test_initializers_listed_as_inputs_go_with_the_nodes_that_read_them():
    """Old exporters (IR < 4) list every initializer as a graph input too. Cutting
    the graph to a value that does not read one must drop the input with the
    initializer, or ORT asks for it as a feed (opset-9 CenterFace under the
    damage search). Both the cut session and the in-graph channel sums run."""
    import onnx_ir as ir

    from onnxprune.runtime.capture import channel_sums

    w = numpy_helper.from_array(np.full(4, 3.0, np.float32), "w")
    unused = numpy_helper.from_array(np.array(7, np.int64), "bn.num_batches_tracked")
    nodes = [helper.make_node("Mul", ["x", "w"], ["a"], name="mul"),
             helper.make_node("Cast", ["bn.num_batches_tracked"], ["n"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("Add", ["a", "n"], ["y"], name="add")]
    g = helper.make_graph(nodes, "ir3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
                                         helper.make_tensor_value_info("w", TensorProto.FLOAT, [4]),
                                         helper.make_tensor_value_info("bn.num_batches_tracked", TensorProto.INT64, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w, unused])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)], ir_version=3)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    sess = exposed(model, ["a"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    (a,) = sess.run(["a"], {"x": x})
    assert np.allclose(a, x * 3.0)
    sums = channel_sums(ir.serde.deserialize_model(model), {"a": (1, 2)}, [{"x": x}])
    total, count = sums["a"]
    assert np.allclose(total, (x * 3.0).sum(0)) and count == 2


def test_a_session_error_prints_nothing_and_raises(capfd):
    """Two Convs whose weights and biases are graph inputs (the damage search
    feeds them per candidate), added and rectified, with the first Conv's output
    also a graph output: onnxruntime's full optimisation level refuses the graph
    ("Failed to find node output ... producing output: c"). The error comes back
    as an exception for the caller (the damage search then runs whole models)
    and nothing is printed: ORT's provider fallback printed an 'EP Error' banner
    on stdout and retried the same CPU provider."""
    rng = np.random.default_rng(0)
    shapes = {"w": (16, 8, 3, 3), "b": (16,), "w2": (16, 8, 1, 1), "b2": (16,)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["d"], name="conv2"),
             helper.make_node("Add", ["c", "d"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["y"], name="relu")]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])]
    ins += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in shapes.items()]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, None), helper.make_empty_tensor_value_info("c")]
    m = helper.make_model(helper.make_graph(nodes, "g", ins, outs), opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    with pytest.raises(Exception, match="producing output: c"):
        session(m)
    out, err = capfd.readouterr()
    assert "EP Error" not in out + err and not out.strip()
    del m.graph.output[1]  # the same graph without the exposed value makes a session that runs
    feed = {"x": rng.standard_normal((1, 8, 8, 8)).astype(np.float32)}
    feed.update({k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()})
    assert np.all(np.isfinite(session(m).run(None, feed)[0]))


def test_partial_runs_of_a_graph_the_full_level_refuses_run_at_the_extended_one():
    """The graph above with a third Conv after the Relu, every weight and bias
    fed: a run from the second Conv is fed ``c``, which the piece before it
    must expose, and onnxruntime's full level refuses that piece. Resume makes
    its sessions at the extended level instead, and a partial run gives what
    the whole model gives."""
    from onnxprune.runtime.capture import Resume

    rng = np.random.default_rng(0)
    shapes = {"w": (16, 8, 3, 3), "b": (16,), "w2": (16, 8, 1, 1), "b2": (16,), "w3": (4, 16, 1, 1), "b3": (4,)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w2", "b2"], ["d"], name="conv2"),
             helper.make_node("Add", ["c", "d"], ["s"], name="add"),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w3", "b3"], ["y"], name="conv3")]
    ins = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 8])]
    ins += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v)) for k, v in shapes.items()]
    m = helper.make_model(helper.make_graph(nodes, "g", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    base = {k: rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    feeds = [{"x": rng.standard_normal((2, 8, 8, 8)).astype(np.float32)} for _ in range(2)]
    r = Resume(m, {}, base, feeds, threads=1)
    assert r.ok and r.extended and 1 in r.cross and r.cross[1] == ["c"]
    edited = {**base, "w2": base["w2"] * -0.5}
    assert r.start(r.changed(edited)) == 1
    whole = session(m)
    for out, fd in zip(r.run(1, edited), feeds):
        np.testing.assert_allclose(out[0], whole.run(None, {**fd, **edited})[0], rtol=1e-5, atol=1e-5)


def test_partial_runs_move_on_with_the_values_a_measured_run_made():
    """Resume: a keyed run from a starting point keeps the values it made at
    the later ones (here one that is also a graph output); moving the base to
    its arrays takes them over without a run, and a later run from there
    computes what the whole edited model does."""
    from onnxprune.runtime.capture import Resume

    model = _chain(depth=3)
    g = model.graph
    base = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    g.input.extend(helper.make_tensor_value_info(k, TensorProto.FLOAT, list(a.shape)) for k, a in base.items())
    del g.initializer[:]
    g.output.append(helper.make_tensor_value_info("a1", TensorProto.FLOAT, ["N", 8]))
    feeds = _feeds(2)
    r = Resume(model, {}, base, feeds, threads=1)
    assert r.ok and sorted(r.cross) == [3, 6] and r.cross[6] == ["a1"]

    def whole(arrays):
        return [_full(model, ["y", "a1"], {**fd, **arrays}) for fd in feeds]

    one = {**base, "W1": base["W1"] * 0.5}
    assert r.start(r.changed(one)) == 3
    got = r.run(3, one, key="one")
    for out, ref in zip(got, whole(one)):
        np.testing.assert_allclose(out[0], ref["y"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(out[1], ref["a1"], rtol=1e-5, atol=1e-6)
    r.rebase(one, key="one")
    assert (r.reused, r.rebased) == (1, 0)
    two = {**one, "W2": base["W2"] * -1.0}
    assert r.start(r.changed(two)) == 6
    for out, ref in zip(r.run(6, two), whole(two)):
        np.testing.assert_allclose(out[0], ref["y"], rtol=1e-5, atol=1e-6)
    r.rebase({**base}, key="not run")  # back to the unedited model: no kept run of that name, one run
    assert (r.reused, r.rebased) == (1, 1)
