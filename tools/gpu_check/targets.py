"""The project's own targets for benchmark.py's figures, judged PASS or MISS, with what the run found.

    python tools/gpu_check/targets.py                               # benchmark.py's default row
    python tools/gpu_check/targets.py --timed 10 --warmup 3 --wide --profile

It takes benchmark.py's flags (and --profile), runs benchmark.py (its table and JSON file) with
OpenCV's data pipelines (tools/opencv_pipelines.py) timed beside ours where OpenCV is installed, and
then on CUDA the cuDNN-fused inference candidate (cudnn_fused.py). It prints findings and the targets,
and adds both to the JSON file. Targets are benchmarks, not tests: a MISS is a finding, not an error.
They hold at the row's sizes; measured at others (--size, --train-crop, --train-batch), they are
printed as not judged, but for the memory target, which is counted at its own size:

- memory, any device: training at 512x1024, batch 2, bf16 needs at most 3 GB (the table: 5.8 GB),
  estimated on fake tensors and on CUDA measured, with activation checkpointing where the default
  misses it alone;
- CPU: the default variant runs at least 2x fp32 eager's speed for inference and for training, reaches
  90% of the matmul rate for inference and 80% for training, and agrees with fp32's argmax on 99.5%;
- CUDA: inference reaches 40% of the matmul rate and 25x the table's fps; train.py's step
  (cudnn.benchmark on) at the largest batch reaches 30% of it.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project's files, in the repository root
import benchmark  # noqa: E402
import evaluate  # noqa: E402
from benchmark import find  # noqa: E402
from tools import opencv_pipelines  # noqa: E402
from tools.gpu_check import cudnn_fused  # noqa: E402

# The memory target: the table's 512x1024 row (5.8 GB there) at its per-GPU batch, in bf16.
MEMORY_TARGET = dict(crop_size=(512, 1024), batch=2, precision="bf16", gb=3.0)


def main(argv=None):
    parser = benchmark.build_parser()
    parser.description = (
        "benchmark.py, then the project's targets for its figures (tools/gpu_check/targets.py)"
    )
    parser.add_argument("--profile", action="store_true", help="also the top kernels (on a CPU, operators)")
    args, device, row, variants = benchmark.parse_arguments(argv, parser)
    beside = dict(opencv=opencv_pipelines.pipelines) if opencv_pipelines.cv2 else None
    report = benchmark.measure_and_report(args, device, row, variants, data_beside=beside)
    if device.type == "cuda":
        report["cudnn_fused"] = measure_fused(row, device, args, find(report["variants"], default=True))
    if args.profile:
        report["profile"] = profile(row, device, find(variants, default=True))
    sizes = (MEMORY_TARGET["crop_size"], MEMORY_TARGET["batch"])
    estimates = {
        name: benchmark.estimate_on_fake_tensors(
            row, MEMORY_TARGET["precision"], name == "checkpointing", *sizes
        )
        for name in ("default", "checkpointing")
    }
    report["memory_target"] = dict(MEMORY_TARGET, **estimates)
    report["targets"] = check_targets(row, report["variants"], device, estimates)
    print_findings(report, device)
    return benchmark.write_report(report, args.out)


def measure_fused(row, device, args, default):
    """images/s of the default variant's inference with cudnn_fused.fuse_conv_relu, and its argmax
    agreement with fp32 eager; or the error it failed with."""
    variant = benchmark.make_variant(default["precision"], default["channels_last"])
    torch.backends.cudnn.benchmark = False  # as the default was measured
    try:
        fused = cudnn_fused.fuse_conv_relu(
            evaluate.fold_batchnorm(benchmark.build_model(row, variant, device))
        )
        timing = benchmark.measure_inference(
            variant, row, device, args.warmup, args.timed, False, model=fused
        )
        fp32 = benchmark.inference_call(benchmark.make_variant("fp32", False), row, device)()
    except Exception as error:
        return dict(error=f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}")
    finally:
        benchmark.release_memory(device)
    agreement = (timing["first_result"] == fp32).double().mean().item()
    ratio = timing["images_per_s"] / default["inference"]["images_per_s"]
    return dict(
        images_per_s=timing["images_per_s"], of_the_default=ratio, argmax_agreement_with_fp32=agreement
    )


def profile(row, device, default):
    """Where the time goes: the top kernels of the default's inference and of train.py's step
    (cudnn.benchmark on CUDA) at the largest training batch, each after warm-up calls."""
    calls = dict(inference=benchmark.inference_call(default, row, device))
    calls["training"] = benchmark.training_step(default, row, device, max(row["train_batches"]))[0]
    found = {}
    for phase, call in calls.items():
        torch.backends.cudnn.benchmark = phase == "training" and device.type == "cuda"
        for _ in range(2):  # the first SGD step makes the momentum buffers; cuDNN searches its algorithms
            call()
        found[phase] = top_kernels(call, device)
    benchmark.release_memory(device)
    return found


def top_kernels(function, device, calls=3, top=12):
    """The CUDA kernels (on a CPU, the operators) that took the most time over `calls` calls, and the
    operators by input shapes with the time of what they ran (on CUDA their kernels': which add, which
    convolution). Each entry has its share of the total and its ms per call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(calls):
            function()
        benchmark.synchronize(device)

    def ranked(times):
        total = sum(times.values()) or 1
        best = sorted(times.items(), key=lambda item: -item[1])[:top]
        return [dict(name=name, share=us / total, ms_per_call=us / 1000 / calls) for name, us in best]

    by_shape, cuda = profiler.key_averages(group_by_input_shape=True), torch.autograd.DeviceType.CUDA
    if device.type == "cuda":
        kernels = {e.key: e.self_device_time_total for e in profiler.key_averages() if e.device_type == cuda}
        shapes = {
            f"{e.key} {e.input_shapes}": e.self_device_time_total for e in by_shape if e.device_type != cuda
        }
    else:
        kernels = {e.key: e.self_cpu_time_total for e in profiler.key_averages()}
        shapes = {f"{e.key} {e.input_shapes}": e.self_cpu_time_total for e in by_shape}
    return dict(kernels=ranked(kernels), operators_by_shape=ranked(shapes))


def check_targets(row, records, device, estimates):
    """The targets of this device kind: measured value, threshold, passed True, False or None (not
    judged at this size). Training memory counts with activation checkpointing where the default alone
    misses the target."""
    default, memory, targets = find(records, default=True), MEMORY_TARGET, []
    inference, training = default["inference"], default["training"]
    peak, default_is = (
        f"the {default['precision']} matmul rate",
        f"of the default variant ({default['name']})",
    )
    size = f"{memory['crop_size'][0]}x{memory['crop_size'][1]} at batch {memory['batch']} in {memory['precision']}"

    def target(description, measured, comparison, threshold, note=None, judged=row["comparable"]):
        passed = measured >= threshold if comparison == ">=" else measured <= threshold
        figures = dict(measured=measured, comparison=comparison, threshold=threshold)
        targets.append(dict(target=description, **figures, passed=passed if judged else None, note=note))

    def memory_target(description, without, with_checkpointing):
        if with_checkpointing is None or without <= memory["gb"]:
            note = with_checkpointing and f"with activation checkpointing {with_checkpointing:.2f} GB"
            target(f"{description}, {size}", without, "<=", memory["gb"], note, judged=True)
        else:
            description += f", {size}, with activation checkpointing"
            target(description, with_checkpointing, "<=", memory["gb"], f"without it {without:.2f} GB", True)

    if device.type == "cpu":
        for description, measured, threshold in [
            (f"inference speed-up {default_is} over fp32 eager", inference["speedup"], 2.0),
            (f"inference FLOP/s {default_is} / {peak}", inference["fraction_of_matmul_peak"], 0.9),
            (f"argmax agreement {default_is} with fp32", inference["argmax_agreement"], 0.995),
            (f"training speed-up {default_is} over fp32 eager", training["speedup"], 2.0),
            (f"training FLOP/s {default_is} / {peak}", training["fraction_of_matmul_peak"], 0.8),
        ]:
            target(description, measured, ">=", threshold)
    else:
        target(f"inference FLOP/s {default_is} / {peak}", inference["fraction_of_matmul_peak"], ">=", 0.4)
        # Training as train.py runs it (cudnn.benchmark on) at the largest batch: 8 is the table's 4 x 2.
        same = dict(precision=default["precision"], channels_last=default["channels_last"], compiled=False)
        batch = max(record["batch"] or 0 for record in records)
        as_trained = find(records, **same, checkpointing=False, cudnn_benchmark=True, batch=batch)
        if as_trained and as_trained["training"]:
            fraction = as_trained["training"]["fraction_of_matmul_peak"]
            target(
                f"training FLOP/s of {as_trained['name']} (as train.py runs) / {peak}", fraction, ">=", 0.3
            )
        if row["published"] and row["inference_comparable"]:
            fps = row["published"][1]
            target(
                f"inference fps {default_is} / the table's {fps}", inference["images_per_s"] / fps, ">=", 25
            )
        # Measured: the default, if bf16, without and with checkpointing at the target's crop and batch.
        same.update(cudnn_benchmark=False)  # the table's memory was taken with it off
        found = [find(records, **same, checkpointing=on, batch=memory["batch"]) for on in (False, True)]
        peaks = [(record and record["training"] or {}).get("peak_memory_gb") for record in found]
        at_target = (
            default["precision"] == memory["precision"] and tuple(row["train_crop"]) == memory["crop_size"]
        )
        if at_target and peaks[0] is not None:
            memory_target("training memory (GB, torch.cuda.max_memory_allocated)", *peaks)
    estimated = [estimates[name]["estimated_training_memory_gb"] for name in ("default", "checkpointing")]
    memory_target(
        "estimated training memory (GB: saved for backward + weights + gradients + momentum)", *estimated
    )
    return targets


def print_findings(report, device):
    """What the figures say beside the table: channels_last on a CPU, the cost of activation
    checkpointing, the cuDNN-fused candidate, the default's training at each batch, the top kernels,
    the targets."""
    records, default = report["variants"], find(report["variants"], default=True)
    if not opencv_pipelines.cv2:
        print("data: opencv not installed, so our data pipelines were timed alone")
    plain, channels_last = find(records, name="bf16"), find(records, name="bf16+channels_last")
    if device.type == "cpu" and plain and channels_last and plain["inference"] and channels_last["inference"]:
        ratios = [
            channels_last[phase]["images_per_s"] / plain[phase]["images_per_s"] for phase in benchmark.PHASES
        ]
        print(
            f"channels_last on this CPU (bf16): inference x{ratios[0]:.2f}, training x{ratios[1]:.2f} "
            f"({'helps' if min(ratios) > 1.05 else 'does not help'})"
        )
    for record in records:
        same = {key: record[key] for key in ("precision", "channels_last", "batch")}
        without = find(records, **same, compiled=False, checkpointing=False, cudnn_benchmark=False)
        if record["checkpointing"] and record["training"] and without and without["training"]:
            kept, costs = record["training"], without["training"]
            print(
                f"activation checkpointing ({record['name']}): step time "
                f"x{costs['images_per_s'] / kept['images_per_s']:.2f}, saved for backward "
                f"{costs['saved_for_backward_gb']:.2f} -> {kept['saved_for_backward_gb']:.2f} GB, peak memory "
                f"{costs['peak_memory_gb']:.2f} -> {kept['peak_memory_gb']:.2f} GB"
            )
    fused = report.get("cudnn_fused")
    if fused:
        said = fused.get("error") and f"failed: {fused['error']}"
        said = said or (
            f"inference x{fused['of_the_default']:.2f} of the default, argmax agreement with fp32 "
            f"{fused['argmax_agreement_with_fp32']:.3%}"
        )
        print(f"cuDNN-fused conv+bias+ReLU (cudnn_fused.py) on {default['name']}: {said}")
    same = {key: default[key] for key in ("precision", "channels_last", "compiled", "checkpointing")}
    at_batches = [r for r in records if r["training"] and all(r[key] == same[key] for key in same)]
    if len(at_batches) > 1:
        rates = ", ".join(f"batch {r['batch']} {r['training']['images_per_s']:.2f}" for r in at_batches)
        print(f"training images/s of {default['name']}: {rates}")
    kinds = dict(
        kernels="kernels" if device.type == "cuda" else "operators",
        operators_by_shape="operators by input shapes",
    )
    for phase, found in report.get("profile", {}).items():
        for key, what in kinds.items():
            print(f"top {what} of {phase} {default['name']} (share of their time, ms per call):")
            for entry in found[key]:
                print(f"  {entry['share']:6.1%} {entry['ms_per_call']:8.2f}  {entry['name'][:150]}")
    print("targets (benchmarks, not tests):")
    for target in report["targets"]:
        note = f"; {target['note']}" if target["note"] else ""
        verdict = {True: "PASS", False: "MISS", None: "not judged at this size:"}[target["passed"]]
        print(
            f"  {verdict}  {target['target']}: {target['measured']:.4f} "
            f"(target {target['comparison']} {target['threshold']}){note}"
        )


if __name__ == "__main__":
    main()
