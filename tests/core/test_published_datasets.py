"""Published dataset layouts on fixture trees written in exactly those layouts."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.io import loadmat, savemat

from core.backbones.preprocess import preprocess_image
from core.cli.main import main
from core.data.datasets import DatasetSpec, ImageSplit, load_dataset, load_image_folder
from core.data.photo_split import PhotoSplit
from core.data.published_datasets import (
    FLOWERS102_CLASSES,
    LAYOUTS,
    OutsideDataRoot,
    load_layout_dataset,
    parse_layout_name,
    scan_layout,
    split_rows,
    training_record,
)
from core.errors import ConfigError, ResourceUnavailable
from core.learning.common import eval_batch_size
from tests.layouts import (
    cub200_tree,
    flowers102_tree,
    jpeg,
    split_folders_tree,
    stanford_cars_tree,
)

WRITERS = {"flowers102": flowers102_tree, "cub200": cub200_tree, "cub200_cropped": cub200_tree,
           "stanford_cars": stanford_cars_tree, "stanford_cars_cropped": stanford_cars_tree,
           "split_folders": split_folders_tree}


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tree per layout under one data root (the cropped variants share theirs)."""
    root = tmp_path_factory.mktemp("data")
    made = {"flowers102": flowers102_tree(root / "flowers"),
            "cub200": cub200_tree(root / "cub"),
            "stanford_cars": stanford_cars_tree(root / "cars"),
            "split_folders": split_folders_tree(root / "sketch")}
    made["cub200_cropped"] = made["cub200"]
    made["stanford_cars_cropped"] = made["stanford_cars"]
    return made


def _spec(layout: str, path: Path, **kw: object) -> DatasetSpec:
    return DatasetSpec(f"{layout}:{path}", **{"image_size": 32, **kw})  # type: ignore[arg-type]


# -- every layout --------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_each_layout_loads_with_its_official_splits(trees: dict[str, Path], layout: str) -> None:
    path = trees[layout]
    index = scan_layout(layout, path, data_root=path.parent.parent, check_headers=True)
    assert len(index.classes) == 3 and len(index.files) == len(index.labels)
    official = index.sizes()
    data = load_dataset(_spec(layout, path), data_root=path.parent.parent)
    sizes = data.describe()["sizes"]
    assert sizes["test"] == official["test"] == 6
    if official["val"]:  # flowers102 and split_folders publish one: kept as it is
        assert (sizes["train"], sizes["val"]) == (official["train"], official["val"]) == (12, 6)
    else:  # cub200, stanford_cars: val_fraction of the official train split
        assert sizes["train"] + sizes["val"] == official["train"] == 12 and sizes["val"] >= 1
    rows = split_rows(index, _spec(layout, path))
    assert not set(rows["test"]) & (set(rows["train"]) | set(rows["val"]))
    assert all(index.splits[rows["test"]] == 2)
    for split in (data.train, data.val, data.test):
        assert isinstance(split, PhotoSplit) and isinstance(split, ImageSplit)
        x, y = split.batch(slice(0, 4))
        assert x.shape == (min(4, len(split)), 3, 32, 32) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 3
    assert data.train.class_counts() == [sizes["train"] // 3] * 3 or layout in (
        "cub200", "cub200_cropped", "stanford_cars", "stanford_cars_cropped")
    assert training_record(data)["preprocess"] == "imagenet"


def test_flowers_labels_and_split_ids_come_from_the_mat_files(trees: dict[str, Path]) -> None:
    path = trees["flowers102"]
    labels = loadmat(path / "imagelabels.mat")["labels"].reshape(-1).astype(int)
    setid = loadmat(path / "setid.mat")
    data = load_layout_dataset(_spec("flowers102", path))
    assert data.classes == list(FLOWERS102_CLASSES[:3])
    for split, key in ((data.train, "trnid"), (data.val, "valid"), (data.test, "tstid")):
        assert isinstance(split, PhotoSplit)
        ids = [int(f.stem.split("_")[1]) for f in split.files]
        assert sorted(ids) == sorted(setid[key].reshape(-1).astype(int).tolist())
        assert split.labels.tolist() == [labels[i - 1] - 1 for i in ids]


def test_class_names_from_the_published_metadata(trees: dict[str, Path]) -> None:
    cub = scan_layout("cub200", trees["cub200"])
    assert cub.classes == ("Chelsea Bird", "Coffee Bird", "Astronaut Bird")  # "001." dropped
    cars = scan_layout("stanford_cars", trees["stanford_cars"])
    assert cars.classes[0] == "Chelsea Coupe 2012"
    sketch = scan_layout("split_folders", trees["split_folders"])
    assert sketch.classes == ("astronaut", "chelsea", "coffee")
    # a CUB download is often pointed at from the folder above CUB_200_2011/
    assert scan_layout("cub200", trees["cub200"].parent).root == trees["cub200"]


# -- decoding: lazily, as /predict does at evaluation, augmented in training ---------------


def test_evaluation_images_are_exactly_what_predict_computes(trees: dict[str, Path]) -> None:
    data = load_layout_dataset(_spec("flowers102", trees["flowers102"], image_size=48))
    split = data.test
    assert isinstance(split, PhotoSplit) and split.augment is None
    x, _ = split.batch([2])
    with Image.open(split.files[2]) as image:
        expected = preprocess_image(image, 48)
    torch.testing.assert_close(x[0], expected, rtol=0, atol=0)


def test_cropped_layouts_crop_to_the_published_boxes(trees: dict[str, Path]) -> None:
    for layout, box in (("cub200_cropped", (0, 0, 20, 32)),
                        ("stanford_cars_cropped", (0, 0, 20, 32))):
        split = load_layout_dataset(_spec(layout, trees[layout])).test
        assert isinstance(split, PhotoSplit) and split.boxes is not None
        x, _ = split.batch([0])
        with Image.open(split.files[0]) as image:
            expected = preprocess_image(image.convert("RGB").crop(box), 32)
        torch.testing.assert_close(x[0], expected, rtol=0, atol=0)
    whole = load_layout_dataset(_spec("cub200", trees["cub200"])).test
    assert isinstance(whole, PhotoSplit) and whole.boxes is None


def test_training_augmentation_is_random_per_batch_but_reproducible(
        trees: dict[str, Path]) -> None:
    path = trees["flowers102"]
    train = load_layout_dataset(_spec("flowers102", path, seed=3)).train
    again = load_layout_dataset(_spec("flowers102", path, seed=3)).train
    other = load_layout_dataset(_spec("flowers102", path, seed=4)).train
    assert isinstance(train, PhotoSplit) and train.augment is not None
    a, ya = train.batch([0, 5, 7])
    torch.testing.assert_close(a, again.batch([0, 5, 7])[0])  # a resumed run sees the same
    assert not torch.equal(a, other.batch([0, 5, 7])[0])
    assert not torch.equal(a[:1], train.batch([0, 1])[0][:1])  # another batch, another crop
    evaluated = load_layout_dataset(_spec("flowers102", path, seed=3)).val.batch([0])[0]
    assert evaluated.shape[1:] == a.shape[1:] and ya.tolist() == train.labels[[0, 5, 7]].tolist()
    rng = np.random.default_rng(0)
    for _ in range(200):  # every crop lies inside the image and keeps the ratio range
        left, top, right, bottom = train.augment.crop_box(40, 32, rng)
        assert 0 <= left < right <= 40 and 0 <= top < bottom <= 32
    assert training_record(load_layout_dataset(_spec("flowers102", path)))["augmentation"] == {
        "scale": (0.08, 1.0), "ratio": (0.75, 4 / 3), "flip": True}


def test_images_are_decoded_only_when_a_batch_asks(tmp_path: Path) -> None:
    path = flowers102_tree(tmp_path / "flowers")
    data = load_layout_dataset(_spec("flowers102", path), check_headers=False)
    split = data.test
    assert isinstance(split, PhotoSplit)
    assert not any(isinstance(v, torch.Tensor) and v.dtype != torch.int64
                   for v in vars(split).values())  # no pixels held, only labels
    split.files[1].write_bytes(b"not a jpeg")
    split.batch([0])
    with pytest.raises(ConfigError, match=r"cannot read image .*image_\d{5}\.jpg"):
        split.batch([1])
    with pytest.raises(ConfigError, match="cannot read image"):  # the checked scan finds it
        load_layout_dataset(_spec("flowers102", path))


def test_limits_are_stratified_and_shrink_an_official_val_split(trees: dict[str, Path]) -> None:
    data = load_layout_dataset(_spec("flowers102", trees["flowers102"], train_limit=6,
                                     test_limit=3))
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    assert data.train.class_counts() == [2, 2, 2]
    cub = load_layout_dataset(_spec("cub200", trees["cub200"], val_fraction=0.25))
    assert (len(cub.train), len(cub.val), len(cub.test)) == (9, 3, 6)


def test_eval_batches_shrink_with_image_size() -> None:
    split = ImageSplit(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), torch.zeros(1), ["a"])
    assert eval_batch_size(256, split) == 256
    photo = PhotoSplit([], torch.zeros(0), ["a"], 224)
    assert eval_batch_size(256, photo) == 20 and eval_batch_size(16, photo) == 8


# -- names ---------------------------------------------------------------------------------


def test_layout_names() -> None:
    assert parse_layout_name("flowers102:/data/f") == ("flowers102", "/data/f")
    assert parse_layout_name("imagefolder:/x") is None and parse_layout_name("mnist5k") is None
    with pytest.raises(ConfigError, match="flowers102:PATH"):
        parse_layout_name("flowers102:")
    with pytest.raises(ConfigError, match="unknown dataset layout 'cifar'"):
        scan_layout("cifar", "/tmp")
    assert set(LAYOUTS) >= {"flowers102", "cub200", "stanford_cars", "split_folders"}


def test_a_split_tree_read_as_an_image_folder_points_to_split_folders(
        trees: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="split_folders:"):
        load_image_folder(trees["split_folders"], 32)


# -- validation: what is missing or malformed, precisely -----------------------------------


def _broken(tmp_path: Path, layout: str) -> Path:
    return WRITERS[layout](tmp_path / layout, per_split=(2, 1, 1)[:3 if layout in (
        "flowers102", "split_folders") else 2])


@pytest.mark.parametrize(("layout", "damage", "error", "words"), [
    ("flowers102", lambda p: (p / "setid.mat").unlink(), ResourceUnavailable,
     r"setid\.mat \(trnid, valid and tstid"),
    ("flowers102", lambda p: (p / "jpg" / "image_00002.jpg").unlink(), ResourceUnavailable,
     r"1 of 12 images listed in setid\.mat are missing .*jpg/image_00002\.jpg"),
    ("flowers102", lambda p: savemat(p / "imagelabels.mat", {"labels": np.array([[1, 2, 103]])}),
     ConfigError, r"ids outside 1\.\.3"),
    ("flowers102", lambda p: savemat(p / "imagelabels.mat", {"labels": np.zeros((1, 12))}),
     ConfigError, r"labels in imagelabels\.mat must be 1\.\.102, found 0\.\.0"),
    ("flowers102", lambda p: savemat(p / "setid.mat", {"trnid": [[1, 2]], "valid": [[2]],
                                                       "tstid": [[3]]}),
     ConfigError, "more than one split"),
    ("flowers102", lambda p: savemat(p / "setid.mat", {"trnid": [[1]], "tstid": [[2]]}),
     ConfigError, r"setid\.mat has no variable 'valid'"),
    ("flowers102", lambda p: (p / "imagelabels.mat").write_text("<html>404</html>"),
     ConfigError, r"imagelabels\.mat is not a readable \.mat file"),
    ("flowers102", lambda p: os.rename(p / "jpg", p / "images"), ResourceUnavailable,
     r"folder jpg/"),
    ("cub200", lambda p: (p / "classes.txt").unlink(), ResourceUnavailable,
     r"classes\.txt .*missing"),
    ("cub200", lambda p: (p / "images.txt").write_text("1 a.jpg\nfoo\n"), ConfigError,
     r"images\.txt line 2 should be"),
    ("cub200", lambda p: (p / "train_test_split.txt").write_text("1 1\n2 0\n"), ConfigError,
     r"train_test_split\.txt and images\.txt list different image ids"),
    ("cub200", lambda p: (p / "image_class_labels.txt").write_text(
        "".join(f"{i} 9\n" for i in range(1, 10))), ConfigError, r"must be 1\.\.3, found 9"),
    ("stanford_cars", lambda p: (p / "cars_test_annos_withlabels.mat").unlink(),
     ResourceUnavailable, r"looked for devkit/cars_test_annos_withlabels\.mat"),
    ("stanford_cars", lambda p: savemat(p / "cars_test_annos_withlabels.mat", {
        "annotations": np.array([[(1, 1, 2, 2, "00001.jpg")]], dtype=[
            ("bbox_x1", object), ("bbox_y1", object), ("bbox_x2", object),
            ("bbox_y2", object), ("fname", object)])}),
     ConfigError, r"lack fields \['class'\] \(cars_test_annos\.mat has no labels"),
    ("stanford_cars", lambda p: (p / "cars_train" / "00003.jpg").unlink(), ResourceUnavailable,
     r"cars_train/00003\.jpg"),
    ("split_folders", lambda p: os.rename(p / "test", p / "testing"), ResourceUnavailable,
     r"needs train/ and test/"),
    ("split_folders", lambda p: jpeg(p / "test" / "zebra" / "0.jpg", "coffee",
                                     np.random.default_rng(0), (8, 8)),
     ConfigError, r"test/ has classes that train/ lacks: \['zebra'\]"),
])
def test_a_damaged_tree_is_refused_naming_what_is_wrong(
        tmp_path: Path, layout: str, damage: object, error: type[Exception], words: str) -> None:
    path = _broken(tmp_path, layout)
    if layout == "cub200":
        path = path / "CUB_200_2011" if (path / "CUB_200_2011").is_dir() else path
    damage(path)  # type: ignore[operator]
    with pytest.raises(error, match=words):
        scan_layout(layout, path)


# -- the data root holds for every file ----------------------------------------------------


def test_no_file_may_escape_the_data_root_through_a_symlink(tmp_path: Path) -> None:
    root = tmp_path / "data"
    outside = tmp_path / "secret.jpg"
    path = flowers102_tree(root / "flowers", per_split=(2, 1, 1))
    (path / "jpg" / "image_00004.jpg").rename(outside)
    (path / "jpg" / "image_00004.jpg").symlink_to(outside)
    with pytest.raises(OutsideDataRoot, match=r"image_00004\.jpg resolves to .*secret\.jpg, "
                                              "outside the data root"):
        scan_layout("flowers102", path, data_root=root)
    with pytest.raises(OutsideDataRoot):
        load_dataset(DatasetSpec(f"flowers102:{path}", image_size=32), data_root=root)
    assert len(scan_layout("flowers102", path).files) == 12  # the command line reads it
    inside = root / "elsewhere.jpg"  # a link that stays below the root is fine
    outside.rename(inside)
    (path / "jpg" / "image_00004.jpg").unlink()
    (path / "jpg" / "image_00004.jpg").symlink_to(inside)
    assert scan_layout("flowers102", path, data_root=root).files[3] == inside

    (path / "setid.mat").rename(tmp_path / "setid.mat")  # metadata files too
    (path / "setid.mat").symlink_to(tmp_path / "setid.mat")
    with pytest.raises(OutsideDataRoot, match=r"setid\.mat resolves"):
        scan_layout("flowers102", path, data_root=root)

    sketch = split_folders_tree(root / "sketch", per_split=(2, 0, 1))
    (sketch / "train" / "coffee").rename(tmp_path / "coffee")  # a linked class folder
    (sketch / "train" / "coffee").symlink_to(tmp_path / "coffee")
    with pytest.raises(OutsideDataRoot, match="train/coffee resolves"):
        scan_layout("split_folders", sketch, data_root=root)


# -- the command line ----------------------------------------------------------------------


def test_xma2_adapt_reads_a_layout_by_name_and_path(trees: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "summary.json"
    assert main(["adapt", "--dataset", "flowers102", "--method", "head_bn", "--size", "32",
                 "--epochs", "1", "--batch-size", "4", "--threads", "1", "--dataset-path",
                 str(trees["flowers102"]), "--out", str(out)]) == 0
    summary = json.loads(out.read_text())
    assert summary["dataset"] == {"name": f"flowers102:{trees['flowers102']}", "train": 12,
                                  "val": 6, "test": 6}
    assert summary["steps"] == 3 and 0 <= summary["test_accuracy"] <= 1
    assert main(["adapt", "--dataset", "flowers102", "--size", "32"]) == 2
    assert "give --dataset-path" in capsys.readouterr().err
    assert main(["adapt", "--dataset", "digits", "--dataset-path", "/tmp"]) == 2
    assert "goes with a published layout" in capsys.readouterr().err


def test_xma2_evaluate_takes_layouts_as_layout_colon_path(trees: dict[str, Path],
                                                          tmp_path: Path) -> None:
    name = f"split_folders:{trees['split_folders']}"
    prefix = tmp_path / "grid"
    assert main(["evaluate", "--datasets", name, "--methods", "head_bn", "--size", "32",
                 "--epochs", "1", "--threads", "1", "--out", str(prefix)]) == 0
    result = json.loads(prefix.with_suffix(".json").read_text())
    assert result["grid"]["datasets"] == [name] and result["grid"]["image_size"] == 32
    assert ["train.batch_size", "32"] in result["grid"]["settings"]  # photos: piggyback's
    (cell,) = result["cells"].values()
    assert (cell["train_images"], cell["val_images"], cell["test_images"]) == (12, 6, 6)


def test_a_file_turned_into_a_link_after_the_check_is_not_read(tmp_path: Path) -> None:
    path = flowers102_tree(tmp_path / "flowers", per_split=(1, 1, 1))
    split = load_layout_dataset(_spec("flowers102", path)).test
    assert isinstance(split, PhotoSplit)
    target = split.files[0]
    target.rename(tmp_path / "moved.jpg")
    target.symlink_to(tmp_path / "moved.jpg")
    with pytest.raises(ConfigError, match="became a link after the dataset was checked"):
        split.batch([0])
