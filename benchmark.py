"""Speed and memory of GCNet on your hardware, measured as the results table measured them.

The table's "Mem (GB)" is the peak memory of training at the row's per-GPU batch and crop; its "Inf
time (fps)" is batch-1 inference at the row's test size and mode, with the resize to the original
size, softmax and argmax, in fp32 on a V100 (mmseg v0.5.0 tools/benchmark.py). This measures both for
variants of our model side by side (fp32 eager as the original ran, bf16/fp16, channels_last,
torch.compile, activation checkpointing, and on CUDA cudnn.benchmark as train.py trains), with FLOPs
per image as a share of a large matmul's rate, and one loader worker's data pipeline. Weights and
images are random: speed does not depend on their values. It prints a table and writes a JSON file.

    python benchmark.py                                       # cityscapes 512x1024, R-50-D8
    python benchmark.py --dataset cityscapes --crop 769 --depth 101
    python benchmark.py --train-batch 2 8                     # also batch 8: one GPU as the table's 4x2
    python benchmark.py --size 64x128 --timed 1 --warmup 1 --train-crop 64x128 --train-batch 1 \
        --data-size 64x128 --data-samples 2 --no-compile      # a quick look on a CPU

The project's own targets for these figures and its GPU check are in tools/gpu_check/.
"""

import argparse
import contextlib
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import data
import evaluate
import recipe
import runtime
import train
from model import CONTEXTS, FUSIONS, POOLINGS, GCNet

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
# The device's limit in a dtype is taken as the rate of a matmul this large. It is a practical peak,
# not a bound: a matmul library can trail the conv library, so a fraction above 100% is possible.
MATMUL_SIZE = {"cuda": 8192, "cpu": 2048}
MATMUL_SECONDS = 0.5
MEMORY_FORMAT = {True: torch.channels_last, False: torch.preserve_format}  # by variant["channels_last"]
SUFFIXES = dict(channels_last="+channels_last", compiled="+compile", checkpointing="+checkpointing")
SUFFIXES["cudnn_benchmark"] = "+cudnn.benchmark"  # the variants' names: precision + suffixes
PHASES = ("inference", "training")
# Samples/s a loader must deliver to an H200 training at batch 8 in 50 ms a step (docs/benchmarks.md).
FEED_RATE, FEED_BATCH = 160, 8
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
        raise ValueError(
            f"--crop {crop_size[0]}x{crop_size[1]}: the results table has {args.dataset} rows for crops "
            f"{crops}; pick one of them (--train-crop changes the training crop alone)"
        )
    original_size = CITYSCAPES_IMAGE_SIZE if args.dataset == "cityscapes" else NATURAL_IMAGE_SIZE
    test_scale = row["scale"]
    if args.size is not None:  # the given size is fed to the model as it is
        original_size, test_scale = args.size, (args.size[1], args.size[0])
    train_crop = args.train_crop or crop_size
    # By default on a GPU also the table's 4 GPUs' worth of images on one (2 -> 8, 4 -> 16).
    batches = [row["batch_size"]] + ([row["global_batch"]] if device.type == "cuda" else [])
    batches = list(dict.fromkeys(args.train_batch or batches))
    # The dataset's class count, or the one given (tools/compare_context_blocks.py: a checkpoint's).
    classes = data.CLASSES_AND_PALETTES[args.dataset]["classes"]
    row.update(backbone=f"R-{args.depth}-D8", num_classes=getattr(args, "num_classes", None) or len(classes))
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
    precision, channels_last, compiled=False, checkpointing=False, batch=None, cudnn_benchmark=False
):
    """One configuration to measure; batch None: the first of --train-batch, with inference."""
    flags = dict(channels_last=channels_last, compiled=compiled, checkpointing=checkpointing)
    flags.update(cudnn_benchmark=cudnn_benchmark)
    name = precision + "".join(SUFFIXES[flag] for flag, on in flags.items() if on)
    name += f" at batch {batch}" if batch else ""
    return dict(name=name, precision=precision, **flags, batch=batch)


def variant_list(device, args, batches):
    """fp32 eager first (the baseline, where FLOPs are counted), then the faster ones; `default` is what
    train.py and evaluate.py run with the same flags. compile and activation checkpointing run on the
    default (bf16 where --precision auto picks fp32), as do the further batches of --train-batch. On
    CUDA the default also runs with cudnn.benchmark on, as train.py trains (the table's figures and
    evaluate.py have it off)."""
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
    variants += [default, *tuned, *compiled, checkpointing]
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


def check_sizes(row, variants, device):
    """Raise a ValueError naming the flag for a training size that would fail part-way through the run
    (tools/compare_context_blocks.py checks its own before it scores)."""
    (height, width), batches = row["train_crop"], row["train_batches"]
    if not recipe.batchnorm_can_train((height, width), min(batches)):
        raise ValueError(
            f"--train-crop {height}x{width} at --train-batch {min(batches)} leaves training BatchNorm one "
            "value per channel at 1/8 of the crop; give a crop over 8 pixels on a side, or a batch of 2"
        )
    available = runtime.device_memory_gb(device)
    for precision, batch in sorted({(v["precision"], v["batch"] or batches[0]) for v in variants}):
        needed = estimate_on_fake_tensors(row, precision, False, row["train_crop"], batch)
        if needed["estimated_training_memory_gb"] > available:
            raise ValueError(
                f"--train-batch {batch}: training at {height}x{width} in {precision} needs an estimated "
                f"{needed['estimated_training_memory_gb']:.1f} GB, more than the {available:.1f} GB of "
                f"this {device.type} device; give a smaller --train-batch or --train-crop"
            )


# 2. Inference and training, timed as the original timed them (mmseg v0.5.0 tools/benchmark.py) ----
def inference_call(variant, row, device, model=None, ms_flip=False):
    """A call of evaluate.predict + argmax + .cpu() on a random photo of the row's original size (the
    forward pass, whole or windows averaged as logits, the resize to the original size, softmax, argmax,
    the copy to the host). model: a built model of the row (a checkpoint's) instead of a random one.
    ms_flip: at evaluate.py --ms-flip's six scales, each also flipped."""
    generator = torch.Generator().manual_seed(0)
    photo = torch.randint(0, 256, (3, *row["original_size"]), dtype=torch.uint8, generator=generator)
    ratios = evaluate.MS_RATIOS if ms_flip else (1.0,)
    layout = MEMORY_FORMAT[variant["channels_last"]]
    scaled = data.test_transform(photo, row["test_scale"], ratios)
    images = [image[None].to(device, memory_format=layout) for image in scaled]
    model = (build_model(row, variant, device) if model is None else model).eval()
    if evaluate.default_fold_batchnorm(variant["precision"]) and not variant["compiled"]:
        model = evaluate.fold_batchnorm(model)  # as evaluate.py does
    if variant["compiled"]:  # inductor's freezing folds BatchNorm into the convs and pre-packs weights
        model = torch.compile(model, options={"freezing": True})
    protocol = dict(mode=row["test_mode"], crop_size=row["test_crop"], stride=row["stride"], flip=ms_flip)

    def infer():
        with runtime.precision_context(device, variant["precision"]):
            probabilities = evaluate.predict(model, images, row["original_size"], **protocol)
        return probabilities.argmax(dim=0).cpu()  # (H, W) at the original size

    return infer


def measure_inference(variant, row, device, warmup, iters, count_flops, model=None):
    """images/s of inference_call and its first prediction. As the original, data loading is not timed."""
    infer = inference_call(variant, row, device, model)
    return time_calls(infer, warmup, iters, device, f"inference {variant['name']}", count_flops=count_flops)


def measure_ms_flip_memory(variant, row, device):
    """The peak memory (GB, as the training figures: the GPU's allocations, or the process's resident
    memory) of one prediction of evaluate.py --ms-flip."""
    infer = inference_call(variant, row, device, ms_flip=True)
    runtime.reset_peak_memory(device)
    infer()
    peak = runtime.peak_memory_gb(device)
    height, width = row["original_size"]
    print(f"ms+flip   {variant['name']:32} peak memory {peak:.2f} GB, one {height}x{width} image", flush=True)
    runtime.release_memory(device)
    return peak


def forward_loss(model, images, labels, row, forward_scope):
    with forward_scope:
        logits, aux_logits = model(images)
    loss = train.segmentation_loss(logits, labels)
    return loss + row["aux_weight"] * train.segmentation_loss(aux_logits, labels)


def training_step(variant, row, device, batch):
    """(step, model): a call of forward (train mode), the recipe's loss, backward and an SGD step on
    random data, and the model it trains."""
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

    return step, model


def measure_training(variant, row, device, warmup, iters, count_flops, batch):
    """images/s and memory of training_step. The peak covers the warm-up, as the original's covers the
    whole run; the first step counts the bytes saved for backward (not under torch.compile, whose graphs
    choose what they save)."""
    step, model = training_step(variant, row, device, batch)
    count = dict(bytes=0)
    saving = [] if variant["compiled"] else [saved_for_backward(model, count)]
    runtime.reset_peak_memory(device)
    description = f"training {variant['name']} batch {batch}"
    timing = time_calls(step, warmup, iters, device, description, batch, count_flops, saving)
    estimate = training_memory(count["bytes"], model)
    timing.update(batch=batch, peak_memory_gb=runtime.peak_memory_gb(device))
    timing.update(estimate if saving else dict.fromkeys(estimate))
    if not torch.isfinite(timing["first_result"]):
        raise RuntimeError(f"{variant['name']}: the training loss is not finite ({timing['first_result']})")
    return timing


def measure_variants(variants, row, device, args):
    """Inference for the variants of the first batch but checkpointing (off in eval mode), then training
    for all; FLOPs on the first (fp32). A failed compile (no C++ compiler...) reports its error."""
    results = {variant["name"]: dict(inference=None, training=None, error=None) for variant in variants}
    jobs = [("inference", v) for v in variants if v["batch"] is None and not v["checkpointing"]]
    for phase, variant in jobs + [("training", variant) for variant in variants]:
        batch = variant["batch"] or row["train_batches"][0]
        timed = (variant, row, device, args.warmup, args.timed, variant is variants[0])
        if variant["compiled"]:
            print(f"{phase:9} {variant['name']:32} compiling: a minute or more", flush=True)
        torch.backends.cudnn.benchmark = variant["cudnn_benchmark"]
        try:
            timing = measure_inference(*timed) if phase == "inference" else measure_training(*timed, batch)
        except Exception as error:
            if not variant["compiled"]:
                raise
            message = error_line(error)
            results[variant["name"]]["error"] = f"{phase}: {message}"
            print(f"{phase:9} {variant['name']:32} failed: {message}", flush=True)
            continue
        finally:
            runtime.release_memory(device)
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
    precision = "bf16" if precision == "fp16" else precision  # the same bytes; the CPU's autocast has no fp16
    with FakeTensorMode():
        model = build_model(row, make_variant(precision, False, checkpointing=checkpointing)).train()
        images, labels = torch.empty(batch, 3, *crop_size), torch.zeros(batch, *crop_size, dtype=torch.long)
        with runtime.training_float32(precision), saved_for_backward(model, count):
            forward_loss(model, images, labels, row, runtime.autocast(cpu, precision))
        return training_memory(count["bytes"], model)


# 4. Data: the training and test transforms of one loader worker, on a Cityscapes-like PNG ----------
def write_photo_like_pair(image_path, label_path, size, seed=2):
    """Write an RGB PNG of smooth colours plus noise (it compresses and decodes about as a photo does)
    and a label PNG of blobs of the 19 Cityscapes train ids with an ignored top band, both of size (H, W)."""
    generator, (height, width) = torch.Generator().manual_seed(seed), size
    coarse = torch.rand(1, 3, max(height // 32, 2), max(width // 32, 2), generator=generator) * 255
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    noise = torch.randn(3, height, width, generator=generator) * 6
    blobs = torch.randint(0, 19, (1, 1, max(height // 64, 2), max(width // 64, 2)), generator=generator)
    label = F.interpolate(blobs.float(), size=size, mode="nearest")[0].to(torch.uint8)
    label[:, : max(height // 20, 1)] = data.IGNORE_INDEX
    data.write_png((smooth + noise).round().clamp(0, 255).to(torch.uint8), image_path)
    data.write_png(label, label_path)


def benchmark_data(row, data_size, iters, beside=(), device=None):
    """images/s of one loader worker (one process, one torch thread) for decode + TrainTransform and decode
    + test_transform of a Cityscapes-like image at the scale and crop of the row's Cityscapes recipe,
    scaled with the image when --data-size is not 1024x2048, then the same from its decoded copy
    (tools/prepare_datasets.py decoded); then training's loader with 1 and 2 workers, and the cores it
    would take to feed FEED_RATE samples/s. beside: (library, function(image_path, label_path, train_scale,
    crop_size) -> dict(train=..., test=...)) pairs, other libraries' pipelines timed in turn with ours
    (tools/gpu_check/targets.py passes OpenCV's)."""
    cityscapes = recipe.row("cityscapes", row["crop_size"] if row["dataset"] == "cityscapes" else None)
    (scale_width, scale_height), (crop_height, crop_width) = cityscapes["scale"], cityscapes["crop_size"]
    height_factor, width_factor = (size / full for size, full in zip(data_size, CITYSCAPES_IMAGE_SIZE))
    train_scale = (round(scale_width * width_factor), round(scale_height * height_factor))
    crop_size = (max(round(crop_height * height_factor), 1), max(round(crop_width * width_factor), 1))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        with tempfile.TemporaryDirectory() as folder:
            # One image and its label in the Cityscapes layout, read as the train split, then its copy.
            stem = str(Path(folder, "{0}", "train", "bench", "bench_000000_000019_{0}{1}.png"))
            image, label = stem.format("leftImg8bit", ""), stem.format("gtFine", "_labelTrainIds")
            write_photo_like_pair(image, label, data_size)
            datasets = dict(files=data.build_dataset("cityscapes", folder, "train", crop_size, train_scale))
            data.write_decoded(folder, image, "image")
            data.write_decoded(folder, label, "label")
            datasets["decoded"] = data.build_dataset("cityscapes", folder, "train", crop_size, train_scale)
            ours = dict(train=lambda: datasets["files"][0], train_decoded=lambda: datasets["decoded"][0])
            ours["test"] = lambda: data.test_transform(data.read_image(image), train_scale)
            ours["test_decoded"] = lambda: data.test_transform(
                data.read_decoded(folder, image, "image"), train_scale
            )
            pipelines = dict(torch=ours)
            for library, make in beside:
                pipelines[library] = make(image, label, train_scale, crop_size)
            calls = {
                (library, name): call for library in pipelines for name, call in pipelines[library].items()
            }
            seconds = {key: [] for key in calls}
            # Each pipeline in turn, sample by sample, so that a slower or faster spell of the machine
            # hits them alike (side by side, two libraries otherwise differ by a few % run to run).
            for sample in tqdm(range(1 + iters), desc="data", leave=False, disable=None):  # 0: a warm-up
                for key, call in calls.items():
                    start = time.perf_counter()
                    call()
                    seconds[key] += [time.perf_counter() - start] if sample else []
            loader, batches = {}, max(2, iters // 4)
            for source, dataset in datasets.items():
                dataset.pairs = dataset.pairs[:1] * FEED_BATCH * (2 + batches)  # no second epoch
                loader[source] = [
                    loader_rate(dataset, workers, batches, device=device)[0] for workers in (1, 2)
                ]
    finally:
        torch.set_num_threads(threads)
    rates = {library: {} for library in pipelines}
    for (library, name), values in seconds.items():
        rates[library][f"{name}_transform_images_per_s"] = len(values) / sum(values)
    figures = ", ".join(
        f"{library} {rate['train_transform_images_per_s']:.2f} / {rate['test_transform_images_per_s']:.2f}"
        for library, rate in rates.items()
    )
    decoded = "{train_decoded_transform_images_per_s:.2f} / {test_decoded_transform_images_per_s:.2f}"
    size = f"{data_size[0]}x{data_size[1]} PNG"
    print(f"data      one worker, {size}, decode+TrainTransform / decode+test_transform: {figures} images/s")
    print(f"data      the same from the decoded copy: {decoded.format(**rates['torch'])} images/s")
    cores = {source: math.ceil(FEED_RATE / rate[0]) for source, rate in loader.items()}
    rates_of = {source: " / ".join(f"{rate:.1f}" for rate in rates) for source, rates in loader.items()}
    print(
        f"loader    training samples/s at batch {FEED_BATCH} with 1 / 2 workers: files {rates_of['files']}, "
        f"decoded copy {rates_of['decoded']}; cores to feed {FEED_RATE}/s: {cores['files']} from the files, "
        f"{cores['decoded']} from the copy"
    )
    sizes = dict(image_size=data_size, train_scale=train_scale, crop_size=crop_size, iters=iters, threads=1)
    loaders = dict(loader_samples_per_s=loader, cores_to_feed=dict(rate=FEED_RATE, **cores))
    return dict(sizes, **rates.pop("torch"), **loaders, beside=rates)


def loader_rate(dataset, workers, batches, batch_size=FEED_BATCH, device=None):
    """(samples/s, seconds to the first batch) of train.py's training loader (train.training_batches)
    with `workers` workers, timed over `batches` batches once each worker's first is in (the workers'
    start left out)."""
    config = dict(
        dataset=dataset.name, seed=0, batch_size=batch_size, global_batch=batch_size, workers=workers
    )
    # The device whose run it feeds (default: the GPU if there is one), which decides the pinned memory.
    config["device"] = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    start = time.perf_counter()
    stream = train.training_batches(dataset, config, 0)
    next(stream)
    first = time.perf_counter() - start
    for _ in range(max(workers, 1) - 1):
        next(stream)
    start = time.perf_counter()
    for _ in range(batches):
        next(stream)
    rate = batches * batch_size / (time.perf_counter() - start)
    stream.close()  # stops the workers
    return rate, first


# 5. Report: the figures relative to fp32 eager and to the matmul peak, the table ---------------------
def summarize(variants, measured, peaks, flops):
    """One record per variant: speed-up over fp32 eager at the same batch, FLOP/s and its fraction of
    the matmul rate of the variant's dtype, argmax agreement with fp32 eager."""
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
    return records


def format_rate(flops_per_s):
    return f"{flops_per_s / 1e12:.2f} TFLOP/s" if flops_per_s >= 1e12 else f"{flops_per_s / 1e9:.0f} GFLOP/s"


# The table's columns: (header, phase, field, format). Mem (GB) and Inf time (fps) are the results
# table's (our Mem = training peak, fps = inference images/s); the short table has those marked True.
COLUMNS = [
    ("Mem (GB)", "training", "peak_memory_gb", "{:.2f}".format, True),
    ("Inf time (fps)", "inference", "images_per_s", "{:.3f}".format, True),
    ("variant", "record", "label", str, True),
    ("measured at", "record", "sizes", str, True),
    ("inf speed-up", "inference", "speedup", "{:.2f}x".format, False),
    ("inf FLOP/s", "inference", "flops_per_s", format_rate, False),
    ("inf % of matmul peak", "inference", "fraction_of_matmul_peak", "{:.0%}".format, True),
    ("argmax agreement", "inference", "argmax_agreement", "{:.3%}".format, False),
    ("train img/s", "training", "images_per_s", "{:.3f}".format, True),
    ("train speed-up", "training", "speedup", "{:.2f}x".format, False),
    ("train FLOP/s", "training", "flops_per_s", format_rate, False),
    ("train % of matmul peak", "training", "fraction_of_matmul_peak", "{:.0%}".format, True),
    ("saved for backward (GB)", "training", "saved_for_backward_gb", "{:.2f}".format, False),
    ("estimated memory (GB)", "training", "estimated_training_memory_gb", "{:.2f}".format, False),
]


def results_table(row, records, wide=False):
    """A markdown table shaped like the results table, the published row first, then one line per variant
    ("-" where it has no such figure) with the sizes it ran at. wide: every figure, after the results
    table's Method, Backbone and Crop Size."""
    (height, width), (crop_height, crop_width) = row["input_size"], row["train_crop"]
    columns = [column for column in COLUMNS if wide or column[4]]
    start = [row["model"], row["backbone"], "{}x{}".format(*row["crop_size"])] if wide else []
    lines = [start + [*map(str, row["published"]), "published: V100, fp32"]] if row["published"] else []
    for record in records:
        figures = dict(inference=record["inference"] or {}, training=record["training"] or {})
        label = record["name"] + (" (default)" if record["default"] else "")
        label += f" [{record['error']}]" if record["error"] else ""
        training = f"training {crop_height}x{crop_width} batch {record['batch']}"
        sizes = [f"inference {height}x{width}"] if figures["inference"] else []
        sizes += [training] if figures["training"] else []
        figures["record"] = dict(label=label, sizes=", ".join(sizes))
        values = [(figures[phase].get(field), style) for _, phase, field, style, _ in columns]
        lines.append(start + ["-" if value is None else style(value) for value, style in values])
    header = (["Method", "Backbone", "Crop Size"] if wide else []) + [column[0] for column in columns]
    lines = [cells + [""] * (len(header) - len(cells)) for cells in lines]
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "| " + " | ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)) + " |"
        for cells in [header, ["-" * width for width in widths], *lines]
    )


def protocol_lines(row, args, device, flops, peaks):
    (height, width), train_crop = row["input_size"], row["train_crop"]
    timed, matmul = f"{args.warmup} warm-up + {args.timed} timed", MATMUL_SIZE[device.type]
    cudnn = f", cuDNN {torch.backends.cudnn.version()}, cudnn.benchmark off but in +cudnn.benchmark"
    windows = f", windows {row['test_crop'][0]} stride {row['stride'][0]}" if row["stride"] else ""
    lines = [
        f"device      {device.type}: {device_description(device)}; torch {torch.__version__}, "
        f"python {platform.python_version()}, {torch.get_num_threads()} threads{cudnn if device.type == 'cuda' else ''}",
        f"inference   batch 1, {height}x{width} input ({row['test_mode']}{windows}, align_corners "
        f"{row['align_corners']}), resized to the original {row['original_size'][0]}x{row['original_size'][1]}, "
        f"softmax, argmax, to host; {timed} images",
        f"training    batch {' and '.join(map(str, row['train_batches']))}, crop {train_crop[0]}x{train_crop[1]}, "
        f"forward + decode/aux loss + backward + SGD step; {timed} steps",
        "precision   fp32 = no TF32; autocast keeps the GC softmax, LayerNorm and the final resize in fp32",
        f"FLOPs       counted once in fp32 (convs and matmuls): inference {flops['inference'] / 1e9:.1f} GFLOP "
        f"per image, training {flops['training'] / 1e9:.1f} GFLOP per image (forward + backward)",
        f"peak        {matmul}x{matmul} matmul, best of the start and the end of the run: "
        + ", ".join(f"{precision} {format_rate(rate)}" for precision, rate in peaks.items()),
    ]
    note = "note        sizes or batch differ from the row: not comparable with the published figures"
    return lines + ([] if row["comparable"] else [note])


def print_busy_cpu(records):
    shares = {f"{r['name']} {phase}": (r[phase] or {}).get("cpu_share") for r in records for phase in PHASES}
    contended = [name for name, share in shares.items() if share is not None and share < 0.9]
    if contended:
        print(
            f"busy CPU: other processes took a share of the cores during {', '.join(contended)} "
            "(CPU share < 0.9 in the JSON); these figures are pessimistic"
        )


# 6. The run: the flags checked, the peaks, every variant, the data, the report ----------------------
def parse_arguments(argv=None, parser=None):
    """(args, device, row, variants), every flag and size checked before anything is measured: a bad
    one ends the run with one line that names it."""
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        _, _, device = runtime.setup_device(args.device)
        row = row_settings(args, device)
        variants = variant_list(device, args, row["train_batches"])
        check_sizes(row, variants, device)
        if min(args.data_size) < 2:  # the training transform halves the image at its smallest scale
            raise ValueError(f"--data-size {args.data_size[0]}x{args.data_size[1]}: expected at least 2x2")
    except ValueError as error:
        parser.error(str(error))
    args.timed = args.timed or (50 if device.type == "cuda" else 3)
    args.ms_flip = device.type == "cuda" if args.ms_flip is None else args.ms_flip
    return args, device, row, variants


def main(argv=None):
    return measure_and_report(*parse_arguments(argv))


def measure_and_report(args, device, row, variants, data_beside=()):
    """Measure, print and write to --out; returns the report as written. data_beside: other
    libraries' data pipelines, timed beside ours (benchmark_data's beside)."""
    runtime.keep_freed_memory()  # as train.py and evaluate.py do
    runtime.set_threads(args.threads, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = False  # as the table's figures were taken (mmseg tools/benchmark.py)
    crop = "{}x{}".format(*row["crop_size"])
    where = f"{row['model']} {row['backbone']} {row['dataset']} {crop}, {row['num_classes']} classes"
    print(f"benchmark: {where}, on {device}, random weights and images", flush=True)
    precisions = dict.fromkeys(variant["precision"] for variant in variants)
    peaks = {precision: matmul_rate(precision, device) for precision in precisions}
    measured = measure_variants(variants, row, device, args)
    baseline = measured[variants[0]["name"]]
    flops = dict(inference=baseline["inference"]["flops"])
    flops["training"] = baseline["training"]["flops"] / row["train_batches"][0]
    default = next(variant for variant in variants if variant["default"])
    ms_flip_gb = measure_ms_flip_memory(default, row, device) if args.ms_flip else None
    data_results = benchmark_data(row, args.data_size, args.data_samples, data_beside, device)
    # Measured again at the end: on a shared machine, the better of the two is closer to the device's limit.
    peaks = {precision: max(rate, matmul_rate(precision, device)) for precision, rate in peaks.items()}
    records = summarize(variants, measured, peaks, flops)
    print("\n" + "\n".join(protocol_lines(row, args, device, flops, peaks)) + "\n")
    print(results_table(row, records, args.wide) + "\n")
    print_busy_cpu(records)

    protocol = dict(device=device.type, device_name=device_description(device), torch=torch.__version__)
    protocol.update(python=platform.python_version(), threads=torch.get_num_threads(), warmup=args.warmup)
    protocol.update(timed=args.timed, matmul_size=MATMUL_SIZE[device.type])
    protocol["memory"] = "max_memory_allocated" if device.type == "cuda" else "peak resident set size"
    report = dict(protocol=protocol, row=row, flops_per_image=flops, matmul_peak_flops_per_s=peaks)
    report.update(variants=records, data=data_results, ms_flip_peak_memory_gb=ms_flip_gb)
    return write_report(report, args.out)


def error_line(error):
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def write_report(report, out, done="wrote"):
    """Write the report as JSON and return it as read back (tuples become lists)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    runtime.write_text(out, text)
    print(f"{done} {out}")
    return json.loads(text)


# Mechanics: timing, the device's limits, the device's name, the command line ------------------------
def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(function, warmup, iters, device, description, images=1, count_flops=False, scopes=()):
    """Call `function` warmup times, then iters times, each call timed alone between device syncs. The
    first call runs inside `scopes` and, with count_flops, a FLOP counter (every conv and matmul, backward
    included; no BatchNorm, resize or softmax). cpu_share: the share of the CPU threads the timed calls
    got (below ~0.9, other processes were competing)."""
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
    timing = dict(first_result=first_result, first_call_seconds=seconds[0], seconds=seconds[warmup:])
    threads_seconds = (time.perf_counter() - wall_start) * torch.get_num_threads()
    share = (time.process_time() - cpu_start) / threads_seconds if device.type == "cpu" else None
    timing.update(cpu_share=share, flops=counter and counter.get_total_flops())
    return dict(timing, images_per_s=images * iters / sum(timing["seconds"]))


def matmul_rate(precision, device):
    """FLOP/s of a large square matmul in the given dtype: the practical peak of the device for it
    (fp32 with TF32 off on CUDA, as the fp32 variant runs)."""
    size = MATMUL_SIZE[device.type]
    calls_per_round = 20 if device.type == "cuda" else 1  # CUDA: few host synchronisations
    with runtime.precision_context(device, "fp32"):  # TF32 off, for the fp32 rate
        dtype = runtime.AUTOCAST_DTYPES.get(precision, torch.float32)
        a, b = (torch.randn(size, size, device=device).to(dtype) for _ in range(2))
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
        allow_abbrev=False,
        description="Measure GCNet's training memory, inference speed and their distance to the device's "
        "peak for one row of the results table (see the docstring of benchmark.py).",
        epilog="--precision auto (the default) runs every precision and marks as default the variant that "
        "train.py and evaluate.py would run; an explicit --precision P (with --channels-last) makes that the "
        "default variant and runs only fp32 eager (the baseline) and P's variants.",
    )
    add = parser.add_argument
    positive, size = runtime.number_flag(int, 1), runtime.size_flag
    add("--dataset", default="cityscapes", choices=recipe.TABLE_DATASETS, help="default: cityscapes")
    add("--crop", type=size("--crop"), help="the row's crop, 769 or HxW (default: the dataset's first)")
    add("--depth", type=int, default=50, choices=(50, 101), help="default 50")
    add("--context", default="gc", choices=CONTEXTS, help="the decode head's block, as train.py (default gc)")
    add("--gc-pooling", choices=POOLINGS, help="the GC block's pooling, as train.py (default att)")
    add("--gc-fusion", choices=FUSIONS, help="the GC block's fusion, as train.py (default add)")
    add("--size", type=size("--size"), help="HxW fed to the model for inference (default: the row's)")
    add("--timed", type=positive, help="timed images and steps (default 50 CUDA, 3 CPU)")
    add("--warmup", type=positive, default=2, help="untimed calls before them (default 2; the original: 5)")
    what = "training batches, the first for every variant (default: the row's; on CUDA also 4 GPUs' worth)"
    add("--train-batch", type=positive, nargs="+", help=what)
    add("--train-crop", type=size("--train-crop"), help="769 or HxW (default: the row's crop)")
    add("--data-size", type=size("--data-size"), default=(1024, 2048), help="HxW of the data timing's PNG")
    add("--data-samples", type=positive, default=40, help="timed samples per data pipeline (default 40)")
    add("--compile", action=argparse.BooleanOptionalAction, default=True, help="measure torch.compile")
    what = "also the peak memory of an evaluate.py --ms-flip prediction (default: on CUDA; slow on a CPU)"
    add("--ms-flip", action=argparse.BooleanOptionalAction, help=what)
    add("--wide", action="store_true", help="print every figure (the JSON has them all)")
    add("--out", type=runtime.writable_path("file"), default="benchmark.json", help="where the JSON goes")
    runtime.add_arguments(parser)
    return parser


if __name__ == "__main__":
    main()
