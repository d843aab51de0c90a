"""benchmark.py end to end at a tiny size: every figure of the JSON is there and makes sense; the count
of bytes saved for backward; the CUDA targets on made-up figures."""

import json
import math

import pytest
import torch
from torch import nn

import benchmark


def positive_number(value):
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture
def threads_put_back():
    """benchmark.main sets the process's thread count (--threads); the tests after it get theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_benchmark_reports_every_figure(tmp_path, capsys, threads_put_back, monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(benchmark, "MATMUL_SECONDS", 0.05)  # the peak's matmuls: a rate is all this needs
    out = tmp_path / "bench.json"
    # One thread: on a busy 2-core machine a second OpenMP thread waits for a core at every op.
    benchmark.main(
        ["--size", "64x96", "--timed", "1", "--warmup", "1", "--train-crop", "64", "--train-batch", "1",
         "--data-size", "64x128", "--data-samples", "1", "--threads", "1", "--no-compile", "--out", str(out)]
    )  # fmt: skip
    report = json.loads(out.read_text())

    protocol = report["protocol"]
    assert protocol["device"] == "cpu" and protocol["threads"] == 1
    assert protocol["inference"]["input_size"] == [64, 96] and protocol["inference"]["mode"] == "whole"
    assert protocol["training"]["batch"] == 1 and protocol["training"]["crop_size"] == [64, 64]
    assert protocol["comparable_with_published"] is False
    assert report["published"] == {"mem_gb": 5.8, "fps": 3.93, "hardware": "V100, fp32"}

    # FLOPs are shapes only: the convs of R-50-D8 at 64x96 are ~9.3 GFLOP; training is ~3x a forward
    # at 64x64 (and adds the auxiliary head).
    flops = report["flops_per_image"]
    assert 8e9 < flops["inference"] < 11e9
    assert 2.5 * flops["inference"] * 64 / 96 < flops["training"] < 3.5 * flops["inference"] * 64 / 96
    assert set(report["matmul_peak_flops_per_s"]) == {"fp32", "bf16"}
    assert all(positive_number(rate) for rate in report["matmul_peak_flops_per_s"].values())

    variants = {record["name"]: record for record in report["variants"]}
    # No compile, no fp16 on the CPU; checkpointing is a training variant of the default.
    assert list(variants) == ["fp32", "bf16", "bf16+channels_last", "bf16+channels_last+checkpointing"]
    assert sum(record["default"] for record in variants.values()) == 1
    for record in variants.values():
        assert record["error"] is None and record["batch"] == 1
        inference, training = record["inference"], record["training"]
        assert (inference is None) == record["checkpointing"]
        for key in ("images_per_s", "first_call_seconds", "speedup", "flops_per_s", "fraction_of_matmul_peak",
                    "cpu_share"):  # fmt: skip
            assert inference is None or positive_number(inference[key]), (record["name"], "inference", key)
            assert positive_number(training[key]), (record["name"], "training", key, training[key])
        for key in (
            "peak_memory_gb",
            "resident_before_gb",
            "saved_for_backward_gb",
            "weights_gradients_momentum_gb",
        ):
            assert positive_number(training[key]), (record["name"], key, training[key])
        assert math.isclose(
            training["estimated_training_memory_gb"],
            training["saved_for_backward_gb"] + training["weights_gradients_momentum_gb"],
        )
        assert len(training["seconds"]) == 1
        if inference:
            assert len(inference["seconds"]) == 1 and 0 <= inference["argmax_agreement"] <= 1
            # FLOP/s is FLOPs per image times images per second.
            assert math.isclose(inference["flops_per_s"], flops["inference"] * inference["images_per_s"])
    # R-50-D8 has ~49.6M parameters, each with a gradient and a momentum buffer: ~0.55 GB in fp32.
    assert 0.5 < variants["fp32"]["training"]["weights_gradients_momentum_gb"] < 0.6
    # bf16 autocast saves a bf16 copy of the weights (~0.09 GB) beside the activations.
    assert (
        variants["bf16"]["training"]["saved_for_backward_gb"]
        > variants["fp32"]["training"]["saved_for_backward_gb"]
    )
    checkpointing = variants["bf16+channels_last+checkpointing"]["training"]
    assert (
        checkpointing["saved_for_backward_gb"]
        < checkpointing["without_checkpointing"]["saved_for_backward_gb"]
    )
    assert positive_number(checkpointing["checkpointing_step_time_cost"])
    assert variants["fp32"]["inference"]["speedup"] == 1.0
    assert variants["fp32"]["inference"]["argmax_agreement"] == 1.0
    # bf16 rounds the random model's logits, which changes few argmaxes.
    assert variants["bf16"]["inference"]["argmax_agreement"] > 0.9

    data = report["data"]
    assert (
        data["image_size"] == [64, 128] and data["crop_size"] == [32, 64] and data["train_scale"] == [128, 64]
    )
    assert positive_number(data["train_transform_images_per_s"])
    assert positive_number(data["test_transform_images_per_s"])
    assert (data["opencv"] is None) == (data["opencv_note"] == "opencv not installed")

    assert len(report["targets"]) == 6
    # Speed at 64x96 says nothing of the row's sizes: reported, not judged. The memory estimate is judged.
    for target in report["targets"][:-1]:
        assert positive_number(target["measured"]) and target["passed"] is None, target
    assert report["targets"][-1]["passed"] in (True, False)
    # The memory target is counted at its own size (512x1024, batch 2, bf16) whatever the run's sizes.
    memory = report["memory_target"]
    assert memory["crop_size"] == [512, 1024] and memory["batch"] == 2 and memory["precision"] == "bf16"
    estimates = [memory[name]["estimated_training_memory_gb"] for name in ("default", "checkpointing")]
    assert 1.0 < estimates[1] < estimates[0] < 6.0
    memory_target = report["targets"][-1]
    assert (
        memory_target["target"].startswith("estimated training memory") and memory_target["threshold"] == 3.0
    )
    assert memory_target["measured"] in estimates
    printed = capsys.readouterr().out
    # The short table by default, each row labelled with the sizes it ran at; the wide one with --wide.
    assert "| Method | Backbone | Crop Size |" not in printed
    header = next(line for line in printed.splitlines() if line.startswith("variant "))
    assert (
        header.split()
        == "variant measured at inference img/s training img/s Mem (GB) inf % of peak train % of peak".split()
    )
    default = next(line for line in printed.splitlines() if line.startswith("bf16+channels_last (default) "))
    assert "inference 64x96, training 64x64 batch 1" in default
    assert printed.count("not judged at this size") == 5 and "MISS  inference" not in printed


def test_saved_for_backward_counts_each_storage_once_without_parameters():
    weight = nn.Parameter(torch.randn(4, 8))
    x = torch.randn(4, 8, requires_grad=True)
    count = dict(bytes=0)
    with benchmark.saved_for_backward(nn.ParameterList([weight]), count):
        a = x.sin()  # saves x: 4 x 8 x 4 bytes
        b = x[1:].cos()  # saves a view of x: the same storage, not counted again
        c = a.exp()  # saves its result: a new storage of 128 bytes
        d = c * weight  # saves c (counted) and the weight (a parameter: counted as weights, not here)
    (b.sum() + d.sum()).backward()
    assert count["bytes"] == 2 * 4 * 8 * 4


def test_activation_checkpointing_saves_less_and_fake_tensors_count_as_real_ones():
    row = dict(num_classes=19, depth=50, align_corners=False, aux_weight=0.4, block=dict(context="gc"))
    estimates = [benchmark.estimate_on_fake_tensors(row, "fp32", on, (32, 32), 1) for on in (False, True)]
    saved = [estimate["saved_for_backward_gb"] for estimate in estimates]
    assert 0 < saved[1] < saved[0]
    # The same step on real tensors saves the same bytes.
    model = benchmark.build_model(row, benchmark.make_variant("fp32", False), torch.device("cpu")).train()
    images, labels = torch.randn(1, 3, 32, 32), torch.randint(0, 19, (1, 32, 32))
    count = dict(bytes=0)
    with benchmark.saved_for_backward(model, count):
        benchmark.forward_loss(model, images, labels, row, torch.autocast("cpu", enabled=False))
    assert math.isclose(count["bytes"] / benchmark.GB, saved[0], rel_tol=1e-3)


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
        return dict(variant, batch=batch, default=default, inference=inference,
                    training=dict(peak_memory_gb=peak_memory_gb, fraction_of_matmul_peak=fraction))  # fmt: skip

    records = [record(False, 2, 4.5, default=True), record(True, 2, 2.5), record(False, 8, 15.0),
               record(False, 8, 16.0, cudnn_benchmark=True, fraction=0.25), record(False, 2, 5.0, cudnn_benchmark=True)]  # fmt: skip
    estimates = {
        "default": dict(estimated_training_memory_gb=3.2),
        "checkpointing": dict(estimated_training_memory_gb=1.9),
    }
    targets = {t["target"]: t for t in benchmark.check_targets(row, records, torch.device("cuda"), estimates)}
    assert len(targets) == 5
    peak = next(t for name, t in targets.items() if name.startswith("inference FLOP/s"))
    assert peak["measured"] == 0.5 and peak["threshold"] == 0.4 and peak["passed"]
    fps = next(t for name, t in targets.items() if "3.93" in name)
    assert math.isclose(fps["measured"], 120.0 / 3.93) and fps["threshold"] == 25 and fps["passed"]
    training = next(t for name, t in targets.items() if name.startswith("training FLOP/s"))
    assert "cudnn.benchmark" in training["target"] and training["measured"] == 0.25  # batch 8, not 2
    assert training["threshold"] == 0.3 and not training["passed"]
    measured = next(t for name, t in targets.items() if "max_memory_allocated" in name)
    assert measured["measured"] == 2.5 and measured["passed"] and "4.50 GB" in measured["note"]
    assert "with activation checkpointing" in measured["target"]
    estimated = next(t for name, t in targets.items() if name.startswith("estimated"))
    assert estimated["measured"] == 1.9 and estimated["passed"]


@pytest.mark.parametrize(
    "flag, value",
    [("--timed", "0"), ("--warmup", "0"), ("--train-batch", "0"), ("--data-samples", "-1"), ("--threads", "0"),
     ("--crop", "0"), ("--size", "12x"), ("--data-size", "0x5")],
)  # fmt: skip
def test_numeric_and_size_flags_are_checked_when_parsed(flag, value, capsys):
    with pytest.raises(SystemExit):
        benchmark.build_parser().parse_args([flag, value])
    assert f"argument {flag}: expected" in capsys.readouterr().err


def test_the_comparison_models_are_benchmarked_beside_their_published_figures():
    device, parser = torch.device("cpu"), benchmark.build_parser()
    published = {"nonlocal": (7.4, 2.72), "none": (5.7, 4.17), "gc": (5.8, 3.93)}
    for context, figures in published.items():
        row = benchmark.row_settings(parser.parse_args(["--context", context]), device)
        assert row["published"] == figures and row["block"]["context"] == context
        with torch.device("meta"):  # shapes only: nothing is allocated
            net = benchmark.build_model(row, benchmark.make_variant("fp32", False))
        assert hasattr(net.decode_head, "nl_block") == (context == "nonlocal")
        assert hasattr(net.decode_head, "gc_block") == (context == "gc")
    row = benchmark.row_settings(parser.parse_args(["--gc-pooling", "avg", "--gc-fusion", "mul"]), device)
    assert row["method"] == "gcnet-avg-mul" and row["published"] is None  # the original has no such row


def test_the_cudnn_fused_candidate_computes_what_the_folded_model_computes(randomize):
    # On a CPU FusedConvReLU runs its maths unfused: this checks the wiring (which convs take which ReLU
    # and residual); tests/test_cuda.py checks cuDNN's fused calls against it on a GPU.
    net = randomize(benchmark.GCNet(19), seed=3).eval()
    folded = benchmark.evaluate.fold_batchnorm(net)
    fused = benchmark.fuse_conv_relu(folded)
    kinds = [type(module) for module in fused.modules()]
    # 16 Bottlenecks x 3, the stem's 2nd and 3rd conv, the decode head's 3 and the auxiliary head's 1.
    assert kinds.count(benchmark.FusedBottleneck) == 16 and kinds.count(benchmark.FusedConvReLU) == 54
    assert kinds.count(nn.ReLU) == 2  # after the stem's 3-channel conv, and inside the GC block's bottleneck
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), folded(x), rtol=1e-5, atol=1e-5)
        dtypes = []
        fused.backbone.layer4.register_forward_hook(
            lambda module, inputs, output: dtypes.append(output.dtype)
        )
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reference, logits = folded(x), fused(x)
    assert dtypes == [torch.bfloat16]  # cast as autocast casts a convolution
    assert (logits.argmax(1) == reference.argmax(1)).float().mean() > 0.99
    with pytest.raises(ValueError, match="fold_batchnorm"):
        benchmark.fuse_conv_relu(net)  # BatchNorm not folded: refused, not dropped


def test_the_profile_names_operators_by_their_input_shapes():
    # What the H200 profile could not say: which add a kernel belongs to (a broadcast bias, or a residual).
    small, large = torch.randn(1, 3, 1, 1), torch.randn(2, 3, 40, 50)
    kernels, by_shape = benchmark.top_kernels(lambda: (large + small, large + large), torch.device("cpu"))
    assert kernels[0]["name"] == "aten::add" and kernels[0]["ms_per_call"] > 0
    names = [entry["name"] for entry in by_shape]
    assert "aten::add [[2, 3, 40, 50], [1, 3, 1, 1], []]" in names
    assert "aten::add [[2, 3, 40, 50], [2, 3, 40, 50], []]" in names
    assert sum(entry["share"] for entry in by_shape) == pytest.approx(1.0)
