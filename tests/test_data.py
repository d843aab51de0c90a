"""data.py: layouts and counts, label conversion, the training and test transforms, errors, preparation.

Every dataset is a tiny fixture (32x64 images) written in the real layout: once per module where the
tests only read it, into tmp_path where a test spoils it.
"""

import gc
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import layouts
import opencv_arithmetic
import recipe

HEIGHT, WIDTH = 32, 64


def save(path, array, palette=None):
    """Write a uint8 array (H x W or H x W x 3) as PNG or JPEG; with a palette, as a palette PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette is not None:
        image = image.convert("P")
        image.putpalette(palette)
        image.frombytes(np.asarray(array, dtype=np.uint8).tobytes())  # keep the indices as they are
    image.save(path)


def random_image(seed, height=HEIGHT, width=WIDTH):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3))


def random_label(seed, num_classes, height=HEIGHT, width=WIDTH, low=0):
    label = np.random.RandomState(seed).randint(low, num_classes, (height, width))
    label[:2] = 255  # some ignored pixels, as in real labels
    return label


def make_cityscapes(root):
    names = {"train": ["aachen/aachen_000000", "aachen/aachen_000001", "bochum/bochum_000000"]}
    names["val"] = ["frankfurt/frankfurt_000000", "lindau/lindau_000000"]
    for split, stems in names.items():
        for seed, stem in enumerate(stems):
            save(root / "leftImg8bit" / split / f"{stem}_000019_leftImg8bit.png", random_image(seed))
            save(root / "gtFine" / split / f"{stem}_000019_gtFine_labelTrainIds.png", random_label(seed, 19))
    return root


def make_ade20k(root):
    for subset, count in (("training", 3), ("validation", 2)):
        for index in range(count):
            stem = f"ADE_{subset[:5]}_{index:08d}"
            save(root / "images" / subset / f"{stem}.jpg", random_image(index))
            save(root / "annotations" / subset / f"{stem}.png", random_label(index, 151))
    return root


VOC_PALETTE = [value for colour in layouts.default_palette(256) for value in colour]


def make_voc12aug(root):
    lists = {"train.txt": ["2007_000032", "2007_000039"], "val.txt": ["2007_000033"]}
    lists["aug.txt"] = ["2008_000002", "2008_000003", "2008_000007"]
    for list_name, names in lists.items():
        for seed, name in enumerate(names):
            save(root / "JPEGImages" / f"{name}.jpg", random_image(seed))
            aug = list_name == "aug.txt"  # else SegmentationClass: palette PNGs
            label_dir, palette = ("SegmentationClassAug", None) if aug else ("SegmentationClass", VOC_PALETTE)
            save(root / label_dir / f"{name}.png", random_label(seed, 21), palette=palette)
        (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (root / "ImageSets" / "Segmentation" / list_name).write_text("".join(f"{n}\n" for n in names))
    return root


def make_folder(root, num_classes=3, label_for=None):
    root.mkdir(parents=True, exist_ok=True)
    lines = ["background 0 0 0", "traffic light 250 170 30"] + [f"class {i}" for i in range(2, num_classes)]
    (root / "classes.txt").write_text("# name [R G B]\n" + "\n".join(lines[:num_classes]) + "\n")
    for split, count, extension in (("train", 3, ".png"), ("val", 2, ".jpg")):
        for index in range(count):
            save(root / "images" / split / f"photo{index}{extension}", random_image(index))
            label = label_for(index) if label_for else random_label(index, num_classes)
            save(root / "labels" / split / f"photo{index}.png", label)
    return root


MAKE = dict(cityscapes=make_cityscapes, ade20k=make_ade20k, voc12aug=make_voc12aug, folder=make_folder)
SMALL = dict(crop_size=(16, 16), scale=(64, 32))  # keeps the fixtures at their size


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """The four layouts, written once for the tests that only read them."""
    folder = tmp_path_factory.mktemp("layouts")
    return {name: make(folder / name) for name, make in MAKE.items()}


# -----------------------------------------------------------------------------------------------
# Layouts, counts and items


def test_counts_per_split_and_classes(roots, monkeypatch):
    expected = dict(cityscapes=(3, 2, 19), ade20k=(3, 2, 150), voc12aug=(5, 1, 21), folder=(3, 2, 3))
    imported = []  # torchvision, imported at the build of a split of JPEGs alone
    monkeypatch.setattr(data, "torchvision_io", lambda: imported.append(True))
    for name, (train_count, val_count, num_classes) in expected.items():
        del imported[:]
        train_set = data.build_dataset(name, roots[name], "train", **SMALL)
        assert bool(imported) == (name in ("ade20k", "voc12aug")), name
        val_set = data.build_dataset(name, roots[name], "val", **SMALL)
        assert (len(train_set), len(val_set)) == (train_count, val_count), name
        assert train_set.num_classes == len(train_set.classes) == len(train_set.palette) == num_classes
        assert train_set.name == name
    folder_set = data.build_dataset("folder", roots["folder"], "val")
    assert folder_set.classes == ["background", "traffic light", "class 2"]
    assert folder_set.palette[:2] == [[0, 0, 0], [250, 170, 30]]
    assert data.build_dataset("ade20k", roots["ade20k"], "val").classes[7] == "bed "  # sic, the original's
    # VOC train = train.txt with SegmentationClass, then aug.txt with SegmentationClassAug.
    pairs = data.build_dataset("voc12aug", roots["voc12aug"], "train").pairs
    assert [p[1].split("/")[-2] for p in pairs] == ["SegmentationClass"] * 2 + ["SegmentationClassAug"] * 3


def test_defaults_follow_the_recipe(roots):
    assert recipe.DATASETS["cityscapes"]["root"] == "data/cityscapes"
    assert recipe.DATASETS["ade20k"]["root"] == "data/ade/ADEChallengeData2016"
    assert recipe.DATASETS["voc12aug"]["root"] == "data/VOCdevkit/VOC2012"
    assert data.data_root("ade20k") == recipe.DATASETS["ade20k"]["root"] and data.data_root("toy", "x") == "x"
    assert recipe.row("cityscapes")["crop_size"] == (512, 1024)
    scales = dict(cityscapes=(2048, 1024), ade20k=(2048, 512), voc12aug=(2048, 512), toy=(256, 128))
    assert {name: recipe.row(name)["scale"] for name in scales} == scales
    assert recipe.DATASETS["ade20k"]["reduce_zero_label"]
    assert not recipe.DATASETS["voc12aug"].get("reduce_zero_label")
    # The 769 rows use the 2049x1025 scale.
    cityscapes = roots["cityscapes"]
    assert data.build_dataset("cityscapes", cityscapes, "val", crop_size=(769, 769)).scale == (2049, 1025)
    assert data.build_dataset("cityscapes", cityscapes, "val").scale == (2048, 1024)


def test_train_and_val_items(roots):
    torch.manual_seed(0)
    cityscapes = roots["cityscapes"]
    train_set = data.build_dataset("cityscapes", cityscapes, "train", crop_size=(24, 40), scale=(64, 32))
    image, label = train_set[0]
    assert image.shape == (3, 24, 40) and image.dtype == torch.float32
    assert label.shape == (24, 40) and label.dtype == torch.int64
    assert set(label.unique().tolist()) <= set(range(19)) | {255}

    val_set = data.build_dataset("cityscapes", cityscapes, "val", scale=(64, 32), test_ratios=(0.5, 1.0, 1.5))
    images, label, meta = val_set[0]
    assert [tuple(i.shape) for i in images] == [(3, 16, 32), (3, 32, 64), (3, 48, 96)]
    assert torch.equal(label, data.read_label(val_set.pairs[0][1]).long())  # original resolution, unchanged
    assert meta == dict(
        name="frankfurt_000000_000019", image_path=val_set.pairs[0][0], original_size=(32, 64)
    )
    denormalized = (images[1] * data.STD_TENSOR + data.MEAN_TENSOR).round().clamp(0, 255).to(torch.uint8)
    assert torch.equal(denormalized, data.read_image(meta["image_path"]))


def test_train_items_are_reproducible_with_a_seed(roots):
    dataset = data.build_dataset("cityscapes", roots["cityscapes"], "train", **SMALL)
    torch.manual_seed(0)
    first = dataset[0]
    torch.manual_seed(0)
    again = dataset[0]
    later = dataset[0]
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], later[0])

    def batches(seed):
        generator = torch.Generator().manual_seed(seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, generator=generator)
        return [images for epoch in range(2) for images, _ in loader]

    run, rerun = batches(0), batches(0)
    assert all(torch.equal(a, b) for a, b in zip(run, rerun, strict=True))
    assert not torch.equal(run[0], run[1])  # epochs differ
    assert not torch.equal(run[0], batches(1)[0])


def test_ade20k_reduce_zero_label(tmp_path):
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    save(root / "annotations" / "validation" / "ADE_valid_00000000.png", np.array([[0, 1, 2, 150, 255]] * 4))
    save(root / "images" / "validation" / "ADE_valid_00000000.jpg", random_image(0, 4, 5))
    _, label, _ = data.build_dataset("ade20k", root, "val")[0]
    assert label[0].tolist() == [255, 0, 1, 149, 255]  # 0 -> ignore, v -> v - 1, 255 stays


def test_voc_palette_labels_read_as_indices(tmp_path):
    indices = np.array([[0, 1, 15, 255], [20, 3, 0, 7]])
    save(tmp_path / "label.png", indices, palette=VOC_PALETTE)
    assert Image.open(tmp_path / "label.png").mode == "P"
    assert data.read_label(tmp_path / "label.png").tolist() == indices.tolist()


def test_a_1_bit_label_reads_as_0_and_1_and_a_1_bit_image_as_black_and_white(tmp_path):
    mask = np.array([[0, 1, 1], [1, 0, 0]], dtype=bool)
    Image.fromarray(mask).save(tmp_path / "mask.png")  # what Pillow writes for a boolean mask
    assert Image.open(tmp_path / "mask.png").mode == "1"
    assert data.read_label(tmp_path / "mask.png").tolist() == mask.astype(int).tolist()
    assert data.read_image(tmp_path / "mask.png").tolist() == [(mask * 255).tolist()] * 3


def test_a_photo_with_data_after_its_end_is_whole(tmp_path):
    save(tmp_path / "motion.jpg", random_image(0))
    with open(tmp_path / "motion.jpg", "ab") as file:  # a phone's motion photo: a video after the JPEG
        file.write(bytes(range(256)) * 200)
    assert data.file_problem(tmp_path / "motion.jpg", "image") == (None, (WIDTH, HEIGHT))
    assert data.read_image(tmp_path / "motion.jpg").shape == (3, HEIGHT, WIDTH)
    # A phone's JPEG with a second picture (a depth or gain map) in it, which Pillow calls MPO, is a JPEG.
    photo = Image.fromarray(random_image(0).astype(np.uint8))
    photo.save(tmp_path / "mpo.jpg", "MPO", save_all=True, append_images=[photo.resize((8, 4))])
    assert data.file_problem(tmp_path / "mpo.jpg", "image") == (None, (WIDTH, HEIGHT))
    assert torch.equal(
        data.read_image(tmp_path / "mpo.jpg"), data.decode_file(tmp_path / "mpo.jpg", "image", "RGB")
    )
    # A PNG without its last chunk (IEND) but with all its pixels is whole too; half of one is not.
    save(tmp_path / "label.png", random_label(0, 3))
    whole = (tmp_path / "label.png").read_bytes()
    (tmp_path / "label.png").write_bytes(whole[:-12])
    assert data.file_problem(tmp_path / "label.png", "label") == (None, (WIDTH, HEIGHT))
    (tmp_path / "label.png").write_bytes(whole[: len(whole) // 2])
    assert (
        "the PNG file is truncated (no end marker)" in data.file_problem(tmp_path / "label.png", "label")[0]
    )


def test_collate_val_handles_different_sizes():
    def item(height, width):
        return [torch.zeros(3, height, width)], torch.zeros(height, width, dtype=torch.long), dict(name="x")

    images, labels, metas = data.collate_val([item(4, 6), item(5, 3)])
    assert [i[0].shape[1:] for i in images] == [(4, 6), (5, 3)]
    assert isinstance(labels, list) and [tuple(label.shape) for label in labels] == [(4, 6), (5, 3)]
    assert metas == [dict(name="x"), dict(name="x")]
    _, labels, _ = data.collate_val([item(4, 6), item(4, 6)])
    assert labels.shape == (2, 4, 6)


def test_read_image_can_apply_exif_orientation(tmp_path):
    photo = Image.fromarray(np.zeros((20, 30, 3), dtype=np.uint8))  # 20 high, 30 wide as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    photo.save(tmp_path / "phone.jpg", exif=exif)
    assert data.read_image(tmp_path / "phone.jpg").shape == (3, 20, 30)  # datasets: as stored
    assert data.read_image(tmp_path / "phone.jpg", upright=True).shape == (3, 30, 20)
    photo.save(tmp_path / "phone.webp", exif=exif, lossless=True)
    assert data.read_image(tmp_path / "phone.webp").shape == (3, 20, 30)
    assert data.read_image(tmp_path / "phone.webp", upright=True).shape == (3, 30, 20)


def test_test_split_has_no_labels_and_reduce_zero_label_can_be_chosen(tmp_path):
    root = make_cityscapes(tmp_path / "cs")
    save(root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png", random_image(5))
    test_set = data.build_dataset("cityscapes", root, "test", scale=(64, 32))
    assert not test_set.has_labels and data.build_dataset("cityscapes", root, "val").has_labels
    images, label, meta = test_set[0]
    assert label is None and meta["name"] == "berlin_000000_000019" and meta["original_size"] == (32, 64)
    assert data.collate_val([test_set[0]])[1] == [None]
    folder = make_folder(tmp_path / "mine", label_for=lambda i: random_label(i, 4, low=1))  # 1..3 and 255
    expected = torch.from_numpy(random_label(0, 4, low=1)).long() - 1
    expected[expected == 254] = 255
    _, label, _ = data.build_dataset("folder", folder, "val", reduce_zero_label=True)[0]
    assert torch.equal(label, expected)
    # ... and so does the line `label0: ignore` in classes.txt.
    (folder / "classes.txt").write_text("# 0 = unlabelled\nlabel0: ignore\nsky\nroad\ncar\n")
    dataset = data.build_dataset("folder", folder, "val")
    assert dataset.reduce_zero_label and dataset.classes == ["sky", "road", "car"]
    assert torch.equal(dataset[0][1], expected)
    assert not data.build_dataset("folder", folder, "val", reduce_zero_label=False).reduce_zero_label
    # The flag and the line give the classes the same default colours: those of the values they are stored as.
    (folder / "classes.txt").write_text("sky\nroad\ncar\n")
    flagged = data.build_dataset("folder", folder, "val", reduce_zero_label=True).palette
    assert flagged == dataset.palette == layouts.default_palette(4)[1:]
    # Two classes and label 0 ignored: stored 0/1 is a label, not a 0/255 mask; a stray value is named as
    # stored, without the advice to add the line that is there.
    (folder / "classes.txt").write_text("label0: ignore\ncat\ndog\n")
    save(folder / "labels" / "val" / "photo1.png", np.eye(HEIGHT, WIDTH) * 3)
    save(folder / "labels" / "val" / "photo0.png", np.eye(HEIGHT, WIDTH))
    two = data.build_dataset("folder", folder, "val")
    assert torch.equal(two[0][1], torch.from_numpy(np.where(np.eye(HEIGHT, WIDTH), 0, 255)).to(torch.uint8))
    with pytest.raises(
        data.FileProblem, match=r"values \[0, 3\], .* expected 0 \(ignored\), 1\.\.2 and 255"
    ) as error:
        two[1]
    assert "label0" not in str(error.value)


def test_test_splits_are_found_without_labels(tmp_path):
    ade = make_ade20k(tmp_path / "ade" / "ADEChallengeData2016")
    save(tmp_path / "ade" / "release_test" / "testing" / "ADE_test_00000001.jpg", random_image(1))
    test_set = data.build_dataset("ade20k", ade, "test")  # release_test.zip unzipped beside the root
    assert [Path(image).name for image, _ in test_set.pairs] == ["ADE_test_00000001.jpg"]
    save(ade / "release_test" / "testing" / "ADE_test_00000002.jpg", random_image(2))  # ... or inside it
    inside = str(ade / "release_test" / "testing" / "ADE_test_00000002.jpg")
    assert data.build_dataset("ade20k", ade, "test").pairs == [(inside, None)]
    save(ade / "images" / "testing" / "ADE_test_00000003.jpg", random_image(3))  # images/testing first
    images, label, meta = data.build_dataset("ade20k", ade, "test", scale=(64, 32))[0]
    assert label is None and meta["name"] == "ADE_test_00000003" and len(images) == 1

    voc = make_voc12aug(tmp_path / "VOCdevkit" / "VOC2012")
    save(voc / "JPEGImages" / "2008_000001.jpg", random_image(4))
    (voc / "ImageSets" / "Segmentation" / "test.txt").write_text("2008_000001\n")
    voc_test = data.build_dataset("voc12aug", voc, "test")
    assert voc_test.pairs == [(str(voc / "JPEGImages" / "2008_000001.jpg"), None)] and not voc_test.has_labels

    folder = make_folder(tmp_path / "mine")
    save(folder / "images" / "test" / "new.jpg", random_image(5))
    folder_test = data.build_dataset("folder", folder, "test")
    assert [meta["name"] for _, _, meta in folder_test] == ["new"] and not folder_test.has_labels
    assert len(data.build_dataset("ade20k", ade, "val")) == 2
    assert len(data.build_dataset("voc12aug", voc, "val")) == 1
    with pytest.raises(FileNotFoundError, match=r"(?s)images/testing not found.*release_test/testing"):
        data.build_dataset("ade20k", make_ade20k(tmp_path / "other" / "ADEChallengeData2016"), "test")


def test_finding_a_big_folder_split_grows_linearly_with_its_files(tmp_path, monkeypatch):
    # Before, each image was looked up in a list of all files: 10,000 images took 15 s, 20,000 a minute.

    count = 3000
    for folder in ("images/train", "labels/train"):
        (tmp_path / folder).mkdir(parents=True)
    for index in range(count):
        (tmp_path / "images/train" / f"{index:05d}.png").touch()
        (tmp_path / "labels/train" / f"{index:05d}.png").touch()
    comparisons = []
    real_eq = Path.__eq__
    monkeypatch.setattr(Path, "__eq__", lambda self, other: comparisons.append(1) or real_eq(self, other))
    assert len(layouts.find_pairs("folder", tmp_path, "train")) == count
    assert len(layouts.image_files([str(tmp_path / "images/train")])[0]) == count
    assert len(comparisons) < 10 * count  # a list lookup per image would make millions


def test_stray_files_are_named_in_warnings(tmp_path):
    root = make_folder(tmp_path / "mine")
    save(root / "labels" / "val" / "lost.png", random_label(0, 3))
    save(root / "images" / "val" / "old.bmp", random_image(0))
    os.mkfifo(root / "images" / "val" / "pipe.jpg")  # opened, it would wait for a writer for ever
    save(root / "images" / "val" / "sub" / "deep.png", random_image(0))  # only the top level is read,
    save(root / "labels" / "val" / "sub" / "deep.png", random_label(0, 3))  # so its label is no orphan
    with pytest.warns(UserWarning) as caught:
        dataset = data.build_dataset("folder", root, "val")
    messages = "\n".join(str(warning.message) for warning in caught)
    assert "1 label files have no image: " in messages and "labels/val/lost.png. Add" in messages
    assert "1 folders in " in messages and "are not read: a split's images lie in it" in messages
    assert "are skipped: old.bmp" in messages
    assert (
        "1 entries in " in messages
        and "are not regular files (FIFOs, devices) and are skipped: pipe.jpg" in messages
    )
    assert len(dataset) == 2
    # photo0.png beside photo0.jpg: one label for two images, and test outputs overwriting each other.
    save(root / "images" / "val" / "photo0.png", random_image(0))
    shared = r"images in \S*images/val share a name: photo0\.jpg \+ photo0\.png\. "
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=shared):  # the warnings above again
        data.build_dataset("folder", root, "val")
    # Named as an image where a file is expected, a FIFO or a device is no image, and not "not found".
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    for path in (root / "images" / "val" / "pipe.jpg", tmp_path / "zero.png"):
        with pytest.raises(
            FileNotFoundError, match=f"image {path} is not a regular file \\(a FIFO, a device"
        ):
            data.read_image(path)
        assert data.file_problem(path, "image")[0].startswith(f"image {path} is not a regular file")
    cityscapes = make_cityscapes(tmp_path / "cs")
    save(cityscapes / "gtFine/val/ulm/ulm_000000_000019_gtFine_labelTrainIds.png", random_label(0, 19))
    with pytest.warns(UserWarning, match=r"1 label files have no image: .*ulm_000000_000019_gtFine"):
        data.build_dataset("cityscapes", cityscapes, "val")


# -----------------------------------------------------------------------------------------------
# The toy dataset


def test_toy_dataset_is_generated_once_deterministically(tmp_path, toy_written):
    # toy_written is data.build_dataset("toy", root, "train") on a new root, done once for the session.
    root = toy_written
    train_set = data.build_dataset("toy", root, "train")
    copy = tmp_path / "toy"  # (a copy to take a file from: the session's stays whole)
    shutil.copytree(root, copy)
    copy.joinpath("gtFine", "train", "toy", "toy_000001_gtFine_labelTrainIds.png").unlink()
    with pytest.raises(FileNotFoundError, match="toy_000001"):  # an existing root is not written again
        data.build_dataset("toy", copy, "train")
    val_set = data.build_dataset("toy", root, "val")
    assert (len(train_set), len(val_set)) == (64, 16)
    assert train_set.classes == data.TOY_CLASSES and train_set.crop_size == (128, 128)
    assert train_set.scale == (256, 128)
    image, label = data.read_pair(*val_set.pairs[0], val_set)
    assert image.shape == (3, 128, 256) and label.shape == (128, 256)
    # Written in the Cityscapes layout, sample i from seed i (train first): fully determined.
    assert torch.equal(label, torch.from_numpy(data.draw_toy_sample(64)[1]))
    toy_image = torch.from_numpy(data.draw_toy_sample(5)[0]).permute(2, 0, 1)
    assert torch.equal(data.read_pair(*train_set.pairs[5], train_set)[0], toy_image)
    val_classes = set()
    for index in range(len(val_set)):
        val_classes |= set(data.read_pair(*val_set.pairs[index], val_set)[1].unique().tolist())
    assert val_classes == {0, 1, 2, 3, 4}
    assert sorted(path.name for path in root.parent.iterdir()) == ["toy"]  # no temporary folder left


def test_toy_generation_is_atomic(tmp_path, monkeypatch):
    draw = data.draw_toy_sample

    def interrupted(seed):
        if seed == 5:
            raise KeyboardInterrupt
        return draw(seed)

    monkeypatch.setattr(data, "draw_toy_sample", interrupted)
    with pytest.raises(KeyboardInterrupt):
        data.build_dataset("toy", tmp_path / "toy", "train")
    assert list(tmp_path.iterdir()) == []  # neither a half dataset nor a temporary folder
    monkeypatch.setattr(data, "draw_toy_sample", draw)
    monkeypatch.setattr(data, "TOY_COUNTS", {"train": 2, "val": 1})  # a small complete run
    assert len(data.build_dataset("toy", tmp_path / "toy", "val")) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["toy"]


# -----------------------------------------------------------------------------------------------
# Resizing and sizes


def resize_label(label, size):
    """A whole label resized, as random_crop crops it: the window that is the whole image."""
    return opencv_arithmetic.resize_label_window(label, size, 0, 0, *size)


def test_resize_image_matches_cv2_inter_linear():
    # Expected values are cv2.resize(INTER_LINEAR) outputs (OpenCV 4.14). Half-pixel centres, edge
    # clamped, weights 1/4 and 3/4; OpenCV's fixed-point arithmetic gives 162 and 87 where float
    # bilinear rounded half up would give 163 and 88.
    image = torch.tensor([[0, 100], [200, 50]], dtype=torch.uint8).expand(3, 2, 2)
    expected = [[0, 25, 75, 100], [50, 59, 78, 88], [150, 128, 84, 63], [200, 162, 87, 50]]
    assert opencv_arithmetic.resize_image(image, (4, 4))[0].tolist() == expected
    window = opencv_arithmetic.resize_image_window(image, (4, 4), 1, 1, 3, 2)[0]
    assert window.tolist() == [row[1:3] for row in expected[1:]]
    image = torch.tensor([[10, 20, 30], [40, 50, 60], [70, 80, 95]], dtype=torch.uint8).expand(3, 3, 3)
    expected = [[10, 14, 20, 26, 30], [29, 32, 39, 45, 49], [51, 55, 61, 68, 73], [70, 74, 80, 89, 95]]
    assert opencv_arithmetic.resize_image(image, (4, 5))[2].tolist() == expected
    # A downscale samples between pixels: no antialiasing.
    row = torch.tensor([[[0, 100, 200, 250, 10, 10]]], dtype=torch.uint8)
    assert opencv_arithmetic.resize_image(row, (1, 2)).tolist() == [[[100, 10]]]
    assert opencv_arithmetic.resize_image(row, (1, 3)).tolist() == [[[50, 225, 10]]]
    # OpenCV's fixed-point result stays within 1 of float bilinear (align_corners=False, no antialias).
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for size in ((11, 5), (80, 101), (37, 53)):
        reference = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        assert (opencv_arithmetic.resize_image(image, size).float() - reference).abs().max() <= 1.0


def test_resize_label_is_cv2_inter_nearest():
    label = torch.tensor([[0, 1, 2, 3, 4, 5]], dtype=torch.uint8)
    assert resize_label(label, (1, 2)).tolist() == [[0, 3]]  # floor(dst * 3); 'nearest-exact' gives [1, 4]
    assert resize_label(label, (1, 4)).tolist() == [[0, 1, 3, 4]]
    square = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8)
    assert resize_label(square, (4, 4)).tolist() == [[0, 0, 1, 1]] * 2 + [[2, 2, 3, 3]] * 2


def opencv_linear_taps(in_size, out_size, clamp_weights):
    """cv2.resize INTER_LINEAR's source indices and 11-bit weights along one axis, written out from
    OpenCV's resize.cpp independently of opencv_arithmetic.linear_taps: fx = (float)((d + 0.5) * scale - 0.5) with
    a double scale, sx = floor(fx); columns pin positions outside the image to the edge pixel."""
    scale = 1.0 / (out_size / in_size)
    fx = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    fx = fx - sx.astype(np.float32)
    if clamp_weights:
        fx[(sx < 0) | (sx >= in_size - 1)] = 0
        sx = np.where(sx < 0, 0, np.where(sx >= in_size - 1, in_size - 1, sx))
    weight0 = np.rint((1 - fx) * 2048).astype(np.int64)
    weight1 = np.rint(fx * 2048).astype(np.int64)
    return np.clip(sx, 0, in_size - 1), np.clip(sx + 1, 0, in_size - 1), weight0, weight1


def opencv_resize_linear(image, size):
    """A plain numpy cv2.resize(INTER_LINEAR) for uint8 C x H x W: horizontal pass into int, then
    the vertical pass as OpenCV's SIMD path rounds it: ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16),
    + 2, >> 2."""
    image = image.numpy().astype(np.int64)
    x0, x1, a0, a1 = opencv_linear_taps(image.shape[2], size[1], True)
    y0, y1, b0, b1 = opencv_linear_taps(image.shape[1], size[0], False)
    rows = image[:, :, x0] * a0 + image[:, :, x1] * a1
    upper = ((rows[:, y0] >> 4) * b0[:, None]) >> 16
    lower = ((rows[:, y1] >> 4) * b1[:, None]) >> 16
    return torch.from_numpy(np.clip((upper + lower + 2) >> 2, 0, 255).astype(np.uint8))


def test_resize_and_its_windows_match_a_plain_opencv_implementation():
    # 100 random size pairs, up and down, with windows; the fast gather-based kernel must agree bit for
    # bit with the plain formulas (which match cv2 4.14 on the values above), and a window with resizing
    # all, then cropping (the same integer arithmetic, only fewer pixels). Labels: floor(d * in / out).
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        in_h, in_w, out_h, out_w = torch.randint(2, 120, (4,), generator=generator).tolist()
        image = torch.randint(0, 256, (3, in_h, in_w), dtype=torch.uint8, generator=generator)
        expected = opencv_resize_linear(image, (out_h, out_w))
        assert torch.equal(opencv_arithmetic.resize_image(image, (out_h, out_w)), expected), (
            in_h,
            in_w,
            out_h,
            out_w,
        )
        top, left = (int(torch.randint(0, size, (), generator=generator)) for size in (out_h, out_w))
        window = opencv_arithmetic.resize_image_window(
            image, (out_h, out_w), top, left, out_h - top, out_w - left
        )
        assert torch.equal(window, expected[:, top:, left:])
        label = image[0]
        rows = np.floor(np.arange(out_h) * (1.0 / (out_h / in_h))).astype(np.int64).clip(max=in_h - 1)
        columns = np.floor(np.arange(out_w) * (1.0 / (out_w / in_w))).astype(np.int64).clip(max=in_w - 1)
        expected = torch.from_numpy(label.numpy()[rows][:, columns])
        assert torch.equal(resize_label(label, (out_h, out_w)), expected)
        window = opencv_arithmetic.resize_label_window(
            label, (out_h, out_w), top, left, out_h - top, out_w - left
        )
        assert torch.equal(window, expected[top:, left:])
    # The layout a PNG decodes to (channels last in memory) gives the same result.
    image = torch.randint(0, 256, (50, 70, 3), dtype=torch.uint8, generator=generator).permute(2, 0, 1)
    assert torch.equal(
        opencv_arithmetic.resize_image(image, (33, 101)), opencv_resize_linear(image, (33, 101))
    )


def test_test_time_sizes():
    assert data.rescale_size(375, 500, (2048, 512)) == (512, 683)  # VOC landscape
    assert data.rescale_size(500, 375, (2048, 512)) == (683, 512)  # portrait: same rule
    assert data.rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)
    assert data.rescale_size(1024, 2048, (2049, 1025)) == (1025, 2049)
    assert data.rescale_size(500, 4000, (2048, 512)) == (256, 2048)  # capped by the long side
    ratios = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
    expected = [(1024, 512), (1536, 768), (2049, 1025), (2561, 1281), (3073, 1537), (3585, 1793)]
    assert [data.ratio_scale((2049, 1025), r) for r in ratios] == expected
    assert data.rescale_size(375, 500, data.ratio_scale((2048, 512), 0.5)) == (256, 341)
    image = torch.zeros(3, 375, 500, dtype=torch.uint8)
    sizes = [tuple(i.shape[1:]) for i in data.test_transform(image, (2048, 512), (0.5, 1.0))]
    assert sizes == [(256, 341), (512, 683)]
    # --scales 0.01 of a small recorded scale: a pixel a side, not a division by zero.
    tiny = data.test_transform(image, (48, 32), (0.01, 0.1))
    assert [tuple(i.shape[1:]) for i in tiny] == [(1, 1), (3, 4)]


# -----------------------------------------------------------------------------------------------
# Training transform


@pytest.mark.parametrize(
    "zeros, ones, ignored, acceptable",
    [(70, 30, 0, True), (75, 25, 0, False), (60, 20, 20, False), (50, 20, 30, True), (50, 0, 50, False)],
)
def test_crop_check_excludes_ignore_and_needs_two_classes(zeros, ones, ignored, acceptable):
    # The largest class must hold under 0.75 of the pixels that are not ignored, and there must be two.
    crop = torch.tensor([[0] * zeros + [1] * ones + [255] * ignored], dtype=torch.uint8)
    assert data.crop_is_acceptable(crop) == acceptable


def test_cat_max_ratio_draws(monkeypatch):
    draws = []  # the boxes drawn, (top, left): each has its label crop computed
    resize_label_window = opencv_arithmetic.resize_label_window

    def counting(label, size, top, left, height, width):
        draws.append((top, left))
        return resize_label_window(label, size, top, left, height, width)

    monkeypatch.setattr(data, "resize_label_window", counting)
    torch.manual_seed(0)
    single_class = torch.zeros(40, 40, dtype=torch.uint8)
    _, crop = data.random_crop(single_class[None], single_class, (40, 40), (16, 16))
    (top, left) = draws[-1]
    assert len(draws) == 11 and 0 <= top <= 24 and 0 <= left <= 24  # 10 checks, then an unchecked 11th box
    assert crop.shape == (16, 16)
    draws.clear()
    board = (torch.arange(40)[:, None] + torch.arange(40)).remainder(2).to(torch.uint8)
    image_crop, crop = data.random_crop(board[None] * 7, board, (40, 40), (16, 16))
    (top, left) = draws[-1]
    assert len(draws) == 1  # the first box passes
    assert torch.equal(crop, board[top : top + 16, left : left + 16])
    assert torch.equal(image_crop, crop[None] * 7)
    draws.clear()
    data.random_crop(single_class[None], single_class, (40, 40), (16, 16), cat_max_ratio=1.0)
    assert len(draws) == 1  # no check without a ratio


def test_cat_max_ratio_prefers_crops_with_two_classes():
    label = torch.zeros(64, 64, dtype=torch.uint8)
    label[:24, :24] = 1  # one class, except a corner region: about 1 random 32x32 crop in 9 passes

    def accepted_share(cat_max_ratio):
        torch.manual_seed(0)
        accepted = 0
        for _ in range(100):
            _, crop = data.random_crop(label[None], label, (64, 64), (32, 32), cat_max_ratio)
            accepted += data.crop_is_acceptable(crop)
        return accepted / 100

    assert accepted_share(0.75) > 0.6 and accepted_share(1.0) < 0.25


def test_train_transform_equals_the_plain_order_of_the_original():
    # TrainTransform computes only the crop's pixels of the rescaled image; the plain order rescales
    # the whole image and label, crops, flips, distorts, normalises and pads. With the same random
    # draws, the two give the same bits.
    generator = torch.Generator().manual_seed(3)
    image = torch.randint(0, 256, (3, 45, 70), dtype=torch.uint8, generator=generator)
    label = torch.randint(0, 4, (45, 70), dtype=torch.uint8, generator=generator)
    label[:10] = 255
    transform = data.TrainTransform(train_scale=(60, 40), crop_size=(32, 48))

    def plain_order(image, label):
        size = data.rescale_size(*label.shape, data.ratio_scale((60, 40), data.uniform(0.5, 2.0)))
        image, label = (
            opencv_arithmetic.resize_image(image, size),
            resize_label(label, size),
        )  # 1. rescale, all of it
        height, width = min(32, size[0]), min(48, size[1])
        for attempt in range(11):  # 2. crop, checking at most 10 boxes
            top = int(torch.randint(0, max(size[0] - 32, 0) + 1, ()))
            left = int(torch.randint(0, max(size[1] - 48, 0) + 1, ()))
            label_crop = label[top : top + height, left : left + width]
            if attempt == 10 or data.crop_is_acceptable(label_crop):
                break
        image, label = image[:, top : top + height, left : left + width], label_crop
        if float(torch.rand(())) < 0.5:  # 3. flip
            image, label = image.flip(-1), label.flip(-1)
        image = data.photometric_distortion(image)  # 4. photometric distortion
        return data.normalize_and_pad(image, label, (32, 48))  # 5. normalise and pad

    for seed in range(12):
        torch.manual_seed(seed)
        expected = plain_order(image, label)
        torch.manual_seed(seed)
        ours = transform(image, label)
        assert torch.equal(ours[0], expected[0]) and torch.equal(ours[1], expected[1]), seed


def test_pad_bottom_right_with_zero_and_ignore():
    image = torch.full((3, 2, 3), 200, dtype=torch.uint8)
    label = torch.ones(2, 3, dtype=torch.uint8)
    padded, padded_label = data.normalize_and_pad(image, label, (4, 5))
    assert padded.shape == (3, 4, 5) and padded_label.dtype == torch.int64
    # (200 - mean) / std per channel, by hand
    assert torch.allclose(padded[:, 0, 0], torch.tensor([1.30704, 1.46568, 1.68139]), atol=1e-5)
    assert (padded[:, :2, :3] == padded[:, :1, :1]).all()
    assert (padded[:, 2:] == 0).all() and (padded[:, :, 3:] == 0).all()
    assert padded_label.tolist() == [[1, 1, 1, 255, 255]] * 2 + [[255] * 5] * 2


def test_train_transform_pads_small_images_to_the_crop():
    image = torch.from_numpy(random_image(0, 20, 30)).permute(2, 0, 1).contiguous()
    label = torch.from_numpy(random_label(0, 3, 20, 30)).to(torch.uint8)
    label[:2] = 1
    transform = data.TrainTransform(train_scale=(30, 20), crop_size=(64, 64))  # rescaled to at most 40x60
    torch.manual_seed(0)
    for _ in range(5):
        out_image, out_label = transform(image, label)
        assert out_image.shape == (3, 64, 64) and out_label.shape == (64, 64)
        valid = out_label != 255
        height, width = int(valid.any(1).nonzero().max()) + 1, int(valid.any(0).nonzero().max()) + 1
        assert 10 <= height <= 40 and 15 <= width <= 60
        assert (out_image[:, height:] == 0).all() and (out_image[:, :, width:] == 0).all()
        assert (out_label[height:] == 255).all() and (out_label[:, width:] == 255).all()


def test_train_transform_rescale_range_and_flip():
    # A horizontal ramp label: its values give the rescale factor and the flip.
    label = (torch.arange(64) // 4).to(torch.uint8).expand(32, 64).contiguous()
    image = label.expand(3, 32, 64).contiguous()
    transform = data.TrainTransform(train_scale=(64, 32), crop_size=(128, 128), cat_max_ratio=1.0)
    torch.manual_seed(0)
    widths, flips = [], 0
    for _ in range(40):
        _, out_label = transform(image, label)
        row = out_label[0][out_label[0] != 255]
        widths.append(len(row))
        flips += bool(row[0] > row[-1])
    assert 32 <= min(widths) and max(widths) < 128 and max(widths) - min(widths) > 40  # ratio in [0.5, 2)
    assert 10 <= flips <= 30


def test_photometric_arithmetic():
    pixels = torch.tensor([0, 10, 100, 200, 250], dtype=torch.uint8)
    assert data.scale_and_shift_uint8(pixels, beta=20.7).tolist() == [20, 30, 120, 220, 255]
    assert data.scale_and_shift_uint8(pixels, beta=-20.3).tolist() == [0, 0, 79, 179, 229]  # truncation
    assert data.scale_and_shift_uint8(pixels, alpha=1.5).tolist() == [0, 15, 150, 255, 255]
    # The table it looks up gives what the float32 arithmetic on each pixel gives, for every value and
    # the ranges of brightness, contrast and saturation.
    every = torch.arange(256, dtype=torch.uint8)
    generator = torch.Generator().manual_seed(0)
    for contrast, brightness in torch.rand(500, 2, generator=generator).tolist():
        for alpha, beta in ((contrast + 0.5, 0.0), (1.0, brightness * 64 - 32)):
            in_float = every.float().mul_(alpha).add_(beta).clamp_(0, 255).to(torch.uint8)
            assert torch.equal(data.scale_and_shift_uint8(every, alpha, beta), in_float)


def test_photometric_keeps_grey_grey_and_shapes():
    grey = torch.arange(0, 256, dtype=torch.uint8).expand(3, 16, 256).contiguous()
    torch.manual_seed(0)
    outputs = [data.photometric_distortion(grey) for _ in range(20)]
    for out in outputs:  # brightness and contrast act alike on every channel; S = 0 stays 0
        assert out.dtype == torch.uint8 and out.shape == grey.shape
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert sum(not torch.equal(out, grey) for out in outputs) >= 10


def test_hsv_is_opencv_uint8_hsv():
    # red, green, blue, grey, orange, pink; H in [0, 180) is half the angle.
    rgb = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128], [255, 128, 0], [255, 0, 128]])
    image = rgb.T.to(torch.uint8).view(3, 1, 6)
    hue, saturation, value = opencv_arithmetic.rgb_to_hsv_uint8(image)
    assert hue.tolist() == [[0, 60, 120, 0, 15, 165]]
    assert saturation.tolist() == [[255, 255, 255, 0, 255, 255]]
    assert value.tolist() == [[255, 255, 255, 128, 255, 255]]
    assert torch.equal(opencv_arithmetic.hsv_to_rgb_uint8(hue, saturation, value)[:, :, :4], image[:, :, :4])
    shifted = opencv_arithmetic.hsv_to_rgb_uint8((hue + 60) % 180, saturation, value)  # +120 degrees
    assert shifted[:, 0, :3].T.tolist() == [[0, 255, 0], [0, 0, 255], [255, 0, 0]]


def opencv_rgb_to_hsv(rgb):
    """cv2.cvtColor(COLOR_BGR2HSV) for 8 bits, written plainly in numpy from OpenCV's RGB2HSV_b:
    rgb is an int array ... x 3, the result (H 0..179, S, V)."""
    shift = 12
    divisor = np.arange(256, dtype=np.float64)
    with np.errstate(divide="ignore"):
        saturation_table = np.where(divisor > 0, np.rint((255 << shift) / divisor), 0).astype(np.int32)
        hue_table = np.where(divisor > 0, np.rint((180 << shift) / (6 * divisor)), 0).astype(np.int32)
    r, g, b = rgb[..., 0].astype(np.int32), rgb[..., 1].astype(np.int32), rgb[..., 2].astype(np.int32)
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    s = (diff * saturation_table[v] + (1 << (shift - 1))) >> shift
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hue_table[diff] + (1 << (shift - 1))) >> shift
    h = np.where(h < 0, h + 180, h)
    return h, s, v


def opencv_hsv_to_rgb(h, s, v):
    """cv2.cvtColor(COLOR_HSV2BGR) for 8 bits, written plainly in numpy from OpenCV's vectorised
    HSV2RGB_b (4.1.1 and later, x86 with FMA): float32, h = H * (6/180), sector = trunc(h), a sector
    table, 1 - s*f fused into one rounding, and truncation to uint8. Returns ... x 3 RGB uint8.
    (Checked against cv2 4.14 and 5.0 on every (H, S, V).)"""
    h = h.astype(np.float32) * (np.float32(6) / np.float32(180))
    s = s.astype(np.float32) * np.float32(1 / 255)
    v = v.astype(np.float32) * np.float32(1 / 255)
    sector = np.trunc(h)
    f = h - sector
    one = np.float32(1)

    def fused(a, b):  # 1 - a * b with a single rounding, as a fused multiply-subtract
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)

    table = np.stack([v, v * (one - s), v * fused(s, f), v * fused(s, one - f)])
    # (B, G, R) of OpenCV's sector_data, reversed to (R, G, B)
    sectors = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])[:, ::-1]
    picks = sectors[sector.astype(np.int32)]  # ... x 3
    rgb = np.take_along_axis(table, np.moveaxis(picks, -1, 0), axis=0) * np.float32(255)
    return np.moveaxis(np.clip(np.trunc(rgb), 0, 255).astype(np.uint8), 0, -1)


def test_hsv_to_rgb_equals_cv2_outputs():
    # cv2.cvtColor(COLOR_HSV2BGR) outputs (cv2 4.14, AVX512; reversed to RGB) for 64-pixel rows. The
    # first six triples are where OpenCV's truncation and fused 1 - s*f matter: rounding gives
    # (1, 1, 1) for the first, unfused arithmetic gives (3, 1, 0), (5, 1, 1), (2, 6, 2), (6, 2, 1),
    # (7, 9, 7) for the next five.
    hsv = [(0, 1, 1), (5, 204, 3), (3, 170, 5), (55, 153, 6), (5, 204, 6), (47, 50, 9), (0, 255, 255)]
    hsv += [(30, 128, 200), (120, 77, 190), (179, 255, 128), (91, 13, 250)]
    cv2_rgb = [[1, 0, 0], [3, 0, 0], [5, 2, 1], [3, 6, 2], [6, 1, 1], [8, 9, 7], [255, 0, 0]]
    cv2_rgb += [[200, 200, 99], [132, 132, 190], [128, 0, 4], [237, 249, 250]]
    hue, saturation, value = torch.tensor(hsv, dtype=torch.int32).T.unsqueeze(1)  # each 1 x 11
    assert opencv_arithmetic.hsv_to_rgb_uint8(hue, saturation, value)[:, 0].T.tolist() == cv2_rgb
    h, s, v = (np.array(channel) for channel in zip(*hsv))
    assert opencv_hsv_to_rgb(h, s, v).tolist() == cv2_rgb  # the reference below agrees too


def test_hsv_matches_a_plain_opencv_implementation_on_every_colour():
    # All 16.7M colours, in 4 chunks to bound the memory.
    for red in np.split(np.arange(256, dtype=np.int32), 4):
        codes = (red[:, None] << 16 | np.arange(1 << 16, dtype=np.int32)).ravel()
        rgb = np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8)
        expected = opencv_rgb_to_hsv(rgb)
        image = torch.from_numpy(rgb).view(-1, 4096, 3).permute(2, 0, 1).contiguous()
        for ours, theirs in zip(opencv_arithmetic.rgb_to_hsv_uint8(image), expected):
            assert np.array_equal(ours.flatten().numpy(), theirs)
    # Every (H, S, V) once, in both directions round the hue circle, again in 4 chunks. The reference
    # is computed once, and rolled along the hue for each shift.
    for values in np.split(np.arange(256, dtype=np.int32), 4):
        codes = np.arange(180 * 256 * len(values), dtype=np.int32)
        h, s, v = codes % 180, (codes // 180) % 256, values[codes // (180 * 256)]
        expected = opencv_hsv_to_rgb(h, s, v)
        hue, saturation, value = (torch.from_numpy(x) for x in (h, s, v))
        for shift in (0, 17, -18):
            ours = opencv_arithmetic.hsv_to_rgb_uint8(hue, saturation, value, hue_shift=shift)
            shifted = np.roll(expected.reshape(len(values), 256, 180, 3), -shift, axis=2).reshape(-1, 3)
            assert np.array_equal(ours.T.numpy(), shifted), shift


# -----------------------------------------------------------------------------------------------
# Errors: each names the file or flag, what was expected and what to do


def cut_in_half(path):  # a download cut short
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def cut_keeping_the_end_marker(path):  # a JPEG cut in half, its end marker put back
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] + b"\xff\xd9")


def declaring_8000(path):  # a JPEG whose header says 8000x8000, its data that of the small image
    content = bytearray(path.read_bytes())
    frame = content.index(b"\xff\xc0") + 5  # baseline frame header: precision, then height and width
    content[frame : frame + 4] = (8000).to_bytes(2, "big") * 2
    path.write_bytes(bytes(content))


def declaring(size):
    """A PNG header that declares size x size pixels: a small file that asks for gigabytes."""

    def write(path):
        from test_evaluate import png_declaring  # imported when used: it imports evaluate.py

        png_declaring(path, size, size)

    return write


def change(path, content):
    """None removes a file (and empties a folder), a function changes it, text, bytes or an array replace it."""
    if content is None and path.is_dir():
        shutil.rmtree(path)
        path.mkdir()
    elif content is None:
        path.unlink()
    elif callable(content):
        content(path)
    elif isinstance(content, (str, bytes)):
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    else:
        save(path, content)


FIXTURES = {  # the fixtures beside MAKE's: (dataset, how it is written)
    "nowhere": ("cityscapes", None),
    "kitti": ("kitti", None),
    "toy": ("toy", None),
    "blurred mask": ("folder", lambda root: make_folder(root, 2, lambda index: np.eye(32, 64) * 191 + 64)),
    "labels 1..3": ("folder", lambda root: make_folder(root, 3, lambda index: random_label(index, 4, low=1))),
    "2 classes, 0..2": ("folder", lambda root: make_folder(root, 2, lambda index: random_label(index, 3))),
}
CITY_VAL = "gtFine/val/lindau/lindau_000000_000019_gtFine_labelTrainIds.png"
ADE_VAL = "annotations/validation/ADE_valid_0000000{}.png"
TXT = "classes.txt"
TRUNCATED = {"images/val/photo1.jpg": cut_in_half, "labels/val/photo0.png": cut_in_half}
TOO_LARGE = {"images/train/photo0.png": declaring(20000), "labels/train/photo1.png": declaring(9000)}

# case: (fixture, split, {file under the root: new content}, the item read (None: the build fails), error)
SPOILED = {
    "no root": ("nowhere", "train", {}, None, FileNotFoundError),
    "empty split": ("ade20k", "train", {"images/training": None}, None, FileNotFoundError),
    "no classes.txt": ("folder", "train", {TXT: None}, None, FileNotFoundError),
    "unknown dataset": ("kitti", "train", {}, None, ValueError),
    "unknown split": ("toy", "testing", {}, None, ValueError),
    "toy test split": ("toy", "test", {}, None, ValueError),
    "labels not prepared": ("cityscapes", "val", {CITY_VAL: None}, None, FileNotFoundError),
    "no aug.txt": ("voc12aug", "train", {"ImageSets/Segmentation/aug.txt": None}, None, FileNotFoundError),
    "no VOC label": ("voc12aug", "val", {"SegmentationClass/2007_000033.png": None}, None, FileNotFoundError),
    "sizes differ": ("folder", "val", {"labels/val/photo1.png": np.zeros((32, 65))}, None, ValueError),
    "EXIF-turned": ("folder", "val", {"labels/val/photo1.png": np.zeros((64, 32))}, None, ValueError),
    "not an image": ("folder", "train", {"images/train/photo2.png": b"not a png"}, None, ValueError),
    "colour label": ("folder", "train", {"labels/train/photo1.png": random_image(1)}, None, ValueError),
    "truncated": ("folder", "val", TRUNCATED, None, ValueError),
    "too large": ("folder", "train", TOO_LARGE, None, ValueError),
    "JPEG cut, end kept": (
        "folder",
        "val",
        {"images/val/photo1.jpg": cut_keeping_the_end_marker},
        1,
        ValueError,
    ),
    "JPEG declares more": ("folder", "val", {"images/val/photo0.jpg": declaring_8000}, None, ValueError),
    "label ids": ("cityscapes", "val", {CITY_VAL: np.full((32, 64), 26)}, 1, ValueError),
    "blurred mask": ("blurred mask", "val", {}, 0, ValueError),
    "labels 1..3": ("labels 1..3", "train", {}, 0, ValueError),
    "2 classes, 0..2": ("2 classes, 0..2", "val", {}, 0, ValueError),
    "ADE20K reduced": ("ade20k", "val", {ADE_VAL.format(1): random_label(1, 150)}, 1, ValueError),
    "ADE20K reduced first": ("ade20k", "val", {ADE_VAL.format(0): random_label(0, 150)}, None, ValueError),
    "not UTF-8": ("folder", "val", {TXT: "background\nb\xe4ume\n".encode("latin-1")}, None, ValueError),
    "negative colour": ("folder", "val", {TXT: "background\na -1 0 0\nclass 2\n"}, None, ValueError),
    "two numbers": ("folder", "val", {TXT: "background\na 10 20\nclass 2\n"}, None, ValueError),
    "colour beyond 255": ("folder", "val", {TXT: "background\na 10 20 300\nclass 2\n"}, None, ValueError),
    "class twice": ("folder", "val", {TXT: "background\nroad 1 2 3\n# comment\nroad\n"}, None, ValueError),
    "unknown directive": ("folder", "val", {TXT: "label0: other\nbackground\nroad\n"}, None, ValueError),
    "directive typo": ("folder", "val", {TXT: "label0:ignore\nbackground\nroad\n"}, None, ValueError),
}
MESSAGES = {
    "no root": r"(?s)cityscapes not found.*leftImg8bit.*prepare_datasets\.py cityscapes",
    "empty split": r"(?s)training holds no \*\.jpg.*annotations",
    "no classes.txt": r"(?s)classes\.txt not found.*R G B",
    "unknown dataset": "unknown dataset 'kitti'",
    "unknown split": "'train', 'val' or 'test'",
    "toy test split": "the toy dataset has a train and a val split only; use the val split",
    "labels not prepared": r"1 of 2 images.*lindau_000000_000019_leftImg8bit.*prepare_datasets\.py cityscapes",
    "no aug.txt": r"(?s)aug\.txt not found.*prepare_datasets\.py voc12aug",
    "no VOC label": r"expected .*SegmentationClass/2007_000033\.png",
    "sizes differ": r"(?s)^(?!.*EXIF).*photo1\.jpg is 64x32 .*photo1\.png is 65x32",
    "EXIF-turned": r"photo1\.jpg is 64x32 .*photo1\.png is 32x64; .* the photo likely has an EXIF orientation",
    "not an image": r"cannot decode image .*photo2\.png",
    "colour label": r"photo1\.png has 3 channels",
    "truncated": r"(?s)2 problem.*photo0\.png: the PNG file is truncated.*photo1\.jpg: the JPEG file is truncated"
    r".*Re-download or re-save these files",
    "too large": r"(?s)image \S*/images/train/photo0\.png is too large \(Image size \(400000000 pixels\).*"
    r"label \S*/labels/train/photo1\.png is too large \(9000x9000\): at most 67,108,864",
    "JPEG cut, end kept": r"cannot decode image \S*photo1\.jpg \(Corrupt JPEG data: premature end of data segment\)",
    "JPEG declares more": r"photo0\.jpg: the JPEG declares 8000x8000 pixels in [\d,]+ bytes, so it is cut or damaged",
    "label ids": r"lindau_000000_000019_gtFine_labelTrainIds.* \[26\].*prepare_datasets\.py cityscapes",
    "blurred mask": r"values \[64, 255\].*binary mask",
    "labels 1..3": r"values \[1, 2, 3, 255\].*3 classes.*reduce the labels",
    "2 classes, 0..2": r"(?s)^(?!.*binary mask).*values \[0, 1, 2, 255\].*run up to 2",
    "ADE20K reduced": r"ADE_valid_00000001\.png holds 255 and no 150: it looks already reduced",
    "ADE20K reduced first": r"ADE_valid_00000000\.png holds 255 and no 150",
    "not UTF-8": r"classes\.txt is not UTF-8 text.*save it as UTF-8",
    "negative colour": r"classes\.txt, line 2 \('a -1 0 0'\): expected a class name.*R G B",
    "two numbers": r"classes\.txt, line 2 \('a 10 20'\): expected a class name.*R G B",
    "colour beyond 255": r"classes\.txt, line 2 \('a 10 20 300'\): expected a class name.*R G B",
    "class twice": r"line 4 \('road'\): class 'road' is listed twice \(first on line 2\)",
    "unknown directive": r"line 1 \('label0: other'\): unknown directive",
    "directive typo": r"line 1 \('label0:ignore'\): unknown directive; the known ones are `label0: ignore`",
}


@pytest.mark.parametrize("case", SPOILED)
def test_bad_input_is_named_with_what_to_do(tmp_path, case):
    fixture, split, changes, index, error = SPOILED[case]
    name, make = FIXTURES.get(fixture, (fixture, MAKE.get(fixture)))
    root = make(tmp_path / name) if make else tmp_path / name
    for path, content in changes.items():
        change(root / path, content)
    if index is None:
        with pytest.raises(error, match=MESSAGES[case]):
            data.build_dataset(name, root, split, **SMALL)
    else:
        dataset = data.build_dataset(name, root, split, **SMALL)  # label values are checked as they are read
        with pytest.raises(error, match=MESSAGES[case]):
            dataset[index]


def test_labels_of_0_and_255_in_two_classes_are_warned_about_as_a_mask_not_refused(tmp_path, capsys):
    def mask(index):  # photo0: background and an ignored band (a true label); photo1: a 0/255 mask?
        return (
            np.eye(32, 64) * 255
            if index
            else np.pad(np.zeros((30, 64)), ((2, 0), (0, 0)), constant_values=255)
        )

    root = make_folder(tmp_path / "mask", 2, mask)
    for split in ("train", "val"):
        dataset = data.build_dataset("folder", root, split, **SMALL)
        said = capsys.readouterr().out
        assert re.search(r"WARNING: label \S*photo0\.png holds only the values 0 and 255.*mask // 255", said)
    for index in (0, 1):  # read as stored: a run is not stopped
        assert torch.unique(dataset[index][1]).tolist() == [0, 255]
    save(root / "labels" / "train" / "photo2.png", np.eye(32, 64))  # a 1 among them: true labels
    data.build_dataset("folder", root, "train", **SMALL)
    assert "WARNING" not in capsys.readouterr().out


def test_files_changed_after_the_build_are_named_as_they_are_read(tmp_path, monkeypatch):
    root = make_folder(tmp_path, label_for=lambda index: np.full((HEIGHT, WIDTH), 200 * (index == 1)))
    dataset = data.build_dataset("folder", tmp_path, "val")
    save(root / "labels" / "val" / "photo1.png", np.zeros((HEIGHT, WIDTH + 1)))
    with pytest.raises(ValueError, match=r"photo1\.jpg is 64x32 .*photo1\.png is 65x32"):
        dataset[1]
    # Too costly to check every label at start-up; at its first read, in a worker, the error comes back
    # to the main process as the words that name the file, not the worker's traceback.
    train_set = data.build_dataset("folder", tmp_path, "train", **SMALL)
    loader = torch.utils.data.DataLoader(train_set, batch_size=3, num_workers=1)
    with pytest.raises(data.FileProblem) as error:
        next(iter(loader))
    message = str(error.value)
    # The exception's frames hold the loader, whose worker, after raising, torch stops only when a join
    # of MP_STATUS_CHECK_INTERVAL (5 s) runs out: done here, shorter, not in whichever test collects it
    # (it was the end-to-end test's garbage collection, 5 s of its time).
    del error
    monkeypatch.setattr(torch.utils.data._utils, "MP_STATUS_CHECK_INTERVAL", 0.1)
    gc.collect()
    label_path = tmp_path / "labels" / "train" / "photo1.png"
    assert message.startswith(f"label {label_path} holds the values [200], but folder has")
    assert "Traceback" not in message


def test_what_is_found_beside_the_errors(roots, tmp_path, monkeypatch):
    # The headers of good files pass; a trailing number is part of a class name; raw ADE20K builds.
    good = roots["folder"] / "images" / "train" / "photo0.png"
    assert data.file_problem(good, "image") == (None, (WIDTH, HEIGHT))
    folder = make_folder(tmp_path / "mine")
    (folder / "classes.txt").write_text("background\nlane 2 10 20 30\nclass 2\n")
    assert data.build_dataset("folder", folder, "val").classes == ["background", "lane 2", "class 2"]
    # A BOM (as Notepad saves) is not part of the first line. A class without a colour takes the VOC colour
    # of the value it is stored as, which label0: ignore moves by one (black stays the unlabelled 0's).
    (folder / "classes.txt").write_bytes("\ufefflabel0: ignore\nroad\ncar 1 2 3\nsky\n".encode())
    voc = layouts.default_palette(4)
    assert layouts.read_classes_file(folder) == (["road", "car", "sky"], [voc[1], [1, 2, 3], voc[3]], True)
    (folder / "classes.txt").write_text("road\ncar\n")
    assert layouts.read_classes_file(folder) == (["road", "car"], voc[:2], False)
    ade = make_ade20k(tmp_path / "ADEChallengeData2016")
    assert len(data.build_dataset("ade20k", ade, "val")) == 2
    save(ade / ADE_VAL.format(0), random_label(0, 150))  # reduced already: refused unless asked not to reduce
    assert len(data.build_dataset("ade20k", ade, "val", reduce_zero_label=False)) == 2
    with pytest.raises(FileNotFoundError, match="image file not found"):
        data.read_image(tmp_path / "missing.jpg")
    (tmp_path / "notes.png").write_text("not a picture")  # named once, by its path (Pillow reads its bytes)
    with pytest.raises(
        ValueError, match=r"image \S*notes\.png \(cannot identify image file\)\. Expected a JPEG"
    ):
        data.read_image(tmp_path / "notes.png")
    # A codec's error is told in words, without the paths and C++ stack torchvision puts in it.
    save(tmp_path / "photo.jpg", random_image(0))
    build_paths = RuntimeError(
        "decode_webp, /__w/vision/vision/pytorch/vision/torchvision/csrc/io/image/cpu/decode_webp.cpp:85, "
        "WebPDecodeRGB[A] failed.\nException raised from decode at x.cpp:1"
    )
    monkeypatch.setattr(
        data.torchvision_io(), "decode_image", lambda *args, **kwargs: (_ for _ in ()).throw(build_paths)
    )
    with pytest.raises(
        ValueError, match=r"photo\.jpg \(decode_webp, WebPDecodeRGB\[A\] failed\.\)\. Expected a JPEG"
    ):
        data.read_image(tmp_path / "photo.jpg")


def test_a_torchvision_built_for_another_torch_is_said_in_words(tmp_path):
    fake = tmp_path / "torchvision"  # what importing a mismatched torchvision raises
    fake.mkdir()
    (fake / "__init__.py").write_text('raise RuntimeError("operator torchvision::nms does not exist")\n')
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(Path(data.__file__).parent)!r}]; import data"
    code += "; print('imported'); data.torchvision_io()"  # imported where a JPEG is first read
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr and done.stdout == "imported\n"
    assert "does not fit torch" in done.stderr and "operator torchvision::nms does not exist" in done.stderr
    assert "pip install -U torch torchvision" in done.stderr
