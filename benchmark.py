"""Speed and memory of GCNet on the device at hand, measured as the results table measured them.

The table's "Mem (GB)" is the peak memory of training at the row's per-GPU batch and crop; its
"Inf time (fps)" is batch-1 inference on real test images at the row's test size and mode, with the
post-processing (resize to the original size, softmax, argmax), in fp32 on a V100 (mmseg v0.5.0
tools/benchmark.py, docs/model_zoo.md). This script measures both for one row and for variants of
our model side by side (fp32 eager as the original ran, bf16/fp16 autocast, channels_last,
torch.compile, activation checkpointing, on CUDA cuDNN's fused conv+bias+ReLU), with FLOPs per
image, FLOP/s as a fraction of a large matmul's rate, what training keeps in memory, and the data
pipeline of one loader worker. Weights and images are random: speed does not depend on their
values. It prints a table shaped like the results table (our columns on the right) and the targets
with PASS/MISS, and writes a JSON file.

    python benchmark.py                                       # cityscapes 512x1024, R-50-D8
    python benchmark.py --dataset cityscapes --crop 769 --depth 101
    python benchmark.py --dataset ade20k --no-compile --out ade20k_bench.json
    python benchmark.py --train-batch 2 8                     # also batch 8: one GPU as the table's 4x2
    python benchmark.py --timed 195 --warmup 5                # the original's 200 images (on a GPU)
    python benchmark.py --no-compile --profile                # also where the time goes: the top kernels
    python benchmark.py --size 64x128 --timed 1 --warmup 1 --train-crop 64x128 --train-batch 1 \
        --data-size 64x128 --data-samples 2 --no-compile      # a quick look on a CPU
"""

import argparse
import contextlib
import copy
import ctypes
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
import evaluate
import recipe
import runtime
import train
from model import CONTEXTS, FUSIONS, POOLINGS, Bottleneck, GCNet
from tools import opencv_pipelines
from tools.gpu_check import synthetic_cityscapes

# (Mem (GB), Inf time (fps)) of the 40k rows of the results table by (dataset, crop) and depth
# (mmseg v0.5.0 configs/gcnet/README.md), measured in fp32 on V100s; the 80k rows have none.
PUBLISHED = {
    ("cityscapes", (512, 1024)): {50: (5.8, 3.93), 101: (9.2, 2.61)},
    ("cityscapes", (769, 769)): {50: (6.5, 1.67), 101: (10.5, 1.13)},
    ("ade20k", (512, 512)): {50: (8.5, 23.38), 101: (12.0, 15.20)},
    ("voc12aug", (512, 512)): {50: (5.8, 23.35), 101: (9.2, 14.80)},
}
# The same figures of the original's FCN and NonLocal models, the GC block's comparison (README), by
# (config name's first word, dataset, crop, depth) (mmseg v0.5.0 configs/fcn/README.md, configs/nonlocal_net/README.md).
PUBLISHED_BESIDE = {
    ("fcn", "cityscapes", (512, 1024), 50): (5.7, 4.17),
    ("nonlocal", "cityscapes", (512, 1024), 50): (7.4, 2.72),
}
CITYSCAPES_IMAGE_SIZE = (1024, 2048)  # every Cityscapes image (H, W)
NATURAL_IMAGE_SIZE = (375, 500)  # ADE20K and VOC images vary: a typical 500x375 VOC photo
# The memory target: the table's 512x1024 row (5.8 GB there) at its per-GPU batch, in bf16.
MEMORY_TARGET = dict(crop_size=(512, 1024), batch=2, precision="bf16", gb=3.0)
# The device's limit in a dtype is taken as the rate of a matmul this large. It is a practical peak,
# not a bound: a matmul library can trail the conv library, so a fraction above 100% is possible.
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}
MATMUL_SECONDS = 0.5
DATA_ROUNDS = 4  # the data pipelines are timed in this many alternating rounds
MEMORY_FORMAT = {True: torch.channels_last, False: torch.preserve_format}  # by variant["channels_last"]
PHASES = ("inference", "training")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GB = 1024**3


# 1. The row of the table and the variants of our model --------------------------------------------
def row_settings(args, device):
    """recipe.row of the chosen row, plus what the measurements need: the original image size that
    the test pipeline rescales to the test scale, the training crop and batches."""
    block = train.block_of_flags(args)
    row = recipe.row(args.dataset, args.crop, args.depth, block=block)
    crop_size, table_crops = row["crop_size"], recipe.DATASETS[args.dataset]["crops"]
    if crop_size not in table_crops:
        crops = ", ".join(f"{h}x{w}" for h, w in table_crops)
        raise ValueError(f"--crop {crop_size[0]}x{crop_size[1]}: the results table has {args.dataset} rows "
                         f"for crops {crops}; pick one of them (--train-crop changes the training crop alone)")  # fmt: skip
    original_size = CITYSCAPES_IMAGE_SIZE if args.dataset == "cityscapes" else NATURAL_IMAGE_SIZE
    test_scale = row["scale"]
    if args.size is not None:  # the given size is fed to the model as it is
        original_size = args.size
        test_scale = (original_size[1], original_size[0])
    train_crop = args.train_crop or crop_size
    # By default on a GPU also the table's 4 GPUs' worth of images on one (2 -> 8, 4 -> 16).
    batches = [row["batch_size"]] + ([row["global_batch"]] if device.type == "cuda" else [])
    batches = list(dict.fromkeys(args.train_batch or batches))
    if min(batches) < 1:
        raise ValueError(f"--train-batch: expected positive batch sizes, got {args.train_batch}")
    # The dataset's class count, or the one given (tools/compare_context_blocks.py: a checkpoint's).
    num_classes = getattr(args, "num_classes", None) or len(
        data.CLASSES_AND_PALETTES[args.dataset]["classes"]
    )
    row.update(backbone=f"R-{args.depth}-D8", num_classes=num_classes)
    row.update(original_size=original_size, test_scale=test_scale, train_batches=batches)
    row.update(train_crop=train_crop, input_size=data.rescale_size(*original_size, test_scale))
    row["stride"] = row["test_stride"] if row["test_mode"] == "slide" else None
    row["method"], row["model"] = recipe.method_name(block), recipe.model_name(block)
    row["published"] = PUBLISHED.get((args.dataset, crop_size), {}).get(args.depth)
    if row["method"] != "gcnet":
        row["published"] = PUBLISHED_BESIDE.get((row["method"], args.dataset, crop_size, args.depth))
    row["inference_comparable"] = args.size is None
    row["comparable"] = args.size is None and train_crop == crop_size and batches[0] == row["batch_size"]
    return row


def make_variant(
    precision, channels_last, compiled=False, checkpointing=False, batch=None, cudnn_benchmark=False,
    cudnn_fused=False,
):  # fmt: skip
    """One configuration to measure; batch None: the first of --train-batch, with inference."""
    flags = dict(channels_last=channels_last, compiled=compiled, checkpointing=checkpointing)
    flags.update(cudnn_benchmark=cudnn_benchmark, cudnn_fused=cudnn_fused)
    suffixes = dict(channels_last="+channels_last", compiled="+compile", checkpointing="+checkpointing",
                    cudnn_benchmark="+cudnn.benchmark", cudnn_fused="+cudnn-fused")  # fmt: skip
    name = precision + "".join(suffixes[flag] for flag, on in flags.items() if on)
    name += f" at batch {batch}" if batch else ""
    return dict(name=name, precision=precision, **flags, batch=batch)


def variant_list(device, args, batches):
    """fp32 eager first (the baseline, where FLOPs are counted), then the faster ones; `default` is what
    train.py and evaluate.py run with the same flags. compile and activation checkpointing run on the
    default (bf16 where --precision auto picks fp32), as do the further batches of --train-batch. On
    CUDA the default also runs with cudnn.benchmark on, as train.py trains (the table's figures and
    evaluate.py have it off), and the inference candidate cudnn_fused (fuse_conv_relu)."""
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
    flags = (lead["precision"], lead["channels_last"])
    checkpointing = make_variant(*flags, checkpointing=True)
    compiled = [make_variant(*flags, compiled=True)] if args.compile else []
    tuned = [make_variant(*flags, cudnn_benchmark=True)] if device.type == "cuda" else []
    fused = [make_variant(*flags, cudnn_fused=True)] if device.type == "cuda" else []
    variants += [default, *tuned, *fused, *compiled, checkpointing]
    for batch in batches[1:]:
        for base in (default, lead, *tuned, checkpointing):
            flags = (base["precision"], base["channels_last"], False, base["checkpointing"])
            variants.append(make_variant(*flags, batch, base["cudnn_benchmark"]))
    variants = list({variant["name"]: variant for variant in variants}.values())  # first of each name
    for variant in variants:
        variant["default"] = variant["name"] == default["name"]
    return variants


def build_model(row, variant, device=None):
    """The row's model (GCNet, or the FCN or NonLocal one with --context) with the same random weights for
    every variant, so that their predictions compare."""
    torch.manual_seed(0)
    options = dict(depth=row["depth"], align_corners=row["align_corners"], **row["block"])
    model = GCNet(row["num_classes"], **options, activation_checkpointing=variant["checkpointing"])
    layout = MEMORY_FORMAT[variant["channels_last"]]
    return model if device is None else model.to(device, memory_format=layout)


# 2. Inference and training, timed as the original timed them (mmseg v0.5.0 tools/benchmark.py) ----
def measure_inference(variant, row, device, warmup, iters, count_flops, profile=False, model=None):
    """images/s of evaluate.predict + argmax + .cpu() on a random photo of the row's original size (the
    forward pass, whole or windows averaged as logits, the resize to the original size, softmax, argmax,
    the copy to the host), and the first prediction. As the original, data loading is not timed. model:
    a built model of the row to time (a checkpoint's) instead of a random one."""
    generator = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 256, (3, *row["original_size"]), dtype=torch.uint8, generator=generator)
    image = data.test_transform(photo, row["test_scale"])[0][None]
    image = image.to(device, memory_format=MEMORY_FORMAT[variant["channels_last"]])
    model = (build_model(row, variant, device) if model is None else model).eval()
    # BatchNorm folded as evaluate.py by default; the cuDNN-fused candidate needs it folded in any precision.
    fold = evaluate.default_fold_batchnorm(variant["precision"]) or variant["cudnn_fused"]
    if fold and not variant["compiled"]:
        model = evaluate.fold_batchnorm(model)
    if variant["cudnn_fused"]:
        model = fuse_conv_relu(model)
    if variant["compiled"]:  # inductor's freezing folds BatchNorm into the convs and pre-packs weights
        model = torch.compile(model, options={"freezing": True})
    protocol = dict(mode=row["test_mode"], crop_size=row["test_crop"], stride=row["stride"])

    def infer():
        with runtime.precision_context(device, variant["precision"]):
            probabilities = evaluate.predict(model, [image], row["original_size"], **protocol)
        return probabilities.argmax(dim=0).cpu()  # (H, W) at the original size

    description = f"inference {variant['name']}"
    return time_calls(infer, warmup, iters, device, description, count_flops=count_flops, profile=profile)


class FusedConvReLU(nn.Module):
    """ReLU(conv(x) + bias [+ residual]) as one cuDNN call on CUDA. PyTorch runs a cuDNN convolution
    with a bias as the convolution, then the bias added in a separate broadcast pass (aten
    _convolution); after fold_batchnorm every convolution has a bias, and that pass, with the ReLU
    after it, is a full read and write of every feature map. torch.cudnn_convolution_relu and
    cudnn_convolution_add_relu fold the bias, the residual and the ReLU into the convolution. Elsewhere
    it runs the same maths unfused (the CPU tests check the wiring that way)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, residual=None):
        # Under autocast these ops are not cast for us: cast input, weights and residual as autocast would.
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
        conv, x = self.conv, x.to(dtype)
        weight, bias = conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)
        settings = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if x.is_cuda and residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, *settings)
        if x.is_cuda:
            return torch.cudnn_convolution_add_relu(x, weight, residual.to(dtype), 1.0, bias, *settings)
        y = nn.functional.conv2d(x, weight, bias, *settings)
        return torch.relu(y if residual is None else y + residual.to(dtype))


class FusedBottleneck(nn.Module):
    """A folded Bottleneck as three fused calls: conv1 and conv2 with their ReLUs, conv3 with the
    residual and the last ReLU."""

    def __init__(self, block):
        super().__init__()
        if not all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in (1, 2, 3)):
            raise ValueError(
                "FusedBottleneck takes a Bottleneck whose BatchNorms are folded (evaluate.fold_batchnorm)"
            )
        self.conv1, self.conv2, self.conv3 = (FusedConvReLU(getattr(block, f"conv{i}")) for i in (1, 2, 3))
        self.downsample = block.downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)


def fuse_conv_relu(folded):
    """A copy of a model from evaluate.fold_batchnorm with every convolution that a ReLU follows (the
    stem, the Bottlenecks, the heads' ConvModules) run as a FusedConvReLU: an inference candidate that
    benchmark.py measures on CUDA (variant +cudnn-fused) before evaluate.py takes it up."""
    fused = copy.deepcopy(folded).eval()
    for module in list(fused.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = [name for name, _ in module.named_children()]
        for name in names:
            if isinstance(getattr(module, name), Bottleneck):
                setattr(module, name, FusedBottleneck(getattr(module, name)))
        for conv_name, between, relu in zip(names, names[1:], names[2:]):  # conv, folded BatchNorm, ReLU
            layers = [getattr(module, name) for name in (conv_name, between, relu)]
            # The stem's first conv stays: 3 input channels, where cuDNN's fused kernels want multiples of 8.
            pattern = [type(layer) for layer in layers] == [nn.Conv2d, nn.Identity, nn.ReLU]
            if pattern and layers[0].in_channels % 8 == 0:
                setattr(module, conv_name, FusedConvReLU(layers[0]))
                setattr(module, relu, nn.Identity())
    return fused


def forward_loss(model, images, labels, row, forward_scope):
    """The recipe's loss: decode head + aux_weight x auxiliary head."""
    with forward_scope:
        logits, aux_logits = model(images)
    loss = train.segmentation_loss(logits, labels)
    return loss + row["aux_weight"] * train.segmentation_loss(aux_logits, labels)


def measure_training(variant, row, device, warmup, iters, count_flops, batch, profile=False):
    """images/s and memory of forward (train mode), the recipe's loss, backward and an SGD step on random
    data. The peak covers the warm-up, as the original's covers the whole run; the first step counts the
    bytes saved for backward (not under torch.compile, whose graphs choose what they save)."""
    generator, (height, width) = torch.Generator().manual_seed(1), row["train_crop"]
    images = torch.randn(batch, 3, height, width, generator=generator)
    images = images.to(device, memory_format=MEMORY_FORMAT[variant["channels_last"]])
    labels = torch.randint(0, row["num_classes"], (batch, height, width), generator=generator)
    labels[:, :, : max(width // 16, 1)] = data.IGNORE_INDEX  # every class, and a band of padding or void
    labels = labels.to(device)
    model = build_model(row, variant, device).train()
    optimizer = torch.optim.SGD(model.parameters(), **{k: row[k] for k in ("lr", "momentum", "weight_decay")})
    scaler = torch.amp.GradScaler(device.type, enabled=variant["precision"] == "fp16")
    runner = torch.compile(model) if variant["compiled"] else model

    def step():
        with runtime.training_float32(variant["precision"]):
            loss = forward_loss(runner, images, labels, row, runtime.autocast(device, variant["precision"]))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return loss.detach()

    count = dict(bytes=0)
    saving = [] if variant["compiled"] else [saved_for_backward(model, count)]
    memory = dict(resident_before_gb=resident_memory_gb() if device.type == "cpu" else None)
    memory["memory_measure"] = reset_peak_memory(device)
    description = f"training {variant['name']} batch {batch}"
    timing = time_calls(step, warmup, iters, device, description, batch, count_flops, saving, profile)
    memory["peak_memory_gb"] = runtime.peak_memory_gb(device)
    estimate = training_memory(count["bytes"], model)
    timing.update(batch=batch, **memory, **(estimate if saving else dict.fromkeys(estimate)))
    if not torch.isfinite(timing["first_result"]):
        raise RuntimeError(f"{variant['name']}: the training loss is not finite ({timing['first_result']})")
    return timing


def measure_variants(variants, row, device, args):
    """Inference for the variants of the first batch but checkpointing (off in eval mode), then training
    for all but cudnn-fused (inference only); FLOPs on the first (fp32). A failed compile (no C++
    compiler...) or cudnn-fused variant reports its error. With --profile, the kernels of evaluate.py's
    inference and of train.py's step at the largest batch."""
    results = {variant["name"]: dict(inference=None, training=None, error=None) for variant in variants}
    default = find(variants, default=True)
    as_trained = dict(precision=default["precision"], channels_last=default["channels_last"], compiled=False,
                      checkpointing=False, cudnn_benchmark=device.type == "cuda", cudnn_fused=False)  # fmt: skip
    largest = max(row["train_batches"])
    trained = find(variants, **as_trained, batch=None if largest == row["train_batches"][0] else largest)
    profiled = dict(inference=default["name"], training=(trained or default)["name"])
    jobs = [("inference", v) for v in variants if v["batch"] is None and not v["checkpointing"]]
    jobs += [("training", variant) for variant in variants if not variant["cudnn_fused"]]  # inference only
    for phase, variant in jobs:
        batch = variant["batch"] or row["train_batches"][0]
        timed = (variant, row, device, args.warmup, args.timed, variant is variants[0])
        if variant["compiled"]:
            print(
                f"{phase:9} {variant['name']:32} compiling: the first call takes a minute or more", flush=True
            )
        profile = args.profile and variant["name"] == profiled[phase]
        torch.backends.cudnn.benchmark = variant["cudnn_benchmark"]
        try:
            if phase == "inference":
                timing = measure_inference(*timed, profile=profile)
            else:
                timing = measure_training(*timed, batch, profile=profile)
        except Exception as error:
            if not (variant["compiled"] or variant["cudnn_fused"]):
                raise
            message = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
            results[variant["name"]]["error"] = f"{phase}: {message}"
            print(f"{phase:9} {variant['name']:32} failed: {message}", flush=True)
            continue
        finally:
            release_memory(device)
        results[variant["name"]][phase] = timing
        notes = [f"first call {timing['first_call_seconds']:.1f} s"]
        notes += [f"CPU share {timing['cpu_share']:.2f}"] if timing["cpu_share"] is not None else []
        if phase == "training":
            notes.append(f"batch {batch}, peak memory {timing['peak_memory_gb']:.2f} GB")
        line = f"{phase:9} {variant['name']:32} {timing['images_per_s']:8.3f} images/s  ({', '.join(notes)})"
        print(line, flush=True)
    return results


# 3. Memory: an account of what training keeps, at any size on fake tensors ------------------------
@contextlib.contextmanager
def saved_for_backward(model, count):
    """Adds to count["bytes"] what autograd keeps for backward inside the block, each storage once (a view
    and its base, or a tensor two ops save, share one), parameters left out (training_memory counts them
    as weights). It depends on shapes and dtypes only, so it is the same on any device."""
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
    figures = dict(saved_for_backward_gb=saved_bytes, weights_gradients_momentum_gb=state)
    figures["estimated_training_memory_gb"] = saved_bytes + state
    return {key: value / GB for key, value in figures.items()}


def estimate_on_fake_tensors(row, precision, checkpointing, crop_size, batch):
    """training_memory of one step of the row's model at any size, in about a second: model and batch
    are fake tensors (shapes and dtypes, no data), so nothing is computed or allocated."""
    cpu, count = torch.device("cpu"), dict(bytes=0)
    with FakeTensorMode():
        model = build_model(row, make_variant(precision, False, checkpointing=checkpointing)).train()
        images, labels = torch.empty(batch, 3, *crop_size), torch.zeros(batch, *crop_size, dtype=torch.long)
        with runtime.training_float32(precision), saved_for_backward(model, count):
            forward_loss(model, images, labels, row, runtime.autocast(cpu, precision))
        return training_memory(count["bytes"], model)


# 4. Data: the training and test transforms of one loader worker, on a Cityscapes-sized PNG --------
def benchmark_data(row, data_size, iters):
    """images/s of one loader worker (one process, one torch thread) for decode + TrainTransform and decode
    + test_transform of a Cityscapes image at the scale and crop of the row's Cityscapes recipe, scaled
    with the image when --data-size is not 1024x2048; beside them the same in OpenCV, if installed."""
    cityscapes = recipe.row("cityscapes", row["crop_size"] if row["dataset"] == "cityscapes" else None)
    (scale_width, scale_height), (crop_height, crop_width) = cityscapes["scale"], cityscapes["crop_size"]
    height_factor, width_factor = (size / full for size, full in zip(data_size, CITYSCAPES_IMAGE_SIZE))
    train_scale = (round(scale_width * width_factor), round(scale_height * height_factor))
    crop_size = (max(round(crop_height * height_factor), 1), max(round(crop_width * width_factor), 1))
    threads, seconds, rounds = torch.get_num_threads(), {}, min(DATA_ROUNDS, iters)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            image_path, label_path = str(Path(folder) / "image.png"), str(Path(folder) / "label.png")
            synthetic_cityscapes.write_pair(image_path, label_path, data_size, num_classes=19)
            transform = data.TrainTransform(train_scale, crop_size)
            calls = dict(train=lambda: transform(data.read_image(image_path), data.read_label(label_path)))
            calls["test"] = lambda: data.test_transform(data.read_image(image_path), train_scale)
            pipelines = dict(torch=calls)
            if opencv_pipelines.cv2:
                pipelines["opencv"] = opencv_pipelines.pipelines(
                    image_path, label_path, train_scale, crop_size
                )
            # Alternating rounds, so that a slower or faster spell of the machine hits every
            # pipeline alike (side by side, the two libraries otherwise differ by a few % run to run).
            for round_index in range(rounds):
                count = iters // rounds + (round_index < iters % rounds)
                for library, functions in pipelines.items():
                    for name, function in functions.items():
                        description = f"data {library} {name} ({round_index + 1}/{rounds})"
                        timing = time_calls(function, 1, count, torch.device("cpu"), description)
                        seconds.setdefault((library, name), []).extend(timing["seconds"])
    finally:
        torch.set_num_threads(threads)
    rates = {}
    for (library, name), values in seconds.items():
        rates.setdefault(library, {})[f"{name}_transform_images_per_s"] = len(values) / sum(values)
    ours, theirs = rates["torch"], rates.get("opencv")
    note = f"opencv {opencv_pipelines.cv2.__version__}" if theirs else "opencv not installed"
    train_rate, test_rate = "train_transform_images_per_s", "test_transform_images_per_s"
    comparison = f"opencv: {theirs[train_rate]:.2f} / {theirs[test_rate]:.2f} images/s" if theirs else note
    print(
        f"data      decode+TrainTransform {ours[train_rate]:.2f} images/s, decode+test_transform "
        f"{ours[test_rate]:.2f} images/s per worker ({data_size[0]}x{data_size[1]} PNG, 1 thread); {comparison}",
        flush=True,
    )
    sizes = dict(image_size=data_size, train_scale=train_scale, crop_size=crop_size, iters=iters, threads=1)
    return dict(sizes, **ours, opencv=theirs, opencv_note=note)


# 5. Report: the figures relative to fp32 eager and to the matmul peak, the table, the targets -----
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
            speedup = timing["images_per_s"] / baseline[phase]["images_per_s"] if same_batch else None
            fraction = flops_per_s / peaks[variant["precision"]]
            record[phase].update(speedup=speedup, flops_per_s=flops_per_s, fraction_of_matmul_peak=fraction)
        if record["inference"]:
            prediction = measured[variant["name"]]["inference"]["first_result"]
            agreement = (prediction == baseline["inference"]["first_result"]).double().mean().item()
            record["inference"]["argmax_agreement"] = agreement
        record["batch"] = record["training"] and record["training"].pop("batch")
        records.append(record)
    for record in records:
        fields = {key: record[key] for key in ("precision", "channels_last", "batch")}
        without = record["checkpointing"] and find(
            records, **fields, compiled=False, checkpointing=False, cudnn_benchmark=False, cudnn_fused=False
        )
        if record["training"] and without and without["training"]:
            cost = without["training"]["images_per_s"] / record["training"]["images_per_s"]
            memory = {key: without["training"][key] for key in ("peak_memory_gb", "saved_for_backward_gb")}
            record["training"].update(checkpointing_step_time_cost=cost, without_checkpointing=memory)
    return records


def format_rate(flops_per_s):
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


# The columns of results_table after Method, Backbone and Crop Size: (header, phase, field, format).
# The first two are the results table's (our Mem = training peak, fps = inference images/s).
TABLE_COLUMNS = [
    ("Mem (GB)", "training", "peak_memory_gb", "{:.2f}".format),
    ("Inf time (fps)", "inference", "images_per_s", "{:.3f}".format),
    ("variant", "record", "label", str),
    ("inf speed-up", "inference", "speedup", "{:.2f}x".format),
    ("inf FLOP/s", "inference", "flops_per_s", format_rate),
    ("inf % of matmul peak", "inference", "fraction_of_matmul_peak", "{:.0%}".format),
    ("argmax agreement", "inference", "argmax_agreement", "{:.3%}".format),
    ("train img/s", "training", "images_per_s", "{:.3f}".format),
    ("train speed-up", "training", "speedup", "{:.2f}x".format),
    ("train FLOP/s", "training", "flops_per_s", format_rate),
    ("train % of matmul peak", "training", "fraction_of_matmul_peak", "{:.0%}".format),
    ("saved for backward (GB)", "training", "saved_for_backward_gb", "{:.2f}".format),
    ("estimated memory (GB)", "training", "estimated_training_memory_gb", "{:.2f}".format),
]


def results_table(row, records):
    """Markdown table: the results table's columns, then ours ("-" where a variant has no such
    figure). The published row comes first."""
    start = [row["model"], row["backbone"], f"{row['crop_size'][0]}x{row['crop_size'][1]}"]
    lines = [start + [*map(str, row["published"]), "published: V100, fp32"]] if row["published"] else []
    for record in records:
        label = record["name"] + (" (default)" if record["default"] else "")
        figures = dict(record=dict(label=label + (f" [{record['error']}]" if record["error"] else "")))
        figures.update(inference=record["inference"] or {}, training=record["training"] or {})
        values = [(figures[phase].get(field), style) for _, phase, field, style in TABLE_COLUMNS]
        lines.append(start + ["-" if value is None else style(value) for value, style in values])
    header = ["Method", "Backbone", "Crop Size"] + [column[0] for column in TABLE_COLUMNS]
    lines = [cells + [""] * (len(header) - len(cells)) for cells in lines]
    widths = [max(len(cells[i]) for cells in [header] + lines) for i in range(len(header))]
    return "\n".join(
        "| " + " | ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)) + " |"
        for cells in [header, ["-" * width for width in widths], *lines]
    )


def short_table(row, records):
    """The few figures a person reads first, one row per variant, labelled with the sizes it ran at:
    images/s, peak memory and the share of the matmul peak (--wide prints every figure)."""
    (height, width), (crop_height, crop_width) = row["input_size"], row["train_crop"]
    header = ["variant", "measured at", "inference img/s", "training img/s", "Mem (GB)", "inf % of peak",
              "train % of peak"]  # fmt: skip
    lines = []
    for record in records:
        inference, training = record["inference"] or {}, record["training"] or {}
        sizes = [f"inference {height}x{width}"] if inference else []
        sizes += [f"training {crop_height}x{crop_width} batch {record['batch']}"] if training else []
        cells = [
            record["name"]
            + (" (default)" if record["default"] else "")
            + (" [failed]" if record["error"] else ""),
            ", ".join(sizes),
            f"{inference['images_per_s']:.3f}" if inference else "-",
            f"{training['images_per_s']:.3f}" if training else "-",
            f"{training['peak_memory_gb']:.2f}" if training else "-",
            f"{inference['fraction_of_matmul_peak']:.0%}" if inference else "-",
            f"{training['fraction_of_matmul_peak']:.0%}" if training else "-",
        ]
        lines.append(cells)
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    texts = (
        "  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)) for cells in [header, *lines]
    )
    return "\n".join(text.rstrip() for text in texts)


def check_targets(row, records, device, estimates):
    """The targets of this device kind: measured value, threshold, PASS or MISS (a finding, not an error).
    Training memory counts with activation checkpointing where the default alone misses the target."""
    default = find(records, default=True)
    inference, training = default["inference"], default["training"]
    peak, memory, targets = f"the {default['precision']} matmul rate", MEMORY_TARGET, []
    size = f"{memory['crop_size'][0]}x{memory['crop_size'][1]} at batch {memory['batch']} in {memory['precision']}"

    def target(description, measured, comparison, threshold, note=None, judged=row["comparable"]):
        # A target holds at the row's sizes: measured at others, it is reported, not judged (passed None).
        passed = measured >= threshold if comparison == ">=" else measured <= threshold
        figures = dict(
            measured=measured, comparison=comparison, threshold=threshold, passed=passed if judged else None
        )
        targets.append(dict(target=description, **figures, note=note))

    def memory_target(description, without, with_checkpointing):
        if with_checkpointing is None or without <= memory["gb"]:
            note = with_checkpointing and f"with activation checkpointing {with_checkpointing:.2f} GB"
            target(f"{description}, {size}", without, "<=", memory["gb"], note, judged=True)
        else:
            description += f", {size}, with activation checkpointing"
            target(
                description,
                with_checkpointing,
                "<=",
                memory["gb"],
                f"without it {without:.2f} GB",
                judged=True,
            )

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
            ratio = inference["images_per_s"] / fps
            target(f"inference fps {default_is} / the table's {fps}", ratio, ">=", 25)
        # Measured: the default, if bf16, without and with checkpointing at the target's crop and batch.
        same.update(cudnn_benchmark=False)  # the table's memory was taken with it off
        found = [find(records, **same, checkpointing=on, batch=memory["batch"]) for on in (False, True)]
        peaks = [(record and record["training"] or {}).get("peak_memory_gb") for record in found]
        at_target = default["precision"] == memory["precision"] and row["train_crop"] == memory["crop_size"]
        if at_target and peaks[0] is not None:
            memory_target("training memory (GB, torch.cuda.max_memory_allocated)", *peaks)
    estimated = [estimates[name]["estimated_training_memory_gb"] for name in ("default", "checkpointing")]
    what = "estimated training memory (GB: saved for backward + weights + gradients + momentum)"
    memory_target(what, *estimated)
    return targets


def protocol_lines(row, args, device, flops, peaks, variants, estimates):
    """What was measured and how, one line per topic, printed above the table."""
    (height, width), crop, train_crop = row["input_size"], row["crop_size"], row["train_crop"]
    target, matmul = MEMORY_TARGET, MATMUL_SIZE[device.type]
    timed = f"{args.warmup} warm-up + {args.timed} timed"
    cudnn = (
        f", cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark off but in +cudnn.benchmark"
        if device.type == "cuda"
        else ""
    )
    estimated = ", ".join(f"{n} {e['estimated_training_memory_gb']:.2f} GB" for n, e in estimates.items())
    windows = f", windows {crop[0]} stride {row['stride'][0]}" if row["stride"] else ""
    lines = [
        f"device      {device.type}: {device_description(device)}; torch {torch.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads{cudnn}",
        f"row         {row['model']} {row['backbone']} {row['dataset']} {crop[0]}x{crop[1]}, "
        f"{row['num_classes']} classes, random weights and images",
        f"inference   batch 1, {height}x{width} input ({row['test_mode']}{windows}, align_corners "
        f"{row['align_corners']}), resized to the original {row['original_size'][0]}x{row['original_size'][1]}, "
        f"softmax, argmax, to host; {timed} images",
        f"training    batch {' and '.join(map(str, row['train_batches']))}, crop {train_crop[0]}x{train_crop[1]}, "
        f"forward + decode/aux loss + backward + SGD step; {timed} steps",
        f"precision   variants: {', '.join(v['name'] for v in variants)}; fp32 = no TF32; autocast keeps the GC "
        "softmax, LayerNorm and the final resize in fp32",
        f"FLOPs       counted once in fp32 (convs and matmuls): inference {flops['inference'] / 1e9:.1f} GFLOP "
        f"per image, training {flops['training'] / 1e9:.1f} GFLOP per image (forward + backward)",
        f"peak        {matmul}x{matmul} matmul, best of the start and the end of the run: "
        + ", ".join(f"{precision} {format_rate(rate)}" for precision, rate in peaks.items()),
        "memory      estimated = saved for backward (saved_tensors_hooks, each storage once) + weights + "
        f"gradients + SGD momentum; at {target['crop_size'][0]}x{target['crop_size'][1]} batch {target['batch']} "
        f"{target['precision']} on fake tensors: {estimated}",
    ]
    note = "note        sizes or batch differ from the row: not comparable with the published figures"
    return lines + ([] if row["comparable"] else [note])


def print_findings(records, targets, device):
    """channels_last on the CPU, the cost of activation checkpointing, the cuDNN-fused candidate, a busy
    CPU, the targets."""
    plain, channels_last = find(records, name="bf16"), find(records, name="bf16+channels_last")
    if device.type == "cpu" and plain and channels_last and plain["inference"] and channels_last["inference"]:
        ratios = [channels_last[phase]["images_per_s"] / plain[phase]["images_per_s"] for phase in PHASES]
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
    fused = find(records, cudnn_fused=True)
    if fused and fused["inference"] and default["inference"]:  # the candidate for evaluate.py
        ratio = fused["inference"]["images_per_s"] / default["inference"]["images_per_s"]
        agreement = fused["inference"]["argmax_agreement"]
        print(f"cuDNN-fused conv+bias+ReLU ({fused['name']}): inference x{ratio:.2f} of the default, "
              f"argmax agreement with fp32 {agreement:.3%}")  # fmt: skip
    same = {key: default[key] for key in ("precision", "channels_last", "compiled", "checkpointing")}
    at_batches = [r for r in records if r["training"] and all(r[key] == same[key] for key in same)]
    if len(at_batches) > 1:
        rates = ", ".join(f"batch {r['batch']} {r['training']['images_per_s']:.2f}" for r in at_batches)
        print(f"training images/s of {default['name']}: {rates}")
    shares = {f"{r['name']} {phase}": (r[phase] or {}).get("cpu_share") for r in records for phase in PHASES}
    contended = [name for name, share in shares.items() if share is not None and share < 0.9]
    if contended:
        print(
            f"busy CPU: other processes took a share of the cores during {', '.join(contended)} "
            "(CPU share < 0.9 in the JSON); these figures are pessimistic"
        )
    for record in records:
        for phase in PHASES:
            figures = record[phase] or {}
            kinds = ("kernels" if device.type == "cuda" else "operators", "operators by input shapes")
            for what, entries in zip(
                kinds, (figures.get("top_kernels"), figures.get("top_operators_by_shape"))
            ):
                if entries:
                    print(f"top {what} of {phase} {record['name']} (share of their time, ms per call):")
                    for entry in entries:
                        print(f"  {entry['share']:6.1%} {entry['ms_per_call']:8.2f}  {entry['name'][:150]}")
    print("targets (benchmarks, not tests):")
    for target in targets:
        note = f"; {target['note']}" if target["note"] else ""
        verdict = {True: "PASS", False: "MISS", None: "not judged at this size:"}[target["passed"]]
        print(
            f"  {verdict}  {target['target']}: {target['measured']:.4f} "
            f"(target {target['comparison']} {target['threshold']}){note}"
        )


# 6. The run: the row, the peaks, every variant, the memory estimate, the data, the report ---------
def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.keep_freed_memory()  # as train.py and evaluate.py do
    try:
        _, _, device = runtime.setup_device(args.device)
        row = row_settings(args, device)
        variants = variant_list(device, args, row["train_batches"])
    except ValueError as error:
        raise SystemExit(f"benchmark.py: {error}") from None
    if args.timed is None:
        args.timed = 50 if device.type == "cuda" else 3
    runtime.set_threads(args.threads, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # as the table's figures were taken (mmseg tools/benchmark.py)

    print(f"benchmark: {row['model']} {row['backbone']} {row['dataset']} on {device}", flush=True)
    precisions = dict.fromkeys(variant["precision"] for variant in variants)
    peaks = {precision: matmul_rate(precision, device) for precision in precisions}
    measured = measure_variants(variants, row, device, args)
    baseline = measured[variants[0]["name"]]
    flops = dict(inference=baseline["inference"]["flops"])
    flops["training"] = baseline["training"]["flops"] / row["train_batches"][0]
    memory = MEMORY_TARGET
    fake = (memory["crop_size"], memory["batch"])
    estimates = {
        name: estimate_on_fake_tensors(row, memory["precision"], name == "checkpointing", *fake)
        for name in ("default", "checkpointing")
    }
    data_results = benchmark_data(row, args.data_size, args.data_samples)
    # Measured again at the end: on a shared machine, the better of the two is closer to the device's limit.
    peaks = {precision: max(rate, matmul_rate(precision, device)) for precision, rate in peaks.items()}
    records = summarize(variants, measured, peaks, flops)
    targets = check_targets(row, records, device, estimates)
    print("\n" + "\n".join(protocol_lines(row, args, device, flops, peaks, variants, estimates)) + "\n")
    print((results_table(row, records) if args.wide else short_table(row, records)) + "\n")
    print_findings(records, targets, device)

    timed = dict(warmup=args.warmup, iters=args.timed)
    inference = {key: row[key] for key in ("input_size", "original_size", "stride", "align_corners")}
    training = dict(batch=row["train_batches"][0], batches=row["train_batches"], crop_size=row["train_crop"])
    protocol = dict(device=device.type, device_name=device_description(device), torch=torch.__version__)
    protocol.update(python=platform.python_version(), threads=torch.get_num_threads())
    keys = ("model", "block", "dataset", "backbone", "depth", "crop_size", "num_classes")
    protocol.update({key: row[key] for key in keys})
    protocol["inference"] = dict(batch=1, mode=row["test_mode"], **inference, **timed)
    protocol.update(training=dict(training, **timed), comparable_with_published=row["comparable"])
    protocol["flops_counted_in"] = "fp32, torch.utils.flop_counter.FlopCounterMode (convs and matmuls)"
    hooks = "torch.autograd.graph.saved_tensors_hooks, each storage once"
    protocol.update(matmul_size=MATMUL_SIZE[device.type], saved_for_backward_counted_with=hooks)
    published = row["published"] and dict(zip(("mem_gb", "fps"), row["published"]), hardware="V100, fp32")
    memory_target = dict(memory, counted_on="fake tensors: shapes and dtypes, no data", **estimates)
    report = dict(protocol=protocol, published=published or None, flops_per_image=flops)
    report.update(matmul_peak_flops_per_s=peaks, variants=records, memory_target=memory_target)
    report.update(data=data_results, targets=targets)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return json.loads(out.read_text())


# Mechanics: timing, the device's limit, the process's memory, the device's name, the command line ---
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    function, warmup, iters, device, description, images=1, count_flops=False, scopes=(), profile=False
):
    """Call `function` warmup times, then iters times, each call timed alone between device syncs. The
    first call runs inside `scopes` and, with count_flops, a FLOP counter (every conv and matmul, backward
    included; no BatchNorm, resize or softmax). cpu_share: the share of the CPU threads the timed calls
    got (below ~0.9, other processes were competing). profile: then the top kernels of a few more calls."""
    counter = FlopCounterMode(display=False) if count_flops else None
    seconds = []
    for call in tqdm(range(warmup + iters), desc=description, leave=False, disable=None):
        if call == warmup:
            cpu_start, wall_start = time.process_time(), time.perf_counter()
        with contextlib.ExitStack() as stack:
            for scope in [*scopes, *filter(None, [counter])] if call == 0 else []:
                stack.enter_context(scope)
            synchronize(device)
            start = time.perf_counter()
            result = function()
            synchronize(device)
            seconds.append(time.perf_counter() - start)
        if call == 0:
            first_result = result
    threads_seconds = (time.perf_counter() - wall_start) * torch.get_num_threads()
    share = (time.process_time() - cpu_start) / threads_seconds if device.type == "cpu" else None
    timing = dict(first_result=first_result, first_call_seconds=seconds[0], seconds=seconds[warmup:])
    timing.update(cpu_share=share, flops=counter and counter.get_total_flops())
    if profile:
        timing["top_kernels"], timing["top_operators_by_shape"] = top_kernels(function, device)
    return dict(timing, images_per_s=images * iters / sum(timing["seconds"]))


def top_kernels(function, device, calls=3, top=12):
    """Where a call's time goes over `calls` calls: the CUDA kernels (on a CPU, the operators) that took
    the most time, and the operators by input shapes with the time of what they ran (on CUDA their
    kernels': which add, which convolution). Each entry has its share of the total and its ms per call."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(calls):
            function()
        synchronize(device)

    def ranked(times):
        total = sum(times.values()) or 1
        best = sorted(times.items(), key=lambda item: -item[1])[:top]
        return [dict(name=name, share=us / total, ms_per_call=us / 1000 / calls) for name, us in best]

    operators = profiler.key_averages(group_by_input_shape=True)
    if device.type == "cuda":
        kind = torch.autograd.DeviceType.CUDA
        kernels = {e.key: e.self_device_time_total for e in profiler.key_averages() if e.device_type == kind}
        shapes = {
            f"{e.key} {e.input_shapes}": e.self_device_time_total for e in operators if e.device_type != kind
        }
    else:
        kernels = {e.key: e.self_cpu_time_total for e in profiler.key_averages()}
        shapes = {f"{e.key} {e.input_shapes}": e.self_cpu_time_total for e in operators}
    return ranked(kernels), ranked(shapes)


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


def release_memory(device):
    """Hand freed memory back (glibc's heap to the OS, the CUDA cache to the driver), so that the
    next peak starts from what is really in use."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_memory(device):
    """Start a new peak of runtime.peak_memory_gb; returns what it will mean. On the CPU it counts the
    whole process; Linux resets it through /proc/self/clear_refs, elsewhere earlier peaks carry over."""
    release_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return "torch.cuda.max_memory_allocated during the training steps"
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


def device_description(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "cpu"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), name)
    return f"{name}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}"


def build_parser():
    parser = argparse.ArgumentParser(
        description="Measure GCNet's training memory, inference speed and their distance to the device's "
        "peak for one row of the results table (see the docstring of benchmark.py).",
        epilog="--precision auto (the default) runs every precision and marks as default the variant that "
        "train.py and evaluate.py would run; an explicit --precision P (with --channels-last) makes that the "
        "default variant, which the targets judge, and runs only fp32 eager (the baseline) and P's variants.",
    )
    add = parser.add_argument
    positive, size = runtime.number_flag(int, 1), runtime.size_flag
    # fmt: off
    add("--dataset", default="cityscapes", choices=recipe.TABLE_DATASETS, help="default: cityscapes")
    add("--crop", type=size("--crop"), help="the row's crop, 769 or HxW (default: the dataset's first)")
    add("--depth", type=int, default=50, choices=(50, 101), help="default 50")
    add("--context", default="gc", choices=CONTEXTS, help="the decode head's block: gc (default), or the "
        "original's nonlocal and none (FCN) models, as train.py")
    add("--gc-pooling", choices=POOLINGS, help="the GC block's pooling, as train.py (default att)")
    add("--gc-fusion", choices=FUSIONS, help="the GC block's fusion, as train.py (default add)")
    add("--size", type=size("--size"), help="HxW fed to the model for inference (default: the row's)")
    add("--timed", type=positive, help="timed images and steps (default 50 CUDA, 3 CPU)")
    add("--warmup", type=positive, default=2, help="untimed calls before them (default 2: the first SGD step "
        "creates the momentum buffers, so steady steps start at the third; the original: 5)")
    add("--train-batch", type=positive, nargs="+", help="training batches: the first for every variant, the "
        "others for the default and checkpointing ones (default: the row's per-GPU batch; on CUDA also the "
        "table's 4 GPUs' worth on one, e.g. 2 8)")
    add("--train-crop", type=size("--train-crop"), help="769 or HxW (default: the row's crop)")
    add("--data-size", type=size("--data-size"), default=(1024, 2048), help="HxW of the data timing's PNG")
    add("--data-samples", type=positive, default=40, help="timed samples per data pipeline (default 40)")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="measure the torch.compile "
        "variant (default; --no-compile skips it)")
    add("--wide", action="store_true", help="print the wide table (every figure; the JSON has them all)")
    add("--profile", action="store_true", help="also list the top kernels, and the operators by input "
        "shapes, of the default inference and of train.py's step at the largest batch")
    add("--out", default="benchmark.json", help="where the JSON results go")
    # fmt: on
    runtime.add_arguments(parser)
    return parser


if __name__ == "__main__":
    main()
