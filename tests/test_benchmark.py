"""benchmark.py end to end at a tiny size: every figure of the JSON is there and makes sense."""

import json
import math

import torch

import benchmark


def positive_number(value):
    return (
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    )


def test_benchmark_reports_every_figure(tmp_path, capsys):
    torch.manual_seed(0)
    out = tmp_path / "bench.json"
    # One thread: on a busy 2-core machine a second OpenMP thread waits for a core at every op.
    benchmark.main(
        ["--size", "64x96", "--iters", "1", "--warmup", "1", "--train-crop", "64", "--train-batch", "1",
         "--data-size", "64x128", "--data-iters", "1", "--threads", "1", "--no-compile", "--out", str(out)]
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
    assert list(variants) == ["fp32", "bf16", "bf16+channels_last"]  # no compile, no fp16 on the CPU
    assert sum(record["default"] for record in variants.values()) == 1
    for record in variants.values():
        assert record["error"] is None
        inference, training = record["inference"], record["training"]
        for key in ("images_per_s", "first_call_seconds", "speedup", "flops_per_s", "fraction_of_matmul_peak",
                    "cpu_share"):  # fmt: skip
            assert positive_number(inference[key]), (record["name"], "inference", key, inference[key])
            assert positive_number(training[key]), (record["name"], "training", key, training[key])
        for key in ("peak_memory_gb", "resident_before_gb"):
            assert positive_number(training[key]), (record["name"], key, training[key])
        assert len(inference["seconds"]) == 1 and len(training["seconds"]) == 1
        assert 0 <= inference["argmax_agreement"] <= 1
        # FLOP/s is FLOPs per image times images per second.
        assert math.isclose(inference["flops_per_s"], flops["inference"] * inference["images_per_s"])
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

    assert len(report["targets"]) == 5
    for target in report["targets"]:
        assert positive_number(target["measured"]) and target["passed"] in (True, False)
    printed = capsys.readouterr().out
    assert "| Method | Backbone | Crop Size | Mem (GB) | Inf time (fps) |" in printed
    assert "PASS" in printed or "MISS" in printed
