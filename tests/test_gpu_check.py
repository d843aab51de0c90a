"""tools/gpu_check/, the project's own instrument, where it runs without a GPU: the targets judged on a
tiny benchmark run and on made-up CUDA figures, the top kernels, the cuDNN-fused candidate's wiring
(tests/test_cuda.py runs it), the synthetic Cityscapes, the loader's speed, a run's projected time."""

import contextlib
import io
import json
import math
import os

import pytest
import torch
from torch import nn

import benchmark
import data
import evaluate
import model
from model import GCNet
from tools import opencv_pipelines
from tools.gpu_check import cudnn_fused, loader_speed, run_time, synthetic_cityscapes, targets


def test_targets_on_a_tiny_run_are_reported_not_judged_but_the_memory_target(tmp_path, monkeypatch):
    monkeypatch.setattr(benchmark, "MATMUL_SECONDS", 0.05)
    monkeypatch.setattr(benchmark, "MATMUL_SIZE", dict(cpu=256, cuda=1024))
    flags = ["--size", "32x48", "--timed", "1", "--warmup", "1", "--train-crop", "32", "--train-batch", "1"]
    flags += ["--data-size", "32x64", "--data-samples", "1", "--threads", "1", "--no-compile", "--profile"]
    flags += ["--precision", "fp32", "--out", str(tmp_path / "bench.json")]
    threads, printed = torch.get_num_threads(), io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = targets.main(flags)
    torch.set_num_threads(threads)
    printed = printed.getvalue()
    assert report == json.loads((tmp_path / "bench.json").read_text())
    assert [record["name"] for record in report["variants"]] == [
        "fp32",
        "fp32+channels_last",
        "fp32+checkpointing",
    ]

    assert len(report["targets"]) == 6
    # Speed at 32x48 says nothing of the row's sizes: reported, not judged. The memory estimate is judged.
    for target in report["targets"][:-1]:
        assert target["measured"] > 0 and target["passed"] is None, target
    assert report["targets"][-1]["passed"] in (True, False)
    # The memory target is counted at its own size (512x1024, batch 2, bf16) whatever the run's sizes.
    memory = report["memory_target"]
    assert memory["crop_size"] == [512, 1024] and memory["batch"] == 2 and memory["precision"] == "bf16"
    estimates = [memory[name]["estimated_training_memory_gb"] for name in ("default", "checkpointing")]
    assert 0.1 < estimates[1] < estimates[0] < 6.0  # the tests' small model: under the real 2-4 GB
    memory_target = report["targets"][-1]
    assert (
        memory_target["target"].startswith("estimated training memory") and memory_target["threshold"] == 3.0
    )
    assert memory_target["measured"] in estimates
    assert printed.count("not judged at this size") == 5 and "MISS  inference" not in printed

    # OpenCV's data pipelines beside ours where it is installed; the top operators of each phase.
    assert list(report["data"]["beside"]) == (["opencv"] if opencv_pipelines.cv2 else [])
    for phase in ("inference", "training"):
        found = report["profile"][phase]
        assert found["kernels"] and found["operators_by_shape"]
        assert sum(entry["share"] for entry in found["operators_by_shape"]) <= 1 + 1e-9
        assert f"top operators of {phase} fp32 (share of their time, ms per call):" in printed
    assert "cudnn_fused" not in report  # CUDA only


def test_cuda_targets_on_made_up_figures():
    """The CUDA branch of check_targets, which no CPU run reaches: inference vs the matmul peak and
    25x the table's fps, train.py's step at batch 8 vs the matmul peak, and training memory with
    checkpointing where the default misses 3 GB."""
    row = dict(published=(5.8, 3.93), inference_comparable=True, comparable=True, train_crop=(512, 1024))

    def record(checkpointing, batch, peak_memory_gb, default=False, cudnn_benchmark=False, fraction=0.1):
        variant = benchmark.make_variant(
            "bf16", True, checkpointing=checkpointing, cudnn_benchmark=cudnn_benchmark
        )
        inference = dict(fraction_of_matmul_peak=0.5, images_per_s=120.0) if default else None
        training = dict(peak_memory_gb=peak_memory_gb, fraction_of_matmul_peak=fraction)
        return dict(variant, batch=batch, default=default, inference=inference, training=training)

    records = [record(False, 2, 4.5, default=True), record(True, 2, 2.5), record(False, 8, 15.0)]
    records += [
        record(False, 8, 16.0, cudnn_benchmark=True, fraction=0.25),
        record(False, 2, 5.0, cudnn_benchmark=True),
    ]
    estimates = [dict(estimated_training_memory_gb=3.2), dict(estimated_training_memory_gb=1.9)]
    found = {t["target"]: t for t in targets.check_targets(row, records, torch.device("cuda"), estimates)}
    assert len(found) == 5
    peak = next(t for name, t in found.items() if name.startswith("inference FLOP/s"))
    assert peak["measured"] == 0.5 and peak["threshold"] == 0.4 and peak["passed"]
    fps = next(t for name, t in found.items() if "3.93" in name)
    assert math.isclose(fps["measured"], 120.0 / 3.93) and fps["threshold"] == 25 and fps["passed"]
    training = next(t for name, t in found.items() if name.startswith("training FLOP/s"))
    assert "cudnn.benchmark" in training["target"] and training["measured"] == 0.25  # batch 8, not 2
    assert training["threshold"] == 0.3 and not training["passed"]
    measured = next(t for name, t in found.items() if "max_memory_allocated" in name)
    assert measured["measured"] == 2.5 and measured["passed"] and "4.50 GB" in measured["note"]
    assert "with activation checkpointing" in measured["target"]
    estimated = next(t for name, t in found.items() if name.startswith("estimated"))
    assert estimated["measured"] == 1.9 and estimated["passed"]


def test_the_profile_names_operators_by_their_input_shapes():
    # What the H200 profile could not say: which add a kernel belongs to (a broadcast bias, or a residual).
    small, large = torch.randn(1, 3, 1, 1), torch.randn(2, 3, 40, 50)
    found = targets.top_kernels(lambda: (large + small, large + large), torch.device("cpu"))
    assert found["kernels"][0]["name"] == "aten::add" and found["kernels"][0]["ms_per_call"] > 0
    names = [entry["name"] for entry in found["operators_by_shape"]]
    assert "aten::add [[2, 3, 40, 50], [1, 3, 1, 1], []]" in names
    assert "aten::add [[2, 3, 40, 50], [2, 3, 40, 50], []]" in names
    assert sum(entry["share"] for entry in found["operators_by_shape"]) == pytest.approx(1.0)


def test_the_cudnn_fused_candidate_fuses_every_conv_that_a_relu_follows():
    # Its maths runs on CUDA alone: tests/test_cuda.py checks its logits against the folded model's.
    net = GCNet(19).eval()
    fused = cudnn_fused.fuse_conv_relu(evaluate.fold_batchnorm(net))
    kinds = [type(module) for module in fused.modules()]
    # Every Bottleneck's 3, the stem's 2nd and 3rd conv, the decode head's 3 and the auxiliary head's 1.
    blocks = sum(model.STAGE_BLOCKS[50])
    assert kinds.count(cudnn_fused.FusedBottleneck) == blocks
    assert kinds.count(cudnn_fused.FusedConvReLU) == 3 * blocks + 6
    assert kinds.count(nn.ReLU) == 2  # after the stem's 3-channel conv, and inside the GC block's bottleneck
    with pytest.raises(ValueError, match="fold_batchnorm"):
        cudnn_fused.fuse_conv_relu(net)  # BatchNorm not folded: refused, not dropped


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
    out = tmp_path / "results" / "loader.json"  # its folder made
    root = synthetic_cityscapes.make(
        tmp_path / "cs", dict(train=12, val=1), distinct=3, size=(32, 64), workers=1
    )
    flags = ["--data-root", str(root), "--crop", "16x32", "--workers", "0", "1", "--batch-size", "2"]
    results = loader_speed.main([*flags, "--batches", "3", "--decoded", "--out", str(out)])
    assert [(r["workers"], r["decoded"]) for r in results] == [(0, False), (1, False), (0, True), (1, True)]
    assert all(r["samples_per_s"] > 0 and r["first_batch_s"] > 0 for r in results)
    assert json.loads(out.read_text())["results"][1]["workers"] == 1
    assert len(list((root / "decoded").rglob("*.npy"))) == 2 * 12  # the train split's images and labels


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
