"""The README's path on toy data: train 20 iterations (the loss falls), evaluate the checkpoint as the README
does (no flags: the newest best.pth, the data it was trained on), look at the outputs, predict from Python."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import data
import evaluate
import pictures
import train


def test_train_then_evaluate_writes_results_and_pictures(tmp_path, capsys, monkeypatch, toy_copy):
    root = toy_copy(tmp_path, val_images=2)  # as data.py writes it, in the Cityscapes layout
    work_dir = tmp_path / "work_dirs" / "run"
    # The default precision (bf16 where the CPU has it), so that BatchNorm folding is in play.
    fast = ["--crop", "64", "--batch-size", "4", "--workers", "0", "--log-interval", "1"]
    train.main(fast + ["--data-root", str(root), "--work-dir", str(work_dir), "--iters", "20",
                       "--eval-interval", "10", "--pictures"])  # fmt: skip
    said = capsys.readouterr().out
    assert (
        f"pictures of the last validation (labels, overlay, attention, and all three beside the ground truth in <name>_composite.png; the confusion matrix in confusion.png) in {work_dir / 'pictures'}"
        in said
    )
    assert f"evaluate with: python evaluate.py --checkpoint {work_dir / 'best.pth'} --ms-flip" in said
    assert f"the losses, learning rate and validation mIoU: {work_dir / 'log.png'}" in said
    assert Image.open(work_dir / "log.png").width == pictures.PLOT_WIDTH

    # The loss falls. Single steps are noisy at batch 4; the means of the first and last ten are not.
    log = [json.loads(line) for line in (work_dir / "log.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in log if "loss" in record]
    assert len(losses) == 20 and sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses
    # It validated at 10 and 20 and wrote its checkpoints, whole and plainly named, and pictures.
    assert [record["iteration"] for record in log if "mIoU" in record] == [10, 20]
    # Its validation loss, the decode head's cross-entropy over the val split, is printed and logged.
    val_losses = [record["val_loss"] for record in log if "mIoU" in record]
    assert all(0 < loss < 10 for loss in val_losses) and f"iteration 20: val loss {val_losses[1]:.4f}" in said
    checkpoint = torch.load(work_dir / "iter_20.pth", weights_only=True)
    assert checkpoint["iteration"] == 20 and checkpoint["recipe"]["dataset"] == "toy"
    assert not any(key.startswith(("module.", "_orig_mod.")) for key in checkpoint["state_dict"])
    assert {"optimizer", "scaler", "rng", "meta"} <= checkpoint.keys()
    assert (work_dir / "best.pth").exists() and not list(work_dir.glob(".*.tmp"))
    log_miou = [record["mIoU"] for record in log if "mIoU" in record]
    best_miou = max(log_miou)
    val_set = data.build_dataset("toy", str(root), "val")
    assert (
        Image.open(work_dir / "pictures" / "confusion.png").mode == "RGB"
    )  # the toy demo's pictures show it
    for _, label, meta in (val_set[i] for i in range(len(val_set))):
        prediction = Image.open(work_dir / "pictures" / f"{meta['name']}_pred.png")
        assert prediction.mode == "P" and prediction.size == (label.shape[1], label.shape[0])
        palette = np.array(prediction.getpalette()[: 3 * 5]).reshape(5, 3).tolist()
        assert palette == data.TOY_PALETTE
        for kind in ("overlay", "attention"):
            (picture,) = (work_dir / "pictures").glob(f"{meta['name']}_{kind}.*")
            assert Image.open(picture).size == (256, 128)
        # The composite: image, ground truth, prediction and attention side by side, a legend below.
        composite = Image.open(work_dir / "pictures" / f"{meta['name']}_composite.png")
        assert composite.width == 4 * 256 + 3 * pictures.COMPOSITE_GAP and composite.height > 128 + 20

    # evaluate.py as the README runs it, with no flags: it names the best.pth it takes, reads the data where
    # the run did, and gives training's validation score, to the bit, with the same settings.
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "results.json"
    capsys.readouterr()
    evaluate.main(["--workers", "0", "--out", str(out), "--save-dir", str(tmp_path / "pictures")])
    said = capsys.readouterr().out
    assert "no --checkpoint: evaluating work_dirs/run/best.pth, the newest of 1 work_dirs/*/best.pth" in said
    results = json.loads(out.read_text())
    assert results["num_images"] == 2 and results["dataset"] == "toy"
    assert results["mIoU"] == best_miou  # best.pth: the better of the two validations
    assert "at mIoU" in said and "with the same settings: expect the same score" in said
    assert 0 <= results["aAcc"] <= 100 and len(results["per_class"]) == 5
    matrix = torch.tensor(results["confusion_matrix"])
    assert matrix.sum() == (torch.stack([val_set[i][1] for i in range(2)]) != 255).sum()
    assert len(list((tmp_path / "pictures").glob("*_attention.png"))) == 2
    assert len(list((tmp_path / "pictures").glob("*_composite.png"))) == 2
    assert Image.open(tmp_path / "pictures" / "confusion.png").mode == "RGB"
    # F1, precision and recall beside IoU and Acc, and the loss, which the last validation also measured
    assert {"F1", "Precision", "Recall"} <= results["per_class"]["disc"].keys()
    assert results["mRecall"] == results["mAcc"] and 0 < results["mF1"] <= 100
    assert results["loss"] == pytest.approx(val_losses[1] if best_miou == log_miou[1] else val_losses[0])

    # Three lines of Python predict an image as evaluate.py did.
    predictor = evaluate.Predictor(work_dir / "best.pth", ["--workers", "0"])
    labels = predictor(val_set.pairs[0][0])
    written = Image.open(tmp_path / "pictures" / f"{val_set[0][2]['name']}_pred.png")
    assert (
        torch.equal(labels, torch.from_numpy(np.array(written)).long())
        and predictor.classes == data.TOY_CLASSES
    )
