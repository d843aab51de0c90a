"""benchmark.py end to end at a tiny size, one run shared by the tests: every figure of the JSON is there
and makes sense; the count of bytes saved for backward; every flag and size checked before anything
is measured."""

import contextlib
import io
import json
import math
import re

import pytest
import torch
from torch import nn

import benchmark
import model
from model import GCNet


def positive_number(value):
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(the report main returned, what it printed, the JSON file) of one run at tiny sizes."""
    out = tmp_path_factory.mktemp("benchmark") / "bench.json"
    # One thread: on a busy 2-core machine a second OpenMP thread waits for a core at every op.
    flags = ["--size", "32x48", "--timed", "1", "--warmup", "1", "--train-crop", "32", "--train-batch", "1"]
    flags += [
        "--data-size",
        "32x64",
        "--data-samples",
        "1",
        "--threads",
        "1",
        "--no-compile",
        "--ms-flip",
        "--out",
        str(out),
    ]
    threads, printed = torch.get_num_threads(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(printed):
        # The peak's matmuls: a rate is all this needs.
        patch.setattr(benchmark, "MATMUL_SECONDS", 0.05)
        patch.setattr(benchmark, "MATMUL_SIZE", dict(cpu=256, cuda=1024))
        torch.manual_seed(0)
        report = benchmark.main(flags)
    torch.set_num_threads(threads)  # main set it (--threads); the tests after it get theirs back
    return report, printed.getvalue(), json.loads(out.read_text())


def conv_flops(net, size):
    """2 x multiply-adds of every conv of `net` on an image of `size`, read from its output's shape."""
    total = []

    def count(conv, inputs, output):
        total.append(2 * output.numel() * conv.in_channels // conv.groups * math.prod(conv.kernel_size))

    for conv in (module for module in net.modules() if isinstance(module, nn.Conv2d)):
        conv.register_forward_hook(count)
    with torch.no_grad():
        net(torch.zeros(1, 3, *size))
    return sum(total)


def test_benchmark_reports_every_figure(run):
    report, printed, written = run
    assert report == written
    protocol, row = report["protocol"], report["row"]
    assert protocol["device"] == "cpu" and protocol["threads"] == 1 and protocol["timed"] == 1
    assert row["input_size"] == [32, 48] and row["test_mode"] == "whole"
    assert row["train_batches"] == [1] and row["train_crop"] == [32, 32]
    assert row["comparable"] is False and row["published"] == [5.8, 3.93]

    # FLOPs are shapes only: those of the convs, counted here from their outputs; training is ~3x a
    # forward at 32x32 (and adds the auxiliary head).
    flops = report["flops_per_image"]
    assert math.isclose(flops["inference"], conv_flops(GCNet(19).eval(), (32, 48)), rel_tol=0.01)
    assert 2.5 * flops["inference"] * 32 / 48 < flops["training"] < 3.5 * flops["inference"] * 32 / 48
    assert set(report["matmul_peak_flops_per_s"]) == {"fp32", "bf16"}
    assert all(positive_number(rate) for rate in report["matmul_peak_flops_per_s"].values())

    variants = {record["name"]: record for record in report["variants"]}
    # No compile, no fp16 on the CPU; checkpointing is a training variant of the default (of bf16 where
    # the default is fp32: a CPU without native bf16).
    assert list(variants)[:3] == ["fp32", "bf16", "bf16+channels_last"]
    assert list(variants)[-1] == "bf16+channels_last+checkpointing"
    default = [name for name, record in variants.items() if record["default"]]
    assert default in (["fp32"], ["bf16+channels_last"]) and len(variants) == 4
    for record in variants.values():
        assert record["error"] is None and record["batch"] == 1
        inference, training = record["inference"], record["training"]
        assert (inference is None) == record["checkpointing"]
        for key in (
            "images_per_s",
            "first_call_seconds",
            "speedup",
            "flops_per_s",
            "fraction_of_matmul_peak",
        ):
            assert inference is None or positive_number(inference[key]), (record["name"], "inference", key)
            assert positive_number(training[key]), (record["name"], "training", key, training[key])
        assert inference is None or positive_number(inference["cpu_share"])
        assert positive_number(training["cpu_share"])
        for key in ("peak_memory_gb", "saved_for_backward_gb", "weights_gradients_momentum_gb"):
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
    # Each parameter has a gradient and a momentum buffer beside it, in fp32 (and BatchNorm its statistics).
    state = 3 * 4 * model.count_parameters(GCNet(19)) / 1024**3
    assert state < variants["fp32"]["training"]["weights_gradients_momentum_gb"] < 1.001 * state
    # bf16 autocast saves a bf16 copy of the weights (~0.09 GB) beside the activations.
    saved = {name: variants[name]["training"]["saved_for_backward_gb"] for name in variants}
    assert saved["bf16"] > saved["fp32"]
    assert saved["bf16+channels_last+checkpointing"] < saved["bf16+channels_last"]
    assert variants["fp32"]["inference"]["speedup"] == 1.0
    assert variants["fp32"]["inference"]["argmax_agreement"] == 1.0
    # bf16 rounds the random model's logits, which changes few argmaxes.
    assert variants["bf16"]["inference"]["argmax_agreement"] > 0.9

    # One evaluate.py --ms-flip prediction, in the default variant: its peak memory is the process's.
    assert positive_number(report["ms_flip_peak_memory_gb"])
    default = next(name for name, record in variants.items() if record["default"])
    assert re.search(rf"ms\+flip +{re.escape(default)} +peak memory \d+\.\d\d GB, one 32x48 image", printed)

    data = report["data"]
    assert (
        data["image_size"] == [32, 64] and data["crop_size"] == [16, 32] and data["train_scale"] == [64, 32]
    )
    for pipeline in ("train", "test", "train_decoded", "test_decoded"):
        assert positive_number(data[f"{pipeline}_transform_images_per_s"])
    # Training's loader at batch 8 with 1 and 2 workers, from the PNGs and from their decoded copy, and
    # the cores one worker's rate says it takes to feed 160 samples/s.
    for source in ("files", "decoded"):
        assert len(data["loader_samples_per_s"][source]) == 2
        assert all(map(positive_number, data["loader_samples_per_s"][source]))
        cores = data["cores_to_feed"][source]
        assert cores == math.ceil(160 / data["loader_samples_per_s"][source][0]) and cores >= 1
    assert data["cores_to_feed"]["rate"] == benchmark.FEED_RATE == 160
    assert re.search(r"data +the same from the decoded copy: \d+\.\d\d / \d+\.\d\d images/s", printed)
    assert re.search(
        r"loader +training samples/s at batch 8 with 1 / 2 workers: files [\d.]+ / [\d.]+, decoded", printed
    )
    assert data["beside"] == {}  # other libraries only when asked (tools/gpu_check/targets.py: OpenCV)


def test_the_table_labels_each_variant_with_its_sizes_and_shows_the_published_row(run):
    report, printed, _ = run
    lines = printed.splitlines()
    # The short table by default (the wide one, with every figure, with --wide).
    assert not any(line.startswith("| Method ") for line in lines)
    header = next(line for line in lines if line.startswith("| Mem (GB) "))
    assert [cell.strip() for cell in header.strip("|").split("|")] == [
        "Mem (GB)",
        "Inf time (fps)",
        "variant",
        "measured at",
        "inf % of matmul peak",
        "train img/s",
        "train % of matmul peak",
    ]
    default = next(record["name"] for record in report["variants"] if record["default"])
    line = next(line for line in lines if f"| {default} (default) " in line)
    assert "| inference 32x48, training 32x32 batch 1 " in line
    assert next(line for line in lines if "published: V100, fp32" in line).startswith("| 5.8 ")
    assert not any("PASS" in line or "MISS" in line for line in lines)  # targets: tools/gpu_check/targets.py


def test_the_wide_table_has_every_figure():
    record = dict(benchmark.make_variant("fp32", False), default=True, error="training: boom", batch=None)
    record.update(inference=dict(images_per_s=2.0, speedup=1.0, flops_per_s=3e12), training=None)
    row = dict(model="GCNet", backbone="R-50-D8", crop_size=(512, 1024), published=(5.8, 3.93))
    row.update(input_size=(64, 96), train_crop=(64, 64))
    header, rule, published, line = benchmark.results_table(row, [record], wide=True).splitlines()
    assert header.startswith("| Method | Backbone | Crop Size | Mem (GB) | Inf time (fps) | variant ")
    assert "| estimated memory (GB) |" in header and set(rule) <= {"|", "-", " "}
    assert (
        published.startswith("| GCNet  | R-50-D8  | 512x1024  | 5.8 ")
        and "published: V100, fp32" in published
    )
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[:7] == [
        "GCNet",
        "R-50-D8",
        "512x1024",
        "-",
        "2.000",
        "fp32 (default) [training: boom]",
        "inference 64x96",
    ]
    assert cells[7:9] == ["1.00x", "3.00 TFLOP/s"]


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


# (flags, what the one line of the refusal says). Each is refused before anything is measured.
REFUSED = [
    (["--timed", "0"], "argument --timed: expected an integer >= 1"),
    (["--warmup", "0"], "argument --warmup: expected an integer >= 1"),
    (["--train-batch", "0"], "argument --train-batch: expected an integer >= 1"),
    (["--data-samples", "-1"], "argument --data-samples: expected an integer >= 1"),
    (["--threads", "0"], "argument --threads: expected"),
    (["--crop", "0"], "argument --crop: expected"),
    (["--size", "12x"], "argument --size: expected"),
    (["--data-size", "0x5"], "argument --data-size: expected"),
    (["--data-size", "1x64"], "--data-size 1x64: expected at least 2x2"),
    (
        ["--dataset", "ade20k", "--crop", "769"],
        "--crop 769x769: the results table has ade20k rows for crops 512x512",
    ),
    (["--context", "none", "--gc-pooling", "avg"], "--gc-pooling and --gc-fusion switch the GC block"),
    (["--device", "cpu", "--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    (["--out", "tests"], "argument --out: tests is a directory; pass a file name"),  # not after the run
    (
        ["--train-crop", "8", "--train-batch", "1"],
        "--train-crop 8x8 at --train-batch 1 leaves training BatchNorm",
    ),
    (
        ["--train-batch", "2", "100000"],
        "--train-batch 100000: training at 512x1024 in bf16 needs an estimated",
    ),
]


@pytest.mark.parametrize("flags, said", REFUSED, ids=[" ".join(flags) for flags, _ in REFUSED])
def test_bad_flags_and_sizes_are_refused_before_anything_is_measured(flags, said, capsys, monkeypatch):
    def measured(*args, **kwargs):
        raise AssertionError("measured before the flags were checked")

    for name in ("matmul_rate", "measure_variants", "benchmark_data"):
        monkeypatch.setattr(benchmark, name, measured)
    with pytest.raises(SystemExit) as exit:
        benchmark.main(["--device", "cpu", *flags])
    assert exit.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]  # argparse's "PROG: error: ..." under the usage
    assert ": error: " in error and said in error, error


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
