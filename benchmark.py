"""Speed and memory of GCNet on the device at hand, measured as the results table measured them.

The table's "Mem (GB)" is the peak memory of training at the row's per-GPU batch and crop; its
"Inf time (fps)" is batch-1 inference on real test images at the row's test size and mode, timed
with the post-processing (resize to the original size, softmax, argmax), in fp32 on a V100
(mmseg v0.5.0 tools/benchmark.py, docs/model_zoo.md). This script measures both for one row, for
variants of our model side by side (fp32 eager as the original ran, bf16/fp16 autocast,
channels_last, torch.compile, activation checkpointing for training), with FLOPs per image (counted
once, in fp32), achieved FLOP/s and their fraction of a large matmul's rate in the same run and
dtype; training memory also as the bytes autograd saves for backward plus weights, gradients and
SGD momentum; and the data pipeline of one loader worker. Weights and images are random: speed
does not depend on their values.

    python benchmark.py                                       # cityscapes 512x1024, R-50-D8
    python benchmark.py --dataset cityscapes --crop 769 --depth 101
    python benchmark.py --dataset ade20k --no-compile --out ade20k_bench.json
    python benchmark.py --train-batch 2 8                     # also batch 8: one GPU as the table's 4x2
    python benchmark.py --iters 195 --warmup 5                # the original's 200 images (on a GPU)
    python benchmark.py --size 64x128 --iters 1 --warmup 1 --train-crop 64x128 --train-batch 1 \
        --data-size 64x128 --data-iters 2 --no-compile        # a quick look, about a minute on a CPU

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
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from torchvision.io import write_png
from tqdm import tqdm

import data
import evaluate
import recipe
import runtime
import train
from model import GCNet

# Mem (GB) and Inf time (fps) of the 40k rows of the results table (mmseg v0.5.0
# configs/gcnet/README.md), measured in fp32 on V100s; the 80k rows have none.
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
CITYSCAPES_IMAGE_SIZE = (1024, 2048)  # every Cityscapes image (H, W)
NATURAL_IMAGE_SIZE = (375, 500)  # ADE20K and VOC images vary: a typical 500x375 VOC photo
# The memory target: the table's 512x1024 row (5.8 GB there) at its per-GPU batch, in bf16.
MEMORY_TARGET = dict(crop_size=(512, 1024), batch=2, precision="bf16", gb=3.0)
# The device's limit in a dtype is taken as the rate of a matmul this large. It is a practical peak,
# not a bound: a matmul library can trail the conv library, so a fraction above 100% is possible.
MATMUL_SIZE = {"cuda": 4096, "cpu": 2048}
MATMUL_SECONDS = 0.5
DATA_ROUNDS = 4  # the data pipelines are timed in this many alternating rounds
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GB = 1024**3


# -----------------------------------------------------------------------------------------------
# The row of the table and the variants of our model


def row_settings(args, device):
    """recipe.row of the chosen row, plus what the measurements need: the original image size that
    the test pipeline rescales to the test scale, the training crop and batches."""
    row = recipe.row(args.dataset, args.crop and recipe.parse_crop(args.crop, "--crop"), args.depth)
    crop_size, table_crops = row["crop_size"], recipe.DATASETS[args.dataset]["crops"]
    if crop_size not in table_crops:
        raise ValueError(
            f"--crop {args.crop}: the results table has {args.dataset} rows for crops "
            f"{', '.join(f'{h}x{w}' for h, w in table_crops)}; pick one of them "
            "(--train-crop changes the training crop alone)"
        )
    original_size = CITYSCAPES_IMAGE_SIZE if args.dataset == "cityscapes" else NATURAL_IMAGE_SIZE
    test_scale = row["scale"]
    if args.size is not None:  # the given size is fed to the model as it is
        original_size = recipe.parse_crop(args.size, "--size")
        test_scale = (original_size[1], original_size[0])
    train_crop = recipe.parse_crop(args.train_crop, "--train-crop") if args.train_crop else crop_size
    # By default on a GPU also the table's 4 GPUs' worth of images on one (2 -> 8, 4 -> 16).
    batches = [row["batch_size"]] + ([row["global_batch"]] if device.type == "cuda" else [])
    batches = list(dict.fromkeys(args.train_batch or batches))
    if min(batches) < 1:
        raise ValueError(f"--train-batch: expected positive batch sizes, got {args.train_batch}")
    row.update(
        backbone=f"R-{args.depth}-D8",
        num_classes=len(data.DATASETS[args.dataset]["classes"]),
        original_size=original_size,
        test_scale=test_scale,
        input_size=data.rescale_size(*original_size, test_scale),
        stride=row["test_stride"] if row["test_mode"] == "slide" else None,
        train_batches=batches,
        train_crop=train_crop,
        published=PUBLISHED.get((args.dataset, crop_size, args.depth)),
        inference_comparable=args.size is None,
        comparable=args.size is None and train_crop == crop_size and batches[0] == row["batch_size"],
    )
    return row


def make_variant(precision, channels_last, compiled=False, checkpointing=False, batch=None):
    """One configuration to measure; batch None: the first of --train-batch, with inference."""
    flags = [("+channels_last", channels_last), ("+compile", compiled), ("+checkpointing", checkpointing)]
    name = precision + "".join(flag for flag, on in flags if on) + (f" at batch {batch}" if batch else "")
    return dict(name=name, precision=precision, channels_last=channels_last, compiled=compiled,
                checkpointing=checkpointing, batch=batch)  # fmt: skip


def variant_list(device, args, batches):
    """fp32 eager first (the baseline, and where FLOPs are counted), then the faster variants; the
    `default` one is what train.py and evaluate.py run with the same flags. compile and activation
    checkpointing are tried on the default (on bf16 where --precision auto picks fp32); these are
    the ones trained at the further batches of --train-batch."""
    precision = runtime.resolve_precision(args.precision, device)
    default = make_variant(precision, runtime.resolve_channels_last(args.channels_last, device, precision))
    if args.precision == "auto":
        precisions = ["fp32", "bf16"] + (["fp16"] if device.type == "cuda" else [])
        variants = [make_variant(p, False) for p in precisions] + [make_variant("bf16", True)]
    else:  # fp32 stays: the baseline of the speed-ups and of the argmax agreement
        variants = [make_variant(*pair) for pair in (("fp32", False), (precision, False), (precision, True))]
    lead = default
    if args.precision == "auto" and precision == "fp32":
        lead = make_variant("bf16", runtime.resolve_channels_last(args.channels_last, device, "bf16"))
    checkpointing = make_variant(lead["precision"], lead["channels_last"], checkpointing=True)
    variants.append(default)
    if not args.no_compile:
        variants.append(make_variant(lead["precision"], lead["channels_last"], compiled=True))
    variants.append(checkpointing)
    for batch in batches[1:]:
        for base in (default, lead, checkpointing):
            variants.append(
                make_variant(base["precision"], base["channels_last"], False, base["checkpointing"], batch)
            )
    variants = list({variant["name"]: variant for variant in variants}.values())  # first of each name
    for variant in variants:
        variant["default"] = variant["name"] == default["name"]
    return variants


def build_model(row, variant, device=None):
    """GCNet with the same random weights for every variant, so that their predictions compare."""
    torch.manual_seed(0)
    model = GCNet(row["num_classes"], depth=row["depth"], align_corners=row["align_corners"],
                  activation_checkpointing=variant["checkpointing"])  # fmt: skip
    layout = torch.channels_last if variant["channels_last"] else torch.preserve_format
    return model if device is None else model.to(device, memory_format=layout)
    return model


# -----------------------------------------------------------------------------------------------
# Timing, FLOPs and the device's limit


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(function, warmup, iters, device, description, first_call_scopes=()):
    """Call `function` warmup times, then iters times, each timed alone between device
    synchronisations. The first call runs inside `first_call_scopes`: a FLOP counter (it sees every
    conv and matmul, backward included, and no BatchNorm, resize or softmax), a counter of saved
    tensors. cpu_share is the share of the CPU threads that the timed calls got: below ~0.9, other
    processes were competing."""
    progress = tqdm(total=warmup + iters, desc=description, leave=False, disable=None)
    synchronize(device)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for scope in first_call_scopes:
            stack.enter_context(scope)
        first_result = function()
    synchronize(device)
    first_call_seconds = time.perf_counter() - start
    progress.update()
    for _ in range(warmup - 1):
        function()
        progress.update()
    seconds, cpu_start, wall_start = [], time.process_time(), time.perf_counter()
    for _ in range(iters):
        synchronize(device)
        tick = time.perf_counter()
        function()
        synchronize(device)
        seconds.append(time.perf_counter() - tick)
        progress.update()
    cpu_share = (time.process_time() - cpu_start) / (
        (time.perf_counter() - wall_start) * torch.get_num_threads()
    )
    progress.close()
    return dict(first_result=first_result, first_call_seconds=first_call_seconds, seconds=seconds,
                cpu_share=cpu_share if device.type == "cpu" else None)  # fmt: skip


def matmul_rate(precision, device):
    """FLOP/s of a large square matmul in the given dtype: the practical peak of the device for it
    (fp32 with TF32 off on CUDA, as the fp32 variant runs)."""
    size = MATMUL_SIZE[device.type]
    calls_per_round = 20 if device.type == "cuda" else 1  # CUDA: few host synchronisations
    with runtime.precision_context(device, "fp32"):  # TF32 off, for the fp32 rate
        a, b = (torch.randn(size, size, device=device).to(DTYPES[precision]) for _ in range(2))
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


# -----------------------------------------------------------------------------------------------
# Memory: the measured peak, and an account of what training keeps


def trim_cpu_heap():
    """Hand freed heap memory back to the OS (glibc keeps it otherwise), so the next resident-
    memory peak starts from what is really in use."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device):
    """Start a new peak of runtime.peak_memory_gb; returns what the peak will mean. On the CPU it
    counts the Python process, the libraries and the weights as well; Linux resets it through
    /proc/self/clear_refs, elsewhere later variants inherit earlier ones' peaks."""
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
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GB
    except (OSError, IndexError, ValueError):
        return None


@contextlib.contextmanager
def saved_for_backward(model, count):
    """Adds to count["bytes"] what autograd keeps for the backward pass inside the block. Each
    storage counts once (a view and its base, or a tensor that two ops save, share one); parameters
    are left out, as training_memory counts them as weights. The count depends on shapes and dtypes
    only, so it is the same on any device."""
    # A storage is named by its own address: data_ptr would do on a device, but fake tensors have none.
    seen = {parameter.untyped_storage()._cdata for parameter in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            count["bytes"] += storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield count


def training_memory(saved_bytes, model):
    """The estimate of training memory, GB: saved for backward + weights (and BatchNorm buffers) +
    one gradient and one SGD momentum buffer per parameter."""
    state = 3 * sum(p.nbytes for p in model.parameters()) + sum(b.nbytes for b in model.buffers())
    return dict(saved_for_backward_gb=saved_bytes / GB, weights_gradients_momentum_gb=state / GB,
                estimated_training_memory_gb=(saved_bytes + state) / GB)  # fmt: skip


def forward_loss(model, images, labels, row, forward_scope):
    """The recipe's loss: decode head + aux_weight x auxiliary head."""
    with forward_scope:
        logits, aux_logits = model(images)
    loss = train.segmentation_loss(logits, labels)
    return loss + row["aux_weight"] * train.segmentation_loss(aux_logits, labels)


def estimate_on_fake_tensors(row, precision, checkpointing, crop_size, batch):
    """training_memory of one step of the row's model at any size, in about a second: model and batch
    are fake tensors (shapes and dtypes, no data), so nothing is computed or allocated."""
    cpu, count = torch.device("cpu"), dict(bytes=0)
    with FakeTensorMode():
        model = build_model(row, make_variant(precision, False, checkpointing=checkpointing)).train()
        images, labels = torch.empty(batch, 3, *crop_size), torch.zeros(batch, *crop_size, dtype=torch.long)
        step_scope, forward_scope = runtime.training_scopes(cpu, precision)
        with step_scope, saved_for_backward(model, count):
            forward_loss(model, images, labels, row, forward_scope)
        return training_memory(count["bytes"], model)


# -----------------------------------------------------------------------------------------------
# Inference and training, timed as the original timed them (mmseg v0.5.0 tools/benchmark.py)


def synthetic_test_image(row, device):
    """A random photo of the row's original size through the test transform: (1, 3, h, w)."""
    generator = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 256, (3, *row["original_size"]), dtype=torch.uint8, generator=generator)
    return data.test_transform(photo, row["test_scale"])[0][None].to(device)


def measure_inference(variant, row, image, device, warmup, iters, count_flops):
    """images/s of evaluate.predict + argmax + .cpu() on one image, and the first prediction: the
    forward pass (whole image, or windows averaged as logits), the resize to the original size,
    softmax, argmax and the copy to the host. The image is already normalised on the device, as the
    original excluded data loading."""
    model = build_model(row, variant, device).eval()
    if variant["precision"] != "fp32" and not variant["compiled"]:
        model = runtime.fold_batchnorm(model)  # as evaluate.py by default
    if variant["channels_last"]:
        image = image.contiguous(memory_format=torch.channels_last)
    if variant["compiled"]:  # inductor's freezing folds BatchNorm into the convs and pre-packs weights
        model = torch.compile(model, options={"freezing": True})

    def infer():
        with runtime.precision_context(device, variant["precision"]):
            probabilities = evaluate.predict(model, [image], row["original_size"], mode=row["test_mode"],
                                             crop_size=row["test_crop"], stride=row["stride"])  # fmt: skip
        return probabilities.argmax(dim=0).cpu()  # (H, W) at the original size

    counter = FlopCounterMode(display=False) if count_flops else None
    timing = time_calls(infer, warmup, iters, device, f"inference {variant['name']}", filter(None, [counter]))
    timing.update(flops=counter and counter.get_total_flops(), images_per_s=iters / sum(timing["seconds"]))
    return timing


def synthetic_batch(row, batch, device):
    """Normalised-looking images and labels with every class and a band of ignored pixels."""
    generator = torch.Generator().manual_seed(1)
    height, width = row["train_crop"]
    images = torch.randn(batch, 3, height, width, generator=generator)
    labels = torch.randint(0, row["num_classes"], (batch, height, width), generator=generator)
    labels[:, :, : max(width // 16, 1)] = data.IGNORE_INDEX  # as padding or void pixels
    return images.to(device), labels.to(device)


def measure_training(variant, row, batch, device, warmup, iters, count_flops):
    """images/s and memory of forward (train mode), the recipe's loss, backward and an SGD step. The
    warm-up steps count towards the peak, as the original's peak covers the whole run; the first step
    also counts the bytes saved for backward (not under torch.compile, whose graphs choose what they
    save; it cannot freeze the weights that training updates)."""
    model = build_model(row, variant, device).train()
    images, labels = synthetic_batch(row, batch, device)
    if variant["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=row["lr"], momentum=row["momentum"],
                                weight_decay=row["weight_decay"])  # fmt: skip
    scaler = torch.amp.GradScaler(device.type, enabled=variant["precision"] == "fp16")
    runner = torch.compile(model) if variant["compiled"] else model

    def step():
        step_scope, forward_scope = runtime.training_scopes(device, variant["precision"])
        with step_scope:
            loss = forward_loss(runner, images, labels, row, forward_scope)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    counter = FlopCounterMode(display=False) if count_flops else None
    count = dict(bytes=0)
    saving = None if variant["compiled"] else saved_for_backward(model, count)
    resident_before = resident_memory_gb() if device.type == "cpu" else None
    memory_measure = reset_peak_memory(device)
    description = f"training {variant['name']} batch {batch}"
    timing = time_calls(step, warmup, iters, device, description, filter(None, [counter, saving]))
    timing.update(batch=batch, flops=counter and counter.get_total_flops(), resident_before_gb=resident_before,
                  peak_memory_gb=runtime.peak_memory_gb(device), memory_measure=memory_measure,
                  images_per_s=batch * iters / sum(timing["seconds"]))  # fmt: skip
    memory = training_memory(count["bytes"], model)
    timing.update(memory if saving else dict.fromkeys(memory))
    if not torch.isfinite(timing["first_result"]):
        raise RuntimeError(f"{variant['name']}: the training loss is not finite ({timing['first_result']})")
    return timing


def measure_variants(variants, row, device, args):
    """Inference for the variants of the first batch but the checkpointing ones (checkpointing is
    off in eval mode), then training for all. FLOPs are counted on the first (fp32) variant. A
    compile variant that fails (no C++ compiler, an unsupported op) gets its error reported."""
    image = synthetic_test_image(row, device)
    results = {variant["name"]: dict(inference=None, training=None, error=None) for variant in variants}
    jobs = [("inference", v) for v in variants if v["batch"] is None and not v["checkpointing"]]
    for phase, variant in jobs + [("training", variant) for variant in variants]:
        batch = variant["batch"] or row["train_batches"][0]
        image = image if phase == "inference" else None  # out of the training's memory
        measure, argument = (measure_inference, image) if phase == "inference" else (measure_training, batch)
        try:
            timing = measure(variant, row, argument, device, args.warmup, args.iters, variant is variants[0])
        except Exception as error:
            if not variant["compiled"]:
                raise
            message = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
            results[variant["name"]]["error"] = f"{phase}: {message}"
            print(f"{phase:9} {variant['name']:32} failed: {message}", flush=True)
            continue
        finally:
            trim_cpu_heap()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results[variant["name"]][phase] = timing
        notes = [f"first call {timing['first_call_seconds']:.1f} s"]
        notes += [f"CPU share {timing['cpu_share']:.2f}"] if timing["cpu_share"] is not None else []
        notes += (
            [f"batch {batch}, peak memory {timing['peak_memory_gb']:.2f} GB"] if phase == "training" else []
        )
        print(
            f"{phase:9} {variant['name']:32} {timing['images_per_s']:8.3f} images/s  ({', '.join(notes)})",
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
    blob_size = (1, 1, max(height // 64, 2), max(width // 64, 2))
    blobs = torch.randint(0, num_classes, blob_size, generator=generator)
    label = F.interpolate(blobs.float(), size=size, mode="nearest")[0].to(torch.uint8)
    label[:, : max(height // 20, 1)] = data.IGNORE_INDEX
    image_path, label_path = Path(folder) / "image.png", Path(folder) / "label.png"
    write_png(image, str(image_path))
    write_png(label, str(label_path))
    return str(image_path), str(label_path)


def opencv_pipelines(image_path, label_path, train_scale, crop_size):
    """The same two pipelines written with OpenCV and numpy, as the original's mmcv ran them
    (mmseg v0.5.0 mmseg/datasets/pipelines/transforms.py): (train_sample, test_sample), or None when
    OpenCV is not installed. It is no dependency of this project, only a point of comparison."""
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
        height, width = data.rescale_size(*label.shape, data.ratio_scale(train_scale, rng.uniform(0.5, 2.0)))
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
        label = F.pad(torch.from_numpy(label.astype(np.int64)), padding, value=data.IGNORE_INDEX)
        return F.pad(normalized(image), padding, value=0.0), label

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
    cityscapes = recipe.row("cityscapes", row["crop_size"] if row["dataset"] == "cityscapes" else None)
    (scale_width, scale_height), (crop_height, crop_width) = cityscapes["scale"], cityscapes["crop_size"]
    height_factor, width_factor = (size / full for size, full in zip(data_size, CITYSCAPES_IMAGE_SIZE))
    train_scale = (round(scale_width * width_factor), round(scale_height * height_factor))
    crop_size = (max(round(crop_height * height_factor), 1), max(round(crop_width * width_factor), 1))
    transform = data.TrainTransform(train_scale, crop_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            image_path, label_path = write_synthetic_pair(folder, data_size, num_classes=19)
            pipelines = {"torch": (lambda: transform(data.read_image(image_path), data.read_label(label_path)),
                                   lambda: data.test_transform(data.read_image(image_path), train_scale))}  # fmt: skip
            opencv = opencv_pipelines(image_path, label_path, train_scale, crop_size)
            if opencv is not None:
                pipelines["opencv"] = opencv
            # Alternating rounds, so that a slower or faster spell of the machine hits every
            # pipeline alike (side by side, the two libraries otherwise differ by a few % run to run).
            seconds, rounds = {}, min(DATA_ROUNDS, iters)
            for round_index in range(rounds):
                for library, functions in pipelines.items():
                    for name, function in zip(("train", "test"), functions):
                        count = iters // rounds + (round_index < iters % rounds)
                        description = f"data {library} {name} ({round_index + 1}/{rounds})"
                        timing = time_calls(function, 1, count, torch.device("cpu"), description)
                        seconds.setdefault(f"{library}_{name}", []).extend(timing["seconds"])
    finally:
        torch.set_num_threads(threads)
    rates = {key: len(values) / sum(values) for key, values in seconds.items()}
    opencv_rates = opencv and dict(train_transform_images_per_s=rates["opencv_train"],
                                   test_transform_images_per_s=rates["opencv_test"])  # fmt: skip
    opencv_note = f"opencv {sys.modules['cv2'].__version__}" if opencv else "opencv not installed"
    print(f"data      decode+TrainTransform {rates['torch_train']:.2f} images/s, decode+test_transform "
          f"{rates['torch_test']:.2f} images/s per worker ({data_size[0]}x{data_size[1]} PNG, 1 thread); "
          + (f"opencv: {rates['opencv_train']:.2f} / {rates['opencv_test']:.2f} images/s" if opencv else opencv_note),
          flush=True)  # fmt: skip
    return dict(image_size=data_size, train_scale=train_scale, crop_size=crop_size, iters=iters, threads=1,
                train_transform_images_per_s=rates["torch_train"], test_transform_images_per_s=rates["torch_test"],
                opencv=opencv_rates or None, opencv_note=opencv_note)  # fmt: skip


# -----------------------------------------------------------------------------------------------
# Report: the figures relative to fp32 eager and to the matmul peak, the table, the targets


def find(records, **fields):
    """The first record with these field values, or None."""
    return next((r for r in records if all(r[key] == value for key, value in fields.items())), None)


def summarize(variants, measured, peaks, flops):
    """One record per variant with the ratios filled in: speed-up over fp32 eager at the same batch,
    FLOP/s and its fraction of the matmul rate of the variant's dtype, argmax agreement with fp32
    eager; for checkpointing, the step-time cost and the memory without it."""
    baseline = measured[variants[0]["name"]]
    records = []
    for variant in variants:
        record = dict(variant, error=measured[variant["name"]]["error"], inference=None, training=None)
        for phase, timing in measured[variant["name"]].items():
            if phase == "error" or timing is None:
                continue
            record[phase] = {key: timing[key] for key in timing if key not in ("first_result", "flops")}
            flops_per_s = flops[phase] * timing["images_per_s"]
            same_batch = variant["batch"] is None and baseline[phase]
            record[phase].update(
                speedup=timing["images_per_s"] / baseline[phase]["images_per_s"] if same_batch else None,
                flops_per_s=flops_per_s,
                fraction_of_matmul_peak=flops_per_s / peaks[variant["precision"]],
            )
        if record["inference"]:
            prediction = measured[variant["name"]]["inference"]["first_result"]
            agreement = (prediction == baseline["inference"]["first_result"]).double().mean().item()
            record["inference"]["argmax_agreement"] = agreement
        record["batch"] = record["training"] and record["training"].pop("batch")
        records.append(record)
    for record in records:
        fields = {key: record[key] for key in ("precision", "channels_last", "batch")}
        without = record["checkpointing"] and find(records, **fields, compiled=False, checkpointing=False)
        if record["training"] and without and without["training"]:
            cost = without["training"]["images_per_s"] / record["training"]["images_per_s"]
            memory = {key: without["training"][key] for key in ("peak_memory_gb", "saved_for_backward_gb")}
            record["training"].update(checkpointing_step_time_cost=cost, without_checkpointing=memory)
    return records


def format_rate(flops_per_s):
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


def results_table(row, records):
    """Markdown table: the results table's columns (our Mem = training peak, fps = inference
    images/s), then ours. The published row comes first."""
    columns = ["Method", "Backbone", "Crop Size", "Mem (GB)", "Inf time (fps)", "variant", "inf speed-up",
               "inf FLOP/s", "inf % of matmul peak", "argmax agreement", "train img/s", "train speed-up",
               "train FLOP/s", "train % of matmul peak", "saved for backward (GB)", "estimated memory (GB)"]  # fmt: skip
    start = ["GCNet", row["backbone"], f"{row['crop_size'][0]}x{row['crop_size'][1]}"]
    lines = [start + [*map(str, row["published"]), "published: V100, fp32"]] if row["published"] else []
    for record in records:
        inference, training = record["inference"] or {}, record["training"] or {}
        name = record["name"] + (" (default)" if record["default"] else "")
        cells = start + [f"{training['peak_memory_gb']:.2f}" if training else "-"]
        cells += [f"{inference['images_per_s']:.3f}" if inference else "-"]
        cells += [name + (f" [{record['error']}]" if record["error"] else "")]
        for figures, percent in ((inference, "argmax_agreement"), (training, None)):
            if not figures:
                cells += ["-"] * 4
                continue
            cells += [f"{figures['images_per_s']:.3f}"] if figures is training else []
            cells += [
                f"{figures['speedup']:.2f}x" if figures["speedup"] else "-",
                format_rate(figures["flops_per_s"]),
            ]
            cells += [f"{100 * figures['fraction_of_matmul_peak']:.0f}%"]
            cells += [f"{100 * figures[percent]:.3f}%"] if percent else []
        memory = [training.get("saved_for_backward_gb"), training.get("estimated_training_memory_gb")]
        lines.append(cells + ["-" if value is None else f"{value:.2f}" for value in memory])
    lines = [cells + [""] * (len(columns) - len(cells)) for cells in lines]
    widths = [max(len(cells[i]) for cells in [columns] + lines) for i in range(len(columns))]
    return "\n".join(
        "| " + " | ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)) + " |"
        for cells in [columns, ["-" * width for width in widths], *lines]
    )


def check_targets(row, records, device, estimates):
    """The benchmark targets of this device kind: measured value, threshold, PASS or MISS. A miss is
    a finding, not an error: the program goes on. Training memory counts with activation
    checkpointing where the default alone misses the target."""
    default = find(records, default=True)
    inference, training = default["inference"], default["training"]
    peak, memory = f"the {default['precision']} matmul rate", MEMORY_TARGET
    size = f"{memory['crop_size'][0]}x{memory['crop_size'][1]} at batch {memory['batch']} in {memory['precision']}"
    targets = []

    def target(description, measured, comparison, threshold, note=None):
        passed = measured >= threshold if comparison == ">=" else measured <= threshold
        targets.append(dict(target=description, measured=measured, comparison=comparison, threshold=threshold,
                            passed=passed, note=note))  # fmt: skip

    def memory_target(description, without, with_checkpointing):
        if with_checkpointing is None or without <= memory["gb"]:
            note = with_checkpointing and f"with activation checkpointing {with_checkpointing:.2f} GB"
            target(f"{description}, {size}", without, "<=", memory["gb"], note)
        else:
            description += f", {size}, with activation checkpointing"
            target(description, with_checkpointing, "<=", memory["gb"], f"without it {without:.2f} GB")

    default_is = f"of the default variant ({default['name']})"
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
        if row["published"] and row["inference_comparable"]:
            fps = row["published"][1]
            target(
                f"inference fps {default_is} / the table's {fps}", inference["images_per_s"] / fps, ">=", 10
            )
        # Measured: the default, if bf16, without and with checkpointing at the target's crop and batch.
        same = dict(precision=default["precision"], channels_last=default["channels_last"], compiled=False)
        found = [find(records, **same, checkpointing=on, batch=memory["batch"]) for on in (False, True)]
        peaks = [(record and record["training"] or {}).get("peak_memory_gb") for record in found]
        at_target = default["precision"] == memory["precision"] and row["train_crop"] == memory["crop_size"]
        if at_target and peaks[0] is not None:
            memory_target("training memory (GB, torch.cuda.max_memory_allocated)", *peaks)
    memory_target(
        "estimated training memory (GB: saved for backward + weights + gradients + momentum)",
        estimates["default"]["estimated_training_memory_gb"],
        estimates["checkpointing"]["estimated_training_memory_gb"],
    )
    return targets


# -----------------------------------------------------------------------------------------------
# Command line


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def protocol_lines(row, args, device, flops, peaks, variants, estimates):
    (height, width), crop, train_crop = row["input_size"], row["crop_size"], row["train_crop"]
    target = MEMORY_TARGET
    lines = [
        f"device      {device.type}: {device_description(device)}; torch {torch.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads"
        + (f", cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark off" if device.type == "cuda" else ""),
        f"row         GCNet {row['backbone']} {row['dataset']} {crop[0]}x{crop[1]}, "
        f"{row['num_classes']} classes, random weights and images",
        f"inference   batch 1, {height}x{width} input ({row['test_mode']}"
        + (f", windows {crop[0]} stride {row['stride'][0]}" if row["stride"] else "")
        + f", align_corners {row['align_corners']}), resized to the original "
        f"{row['original_size'][0]}x{row['original_size'][1]}, softmax, argmax, to host; "
        f"{args.warmup} warm-up + {args.iters} timed images",
        f"training    batch {' and '.join(map(str, row['train_batches']))}, crop {train_crop[0]}x{train_crop[1]}, "
        f"forward + decode/aux loss + backward + SGD step; {args.warmup} warm-up + {args.iters} timed steps",
        f"precision   variants: {', '.join(v['name'] for v in variants)}; fp32 = no TF32; autocast keeps the GC "
        "softmax, LayerNorm and the final resize in fp32",
        f"FLOPs       counted once in fp32 (convs and matmuls): inference {flops['inference'] / 1e9:.1f} GFLOP "
        f"per image, training {flops['training'] / 1e9:.1f} GFLOP per image (forward + backward)",
        f"peak        {MATMUL_SIZE[device.type]}x{MATMUL_SIZE[device.type]} matmul, best of the start and "
        "the end of the run: " + ", ".join(f"{p} {format_rate(rate)}" for p, rate in peaks.items()),
        "memory      estimated = saved for backward (saved_tensors_hooks, each storage once) + weights + "
        f"gradients + SGD momentum; at {target['crop_size'][0]}x{target['crop_size'][1]} batch {target['batch']} "
        f"{target['precision']} on fake tensors: "
        + ", ".join(
            f"{name} {value['estimated_training_memory_gb']:.2f} GB" for name, value in estimates.items()
        ),
    ]
    if not row["comparable"]:
        lines.append(
            "note        sizes or batch differ from the row: not comparable with the published figures"
        )
    return lines


def print_findings(records, targets, device):
    """channels_last on the CPU, the cost of activation checkpointing, a busy CPU, the targets."""
    plain, channels_last = find(records, name="bf16"), find(records, name="bf16+channels_last")
    if device.type == "cpu" and plain and channels_last and plain["inference"] and channels_last["inference"]:
        phases = ("inference", "training")
        ratios = [channels_last[phase]["images_per_s"] / plain[phase]["images_per_s"] for phase in phases]
        print(
            f"channels_last on this CPU (bf16): inference x{ratios[0]:.2f}, training x{ratios[1]:.2f} "
            f"({'helps' if min(ratios) > 1.05 else 'does not help'})"
        )
    for record in records:
        if record["training"] and "without_checkpointing" in record["training"]:
            training, without = record["training"], record["training"]["without_checkpointing"]
            print(
                f"activation checkpointing ({record['name']}): step time x{training['checkpointing_step_time_cost']:.2f}"
                f", saved for backward {without['saved_for_backward_gb']:.2f} -> {training['saved_for_backward_gb']:.2f}"
                f" GB, peak memory {without['peak_memory_gb']:.2f} -> {training['peak_memory_gb']:.2f} GB"
            )
    default = find(records, default=True)
    same = {key: default[key] for key in ("precision", "channels_last", "compiled", "checkpointing")}
    at_batches = [r for r in records if r["training"] and all(r[key] == same[key] for key in same)]
    if len(at_batches) > 1:
        rates = ", ".join(f"batch {r['batch']} {r['training']['images_per_s']:.2f}" for r in at_batches)
        print(f"training images/s of {default['name']}: {rates}")
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
            + (f"; {target['note']}" if target["note"] else "")
        )


def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.keep_freed_memory()  # as train.py and evaluate.py do
    try:
        _, _, device = runtime.setup_device(args.device)
        row = row_settings(args, device)
        variants = variant_list(device, args, row["train_batches"])
    except ValueError as error:
        raise SystemExit(f"benchmark.py: {error}") from None
    args.iters = args.iters or (50 if device.type == "cuda" else 3)
    if args.warmup < 1 or args.iters < 1:
        raise SystemExit("--warmup and --iters must be at least 1 (the first warm-up call counts the FLOPs)")
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # as the table's figures were taken (mmseg tools/benchmark.py)

    print(f"benchmark: GCNet {row['backbone']} {row['dataset']} on {device}", flush=True)
    precisions = dict.fromkeys(variant["precision"] for variant in variants)
    peaks = {precision: matmul_rate(precision, device) for precision in precisions}
    measured = measure_variants(variants, row, device, args)
    baseline = measured[variants[0]["name"]]
    flops = dict(
        inference=baseline["inference"]["flops"],
        training=baseline["training"]["flops"] / row["train_batches"][0],
    )
    memory = MEMORY_TARGET
    estimates = {
        name: estimate_on_fake_tensors(
            row, memory["precision"], name == "checkpointing", memory["crop_size"], memory["batch"]
        )
        for name in ("default", "checkpointing")
    }
    data_results = benchmark_data(row, recipe.parse_crop(args.data_size, "--data-size"), args.data_iters)
    # The peak is re-measured at the end: on a shared machine the better of the two is the closer
    # to what the device can do.
    peaks = {precision: max(rate, matmul_rate(precision, device)) for precision, rate in peaks.items()}
    records = summarize(variants, measured, peaks, flops)
    targets = check_targets(row, records, device, estimates)
    print("\n" + "\n".join(protocol_lines(row, args, device, flops, peaks, variants, estimates)) + "\n")
    print(results_table(row, records) + "\n")
    print_findings(records, targets, device)

    timed = dict(warmup=args.warmup, iters=args.iters)
    inference = {key: row[key] for key in ("input_size", "original_size", "stride", "align_corners")}
    protocol = dict(
        device=device.type,
        device_name=device_description(device),
        torch=torch.__version__,
        python=platform.python_version(),
        threads=torch.get_num_threads(),
        **{key: row[key] for key in ("dataset", "backbone", "depth", "crop_size", "num_classes")},
        inference=dict(batch=1, mode=row["test_mode"], **inference, **timed),
        training=dict(
            batch=row["train_batches"][0], batches=row["train_batches"], crop_size=row["train_crop"], **timed
        ),
        comparable_with_published=row["comparable"],
        flops_counted_in="fp32, torch.utils.flop_counter.FlopCounterMode (convs and matmuls)",
        matmul_size=MATMUL_SIZE[device.type],
        saved_for_backward_counted_with="torch.autograd.graph.saved_tensors_hooks, each storage once",
    )
    published = row["published"] and dict(
        mem_gb=row["published"][0], fps=row["published"][1], hardware="V100, fp32"
    )
    report = dict(
        protocol=protocol,
        published=published or None,
        flops_per_image=flops,
        matmul_peak_flops_per_s=peaks,
        variants=records,
        memory_target=dict(memory, counted_on="fake tensors: shapes and dtypes, no data", **estimates),
        data=data_results,
        targets=targets,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return json.loads(out.read_text())


def build_parser():
    parser = argparse.ArgumentParser(
        description="Measure GCNet's training memory, inference speed and their distance to the device's "
        "peak for one row of the results table (see the docstring of benchmark.py).",
        epilog="--precision auto (the default) runs every precision and marks as default the variant that "
        "train.py and evaluate.py would run; an explicit --precision P (with --channels-last) makes that the "
        "default variant, which the targets judge, and runs only fp32 eager (the baseline) and P's variants.",
    )
    add = parser.add_argument
    add("--dataset", default="cityscapes", choices=recipe.TABLE_DATASETS)
    add("--crop", default=None, help="the row's crop, 769 or HxW (default: the dataset's first)")
    add("--depth", type=int, default=50, choices=(50, 101))
    add("--size", default=None, help="HxW fed to the model for inference (default: the row's)")
    add("--iters", type=int, default=None, help="timed images and steps (default 50 CUDA, 3 CPU)")
    add("--warmup", type=int, default=2, help="untimed calls before them (default 2: the first SGD step creates "
        "the momentum buffers, so steady steps start at the third; the original: 5)")  # fmt: skip
    add("--train-batch", type=int, nargs="+", default=None, help="training batches: the first for every variant, "
        "the others for the default and checkpointing ones (default: the row's per-GPU batch; on CUDA also "
        "the table's 4 GPUs' worth on one, e.g. 2 8)")  # fmt: skip
    add("--train-crop", default=None, help="769 or HxW (default: the row's crop)")
    add("--data-size", default="1024x2048", help="HxW of the PNG for the data timing")
    add("--data-iters", type=int, default=40, help="timed samples per data pipeline")
    add("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add("--no-compile", action="store_true", help="skip the torch.compile variant")
    add("--out", default="benchmark.json", help="where the JSON results go")
    runtime.add_arguments(parser)
    return parser


if __name__ == "__main__":
    main()
