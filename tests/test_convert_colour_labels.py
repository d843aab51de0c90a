"""tools/convert_colour_labels.py: colour masks -> class-index PNGs on tiny files, unknown colours named,
reruns skipping or overwriting."""

import importlib.util
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "convert_colour_labels.py"
spec = importlib.util.spec_from_file_location("convert_colour_labels", SCRIPT)
convert = importlib.util.module_from_spec(spec)
sys.modules["convert_colour_labels"] = convert  # the process pool finds its functions by name
spec.loader.exec_module(convert)

# Class 2 has no colour in classes.txt: it gets colour 2 of the VOC colour map, (0, 128, 0) (3 with
# label0: ignore, where it is stored as 3).
CLASSES_TXT = "road 128 64 128\ncar 0 0 142  # a comment\nplant\n"
ROAD, CAR, PLANT, WHITE = (128, 64, 128), (0, 0, 142), (0, 128, 0), (255, 255, 255)


def save_rgb(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.array(rows, dtype=np.uint8)).save(path)


def folder_dataset(root, classes_txt=CLASSES_TXT):
    """ROOT/classes.txt and two colour masks in ROOT/labels_colour/{train,val}."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text(classes_txt)
    save_rgb(root / "labels_colour" / "train" / "a.png", [[ROAD, CAR, PLANT], [WHITE, ROAD, CAR]])
    save_rgb(
        root / "labels_colour" / "val" / "b.PNG", [[PLANT, PLANT], [CAR, ROAD]]
    )  # as some tools name them


def read_index_png(path):
    with Image.open(path) as image:
        assert image.mode == "L"  # one uint8 channel
        return np.array(image).tolist()


def test_colours_become_class_indices_and_the_ignore_colour_255(tmp_path, capsys):
    folder_dataset(tmp_path)
    convert.main([str(tmp_path), "--ignore-colour", "255", "255", "255", "--workers", "1"])
    assert "2 converted, 0 skipped" in capsys.readouterr().out
    assert read_index_png(tmp_path / "labels" / "train" / "a.png") == [[0, 1, 2], [255, 0, 1]]
    assert read_index_png(tmp_path / "labels" / "val" / "b.png") == [[2, 2], [1, 0]]
    assert not list((tmp_path / "labels").rglob(".*.tmp"))


def test_label0_ignore_writes_classes_from_1_and_the_ignore_colour_as_0(tmp_path):
    folder_dataset(tmp_path, "label0: ignore\n" + CLASSES_TXT.replace("plant", "plant 0 128 0"))
    convert.main([str(tmp_path), "--ignore-colour", "255", "255", "255", "--workers", "1"])
    assert read_index_png(tmp_path / "labels" / "train" / "a.png") == [[1, 2, 3], [0, 1, 2]]
    assert read_index_png(tmp_path / "labels" / "val" / "b.png") == [[3, 3], [2, 1]]


def test_a_voc_style_mask_with_label0_ignore_needs_no_colours_written(tmp_path):
    # Black is unlabelled (0) and class v has the VOC colour v: aeroplane (128, 0, 0), bicycle (0, 128, 0).
    (tmp_path / "classes.txt").write_text("label0: ignore\naeroplane\nbicycle\n")
    save_rgb(tmp_path / "labels_colour" / "train" / "a.png", [[(128, 0, 0), (0, 128, 0), (0, 0, 0)]])
    convert.main([str(tmp_path), "--ignore-colour", "0", "0", "0", "--workers", "1"])
    assert read_index_png(tmp_path / "labels" / "train" / "a.png") == [[1, 2, 0]]
    # A file where an output folder goes is said in words.
    (tmp_path / "taken").write_text("")
    with pytest.raises(SystemExit, match=r"^error: \[Errno 20\] Not a directory: .*taken"):
        convert.main([str(tmp_path), "--dst", str(tmp_path / "taken"), "--ignore-colour", "0", "0", "0"])


def test_unknown_colours_are_named_with_file_and_pixel_count(tmp_path, capsys):
    folder_dataset(tmp_path)  # white is not declared: both its pixels in a.png are unknown
    save_rgb(tmp_path / "labels_colour" / "train" / "c.png", [[(1, 2, 3)] * 3, [(1, 2, 3), WHITE, ROAD]])
    (tmp_path / "labels_colour" / "train" / "d.png").write_bytes(b"<html>")  # a damaged file: named too
    with pytest.raises(SystemExit) as raised:
        convert.main([str(tmp_path), "--workers", "1"])
    message = str(raised.value)
    assert "cannot decode image" in message and "d.png" in message and "1 files cannot be read" in message
    assert (
        f"{tmp_path / 'labels_colour' / 'train' / 'a.png'}: 1 unknown colour: RGB 255 255 255 (1 px)"
        in message
    )
    assert "c.png: 2 unknown colours: RGB 1 2 3 (4 px), RGB 255 255 255 (1 px)" in message
    assert "2 files have colours that are not in" in message and "--ignore-colour R G B" in message
    assert (
        "1 converted, 0 skipped (exist; --overwrite converts them again), 3 failed" in capsys.readouterr().out
    )
    assert [path.name for path in (tmp_path / "labels").rglob("*.png")] == [
        "b.png"
    ]  # failed files not written


def test_lossy_masks_get_a_hint_and_at_most_ten_colours_named():
    colours = {(value, 0, 0): 100 - value for value in range(30)}
    message = convert.describe_unknown("m.png", colours)
    assert message.count("RGB") == 10 and "RGB 9 0 0 (91 px)" in message and "RGB 10 0 0" not in message
    assert "and 20 more" in message and "JPEG" in message


def test_rerun_skips_existing_files_and_overwrite_converts_again(tmp_path, capsys):
    folder_dataset(tmp_path)
    arguments = [str(tmp_path), "--ignore-colour", "255", "255", "255", "--workers", "1"]
    convert.main(arguments)
    # New colours for the classes: road and car swap. Without --overwrite the old files stay.
    (tmp_path / "classes.txt").write_text("road 0 0 142\ncar 128 64 128\nplant\n")
    capsys.readouterr()
    convert.main(arguments)
    assert "0 converted, 2 skipped" in capsys.readouterr().out
    assert read_index_png(tmp_path / "labels" / "val" / "b.png") == [[2, 2], [1, 0]]
    convert.main(arguments + ["--overwrite"])
    assert "2 converted, 0 skipped" in capsys.readouterr().out
    assert read_index_png(tmp_path / "labels" / "val" / "b.png") == [[2, 2], [0, 1]]
    assert read_index_png(tmp_path / "labels" / "train" / "a.png") == [[1, 0, 2], [255, 1, 0]]


def test_script_with_explicit_folders_and_a_pool(tmp_path, monkeypatch, capsys):
    folder_dataset(tmp_path / "mine")
    source = tmp_path / "masks"
    save_rgb(source / "deep" / "x.png", [[CAR, PLANT]])
    save_rgb(source / "y.png", [[ROAD]])
    # As `python tools/convert_colour_labels.py ...` run from the repository root.
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--src", str(source), "--dst", str(tmp_path / "out"),
                                      "--classes", str(tmp_path / "mine" / "classes.txt"), "--workers", "2"])  # fmt: skip
    runpy.run_path(str(SCRIPT), run_name="__main__")
    assert "2 converted" in capsys.readouterr().out
    assert data.read_label(tmp_path / "out" / "deep" / "x.png").tolist() == [[1, 2]]
    assert data.read_label(tmp_path / "out" / "y.png").tolist() == [[0]]


def test_bad_declarations_are_refused_with_what_to_do(tmp_path):
    with pytest.raises(ValueError, match=r"colour \[0, 0, 142\] stands for both class 1 and --ignore-colour"):
        convert.lookup_table([[128, 64, 128], [0, 0, 142]], [(0, 0, 142)])
    with pytest.raises(ValueError, match=r"at most 255: 0\.\.254 \(255 = ignore\)"):
        convert.lookup_table([[index, 0, 0] for index in range(256)])
    with pytest.raises(
        ValueError, match=r"lists 255 classes; .* at most 254: 1\.\.254 \(0 and 255 = ignore\)"
    ):
        convert.lookup_table([[index, 0, 0] for index in range(255)], zero_is_ignore=True)
    folder_dataset(tmp_path)
    (tmp_path / "other.txt").write_text(CLASSES_TXT)
    with pytest.raises(SystemExit, match="expected the dataset's classes.txt"):
        convert.main([str(tmp_path), "--classes", str(tmp_path / "other.txt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="holds no .png files"):
        convert.main([str(tmp_path), "--src", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="is not a folder"):
        convert.main([str(tmp_path), "--src", str(tmp_path / "nothing")])
    # Inside --src, a rerun would take the labels written before for colour masks.
    for dst in (tmp_path / "labels_colour", tmp_path / "labels_colour" / "index"):
        with pytest.raises(SystemExit, match=r"(are the same folder|is inside --src) .*Pass a --dst outside"):
            convert.main([str(tmp_path), "--dst", str(dst)])


def test_without_root_all_three_folders_are_needed(capsys):
    with pytest.raises(SystemExit):
        convert.main(["--src", "masks"])
    assert (
        "give ROOT, or all of --src, --dst and --classes (missing --dst, --classes)"
        in capsys.readouterr().err
    )


def test_a_mask_is_converted_in_bands_of_rows_with_the_same_result():
    palette = [(0, 0, 0), (128, 64, 128), (220, 20, 60)]
    table = convert.lookup_table(palette)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (9, 7), generator=generator)
    image = torch.tensor(palette, dtype=torch.uint8)[labels].permute(2, 0, 1).contiguous()
    for rows in (1, 2, 4, 256):  # an 8000x8000 mask goes in bands, so that it needs about its own size
        converted, unknown = convert.convert_image(image, table, rows=rows)
        assert unknown == {} and torch.equal(converted, labels.to(torch.uint8))
    image[:, 0, 0] = image[:, 5, 3] = image[:, 8, 6] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    image[:, 6, 1] = torch.tensor([9, 9, 9], dtype=torch.uint8)
    for rows in (1, 3, 256):  # unknown colours counted over every band, the most frequent first
        assert convert.convert_image(image, table, rows=rows) == (None, {(1, 2, 3): 3, (9, 9, 9): 1})
