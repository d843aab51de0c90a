"""The tools behind tools/gpu_check/check_gpu.sh that run anywhere: the synthetic Cityscapes, the loader's speed,
the projection of a run's wall time."""

import json
import os

import pytest
import torch

import data
from tools.gpu_check import loader_speed, run_time, synthetic_cityscapes


def test_synthetic_cityscapes_is_a_real_layout_of_links(tmp_path):
    threads = torch.get_num_threads()
    root = synthetic_cityscapes.make(
        tmp_path / "cs", dict(train=5, val=2), distinct=2, size=(32, 64), workers=1
    )
    assert torch.get_num_threads() == threads  # the tests after this one keep their threads
    train_set = data.build_dataset("cityscapes", root, "train", crop_size=(16, 32))
    val_set = data.build_dataset("cityscapes", root, "val")
    assert (len(train_set), len(val_set)) == (5, 2)
    first, fifth = (synthetic_cityscapes.sample_paths(root, "train", i)[0] for i in (0, 4))
    assert os.path.samefile(first, fifth)  # sample 4 is a link to sample 0 (4 mod 2)
    label = data.read_label(str(synthetic_cityscapes.sample_paths(root, "train", 1)[1]))
    values = set(label.unique().tolist())
    assert data.IGNORE_INDEX in values and values - {data.IGNORE_INDEX} <= set(range(19))
    image, crop_label = train_set[0]
    assert image.shape == (3, 16, 32) and crop_label.shape == (16, 32)
    # A second call keeps what exists.
    mtime = first.stat().st_mtime_ns
    synthetic_cityscapes.make(root, dict(train=5, val=2), distinct=2, size=(32, 64), workers=1)
    assert first.stat().st_mtime_ns == mtime


def test_loader_speed_times_train_py_s_loader(tmp_path):
    out = tmp_path / "loader.json"
    root = synthetic_cityscapes.make(
        tmp_path / "cs", dict(train=12, val=1), distinct=3, size=(32, 64), workers=1
    )
    results = loader_speed.main(["--data-root", str(root), "--crop", "16x32", "--workers", "0", "1",
                                 "--batch-size", "2", "--batches", "3", "--out", str(out)])  # fmt: skip
    assert [r["workers"] for r in results] == [0, 1]
    assert all(r["samples_per_s"] > 0 and r["first_batch_s"] > 0 for r in results)
    assert json.loads(out.read_text())["results"][1]["workers"] == 1


def test_run_time_projects_a_whole_run():
    records = [dict(iteration=i, data_time=0.5 if i <= 2 else 0.01, step_time=0.09) for i in range(1, 31)]
    records.append(dict(iteration=30, mIoU=1.0, val_seconds=12.0))
    result = run_time.project(records, iters=40000, validations=10, skip=2)
    assert result["records"] == 28 and result["data_time"] == pytest.approx(0.01)
    assert result["seconds"] == pytest.approx(40000 * 0.1 + 10 * 12.0)
    assert result["bound"].startswith("compute")
    slow_loader = [dict(r, data_time=0.05) if "step_time" in r else r for r in records]
    assert run_time.project(slow_loader, 40000, 10, 2)["bound"] == "the loader"
    with pytest.raises(SystemExit, match="no training records"):
        run_time.project(records, 40000, 10, skip=100)
