"""Calibration images come from any folder layout a user has: an ImageFolder
root (train/<class>/), one split of class folders, or a plain folder of photos
(nested or not); a static-batch model gets as many samples as a dynamic one.
A folder of fewer photos than samples wanted gives several views of each
(the centre crop first, then random resized crops), each sample's source its
photo; ``--calib-norm`` scales the pixels as the model expects."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from onnxprune.plan.importance import calib  # noqa: E402

MODEL = str(Path(calib.__file__).parents[2] / "data" / "default_resnet.onnx")
DEFAULT = onnx.load(MODEL)


def _write(folder, n, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(start)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(str(folder / f"i{start + i}.png"))


def test_plain_folder_of_photos_nested_or_not(tmp_path):
    _write(tmp_path / "photos", 10)
    _write(tmp_path / "photos" / "trip", 6, start=10)  # a subfolder beside loose photos: still no classes
    c = calib.load(str(tmp_path / "photos"), DEFAULT, n_batches=2, batch=8)
    assert c.n == 16 and c.labels is None
    assert c.batches[0].shape == (8, 3, 128, 128)  # resized to the model's input


def test_imagefolder_root_and_a_split_of_class_folders(tmp_path):
    for cls in ("cat", "dog"):
        _write(tmp_path / "ds" / "train" / cls, 8, start=0 if cls == "cat" else 100)
    root = calib.load(str(tmp_path / "ds"), DEFAULT, n_batches=2, batch=8)
    split = calib.load(str(tmp_path / "ds" / "train"), DEFAULT, n_batches=2, batch=8)
    for c in (root, split):
        assert c.n == 16 and sorted(np.concatenate(c.labels).tolist()) == [0] * 8 + [1] * 8


def test_an_empty_folder_is_one_user_error(tmp_path):
    (tmp_path / "none").mkdir()
    with pytest.raises(calib.UserError, match="no images under"):
        calib.load(str(tmp_path / "none"), DEFAULT, n_batches=2, batch=8)


def _photos(folder, sizes):
    """Photos with structure (smooth gradients and a bright square), of ``sizes`` (w, h)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (w, h) in enumerate(sizes):
        yy, xx = np.mgrid[0:h, 0:w]
        a = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 40 * i)], -1).astype(np.uint8)
        a[h // 4:h // 2, w // 5:w // 2] = 250
        Image.fromarray(a).save(str(folder / f"p{i}.png"))


def test_a_few_photos_give_several_views_each_with_their_photo_as_source(tmp_path):
    from onnxprune.torchbridge.data import transforms

    sizes = [(300, 200), (180, 240), (256, 256)]
    _photos(tmp_path / "few", sizes)
    c = calib.load(str(tmp_path / "few"), DEFAULT, n_batches=2, batch=8)
    assert c.n == 16 and c.batches[0].shape == (8, 3, 128, 128) and c.labels is None
    x, src = np.concatenate(c.batches), np.concatenate(c.sources)
    assert sorted(np.bincount(src).tolist()) == [5, 5, 6]  # every photo, each its own source
    centre = transforms(128, train=False)
    for k in range(3):  # each photo's centre crop comes first, exactly as evaluation preprocesses it
        with Image.open(tmp_path / "few" / f"p{src[k]}.png") as im:
            np.testing.assert_allclose(x[k], centre(im.convert("RGB")).numpy(), atol=1e-6)
    for p in range(3):  # the further views of a photo are other crops, not copies
        views = x[src == p]
        assert min(np.abs(views[i] - views[j]).mean() for i in range(len(views)) for j in range(i)) > 1e-3
    again = calib.load(str(tmp_path / "few"), DEFAULT, n_batches=2, batch=8)
    assert np.array_equal(np.concatenate(again.batches), x)  # the same views every run
    one = tmp_path / "one"
    _photos(one, sizes[:1])
    c1 = calib.load(str(one), DEFAULT, n_batches=1, batch=8)
    assert c1.n == 8 and set(np.concatenate(c1.sources).tolist()) == {0}


def test_many_photos_give_one_centre_crop_each(tmp_path):
    _photos(tmp_path / "many", [(64 + 8 * i, 64) for i in range(20)])
    c = calib.load(str(tmp_path / "many"), DEFAULT, n_batches=2, batch=8)
    assert c.n == 16 and "16 images" in c.source and "views" not in c.source


def test_calib_norm_scales_the_same_views(tmp_path):
    _photos(tmp_path / "p", [(200, 150), (150, 200)])
    got = {n: np.concatenate(calib.load(str(tmp_path / "p"), DEFAULT, n_batches=1, batch=8, norm=n).batches)
           for n in ("unit", "raw", "inception", "imagenet", "0.5,0.25,0/0.5,0.5,2")}
    u = got["unit"]
    assert 0 <= u.min() and u.max() <= 1 and u.max() > 0.9
    np.testing.assert_allclose(got["raw"], u * 255, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(got["inception"], u * 2 - 1, atol=1e-5)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(got["imagenet"], (u - mean[:, None, None]) / std[:, None, None], atol=1e-4)
    mine = (u - np.array([0.5, 0.25, 0])[:, None, None]) / np.array([0.5, 0.5, 2])[:, None, None]
    np.testing.assert_allclose(got["0.5,0.25,0/0.5,0.5,2"], mine, atol=1e-5)
    assert np.array_equal(got["imagenet"], np.concatenate(calib.load(str(tmp_path / "p"), DEFAULT, 1, 8).batches))


@pytest.mark.parametrize("norm", ["bgr", "0.5,0.5/0.5,0.5,0.5", "0,0,0/1,0,1", "a,b,c/d,e,f"])
def test_a_bad_calib_norm_is_one_user_error(tmp_path, norm):
    _photos(tmp_path / "p", [(64, 64)])
    with pytest.raises(calib.UserError, match="--calib-norm"):
        calib.load(str(tmp_path / "p"), DEFAULT, n_batches=1, batch=4, norm=norm)


def test_calib_norm_with_arrays_is_one_user_error(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((8, 3, 128, 128), np.float32))
    with pytest.raises(calib.UserError, match="--calib-norm applies to images read from a folder"):
        calib.load(str(tmp_path / "x.npy"), DEFAULT, n_batches=1, batch=8, norm="unit")


def test_a_static_batch_model_gets_the_same_number_of_samples(tmp_path):
    m = onnx.load(MODEL)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch fixed at 2
    x = np.random.default_rng(0).standard_normal((40, 3, 128, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    c = calib.load(str(tmp_path / "x.npy"), m, n_batches=4, batch=8)
    assert c.n == 32 and all(len(b) == 2 for b in c.batches)


def test_the_cli_takes_a_few_photos_and_their_norm(tmp_path, capsys, monkeypatch):
    from onnxprune.cli import main

    _photos(tmp_path / "p", [(200, 150), (150, 200), (160, 160)])
    seen = []
    load = calib.load
    monkeypatch.setattr(calib, "load", lambda *a, **k: seen.append(k.get("norm")) or load(*a, **k))
    out = tmp_path / "pruned.onnx"
    rc = main([MODEL, "--ratios", '{"target_macs": 0.8}', "--calib", str(tmp_path / "p"), "--calib-norm", "unit",
               "--recover", "-o", str(out), "-q"])
    assert rc == 0 and out.exists() and seen == ["unit"]
    capsys.readouterr()
    rc = main([MODEL, "--ratios", '{"target_macs": 0.8}', "--calib", str(tmp_path / "p"), "--calib-norm", "bgr",
               "-o", str(tmp_path / "b.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--calib-norm 'bgr'" in err[0] and not (tmp_path / "b.onnx").exists()


def test_finetune_takes_the_norm_of_its_image_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx2torch")
    from onnxprune.cli import main
    from onnxprune.errors import UserError
    from onnxprune.torchbridge import train

    _photos(tmp_path / "p", [(64, 64)])
    seen = []

    def record(model, opts):
        seen.append((opts.mean, opts.std))
        raise UserError("stopped here")

    monkeypatch.setattr(train, "finetune", record)
    args = [MODEL, "--data", str(tmp_path / "p"), "--teacher", MODEL, "-o", str(tmp_path / "t.onnx")]
    assert main(["finetune", *args, "--data-norm", "raw"]) == 1
    assert main(["finetune", *args]) == 1
    assert seen == [calib.NORMS["raw"], calib.NORMS["imagenet"]]
    capsys.readouterr()
    np.save(tmp_path / "x.npy", np.zeros((4, 3, 128, 128), np.float32))
    for bad, says in ((["--data-norm", "bgr"], "--data-norm 'bgr'"),
                      (["--data", str(tmp_path / "x.npy"), "--data-norm", "unit"], "--data-norm applies to images")):
        assert main(["finetune", *args, *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0]
    assert len(seen) == 2


def test_gohsp_takes_the_norm_of_its_image_folder(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnx2torch")
    from onnxprune.cli import main
    from onnxprune.methods import gohsp

    seen = []
    real = gohsp.gohsp
    monkeypatch.setattr(gohsp, "gohsp", lambda model, opts: seen.append(opts.norm) or real(model, opts))
    args = ["gohsp", MODEL, "--data", str(tmp_path), "--ratios", '{"kinds": {"mlp": 0.5}}', "-o", str(tmp_path / "g.onnx")]
    assert main([*args, "--data-norm", "bgr"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert seen == ["bgr"] and len(err) == 1 and "--data-norm 'bgr'" in err[0]
    assert not (tmp_path / "g.onnx").exists()


def _identity(dims):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]))


@pytest.mark.parametrize("dims, shape", [
    (["N", 3, 48, 320], (3, 48, 320)),  # a text-line recogniser: wide, not square
    (["N", 1, 64, 256], (1, 64, 256)),  # grey
    (["N", 48, 48, 3], (48, 48, 3)),  # channels last (Keras, tf2onnx)
])
def test_images_take_the_inputs_layout(tmp_path, dims, shape):
    """Synthetic and folder calibration cut images to the input as it is: H and W
    apart, one grey channel, channels last. Photos of one flat colour each come
    back as exactly that colour in every pixel, channel by channel (grey: its
    luminance), normalised."""
    _photos(tmp_path / "few", [(300, 200), (180, 240)])
    model = _identity(dims)
    for spec in ("synthetic", str(tmp_path / "few")):
        c = calib.load(spec, model, n_batches=2, batch=4)
        assert c.batches[0].shape == (4, *shape) and c.n == 8
        assert np.isfinite(np.concatenate(c.batches)).all() and np.concatenate(c.batches).std() > 0.05
    flat = {"red": (200, 100, 30), "blue": (20, 90, 240)}
    (tmp_path / "flat").mkdir()
    for name, rgb in flat.items():
        Image.fromarray(np.full((150, 260, 3), rgb, np.uint8)).save(str(tmp_path / "flat" / f"{name}.png"))
    c = calib.load(str(tmp_path / "flat"), model, n_batches=1, batch=4, norm="unit")
    x, src = np.concatenate(c.batches), np.concatenate(c.sources)
    names = sorted(flat)  # image_files order
    for k in range(len(x)):
        rgb = np.array(flat[names[src[k]]], np.float32) / 255
        want = rgb if shape[0] != 1 else np.array([rgb @ [0.299, 0.587, 0.114]])
        got = x[k].reshape(-1, len(want)) if shape[-1] in (1, 3) and shape[0] not in (1, 3) else \
            x[k].reshape(len(want), -1).T
        np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), atol=3e-3)


def test_an_input_that_is_no_image_is_one_user_error():
    with pytest.raises(calib.UserError, match=r"\[N, H, W, C\].*give a .npy/.npz"):
        calib.load("synthetic", _identity(["N", 3, "H", "W"]), n_batches=2, batch=4)
