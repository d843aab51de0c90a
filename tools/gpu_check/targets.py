"""benchmark.py's run, then its figures judged against the project's targets (check_targets), PASS or MISS.

    python tools/gpu_check/targets.py --timed 10 --warmup 3 --wide --profile    # benchmark.py's flags

Beside benchmark.py's run it times OpenCV's data pipelines (tools/opencv_pipelines.py) where OpenCV
is installed, the cuDNN-fused candidate (cudnn_fused.py) on CUDA and, with --profile, the top kernels,
and it adds them, the findings and the targets to the JSON file. A MISS is a finding, not an error.
Targets hold at the row's sizes; measured at others they are not judged, but for training memory,
which is counted at its own size (the table's 512x1024 row at batch 2, in bf16).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project's files, in the repository root
import benchmark  # noqa: E402
import evaluate  # noqa: E402
import runtime  # noqa: E402
from tools import opencv_pipelines  # noqa: E402
from tools.gpu_check import cudnn_fused  # noqa: E402

# The memory target: the table's 512x1024 row (5.8 GB there) at its per-GPU batch, in bf16.
MEMORY_TARGET = dict(crop_size=(512, 1024), batch=2, precision="bf16", gb=3.0)


def find(records, **fields):
    return next((r for r in records if all(r[key] == value for key, value in fields.items())), None)


def main(argv=None):
    parser = benchmark.build_parser()
    parser.add_argument("--profile", action="store_true", help="also the top kernels (on a CPU, operators)")
    args, device, row, variants = benchmark.parse_arguments(argv, parser)
    beside = [("opencv", opencv_pipelines.pipelines)] if opencv_pipelines.cv2 else []
    report = benchmark.measure_and_report(args, device, row, variants, data_beside=beside)
    default = find(report["variants"], default=True)
    if device.type == "cuda":
        report["cudnn_fused"] = measure_fused(row, device, args, default)
    if args.profile:
        report["profile"] = profile(row, device, default)
    sizes = (MEMORY_TARGET["crop_size"], MEMORY_TARGET["batch"])
    precision = MEMORY_TARGET["precision"]
    estimates = [benchmark.estimate_on_fake_tensors(row, precision, on, *sizes) for on in (False, True)]
    report["memory_target"] = dict(MEMORY_TARGET, default=estimates[0], checkpointing=estimates[1])
    report["targets"] = check_targets(row, report["variants"], device, estimates)
    print_findings(report, device, default)
    return benchmark.write_report(report, args.out, "added the targets to")


def measure_fused(row, device, args, default):
    """The default's inference with cudnn_fused.fuse_conv_relu: images/s, its ratio to the default's and
    its argmax agreement with fp32 eager; or the error it failed with."""
    variant = benchmark.make_variant(default["precision"], default["channels_last"])
    torch.backends.cudnn.benchmark = False  # as the default was measured
    try:
        model = evaluate.fold_batchnorm(benchmark.build_model(row, variant, device))
        fused = cudnn_fused.fuse_conv_relu(model)
        timing = benchmark.measure_inference(variant, row, device, args.warmup, args.timed, False, fused)
        fp32 = benchmark.inference_call(benchmark.make_variant("fp32", False), row, device)()
    except Exception as error:
        return dict(error=benchmark.error_line(error))
    finally:
        runtime.release_memory(device)
    figures = dict(images_per_s=timing["images_per_s"])
    figures["of_the_default"] = timing["images_per_s"] / default["inference"]["images_per_s"]
    return dict(figures, argmax_agreement=(timing["first_result"] == fp32).double().mean().item())


def profile(row, device, default):
    """Where the time goes: the top kernels of the default's inference and of train.py's step
    (cudnn.benchmark on CUDA) at the largest training batch, each after two warm-up calls."""
    calls = dict(inference=benchmark.inference_call(default, row, device))
    calls["training"] = benchmark.training_step(default, row, device, max(row["train_batches"]))[0]
    found = {}
    for phase, call in calls.items():
        torch.backends.cudnn.benchmark = phase == "training" and device.type == "cuda"
        for _ in range(2):  # cuDNN's search; the first SGD step makes the momentum buffers
            call()
        found[phase] = top_kernels(call, device)
    runtime.release_memory(device)
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
    peak = f"the {default['precision']} matmul rate"
    default_is = f"of the default variant ({default['name']})"
    size = "{}x{} at batch {batch} in {precision}".format(*memory["crop_size"], **memory)

    def target(description, measured, threshold, at_most=False, note=None, judged=row["comparable"]):
        passed = measured <= threshold if at_most else measured >= threshold
        figures = dict(measured=measured, comparison="<=" if at_most else ">=", threshold=threshold)
        targets.append(dict(target=description, **figures, passed=passed if judged else None, note=note))

    def memory_target(description, without, checkpointing):
        if checkpointing is None or without <= memory["gb"]:
            note = checkpointing and f"with activation checkpointing {checkpointing:.2f} GB"
            return target(f"{description}, {size}", without, memory["gb"], True, note, judged=True)
        note = f"without it {without:.2f} GB"
        description = f"{description}, {size}, with activation checkpointing"
        target(description, checkpointing, memory["gb"], True, note, judged=True)

    if device.type == "cpu":
        target(f"inference speed-up {default_is} over fp32 eager", inference["speedup"], 2.0)
        target(f"inference FLOP/s {default_is} / {peak}", inference["fraction_of_matmul_peak"], 0.9)
        target(f"argmax agreement {default_is} with fp32", inference["argmax_agreement"], 0.995)
        target(f"training speed-up {default_is} over fp32 eager", training["speedup"], 2.0)
        target(f"training FLOP/s {default_is} / {peak}", training["fraction_of_matmul_peak"], 0.8)
    else:
        target(f"inference FLOP/s {default_is} / {peak}", inference["fraction_of_matmul_peak"], 0.4)
        # Training as train.py runs it (cudnn.benchmark on) at the largest batch: 8 is the table's 4 x 2.
        same = dict(precision=default["precision"], channels_last=default["channels_last"], compiled=False)
        batch = max(record["batch"] or 0 for record in records)
        trained = find(records, **same, checkpointing=False, cudnn_benchmark=True, batch=batch)
        if trained and trained["training"]:
            fraction = trained["training"]["fraction_of_matmul_peak"]
            target(f"training FLOP/s of {trained['name']} (as train.py runs) / {peak}", fraction, 0.3)
        if row["published"] and row["inference_comparable"]:
            fps = row["published"][1]
            target(f"inference fps {default_is} / the table's {fps}", inference["images_per_s"] / fps, 25)
        # Measured: the default, if bf16, without and with checkpointing at the target's crop and batch,
        # with cudnn.benchmark off as the table's memory was taken.
        untuned = dict(same, cudnn_benchmark=False, batch=memory["batch"])
        found = [find(records, **untuned, checkpointing=on) for on in (False, True)]
        peaks = [(record and record["training"] or {}).get("peak_memory_gb") for record in found]
        at_target = (
            tuple(row["train_crop"]) == memory["crop_size"] and default["precision"] == memory["precision"]
        )
        if at_target and peaks[0] is not None:
            memory_target("training memory (GB, torch.cuda.max_memory_allocated)", *peaks)
    estimated = [estimate["estimated_training_memory_gb"] for estimate in estimates]
    what = "estimated training memory (GB: saved for backward + weights + gradients + momentum)"
    memory_target(what, *estimated)
    return targets


def print_findings(report, device, default):
    """Beside the table: the cuDNN-fused candidate, the top kernels, the targets."""
    fused = report.get("cudnn_fused")
    if fused:
        said = fused.get("error") or f"inference x{fused['of_the_default']:.2f} of the default's, argmax"
        said += "" if "error" in fused else f" agreement with fp32 {fused['argmax_agreement']:.3%}"
        print(f"cuDNN-fused conv+bias+ReLU (cudnn_fused.py) on {default['name']}: {said}")
    kinds = dict(kernels="kernels" if device.type == "cuda" else "operators")
    kinds.update(operators_by_shape="operators by input shapes")
    for phase, found in report.get("profile", {}).items():
        for key, what in kinds.items():
            print(f"top {what} of {phase} {default['name']} (share of their time, ms per call):")
            for entry in found[key]:
                print(f"  {entry['share']:6.1%} {entry['ms_per_call']:8.2f}  {entry['name'][:150]}")
    print("targets (benchmarks, not tests):")
    for target in report["targets"]:
        note = f"; {target['note']}" if target["note"] else ""
        verdict = {True: "PASS", False: "MISS", None: "not judged at this size:"}[target["passed"]]
        limit = f"target {target['comparison']} {target['threshold']}"
        print(f"  {verdict}  {target['target']}: {target['measured']:.4f} ({limit}){note}")


if __name__ == "__main__":
    main()
