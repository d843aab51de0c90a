"""The pictures a user looks at (confusion matrix, a run's log) and the tools beside the project
(tools/plot_log.py, tools/export.py), on small inputs."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import pictures
from model import GCNet
from tools import export, plot_log


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
    # 150 classes: small cells, numbered; the names are in the list beside, which fits in the picture
    big = torch.eye(150, dtype=torch.int64) * 100
    big[7, 9] = 300  # class 7 is mostly taken for class 9
    names = [f"class{index}" for index in range(150)]
    picture = pictures.confusion_picture(big, names)
    assert pictures.most_confused_lines(big.double() / big.sum(1, keepdim=True), names)[1] == (
        "class7 -> class9  75.0%"
    )
    assert 150 * pictures.NUMBERED_CELL_PIXELS < picture.height < 800 and picture.width < 1200


def test_the_log_picture_plots_each_series_and_read_log_skips_a_torn_line(tmp_path):
    records = [
        dict(iteration=i, loss=1.0 / i, decode_loss=0.8 / i, lr=0.01 * (1 - i / 100)) for i in range(1, 101)
    ]
    records += [dict(iteration=i, mIoU=float(i) / 2, val_loss=2.0 / i) for i in (50, 100)]
    records.append(dict(iteration=50, mIoU=30.0, val_loss=0.05))  # a resumed run validated 50 again
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"iteration": 101, "lo')
    read, unreadable = checkpoints.read_log(log)
    assert read == records and unreadable == 1
    picture = np.array(pictures.log_picture(read))
    for colour in [(31, 119, 180), (158, 202, 225), (230, 85, 13), (49, 163, 84), (117, 107, 177)]:
        assert (picture == colour).all(axis=2).sum() > 20, colour  # each series is drawn
    # a repeated iteration is plotted once, with its later record
    validations = pictures.split_log(read)[1]
    assert pictures.points(validations, "mIoU") == [(50, 30.0), (100, 50.0)]
    assert pictures.nice_ticks(0, 0.043) == [0, 0.01, 0.02, 0.03, 0.04]
    assert pictures.nice_ticks(0, 300) == [0, 50, 100, 150, 200, 250, 300]
    # the tool: a work dir in, log.png beside its log out; a folder without a log is said in words
    assert plot_log.main([str(tmp_path)]) == tmp_path / "log.png"
    assert Image.open(tmp_path / "log.png").size == (pictures.PLOT_WIDTH, picture.shape[0])
    with pytest.raises(SystemExit, match="nothing not found: pass the work dir of a train.py run"):
        plot_log.main([str(tmp_path / "nothing")])


def test_the_export_reloaded_gives_the_models_logits_at_two_sizes(tmp_path, randomize, capsys):
    net = randomize(GCNet(19).eval())
    # an official file's name: the tool reads the row (Cityscapes 512x1024) from it, as evaluate.py does
    source = tmp_path / "gcnet_r50-d8_512x1024_40k_cityscapes_20200618_074450-ef8f069b.pth"
    torch.save({"state_dict": net.state_dict(), "meta": {}}, source)
    out = export.main([str(source), str(tmp_path / "gcnet.pt2"), "--check-sizes", "64x96", "77x130"])
    said = capsys.readouterr().out
    assert "reloaded and checked at 77x130: largest logit difference" in said and "19 classes" in said
    # independently of the tool's own check: torch alone loads it, and it is the model with the
    # normalisation in front, at sizes it was not traced at, for a batch of 3
    extra = {"gcnet.json": ""}
    program = torch.export.load(str(out), extra_files=extra).module()
    about = json.loads(extra["gcnet.json"])
    assert about["scale"] == [2048, 1024] and about["align_corners"] is False and len(about["classes"]) == 19
    for size in ((3, 3, 40, 56), (1, 3, 81, 33)):
        image = torch.rand(size) * 255
        mean, std = torch.tensor(about["mean"]).view(1, 3, 1, 1), torch.tensor(about["std"]).view(1, 3, 1, 1)
        with torch.no_grad():
            expected = net((image - mean) / std)
        assert torch.allclose(program(image), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="exists: pass another path, or --overwrite"):
        export.main([str(source), str(out)])
    with pytest.raises(SystemExit, match="name the file .pt2"):
        export.main([str(source), str(tmp_path / "gcnet.onnx")])
