"""pictures.py: the composite of an image's predictions, the confusion matrix, a run's log (and
tools/plot_log.py, which draws it), read from their pixels."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import pictures
import run
from tools import plot_log


def cell_colour(picture, matrix_size, row, column):
    """The colour at the middle of cell (row, column) of a confusion_picture, found from its layout:
    the matrix is the square block of cells whose bottom-right corner is the last cell drawn."""
    pixels = np.array(picture)
    cell = 24 if matrix_size <= pictures.NAMED_CLASSES else pictures.NUMBERED_CELL_PIXELS
    # the grey row of the absent class 1 marks where rows are: find the top of the matrix from it
    grey = np.where((pixels == 200).all(axis=2).sum(axis=1) >= cell * matrix_size - 2)[0]
    top = grey[0] - cell
    left = np.where((pixels[grey[0]] == 200).all(axis=1))[0][0]
    return tuple(pixels[top + row * cell + cell // 2 - 6, left + column * cell + 3])


def test_confusion_picture_shows_row_shares_and_names_the_worst_pairs():
    classes = ["road", "car", "sky", "bus"]
    # rows: ground truth. car (row 1) is absent; bus is predicted as sky a quarter of the time.
    matrix = torch.tensor([[90, 0, 10, 0], [0, 0, 0, 0], [0, 0, 50, 0], [0, 0, 25, 75]])
    picture = pictures.confusion_picture(matrix, classes)
    assert cell_colour(picture, 4, 0, 0) == pictures.blue_ramp(math.sqrt(0.9))
    assert cell_colour(picture, 4, 3, 2) == pictures.blue_ramp(math.sqrt(0.25))
    assert cell_colour(picture, 4, 2, 2) == pictures.blue_ramp(1.0)
    assert cell_colour(picture, 4, 1, 1) == (200, 200, 200)  # no ground truth: grey
    lines = pictures.most_confused_lines(matrix.double() / matrix.sum(1, keepdim=True), classes)
    assert lines[1:] == ["bus -> sky  25.0%", "road -> sky  10.0%"]
    # 150 classes: small cells, numbered; the list beside gives numbers and names, a key below them all
    big = torch.eye(150, dtype=torch.int64) * 100
    big[7, 9] = 300  # class 7 is mostly taken for class 9
    names = [f"class{index}" for index in range(150)]
    picture = pictures.confusion_picture(big, names)
    shares = big.double() / big.sum(1, keepdim=True)
    assert pictures.most_confused_lines(shares, names, numbered=True)[1] == "7 class7 -> 9 class9  75.0%"
    assert 150 * pictures.NUMBERED_CELL_PIXELS < picture.height < 1100 and picture.width < 1200


def test_the_log_picture_plots_each_series_and_read_log_skips_a_torn_line(tmp_path):
    records = [
        dict(iteration=i, loss=1.0 / i, decode_loss=0.8 / i, lr=0.01 * (1 - i / 100)) for i in range(1, 101)
    ]
    records += [dict(iteration=i, mIoU=float(i) / 2, val_loss=2.0 / i) for i in (50, 100)]
    records.append(dict(iteration=50, mIoU=30.0, val_loss=0.05))  # a resumed run validated 50 again
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 101, "lo')
    read, unreadable = run.read_log(log)
    assert read == records and unreadable == 1
    picture = np.array(pictures.log_picture(read))
    for colour in [(31, 119, 180), (158, 202, 225), (230, 85, 13), (49, 163, 84), (117, 107, 177)]:
        assert (picture == colour).all(axis=2).sum() > 20, colour  # each series is drawn
    # a repeated iteration is plotted once, with its later record
    training, validations = pictures.split_log(read + [dict(iteration=100, event="nonfinite_loss")])
    assert training[100]["loss"] == 1.0 / 100  # an event of a step leaves its figures
    assert pictures.points(validations, "mIoU") == [(50, 30.0), (100, 50.0)]
    # A run's start leaves out what an earlier run logged after it (a crash, or a resume from iter_40).
    training, validations = pictures.split_log(
        read + [dict(iteration=40, event="start"), dict(iteration=41, loss=9.0)]
    )
    assert sorted(training) == list(range(1, 42)) and training[41]["loss"] == 9.0 and validations == {}
    assert pictures.nice_ticks(0, 0.043) == [0, 0.01, 0.02, 0.03, 0.04]
    assert pictures.nice_ticks(0, 300) == [0, 50, 100, 150, 200, 250, 300]
    assert pictures.log_ticks(0.02, 3.0) == [0.02, 0.05, 0.1, 0.2, 0.5, 1, 2]
    assert pictures.log_ticks(0.001, 3000) == [0.001, 0.01, 0.1, 1, 10, 100, 1000]  # 1, 2, 5 would be 20
    assert pictures.log_ticks(0.692, 0.708) == [0.695, 0.7, 0.705]  # narrow: evenly spaced instead
    # Before the first validation (plot_log.py during a run): the validation plots are empty, not broken.
    early = np.array(pictures.log_picture(records[:10]))
    assert (early == (31, 119, 180)).all(axis=2).sum() > 20 and not (early == (117, 107, 177)).all(
        axis=2
    ).any()
    # the tool: a work dir in, log.png beside its log out; a folder without a log is said in words
    assert plot_log.main([str(tmp_path)]) == tmp_path / "log.png"
    assert Image.open(tmp_path / "log.png").size == (pictures.PLOT_WIDTH, picture.shape[0])
    with pytest.raises(SystemExit, match="nothing not found: pass the work dir of a train.py run"):
        plot_log.main([str(tmp_path / "nothing")])
    assert Image.open(plot_log.main([str(log), "--out", str(tmp_path / "log.jpg")])).format == "JPEG"
    with pytest.raises(SystemExit, match="Pillow writes no picture format named .jgp; name a .png file"):
        plot_log.main([str(log), "--out", str(tmp_path / "log.jgp")])
    with pytest.raises(
        SystemExit, match=r"cannot write --out \S*log\.jsonl/log\.png: (File exists|Not a dir)"
    ):
        plot_log.main([str(log), "--out", str(log / "log.png")])  # a file where its folder should be


def test_heat_colors_run_from_blue_to_red():
    colors = pictures.heat_colors(torch.tensor([0.0, 0.5, 1.0]))
    assert colors.tolist() == [[0, 0, 127.5], [127.5, 255, 127.5], [127.5, 0, 0]]


def test_composite_shows_image_truth_prediction_attention_and_a_legend_of_the_classes_present():
    image = torch.full((3, 20, 30), 200, dtype=torch.uint8)
    label = torch.zeros(20, 30, dtype=torch.long)
    label[:, 15:] = 2
    label[0, 0] = 255  # ignored: black
    pred = torch.zeros(20, 30, dtype=torch.long)
    palette, classes = [[0, 0, 255], [0, 255, 0], [255, 0, 0]], ["sky", "grass", "car"]
    picture = pictures.composite_picture(image, pred, palette, classes, torch.rand(20, 30), label)
    gap, pixels, font = pictures.COMPOSITE_GAP, np.array(picture), pictures.font_of(14)
    # A 30-pixel panel's title takes a line per word (it was cut by the next panel); a wide one takes one.
    title = pictures.wrapped("GC attention (red: more weight)", font, 30)
    assert title == ["GC", "attention", "(red:", "more", "weight)"]
    assert pictures.wrapped("GC attention (red: more weight)", font, 256) == [
        "GC attention (red: more weight)"
    ]
    top = 22 + 17 * 4  # the panels start below their titles: image, ground truth, prediction, attention
    # Each panel has the room of its widest title word, so that none runs into the next panel's title.
    names = ("image", "ground truth", "prediction", "GC attention (red: more weight)")
    slot = max(int(font.getlength(line)) + 1 for name in names for line in pictures.wrapped(name, font, 30))
    assert slot > 30 and picture.width == 4 * slot + 3 * gap and picture.height == top + 20 + 8 + 20
    assert pixels[top + 5, 5].tolist() == [200, 200, 200]
    truth, prediction = slot + gap, 2 * (slot + gap)
    assert pixels[top, truth].tolist() == [0, 0, 0] and pixels[top + 5, truth + 25].tolist() == [255, 0, 0]
    assert pixels[top + 5, truth + 5].tolist() == pixels[top + 5, prediction + 25].tolist() == [0, 0, 255]
    # The legend lists the classes in the label or the prediction, not grass.
    assert [index for row in pictures.legend_rows([0, 2], classes, font, 500) for _, index in row] == [0, 2]
    assert len(pictures.legend_rows([0, 1, 2], classes, font, 60)) == 3  # wrapped at the width
    assert pixels[top + 20 + 8 + 8, 5].tolist() == [0, 0, 255]  # sky's swatch
    # A 1-pixel-wide image: the canvas holds its legend's names whole (they were cut at its edge).
    name = "a class of a rather long name"
    narrow = pictures.composite_picture(image[:, :, :1], pred[:, :1], palette, [name] * 3)
    assert narrow.width >= 18 + font.getlength(name)
