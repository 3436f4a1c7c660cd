"""Calibration images come from any folder layout a user has: an ImageFolder
root (train/<class>/), one split of class folders, or a plain folder of photos
(nested or not); a static-batch model gets as many samples as a dynamic one."""
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
    with pytest.raises(calib.UserError, match="0 images, fewer than one batch of 8"):
        calib.load(str(tmp_path / "none"), DEFAULT, n_batches=2, batch=8)


def test_a_static_batch_model_gets_the_same_number_of_samples(tmp_path):
    m = onnx.load(MODEL)
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # batch fixed at 2
    x = np.random.default_rng(0).standard_normal((40, 3, 128, 128)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    c = calib.load(str(tmp_path / "x.npy"), m, n_batches=4, batch=8)
    assert c.n == 32 and all(len(b) == 2 for b in c.batches)
