"""tools/prepare_datasets.py: Cityscapes labelIds -> trainIds, SBD .mat -> SegmentationClassAug and the
aug lists, the decoded copy and data.py's use of it, on tiny fixtures in the real layouts."""

import importlib.util
import os
import runpy
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import MAKE, SMALL, make_ade20k, make_cityscapes

import data
import runtime

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "prepare_datasets.py"
spec = importlib.util.spec_from_file_location("prepare_datasets", SCRIPT)
prepare_datasets = importlib.util.module_from_spec(spec)
sys.modules["prepare_datasets"] = prepare_datasets  # the process pool finds its functions by name
spec.loader.exec_module(prepare_datasets)

# The official Cityscapes id -> trainId table, written out for ids 0..33 (cityscapesScripts
# helpers/labels.py).
CITYSCAPES_TRAINIDS = [255] * 7 + [0, 1, 255, 255, 2, 3, 4, 255, 255, 255, 5, 255, 6, 7, 8, 9, 10]
CITYSCAPES_TRAINIDS += [11, 12, 13, 14, 15, 255, 255, 16, 17, 18]


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def test_prepare_cityscapes_writes_train_ids(tmp_path, capsys):
    root = tmp_path / "cityscapes"
    all_ids = np.array(list(range(34)) + [255] * 6).reshape(5, 8)
    for split, city in (("train", "aachen"), ("val", "lindau")):
        save(root / "gtFine" / split / city / f"{city}_000000_000019_gtFine_labelIds.png", all_ids)
    prepare_datasets.main(["cityscapes", str(root), "--workers", "2"])
    assert "2 converted, 0 skipped" in capsys.readouterr().out
    train_ids = data.read_label(
        root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png"
    )
    assert train_ids.flatten().tolist() == CITYSCAPES_TRAINIDS + [255] * 6
    prepare_datasets.main(["cityscapes", str(root), "--workers", "1"])
    assert "0 converted, 2 skipped" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"(?s)nowhere/gtFine not found.*leftImg8bit"):
        prepare_datasets.main(["cityscapes", str(tmp_path / "nowhere")])
    # Every bad file is named, in one error after the others are done; a FIFO is said to be one.
    bad = [
        root / "gtFine" / "train" / "bonn" / f"bonn_00000{index}_000019_gtFine_labelIds.png"
        for index in range(3)
    ]
    save(bad[0], all_ids)
    bad[1].write_bytes(b"<html>")
    os.mkfifo(bad[2])
    for workers in ("1", "2"):
        with pytest.raises(SystemExit) as stop:
            prepare_datasets.main(["cityscapes", str(root), "--workers", workers])
        message = str(stop.value)
        assert message.startswith("error: 2 of 5 files could not be converted") and "done before" in message
        assert (
            f"cannot decode label {bad[1]}" in message and f"label {bad[2]} is not a regular file" in message
        )


def test_prepare_voc12aug_from_sbd(tmp_path, capsys):
    scipy_io = pytest.importorskip("scipy.io")
    devkit, sbd = tmp_path / "VOCdevkit", tmp_path / "VOCdevkit" / "VOCaug" / "dataset"
    lists = devkit / "VOC2012" / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train.txt").write_text("a\nb\n")
    (lists / "val.txt").write_text("f\n")
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("a\nc\n")
    (sbd / "val.txt").write_text("d\nf\n")
    segmentations = {}
    for seed, name in enumerate("acdf"):
        segmentations[name] = np.random.RandomState(seed).randint(0, 21, (4, 6)).astype(np.uint8)
        gt = {"Segmentation": segmentations[name], "Boundaries": np.zeros(1), "CategoriesPresent": [1]}
        scipy_io.savemat(sbd / "cls" / f"{name}.mat", {"GTcls": gt})
    prepare_datasets.main(["voc12aug", str(devkit), str(sbd.parent), "--workers", "1"])
    assert "4 converted, 0 skipped" in capsys.readouterr().out
    for name, segmentation in segmentations.items():
        png = devkit / "VOC2012" / "SegmentationClassAug" / f"{name}.png"
        assert Image.open(png).mode == "L"
        assert data.read_label(png).tolist() == segmentation.tolist()
    # trainaug = (VOC train | SBD) - VOC val; aug = SBD - VOC train - VOC val.
    assert (lists / "trainaug.txt").read_text() == "a\nb\nc\nd\n"
    assert (lists / "aug.txt").read_text() == "c\nd\n"
    prepare_datasets.main(["voc12aug", str(devkit), str(sbd), "--workers", "1"])  # SBD_ROOT may be dataset/
    assert "0 converted, 4 skipped" in capsys.readouterr().out


def test_prepare_voc12aug_names_a_bad_mat_file(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    scipy_io.savemat(tmp_path / "x.mat", {"GTinst": {"Segmentation": np.zeros((2, 2))}})
    with pytest.raises(ValueError, match=r"x\.mat has no GTcls struct \(found \['GTinst'\]\)"):
        prepare_datasets.read_sbd_segmentation(tmp_path / "x.mat")
    for name, content in (("empty.mat", b""), ("page.mat", b"<html>not found</html>" * 10)):
        (tmp_path / name).write_bytes(content)  # a download cut short, or an error page
        with pytest.raises(ValueError, match=rf"{name} is not a readable \.mat file \("):
            prepare_datasets.read_sbd_segmentation(tmp_path / name)


def test_the_script_finds_data_py_by_itself(tmp_path, monkeypatch, capsys):
    # As the README runs it, `python tools/prepare_datasets.py ...`: sys.path[0] is tools/, not the root.
    monkeypatch.setattr(sys, "path", [path for path in sys.path if Path(path).resolve() != ROOT])
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "cityscapes", str(tmp_path / "nowhere")])
    monkeypatch.delitem(sys.modules, "data")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        SystemExit, match=r"(?s)nowhere/gtFine not found.*tools/prepare_datasets\.py cityscapes"
    ):
        runpy.run_path(str(SCRIPT), run_name="__main__")


# -----------------------------------------------------------------------------------------------
# The decoded copy


def samples(dataset, seeds=range(12)):
    """Every item of the dataset under each seed (training's random crops, flips and colours)."""
    items = []
    for seed in seeds if dataset.split == "train" else [0]:
        torch.manual_seed(seed)
        items += [dataset[index] for index in range(len(dataset))]
    return items


@pytest.mark.parametrize("name", sorted(MAKE))
def test_the_decoded_copy_gives_every_sample_bit_for_bit(tmp_path, monkeypatch, capsys, name):
    root = MAKE[name](tmp_path / name)
    expected = {split: samples(data.build_dataset(name, root, split, **SMALL)) for split in ("train", "val")}
    prepare_datasets.main(["decoded", name, str(root), "--workers", "1"])
    files = [path for path in root.rglob("*") if path.suffix in (".png", ".jpg")]
    assert f"{len(files)} decoded, 0 skipped" in capsys.readouterr().out
    assert len(list((root / data.DECODED).rglob("*.npy"))) == len(files)

    def no_decoding(path, *args):
        raise AssertionError(f"{path} was decoded")

    datasets = {split: data.build_dataset(name, root, split, **SMALL) for split in ("train", "val")}
    monkeypatch.setattr(data, "read_image", no_decoding)
    monkeypatch.setattr(data, "read_label", no_decoding)
    for split, dataset in datasets.items():
        assert dataset.decoded
        for ours, theirs in zip(samples(dataset), expected[split], strict=True):
            if split == "train":
                assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
            else:
                assert all(map(torch.equal, ours[0], theirs[0])) and torch.equal(ours[1], theirs[1])
                assert ours[2] == theirs[2]


def test_a_copy_that_does_not_match_its_files_is_named(tmp_path, capsys):
    root = make_cityscapes(tmp_path / "cityscapes")
    prepare_datasets.prepare_decoded("cityscapes", root, ("train", "val"), workers=1)
    image = root / "leftImg8bit" / "train" / "aachen" / "aachen_000000_000019_leftImg8bit.png"
    label = root / "gtFine" / "val" / "lindau" / "lindau_000000_000019_gtFine_labelTrainIds.png"
    os.utime(image, ns=(0, os.stat(image).st_mtime_ns + 10**9))  # saved again since
    data.decoded_path(root, label).unlink()
    torn = data.decoded_path(
        root, root / "gtFine" / "train" / "bochum" / "bochum_000000_000019_gtFine_labelTrainIds.png"
    )
    torn.write_bytes(torn.read_bytes()[:-100])
    for split, problem in (("train", f"{image} and its copy differ in modification time"),
                           ("train", f"{torn} does not hold the 64x32 pixels of its file: it is torn, or the file changed"),
                           ("val", f"{data.decoded_path(root, label)} is missing")):  # fmt: skip
        with pytest.raises(ValueError) as error:
            data.build_dataset("cityscapes", root, split)
        assert f"the decoded copy in {root / 'decoded'} does not match" in str(error.value)
        assert problem in str(error.value)
        assert f"`python tools/prepare_datasets.py decoded cityscapes {root} --splits {split}`" in str(
            error.value
        )
    # The command rewrites these three only; the dataset then reads its copy.
    capsys.readouterr()
    prepare_datasets.prepare_decoded("cityscapes", root, ("train", "val"), workers=1)
    assert "3 decoded, 7 skipped" in capsys.readouterr().out
    dataset = data.build_dataset("cityscapes", root, "val")
    # A split the copy was not asked for (--splits test adds it) reads its files, as does one whose first
    # image has no copy (a copy stopped before it began): the first image's copy decides.
    save(
        root / "leftImg8bit" / "test" / "berlin" / "berlin_000000_000019_leftImg8bit.png",
        np.zeros((32, 64, 3)),
    )
    assert not data.build_dataset("cityscapes", root, "test").decoded
    data.decoded_path(root, data.build_dataset("cityscapes", root, "train").pairs[0][0]).unlink()
    assert not data.build_dataset("cityscapes", root, "train").decoded
    # A copy torn after the start is named as it is read.
    copy = data.decoded_path(root, dataset.pairs[1][0])
    copy.write_bytes(copy.read_bytes()[:1000])
    with pytest.raises(data.FileProblem, match=rf"the decoded copy {copy} of image .* cannot be read"):
        dataset[1]


def test_files_beside_the_root_and_files_saved_during_the_copy(tmp_path, monkeypatch):
    # ADE20K's release_test beside the root: its copies stay inside ROOT/decoded, where nothing looks
    # for images, and the test split reads them.
    root = make_ade20k(tmp_path / "ADEChallengeData2016")
    save(tmp_path / "release_test" / "testing" / "ADE_test_00000001.jpg", np.full((32, 64, 3), 90))
    expected = samples(data.build_dataset("ade20k", root, "test"))
    prepare_datasets.prepare_decoded("ade20k", root, ("test",), workers=1)
    copy = root / "decoded" / "@parent" / "release_test" / "testing" / "ADE_test_00000001.jpg.npy"
    assert copy.is_file() and not (root / "release_test").exists()
    dataset = data.build_dataset("ade20k", root, "test")
    assert dataset.decoded and all(map(torch.equal, samples(dataset)[0][0], expected[0][0]))
    # A label saved again while it is decoded: its copy holds the old pixels, so it is stale, not new.
    label = root / "annotations" / "training" / "ADE_train_00000000.png"
    real_read = data.read_label

    def read_then_saved_again(path):
        pixels = real_read(path)
        os.utime(label, ns=(0, os.stat(label).st_mtime_ns + 10**9))
        return pixels

    monkeypatch.setattr(data, "read_label", read_then_saved_again)
    data.write_decoded(root, label, "label")
    assert "differ in modification time" in data.copy_problem(root, label, "label", (64, 32))


def test_the_copy_is_refused_without_the_disk_space_and_resumes_after_a_stop(tmp_path, monkeypatch, capsys):
    root = make_cityscapes(tmp_path / "cityscapes")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**30 + 30_000))
    with pytest.raises(
        SystemExit, match=r"not enough disk space for the decoded copy .* it needs 0.0 MB, 1.1 GB are free"
    ):
        prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "1"])
    assert not list(root.rglob("*.npy"))
    monkeypatch.undo()

    # A run stopped after three files, its last temporary file left behind by a kill.
    real_write, written = data.write_decoded, []

    def stopped_after_three(*args):
        if len(written) == 3:
            raise KeyboardInterrupt
        real_write(*args)
        written.append(args)

    monkeypatch.setattr(data, "write_decoded", stopped_after_three)
    with pytest.raises(SystemExit, match="stopped by Ctrl-C: the files written so far are whole; the same"):
        prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "1"])
    monkeypatch.undo()
    stray = data.decoded_path(root, written[0][1]).with_name(".stray.npy.123-abcd0123.tmp")
    stray.write_bytes(b"half")
    capsys.readouterr()
    prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "2"])
    said = capsys.readouterr().out
    assert "(3 files done before)" in said
    assert "7 decoded, 3 skipped" in said and not stray.exists()
    dataset = data.build_dataset("cityscapes", root, "train", crop_size=(16, 16), scale=(64, 32))
    assert dataset.decoded and len(samples(dataset, seeds=[0])) == 3
    # With less than the gigabyte to spare: a copy up to date needs nothing, and stale copies (the files
    # touched since) are replaced by copies of their size, so neither is refused.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**30 - 1))
    prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "1"])
    for path in root.rglob("*.png"):
        os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
    prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "1"])
    said = capsys.readouterr().out
    assert "0 decoded, 10 skipped" in said and "10 decoded, 0 skipped" in said


def test_a_second_copy_of_the_same_root_at_once_is_refused(tmp_path):
    root = make_cityscapes(tmp_path / "cityscapes")
    with runtime.hold_lock(root / ".decoded.lock"):  # another run, writing the copy
        with pytest.raises(SystemExit, match=r"is being written by another run \(process \d+ on "):
            prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "1"])
        assert not (root / "decoded").exists()
    prepare_datasets.main(["decoded", "cityscapes", str(root), "--workers", "1"])
    assert data.build_dataset("cityscapes", root, "val").decoded


def test_a_folder_copy_without_its_root_names_the_argument_this_command_takes(capsys):
    with pytest.raises(SystemExit):
        prepare_datasets.main(["decoded", "folder"])
    assert "error: the folder dataset needs its ROOT: decoded folder ROOT" in capsys.readouterr().err
