"""Speed and memory of GCNet on the device at hand, measured as the results table measured them.

The table's "Mem (GB)" is the peak memory of training at the row's per-GPU batch and crop; its
"Inf time (fps)" is batch-1 inference on real test images at the row's test size and mode, timed
with the post-processing (resize to the original size, softmax, argmax), in fp32 on a V100
(gcnet-spec.md §6.2). This script measures both for one row, for several variants of our model
side by side (fp32 eager as the original ran, bf16/fp16 autocast, channels_last, torch.compile;
for inference, the eager ones other than fp32 fold BatchNorm into the convs, as evaluate.py does),
and says how far each is from the device's own limit: FLOPs per image (counted once, in fp32),
achieved FLOP/s, and their fraction of a large matmul's rate measured in the same run and dtype.
It also times the data pipeline of one loader worker. Weights and images are random: speed does
not depend on their values.

    python benchmark.py                                       # cityscapes 512x1024, R-50-D8
    python benchmark.py --dataset cityscapes --crop 769 --depth 101
    python benchmark.py --dataset ade20k --no-compile --out ade20k_bench.json
    python benchmark.py --iters 195 --warmup 5                # the original's 200 images (on a GPU)
    python benchmark.py --size 256x512 --iters 2 --warmup 1 --train-crop 256x512 --train-batch 1 \
        --data-size 256x512 --no-compile                      # about a minute on a laptop CPU

Results: a table on screen shaped like the results table, with our columns on the right, the
benchmark targets with PASS/MISS, and everything in a JSON file (--out, default benchmark.json).
"""

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import write_png
from tqdm import tqdm

import data
import evaluate
import train
from model import GCNet
from runtime import fold_batchnorm, keep_freed_memory
from runtime import resolve_channels_last as _resolve_channels_last
from runtime import resolve_precision as _resolve_precision


def default_precision(device):
    return _resolve_precision("auto", device)


def default_channels_last(device, precision):
    return _resolve_channels_last(None, device, precision)


# Mem (GB) and Inf time (fps) of the 40k rows of the results table (gcnet-spec.md §6.3), measured
# with mmseg v0.5 in fp32 on V100s; the 80k rows have none.
PUBLISHED = {
    ("cityscapes", (512, 1024), 50): (5.8, 3.93),
    ("cityscapes", (512, 1024), 101): (9.2, 2.61),
    ("cityscapes", (769, 769), 50): (6.5, 1.67),
    ("cityscapes", (769, 769), 101): (10.5, 1.13),
    ("ade20k", (512, 512), 50): (8.5, 23.38),
    ("ade20k", (512, 512), 101): (12.0, 15.20),
    ("voc12aug", (512, 512), 50): (5.8, 23.35),
    ("voc12aug", (512, 512), 101): (9.2, 14.80),
}
TABLE_DATASETS = ("cityscapes", "ade20k", "voc12aug")
CITYSCAPES_IMAGE_SIZE = (1024, 2048)  # every Cityscapes image (H, W)
# ADE20K and VOC images vary; a typical 500x375 VOC photo becomes 683x512 at test (gcnet-spec.md §4.1).
NATURAL_IMAGE_SIZE = (375, 500)
SLIDE_STRIDE = (513, 513)  # the 769 models' windows (gcnet-spec.md §4.3)
# The training step of the recipe (gcnet-spec.md §3.1).
AUX_WEIGHT = 0.4
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4
# The device's limit in a dtype is taken as the rate of a matmul this large. It is a practical peak,
# not a bound: a matmul library can trail the conv library (on an AMD EPYC, torch's fp32 matmul ran
# at ~200 GFLOP/s and oneDNN's fp32 convs at ~300), so a fraction above 100% is possible.
MATMUL_SIZE = {"cuda": 4096, "cpu": 2048}
MATMUL_SECONDS = 0.5
DATA_ROUNDS = 4  # the data pipelines are timed in this many alternating rounds
AUTOCAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -----------------------------------------------------------------------------------------------
# The row of the table: sizes, test mode, batch


def row_settings(args):
    """Everything the measurements need about the chosen row, as one plain dict.

    Inference follows the test pipeline (gcnet-spec.md §4.1-4.3): the original image is rescaled
    to fit the test scale, the model runs on the whole image or on 769x769 windows (stride 513,
    align_corners=True) for the 769 rows, and the logits are resized back to the original size.
    """
    dataset = args.dataset
    crop_size = (
        train.parse_size(args.crop, "--crop") if args.crop else tuple(data.DATASETS[dataset]["crop_size"])
    )
    table_crops = [train.parse_size(crop, "--crop") for crop in train.RECIPES[dataset]["crops"]]
    if crop_size not in table_crops:
        raise SystemExit(
            f"--crop {args.crop}: the results table has {dataset} rows for crops "
            f"{', '.join(f'{h}x{w}' for h, w in table_crops)}; pick one of them "
            "(--train-crop changes the training crop alone)"
        )
    sliding = crop_size[0] % 8 == 1  # 8k+1 crops (769) pair with align_corners and sliding windows (§1.7)
    if dataset == "cityscapes":
        original_size = CITYSCAPES_IMAGE_SIZE
        test_scale = data.CITYSCAPES_769_SCALE if sliding else data.DATASETS[dataset]["test_scale"]
    else:
        original_size, test_scale = NATURAL_IMAGE_SIZE, data.DATASETS[dataset]["test_scale"]
    overridden = args.size is not None
    if overridden:  # the given size is fed to the model as it is
        original_size = train.parse_size(args.size, "--size")
        test_scale = (original_size[1], original_size[0])
    train_crop = train.parse_size(args.train_crop, "--train-crop") if args.train_crop else crop_size
    train_batch = args.train_batch or train.RECIPES[dataset]["batch_size"]
    return dict(
        dataset=dataset,
        depth=args.depth,
        backbone=f"R-{args.depth}-D8",
        crop_size=crop_size,
        num_classes=len(data.DATASETS[dataset]["classes"]),
        original_size=original_size,
        test_scale=test_scale,
        input_size=data.rescale_size(*original_size, test_scale),
        mode="slide" if sliding else "whole",
        stride=SLIDE_STRIDE if sliding else None,
        align_corners=sliding,
        train_batch=train_batch,
        train_crop=train_crop,
        published=PUBLISHED.get((dataset, crop_size, args.depth)),
        comparable=not overridden
        and train_crop == crop_size
        and train_batch == train.RECIPES[dataset]["batch_size"],
    )


# -----------------------------------------------------------------------------------------------
# The variants of our model


def variant_list(device, with_compile):
    """fp32 eager first (the baseline, and where FLOPs are counted), then the faster variants.

    The default variant is what train.py and evaluate.py run by default on this device
    (model.default_precision, model.default_channels_last).
    """
    variants = [dict(precision="fp32", channels_last=False, compiled=False)]
    variants.append(dict(precision="bf16", channels_last=False, compiled=False))
    if device.type == "cuda":
        variants.append(dict(precision="fp16", channels_last=False, compiled=False))
    variants.append(dict(precision="bf16", channels_last=True, compiled=False))
    precision = default_precision(device)
    default = dict(
        precision=precision, channels_last=default_channels_last(device, precision), compiled=False
    )
    if default not in variants:
        variants.append(default)
    if with_compile:
        variants.append(dict(precision="bf16", channels_last=True, compiled=True))
    for variant in variants:
        variant["name"] = (
            variant["precision"]
            + ("+channels_last" if variant["channels_last"] else "")
            + ("+compile" if variant["compiled"] else "")
        )
        variant["default"] = {k: variant[k] for k in default} == default
    return variants


def build_model(row, device, channels_last):
    """GCNet with the same random weights for every variant, so that their predictions compare."""
    torch.manual_seed(0)
    model = GCNet(row["num_classes"], depth=row["depth"], align_corners=row["align_corners"]).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model


# -----------------------------------------------------------------------------------------------
# Timing, FLOPs, memory and the device's limit


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(function, warmup, iters, device, description, count_flops=False):
    """Call `function` warmup times, then iters times, each timed alone between device
    synchronisations. The first call may count FLOPs (FlopCounterMode sees every conv and matmul,
    backward included, and nothing else: no BatchNorm, resize or softmax). Also returns the share
    of the CPU threads that the timed calls got: below ~0.9, other processes were competing."""
    progress = tqdm(total=warmup + iters, desc=description, leave=False, disable=None)
    synchronize(device)
    start = time.perf_counter()
    counter = FlopCounterMode(display=False) if count_flops else contextlib.nullcontext()
    with counter:
        first_result = function()
    synchronize(device)
    first_call_seconds = time.perf_counter() - start
    progress.update()
    for _ in range(warmup - 1):
        function()
        progress.update()
    seconds = []
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for _ in range(iters):
        synchronize(device)
        tick = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
        progress.update()
    wall = time.perf_counter() - wall_start
    progress.close()
    cpu_share = (time.process_time() - cpu_start) / (wall * torch.get_num_threads())
    return dict(
        first_result=first_result,
        flops=counter.get_total_flops() if count_flops else None,
        first_call_seconds=first_call_seconds,
        seconds=seconds,
        cpu_share=cpu_share if device.type == "cpu" else None,
    )


def matmul_rate(precision, device):
    """FLOP/s of a large square matmul in the given dtype: the practical peak of the device for it
    (fp32 with TF32 off on CUDA, as the fp32 variant runs)."""
    size = MATMUL_SIZE[device.type]
    dtype = AUTOCAST_DTYPES[precision]
    with evaluate.inference_precision(device, "fp32"):  # TF32 off, for the fp32 rate
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        calls_per_round = 20 if device.type == "cuda" else 1  # CUDA: few host synchronisations
        for _ in range(2):
            a @ b
        synchronize(device)
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < MATMUL_SECONDS:
            for _ in range(calls_per_round):
                a @ b
            synchronize(device)
            calls += calls_per_round
        return 2 * size**3 * calls / (time.perf_counter() - start)


def trim_cpu_heap():
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so the next resident-
    memory peak starts from what is really in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device):
    """Start a new memory peak. Returns what the peak will mean.

    CUDA: torch.cuda.max_memory_allocated, what the table's "Mem (GB)" is (gcnet-spec.md §6.2).
    CPU: the process's peak resident memory (ru_maxrss), which counts the Python process, the
    libraries and the weights as well. On Linux /proc/self/clear_refs resets it; elsewhere it stays
    the peak over the process's whole life, and later variants inherit earlier ones' peaks.
    """
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated during the training steps"
    trim_cpu_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size
        return "peak resident memory of the process during the training steps (ru_maxrss, reset before)"
    except OSError:
        return "peak resident memory over the process's whole life so far (ru_maxrss, cannot reset here)"


def resident_memory_gb():
    """Current resident memory of the process (Linux), None elsewhere."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 1024**3


def compiled(model, variant, inference):
    """torch.compile for the compile variant. For inference the weights are frozen into the graph
    (inductor's freezing), which folds BatchNorm into the convs and pre-packs the weights; training
    cannot freeze what it updates."""
    if not variant["compiled"]:
        return model
    return torch.compile(model, options={"freezing": True} if inference else None)


# -----------------------------------------------------------------------------------------------
# Inference: one image at the row's test size and mode (gcnet-spec.md §4, §6.2)


def synthetic_test_image(row, device):
    """A random photo of the row's original size through the test transform: (1, 3, h, w)."""
    generator = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 256, (3, *row["original_size"]), dtype=torch.uint8, generator=generator)
    return data.test_transform(photo, row["test_scale"])[0][None].to(device)


def measure_inference(variant, row, image, device, warmup, iters, count_flops):
    """images/s of evaluate.predict + argmax + .cpu() on one image, and the first prediction.

    This is the original's timed region: the forward pass (whole image, or windows averaged as
    logits), the resize to the original size, softmax, argmax and the copy to the host; the image is
    already normalised on the device, as the original excluded data loading (gcnet-spec.md §6.2).
    """
    model = build_model(row, device, variant["channels_last"]).eval()
    if variant["precision"] != "fp32" and not variant["compiled"]:
        # As evaluate.py by default (compile's freezing folds by itself).
        model = fold_batchnorm(model)
    if variant["channels_last"]:
        image = image.contiguous(memory_format=torch.channels_last)
    runner = compiled(model, variant, inference=True)

    def infer():
        with evaluate.inference_precision(device, variant["precision"]):
            probabilities = evaluate.predict(
                runner,
                [image],
                row["original_size"],
                row["num_classes"],
                row["mode"],
                row["crop_size"],
                row["stride"],
            )
        return probabilities.argmax(dim=0).cpu()  # (H, W) at the original size

    timing = time_calls(infer, warmup, iters, device, f"inference {variant['name']}", count_flops)
    timing["images_per_s"] = len(timing["seconds"]) / sum(timing["seconds"])
    return timing


# -----------------------------------------------------------------------------------------------
# Training: one step of the recipe at the row's per-GPU batch and crop (gcnet-spec.md §3.1, §6.2)


def synthetic_batch(row, device):
    """Normalised-looking images and labels with every class and a band of ignored pixels."""
    generator = torch.Generator().manual_seed(1)
    batch, (height, width) = row["train_batch"], row["train_crop"]
    images = torch.randn(batch, 3, height, width, generator=generator)
    labels = torch.randint(0, row["num_classes"], (batch, height, width), generator=generator)
    labels[:, :, : max(width // 16, 1)] = data.IGNORE_INDEX  # as padding or void pixels
    return images.to(device), labels.to(device)


def precision_scopes(device, precision):
    """(scope of the whole step, scope of the forward pass). fp32: TF32 off throughout, as on the
    table's V100s, which had none. bf16 / fp16: autocast around the forward only, as train.py."""
    if precision == "fp32":
        return evaluate.inference_precision(device, "fp32"), contextlib.nullcontext()
    return contextlib.nullcontext(), evaluate.inference_precision(device, precision)


def measure_training(variant, row, device, warmup, iters, count_flops):
    """images/s and peak memory of forward (train mode), decode + 0.4 aux loss, backward and an SGD
    step; warm-up steps count towards the peak, as the original's peak covers the whole run."""
    model = build_model(row, device, variant["channels_last"]).train()
    images, labels = synthetic_batch(row, device)
    if variant["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    scaler = torch.amp.GradScaler(device.type, enabled=variant["precision"] == "fp16")
    runner = compiled(model, variant, inference=False)

    def step():
        step_scope, forward_scope = precision_scopes(device, variant["precision"])
        with step_scope:
            with forward_scope:
                logits, aux_logits = runner(images)
            loss = train.segmentation_loss(logits, labels) + AUX_WEIGHT * train.segmentation_loss(
                aux_logits, labels
            )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    resident_before = resident_memory_gb() if device.type == "cpu" else None
    memory_measure = reset_peak_memory(device)
    timing = time_calls(step, warmup, iters, device, f"training {variant['name']}", count_flops)
    timing["peak_memory_gb"] = train.peak_memory_gb(device)
    timing["memory_measure"] = memory_measure
    timing["resident_before_gb"] = resident_before
    timing["images_per_s"] = row["train_batch"] * len(timing["seconds"]) / sum(timing["seconds"])
    if not torch.isfinite(timing["first_result"]):
        raise RuntimeError(f"{variant['name']}: the training loss is not finite ({timing['first_result']})")
    return timing


def measure_variants(variants, row, device, args):
    """Inference then training for every variant; FLOPs are counted on the first (fp32) one.
    A compile variant that fails (no C++ compiler, an unsupported op) gets its error reported."""
    image = synthetic_test_image(row, device)
    results = {}
    for phase, measure in (("inference", measure_inference), ("training", measure_training)):
        for variant in variants:
            arguments = (image,) if phase == "inference" else ()
            count_flops = variant is variants[0]
            try:
                timing = measure(variant, row, *arguments, device, args.warmup, args.iters, count_flops)
            except Exception as error:
                if not variant["compiled"]:
                    raise
                message = (
                    f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
                )
                results.setdefault(variant["name"], {})["error"] = f"{phase}: {message}"
                print(f"{phase:9} {variant['name']:30} failed: {message}", flush=True)
                continue
            finally:
                trim_cpu_heap()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results.setdefault(variant["name"], {})[phase] = timing
            print(
                f"{phase:9} {variant['name']:30} {timing['images_per_s']:8.3f} images/s  "
                f"(first call {timing['first_call_seconds']:.1f} s"
                + (f", CPU share {timing['cpu_share']:.2f}" if timing["cpu_share"] is not None else "")
                + (f", peak memory {timing['peak_memory_gb']:.2f} GB" if phase == "training" else "")
                + ")",
                flush=True,
            )
    return results


# -----------------------------------------------------------------------------------------------
# Data: the training and test transforms of one loader worker, on a Cityscapes-sized PNG


def write_synthetic_pair(folder, size, num_classes):
    """A photo-like PNG (smooth colours plus noise, so it compresses like a photo) and a label PNG
    of blobs with ignored borders, of size (H, W). Returns their paths."""
    generator = torch.Generator().manual_seed(2)
    height, width = size
    coarse = torch.rand(1, 3, max(height // 32, 2), max(width // 32, 2), generator=generator) * 255
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    noise = torch.randn(3, height, width, generator=generator) * 6
    image = (smooth + noise).round().clamp(0, 255).to(torch.uint8)
    blobs = torch.randint(
        0, num_classes, (1, 1, max(height // 64, 2), max(width // 64, 2)), generator=generator
    )
    label = F.interpolate(blobs.float(), size=size, mode="nearest")[0].to(torch.uint8)
    label[:, : max(height // 20, 1)] = data.IGNORE_INDEX
    image_path, label_path = Path(folder) / "image.png", Path(folder) / "label.png"
    write_png(image, str(image_path))
    write_png(label, str(label_path))
    return str(image_path), str(label_path)


def opencv_pipelines(image_path, label_path, train_scale, crop_size):
    """The same two pipelines written with OpenCV and numpy, as the original's mmcv ran them
    (gcnet-spec.md §3.3): (train_sample, test_sample), or None when OpenCV is not installed. It is no
    dependency of this project; this is only a point of comparison."""
    try:
        import cv2
    except ImportError:
        return None
    cv2.setNumThreads(1)  # one loader worker, like torch.set_num_threads(1) for ours
    mean, std = np.array(data.MEAN, np.float32), np.array(data.STD, np.float32)
    rng = np.random.default_rng(0)

    def normalized(image_bgr):  # uint8 H x W x 3 BGR -> float32 3 x H x W RGB tensor
        rgb = image_bgr[..., ::-1].astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(((rgb - mean) / std).transpose(2, 0, 1)))

    def convert(image, alpha=1.0, beta=0.0):
        return np.clip(image.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def contrast(image):
        return convert(image, alpha=rng.uniform(0.5, 1.5)) if rng.integers(2) else image

    def crop_box(label):
        """choose_crop of data.py: up to 10 cat_max_ratio checks, then an unchecked draw."""
        for _ in range(11):
            top = int(rng.integers(0, max(label.shape[0] - crop_size[0], 0) + 1))
            left = int(rng.integers(0, max(label.shape[1] - crop_size[1], 0) + 1))
            counts = np.bincount(
                label[top : top + crop_size[0], left : left + crop_size[1]].ravel(), minlength=256
            )
            counts[data.IGNORE_INDEX] = 0
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < 0.75:
                break
        return top, left

    def train_sample():
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)  # BGR
        label = cv2.imread(label_path, cv2.IMREAD_UNCHANGED)
        ratio = rng.uniform(0.5, 2.0)
        height, width = data.rescale_size(*label.shape, data.ratio_scale(train_scale, ratio))
        image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)
        top, left = crop_box(label)
        image = image[top : top + crop_size[0], left : left + crop_size[1]]
        label = label[top : top + crop_size[0], left : left + crop_size[1]]
        if rng.random() < 0.5:
            image, label = cv2.flip(image, 1), cv2.flip(label, 1)
        if rng.integers(2):  # photometric distortion, in mmseg's order
            image = convert(image, beta=rng.uniform(-32, 32))
        contrast_first = rng.integers(2)
        if contrast_first:
            image = contrast(image)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 1] = convert(hsv[..., 1], alpha=rng.uniform(0.5, 1.5))
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if rng.integers(2):
            hsv = cv2.cvtColor(image, cv2.COLOR_BGR2HSV)
            hsv[..., 0] = (hsv[..., 0].astype(np.int32) + rng.integers(-18, 18)) % 180
            image = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
        if not contrast_first:
            image = contrast(image)
        padding = (0, crop_size[1] - image.shape[1], 0, crop_size[0] - image.shape[0])
        return (
            F.pad(normalized(image), padding, value=0.0),
            F.pad(torch.from_numpy(label.astype(np.int64)), padding, value=data.IGNORE_INDEX),
        )

    def test_sample():
        image = cv2.imread(image_path, cv2.IMREAD_COLOR)
        height, width = data.rescale_size(*image.shape[:2], train_scale)
        if (height, width) != image.shape[:2]:
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
        return normalized(image)

    return train_sample, test_sample


def benchmark_data(row, data_size, iters):
    """images/s of one loader worker (one process, one torch thread, as in a DataLoader worker) for
    decode + TrainTransform and decode + test_transform of a Cityscapes image, with the scale and
    crop of the row's Cityscapes recipe (512x1024, or 769 with scale 2049x1025), scaled with the
    image when --data-size is not 1024x2048."""
    height_factor = data_size[0] / CITYSCAPES_IMAGE_SIZE[0]
    width_factor = data_size[1] / CITYSCAPES_IMAGE_SIZE[1]
    if row["dataset"] == "cityscapes" and row["crop_size"] == (769, 769):
        base_scale, base_crop = data.CITYSCAPES_769_SCALE, (769, 769)
    else:
        base_scale, base_crop = data.DATASETS["cityscapes"]["train_scale"], (512, 1024)
    train_scale = (round(base_scale[0] * width_factor), round(base_scale[1] * height_factor))
    crop_size = (max(round(base_crop[0] * height_factor), 1), max(round(base_crop[1] * width_factor), 1))
    transform = data.TrainTransform(train_scale, crop_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    device = torch.device("cpu")
    try:
        with tempfile.TemporaryDirectory() as folder:
            image_path, label_path = write_synthetic_pair(folder, data_size, num_classes=19)

            def train_sample():
                return transform(data.read_image(image_path), data.read_label(label_path))

            def test_sample():
                return data.test_transform(data.read_image(image_path), train_scale)

            pipelines = {"torch": (train_sample, test_sample)}
            opencv = opencv_pipelines(image_path, label_path, train_scale, crop_size)
            if opencv is not None:
                pipelines["opencv"] = opencv
            # Alternating rounds, so that a slower or faster spell of the machine hits every
            # pipeline alike (side by side, the two libraries otherwise differ by a few % run to run).
            seconds = {}
            rounds = min(DATA_ROUNDS, iters)
            for round_index in range(rounds):
                for library, (train_function, test_function) in pipelines.items():
                    for name, function in (("train", train_function), ("test", test_function)):
                        count = iters // rounds + (round_index < iters % rounds)
                        description = f"data {library} {name} ({round_index + 1}/{rounds})"
                        timing = time_calls(function, 1, count, device, description)
                        seconds.setdefault(f"{library}_{name}", []).extend(timing["seconds"])
            rates = {key: len(values) / sum(values) for key, values in seconds.items()}
    finally:
        torch.set_num_threads(threads)
    results = dict(
        image_size=list(data_size),
        train_scale=list(train_scale),
        crop_size=list(crop_size),
        iters=iters,
        threads=1,
        train_transform_images_per_s=rates["torch_train"],
        test_transform_images_per_s=rates["torch_test"],
        opencv=None,
        opencv_note="opencv not installed" if opencv is None else f"opencv {sys.modules['cv2'].__version__}",
    )
    if opencv is not None:
        results["opencv"] = dict(
            train_transform_images_per_s=rates["opencv_train"],
            test_transform_images_per_s=rates["opencv_test"],
        )
    print(
        f"data      decode+TrainTransform {results['train_transform_images_per_s']:.2f} images/s, "
        f"decode+test_transform {results['test_transform_images_per_s']:.2f} images/s per worker "
        f"({data_size[0]}x{data_size[1]} PNG, 1 thread); "
        + (
            f"opencv: {results['opencv']['train_transform_images_per_s']:.2f} / "
            f"{results['opencv']['test_transform_images_per_s']:.2f} images/s"
            if opencv is not None
            else "opencv not installed"
        ),
        flush=True,
    )
    return results


# -----------------------------------------------------------------------------------------------
# Report: the figures relative to fp32 eager and to the matmul peak, the table, the targets


def summarize(variants, measured, peaks, flops):
    """One record per variant with the ratios filled in: speed-up over fp32 eager, FLOP/s, fraction
    of the matmul rate of the variant's dtype, argmax agreement with fp32 eager."""
    baseline = measured[variants[0]["name"]]
    reference_prediction = baseline["inference"]["first_result"]
    records = []
    for variant in variants:
        record = {key: variant[key] for key in ("name", "precision", "channels_last", "compiled", "default")}
        record["error"] = measured.get(variant["name"], {}).get("error")
        for phase in ("inference", "training"):
            timing = measured.get(variant["name"], {}).get(phase)
            if timing is None:
                record[phase] = None
                continue
            flops_per_s = flops[phase] * timing["images_per_s"]
            figures = dict(
                images_per_s=timing["images_per_s"],
                seconds=timing["seconds"],
                first_call_seconds=timing["first_call_seconds"],
                speedup=timing["images_per_s"] / baseline[phase]["images_per_s"],
                flops_per_s=flops_per_s,
                fraction_of_matmul_peak=flops_per_s / peaks[variant["precision"]],
                cpu_share=timing["cpu_share"],
            )
            if phase == "inference":
                prediction = timing["first_result"]
                figures["argmax_agreement"] = (prediction == reference_prediction).double().mean().item()
            else:
                for key in ("peak_memory_gb", "memory_measure", "resident_before_gb"):
                    figures[key] = timing[key]
            record[phase] = figures
        records.append(record)
    return records


def format_rate(flops_per_s):
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def results_table(row, records):
    """Markdown table: the results table's columns (our Mem = training peak, fps = inference
    images/s), then ours. The published row comes first."""
    columns = [
        "Method",
        "Backbone",
        "Crop Size",
        "Mem (GB)",
        "Inf time (fps)",
        "variant",
        "inf speed-up",
        "inf FLOP/s",
        "inf % of matmul peak",
        "argmax agreement",
        "train img/s",
        "train speed-up",
        "train FLOP/s",
        "train % of matmul peak",
    ]
    crop = f"{row['crop_size'][0]}x{row['crop_size'][1]}"
    lines = []
    if row["published"] is not None:
        memory, fps = row["published"]
        lines.append(["GCNet", row["backbone"], crop, f"{memory}", f"{fps}", "published: V100, fp32"])
    for record in records:
        inference, training = record["inference"], record["training"]
        name = record["name"] + (" (default)" if record["default"] else "")
        cells = ["GCNet", row["backbone"], crop]
        cells.append(f"{training['peak_memory_gb']:.2f}" if training else "-")
        cells.append(f"{inference['images_per_s']:.3f}" if inference else "-")
        cells.append(name + (f" [{record['error']}]" if record["error"] else ""))
        if inference:
            cells += [
                f"{inference['speedup']:.2f}x",
                format_rate(inference["flops_per_s"]),
                f"{100 * inference['fraction_of_matmul_peak']:.0f}%",
                f"{100 * inference['argmax_agreement']:.3f}%",
            ]
        else:
            cells += ["-"] * 4
        if training:
            cells += [
                f"{training['images_per_s']:.3f}",
                f"{training['speedup']:.2f}x",
                format_rate(training["flops_per_s"]),
                f"{100 * training['fraction_of_matmul_peak']:.0f}%",
            ]
        else:
            cells += ["-"] * 4
        lines.append(cells)
    lines = [cells + [""] * (len(columns) - len(cells)) for cells in lines]
    widths = [max(len(str(cells[i])) for cells in [columns] + lines) for i in range(len(columns))]
    render = [
        "| " + " | ".join(f"{str(cell):<{width}}" for cell, width in zip(cells, widths)) + " |"
        for cells in [columns] + lines
    ]
    render.insert(1, "| " + " | ".join("-" * width for width in widths) + " |")
    return "\n".join(render)


def check_targets(row, records, device):
    """The benchmark targets of this device kind: measured value, threshold, PASS or MISS. A miss is
    a finding, not an error: the program goes on."""
    default = next(record for record in records if record["default"])
    inference, training = default["inference"], default["training"]
    peak = f"the {default['precision']} matmul rate"
    targets = []

    def target(description, measured, comparison, threshold):
        passed = measured >= threshold if comparison == ">=" else measured <= threshold
        targets.append(
            dict(
                target=description,
                measured=measured,
                comparison=comparison,
                threshold=threshold,
                passed=passed,
            )
        )

    if device.type == "cpu":
        target("inference speed-up of the default variant over fp32 eager", inference["speedup"], ">=", 2.0)
        target(
            f"inference FLOP/s of the default variant / {peak}",
            inference["fraction_of_matmul_peak"],
            ">=",
            0.9,
        )
        target(
            "argmax agreement of the default variant with fp32", inference["argmax_agreement"], ">=", 0.995
        )
        target("training speed-up of the default variant over fp32 eager", training["speedup"], ">=", 2.0)
        target(
            f"training FLOP/s of the default variant / {peak}", training["fraction_of_matmul_peak"], ">=", 0.8
        )
    else:
        if row["dataset"] == "cityscapes" and row["train_crop"] == (512, 1024) and row["train_batch"] == 2:
            target("training memory (GB), 512x1024 at batch 2", training["peak_memory_gb"], "<=", 3.0)
        target(
            f"inference FLOP/s of the default variant / {peak}",
            inference["fraction_of_matmul_peak"],
            ">=",
            0.4,
        )
    return targets


# -----------------------------------------------------------------------------------------------
# Command line


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def choose_device(name):
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def protocol_lines(row, args, device, flops, peaks, variants):
    height, width = row["input_size"]
    lines = [
        f"device      {device.type}: {device_description(device)}; torch {torch.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads"
        + (f", cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark off" if device.type == "cuda" else ""),
        f"row         GCNet {row['backbone']} {row['dataset']} {row['crop_size'][0]}x{row['crop_size'][1]}, "
        f"{row['num_classes']} classes, random weights and images",
        f"inference   batch 1, {height}x{width} input ({row['mode']}"
        + (f", windows {row['crop_size'][0]} stride {row['stride'][0]}" if row["mode"] == "slide" else "")
        + f", align_corners {row['align_corners']}), resized to the original "
        f"{row['original_size'][0]}x{row['original_size'][1]}, softmax, argmax, to host; "
        f"{args.warmup} warm-up + {args.iters} timed images",
        f"training    batch {row['train_batch']}, crop {row['train_crop'][0]}x{row['train_crop'][1]}, forward + "
        f"decode/aux loss + backward + SGD step; {args.warmup} warm-up + {args.iters} timed steps",
        f"precision   variants: {', '.join(v['name'] for v in variants)}; fp32 = no TF32; autocast keeps the GC "
        "softmax, LayerNorm and the final resize in fp32",
        f"FLOPs       counted once in fp32 (convs and matmuls): inference {flops['inference'] / 1e9:.1f} GFLOP "
        f"per image, training {flops['training'] / 1e9:.1f} GFLOP per image (forward + backward)",
        f"peak        {MATMUL_SIZE[device.type]}x{MATMUL_SIZE[device.type]} matmul, best of the start and "
        "the end of the run: " + ", ".join(f"{p} {format_rate(rate)}" for p, rate in peaks.items()),
    ]
    if not row["comparable"]:
        lines.append(
            "note        sizes or batch differ from the row: not comparable with the published figures"
        )
    return lines


def main(argv=None):
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # as train.py and evaluate.py do
    device = choose_device(args.device)
    args.iters = args.iters or (50 if device.type == "cuda" else 3)
    if args.warmup < 1 or args.iters < 1:
        raise SystemExit("--warmup and --iters must be at least 1 (the first warm-up call counts the FLOPs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # as the table's figures were taken (gcnet-spec.md §6.2)
    row = row_settings(args)
    variants = variant_list(device, with_compile=not args.no_compile)
    precisions = list(dict.fromkeys(variant["precision"] for variant in variants))

    print(f"benchmark: GCNet {row['backbone']} {row['dataset']} on {device}", flush=True)
    peaks = {precision: matmul_rate(precision, device) for precision in precisions}
    measured = measure_variants(variants, row, device, args)
    baseline = measured[variants[0]["name"]]
    flops = {
        "inference": baseline["inference"]["flops"],
        "training": baseline["training"]["flops"] / row["train_batch"],
    }
    data_results = benchmark_data(row, train.parse_size(args.data_size, "--data-size"), args.data_iters)
    # The peak is re-measured at the end: on a shared machine the better of the two is the closer
    # to what the device can do.
    peaks = {precision: max(rate, matmul_rate(precision, device)) for precision, rate in peaks.items()}

    records = summarize(variants, measured, peaks, flops)
    targets = check_targets(row, records, device)
    print()
    print("\n".join(protocol_lines(row, args, device, flops, peaks, variants)))
    print()
    print(results_table(row, records))
    print()
    by_name = {record["name"]: record for record in records}
    if device.type == "cpu" and by_name["bf16"]["inference"] and by_name["bf16+channels_last"]["inference"]:
        ratios = [
            by_name["bf16+channels_last"][phase]["images_per_s"] / by_name["bf16"][phase]["images_per_s"]
            for phase in ("inference", "training")
        ]
        print(
            f"channels_last on this CPU (bf16): inference x{ratios[0]:.2f}, training x{ratios[1]:.2f} "
            f"({'helps' if min(ratios) > 1.05 else 'does not help'})"
        )
    contended = [
        f"{record['name']} {phase}"
        for record in records
        for phase in ("inference", "training")
        if record[phase] and record[phase]["cpu_share"] is not None and record[phase]["cpu_share"] < 0.9
    ]
    if contended:
        print(
            f"busy CPU: other processes took a share of the cores during {', '.join(contended)} "
            "(CPU share < 0.9 in the JSON); these figures are pessimistic"
        )
    print("targets (benchmarks, not tests):")
    for target in targets:
        print(
            f"  {'PASS' if target['passed'] else 'MISS'}  {target['target']}: {target['measured']:.4f} "
            f"(target {target['comparison']} {target['threshold']})"
        )

    report = dict(
        protocol=dict(
            device=device.type,
            device_name=device_description(device),
            torch=torch.__version__,
            python=platform.python_version(),
            threads=torch.get_num_threads(),
            dataset=row["dataset"],
            backbone=row["backbone"],
            depth=row["depth"],
            crop_size=list(row["crop_size"]),
            num_classes=row["num_classes"],
            inference=dict(
                batch=1,
                input_size=list(row["input_size"]),
                original_size=list(row["original_size"]),
                mode=row["mode"],
                stride=list(row["stride"]) if row["stride"] else None,
                align_corners=row["align_corners"],
                warmup=args.warmup,
                iters=args.iters,
            ),
            training=dict(
                batch=row["train_batch"],
                crop_size=list(row["train_crop"]),
                warmup=args.warmup,
                iters=args.iters,
            ),
            comparable_with_published=row["comparable"],
            flops_counted_in="fp32, torch.utils.flop_counter.FlopCounterMode (convs and matmuls)",
            matmul_size=MATMUL_SIZE[device.type],
        ),
        published=dict(mem_gb=row["published"][0], fps=row["published"][1], hardware="V100, fp32")
        if row["published"]
        else None,
        flops_per_image=flops,
        matmul_peak_flops_per_s=peaks,
        variants=records,
        data=data_results,
        targets=targets,
    )
    for record in records:  # the prediction maps stay out of the file
        for phase in ("inference", "training"):
            if record[phase]:
                record[phase].pop("first_result", None)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return report


def build_parser():
    parser = argparse.ArgumentParser(
        description="Measure GCNet's training memory, inference speed and their distance to the device's "
        "peak for one row of the results table (see the docstring of benchmark.py)."
    )
    parser.add_argument("--dataset", default="cityscapes", choices=TABLE_DATASETS)
    parser.add_argument(
        "--crop", default=None, help="the row's crop, HxW or N (default: the dataset's first)"
    )
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument(
        "--size", default=None, help="HxW fed to the model for inference (default: the row's)"
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="timed images and steps (default 50 CUDA, 3 CPU)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed calls before them (default 2: the first SGD step creates the momentum buffers, so "
        "steady steps start at the third; the original: 5)",
    )
    parser.add_argument("--train-batch", type=int, default=None, help="default: the row's per-GPU batch")
    parser.add_argument("--train-crop", default=None, help="HxW or N (default: the row's crop)")
    parser.add_argument("--data-size", default="1024x2048", help="HxW of the PNG for the data timing")
    parser.add_argument("--data-iters", type=int, default=40, help="timed samples per data pipeline")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default="benchmark.json", help="where the JSON results go")
    return parser


if __name__ == "__main__":
    main()
