"""tools/prepare_datasets.py: Cityscapes labelIds -> trainIds, SBD .mat -> SegmentationClassAug and the
aug lists, on tiny fixtures in the real layouts."""

import importlib.util
import os
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data

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
