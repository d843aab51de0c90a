"""Evaluate a GCNet checkpoint the way the mmsegmentation GCNet results table was computed.

The table has two accuracy columns (mmseg v0.5.0 configs/_base_/datasets/*.py test_pipeline, and
the original toolbox's tools/test.py with --aug-test):
  mIoU           one pass per image at the row's test scale: the whole image for the 512x1024,
                 ADE20K and VOC models; 769x769 sliding windows with stride 513 on the 2049x1025
                 image for the 769x769 models (align_corners=True).
  mIoU(ms+flip)  the same at 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 times the test scale, each also
                 flipped; the 12 softmax maps are averaged at the original resolution.
The metric is an exact confusion matrix summed over the whole split at the original label resolution:
IoU and Acc per class (and F1, precision, recall), their nanmean over classes, and the pixel accuracy.

The test protocol is the checkpoint's row of the table (recipe.row), or the recipe ours record;
flags override it. Official checkpoints are scored in IEEE fp32 as the table was; ours in the hardware's
native precision, checked against fp32 on up to 10 images (in a fifth of the run's time). Examples: --help.
"""

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import checkpoints
import data
import layouts
import model
import pictures
import recipe
import runtime

# The original's tools/test.py --aug-test: ratios of the test scale, each run plain and flipped (mmseg
# v0.5.0 configs/_base_/datasets/*.py img_ratios).
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


# -----------------------------------------------------------------------------------------------
# The test protocol: sliding windows, then scales and flips of one image
# (mmseg v0.5.0 mmseg/models/segmentors/encoder_decoder.py whole_inference / slide_inference / aug_test)


def slide_windows(height, width, crop_size, stride):
    """Window boxes (y1, y2, x1, x2) of the original slide inference, those sticking out shifted back
    inside. 1025x2049 with crop 769 and stride 513 gives 2 x 4 windows."""
    (crop_h, crop_w), (stride_h, stride_w) = recipe.parse_crop(crop_size), recipe.parse_crop(stride)
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    boxes = []
    for row in range(rows):
        for col in range(cols):
            y2 = min(row * stride_h + crop_h, height)
            x2 = min(col * stride_w + crop_w, width)
            boxes.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return boxes


@torch.no_grad()
def slide_inference(model, images, *, crop_size, stride, window_batch=4):
    """Logits (N, C, H, W), C = model.num_classes, of images (N, 3, H, W); overlapping windows average
    LOGITS, not probabilities. A pass takes window_batch // N positions of the N images (one at least)."""
    crop_h, crop_w = recipe.parse_crop(crop_size)  # 769 -> (769, 769)
    n, channels, height, width = images.shape
    logits_sum = images.new_zeros((n, model.num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    boxes = slide_windows(height, width, (crop_h, crop_w), stride)
    boxes_per_pass = max(1, window_batch // n)
    for start in range(0, len(boxes), boxes_per_pass):
        chunk = boxes[start : start + boxes_per_pass]
        # A window is smaller than the crop where the image is (the 0.5 and 0.75 ratios of the 769
        # models). mmseg v0.5.0, which made the published ms+flip numbers, zero-pads it as here (zero =
        # the mean colour after normalisation) at the bottom/right and keeps the output's top-left
        # part; v0.6+ feeds it unpadded (encoder_decoder.py slide_inference).
        windows = images.new_zeros((len(chunk) * n, channels, crop_h, crop_w))  # (k*N, 3, crop_h, crop_w)
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            windows[k * n : (k + 1) * n, :, : y2 - y1, : x2 - x1] = images[:, :, y1:y2, x1:x2]
        window_logits = model(windows).float()  # (k*N, C, crop_h, crop_w)
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            logits_sum[:, :, y1:y2, x1:x2] += window_logits[k * n : (k + 1) * n, :, : y2 - y1, : x2 - x1]
            count[:, :, y1:y2, x1:x2] += 1
    return logits_sum / count  # every pixel has count >= 1: the windows cover the image


@torch.no_grad()
def predict(
    model, images, original_size, *, mode="whole", crop_size=None, stride=None, flip=False, window_batch=4
):
    """Class probabilities (C, H, W) of ONE image at its original size (H, W), C = model.num_classes.
    images: the normalised image at each test scale, (3, h, w) or (1, 3, h, w). Each scale's logits (and,
    with flip, its mirror image's) are resized bilinearly to the original size with model.align_corners,
    soft-maxed (mirrored maps flipped back) and averaged. One scale, no flip: argmax = the original's."""
    check_protocol(mode, crop_size, stride, images)
    protocol = dict(mode=mode, crop_size=crop_size, stride=stride, flip=flip, window_batch=window_batch)
    # Whole images: every scale's forward pass first, keeping its logits at 1/8 (a few MB), so that no
    # forward pass runs while the maps of the original size below are held. Windows give logits at the
    # scaled size: a scale at a time.
    scales = (forward_scale(model, image, **protocol) for image in images)
    scales = list(scales) if mode == "whole" else scales
    passes = len(images) * (2 if flip else 1)
    if passes > 1 and images[0].device.type == "cpu":
        runtime.return_freed_memory()  # what the passes freed, before the maps of the original size
    probabilities = torch.zeros((model.num_classes, *original_size), device=images[0].device)
    for logits, scaled_size in scales:
        for k, one in enumerate(logits.split(1)):  # the image, then its flipped copy
            one = resized_logits(model, one, scaled_size if mode == "whole" else None, original_size)
            add_softmax(probabilities, one, flipped=k == 1)
    return probabilities if passes == 1 else probabilities.div_(passes)


# -----------------------------------------------------------------------------------------------
# Metrics (mmseg v0.5.0 mmseg/core/evaluation/mean_iou.py)


def confusion_matrix(pred, label, num_classes, ignore_index=data.IGNORE_INDEX):
    """int64 (num_classes, num_classes) matrix: rows = ground truth, columns = prediction. Pixels
    labelled ignore_index are dropped, so a prediction there is no false positive."""
    check_values(pred, label, num_classes, ignore_index)
    keep = label != ignore_index
    gt, predicted = label[keep].long(), pred[keep].long()
    counts = torch.bincount(num_classes * gt + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """aAcc, and per class with their means (mIoU, ...), in percent: IoU = I / (GT + P - I), Acc = recall =
    I / GT, precision = I / P, F1 (Dice) = 2 I / (GT + P), from a class's I(ntersection), GT and P(redicted)
    pixels over the split. 0/0 is NaN, skipped by the means: IoU and F1 of a class neither present nor
    predicted (one predicted but absent counts 0), Acc of one absent, precision of one never predicted."""
    matrix = matrix.double().cpu()
    intersection = matrix.diag()
    gt_area, predicted_area = matrix.sum(dim=1), matrix.sum(dim=0)
    per_class = {  # 0/0 -> NaN
        "IoU": intersection / (gt_area + predicted_area - intersection),
        "Acc": intersection / gt_area,
        "F1": 2 * intersection / (gt_area + predicted_area),
        "Precision": intersection / predicted_area,
        "Recall": intersection / gt_area,
    }
    means = {f"m{key}": 100 * torch.nanmean(values).item() for key, values in per_class.items()}
    lists = {key: (100 * values).tolist() for key, values in per_class.items()}
    return {"aAcc": 100 * (intersection.sum() / matrix.sum()).item(), **means, **lists}


# -----------------------------------------------------------------------------------------------
# A whole split, on one or several processes


@torch.no_grad()
def evaluate_dataset(model, dataset, *, device, precision, workers=2, save_dir=None, opacity=0.5, **protocol):
    """Metrics of `model` on a val split with predict()'s protocol, and train.segmentation_loss's loss over
    the split, of the protocol's probabilities. Under torchrun each process takes every world_size-th image
    and all return the same dict. Pass the model itself, not a DDP wrapper."""
    device = torch.device(device)
    matrix = torch.zeros((dataset.num_classes,) * 2, dtype=torch.int64, device=device)
    losses = torch.zeros(2, dtype=torch.float64, device=device)  # summed pixel losses, pixels
    with evaluation_mode(model):  # below the line: eval mode and cuDNN's default kernels, until the end
        for images, label, meta in test_images(dataset, device, workers):
            with runtime.precision_context(device, precision):
                probabilities = predict(model, images, meta["original_size"], **protocol)
            pred = probabilities.argmax(dim=0)
            losses += summed_pixel_losses(probabilities, label)
            del probabilities  # 1.27 GB for the largest ADE20K image: not held through the next one
            matrix += confusion_matrix(pred, label, dataset.num_classes)
            if save_dir is not None:  # the label PNG, an overlay and the block's attention map
                pictures.save_split_pictures(
                    model, dataset, pred, label, meta, images, precision, save_dir, opacity
                )
    matrix, (loss_sum, pixels) = sum_over_processes(matrix), sum_over_processes(losses).tolist()
    if save_dir is not None:  # confusion.png (pictures.py)
        pictures.save_confusion_picture(matrix, dataset.classes, save_dir)
    results = dict(metrics_from_confusion(matrix), loss=loss_sum / pixels, num_images=len(dataset))
    return dict(results, confusion_matrix=matrix.cpu().tolist())


# Below this line: how it runs: the command line and its three jobs (a split's scores, files for
# the benchmark servers, pictures of image files), checks, speed-ups. A first reading can stop here.


@contextlib.contextmanager
def evaluation_mode(model):
    """The model in eval mode with cuDNN's default kernels (train.py autotunes), both put back after: the
    same kernels round alike, so training's validation and evaluate.py score a checkpoint alike on a GPU."""
    was_training, autotuning = model.training, torch.backends.cudnn.benchmark
    model.eval()
    torch.backends.cudnn.benchmark = False
    try:
        yield model
    finally:
        model.train(was_training)
        torch.backends.cudnn.benchmark = autotuning


def test_images(dataset, device, workers, count=None, desc="predict"):
    """(images per scale on `device`, label or None, meta) for this process's share of the first `count`
    images (default all): rank r of W takes images r, r+W, ..., so none is counted twice."""
    rank, world_size = runtime.rank_and_world_size()
    if len(dataset) == 0:
        split = f"{getattr(dataset, 'name', '')} {getattr(dataset, 'split', '')}"
        raise ValueError(f"the {split} split has no images: check the data root")
    total = len(dataset) if count is None else min(count, len(dataset))
    share = list(range(total))[rank::world_size]
    # An item holds float32 images at every test scale (~235 MB for a Cityscapes ms+flip image)
    # and travels through /dev/shm: one item in flight per worker keeps that bounded.
    loader = DataLoader(
        Subset(dataset, share),
        batch_size=1,
        num_workers=workers,
        collate_fn=data.collate_val,
        pin_memory=torch.device(device).type == "cuda",
        prefetch_factor=1 if workers > 0 else None,
        worker_init_fn=runtime.leave_stop_signals_to_the_main_process,
    )
    here = f" ({len(share)} of {total} images here)" if world_size > 1 else ""
    for images, labels, metas in tqdm(loader, desc=f"{desc}{here}", unit="img", disable=rank != 0):
        label = None if labels[0] is None else labels[0].to(device, non_blocking=True)
        yield [image.to(device, non_blocking=True) for image in images[0]], label, metas[0]


def check_protocol(mode, crop_size, stride, images):
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("slide mode needs crop_size and stride (e.g. 769 and 513)")
    if len(images) == 0:
        raise ValueError("predict() needs the image at one scale at least; got an empty list")


def check_values(pred, label, num_classes, ignore_index):
    if pred.shape != label.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in size")
    keep = label != ignore_index
    gt, predicted = label[keep].long(), pred[keep].long()
    if gt.numel() and (min(gt.min(), predicted.min()) < 0 or max(gt.max(), predicted.max()) >= num_classes):
        found = sorted(set(gt.unique().tolist()) | set(predicted.unique().tolist()))
        raise ValueError(
            f"label/prediction values must be 0..{num_classes - 1} or {ignore_index} (ignored); "
            f"found {found}. Check the dataset's labels (ADE20K needs reduce_zero_label) and the class count."
        )


def forward_scale(model, image, *, mode, crop_size, stride, flip, window_batch):
    """(logits, (h, w)) of one scale's image (3, h, w) or (1, 3, h, w) and, with flip, its flipped copy:
    at 1/8 for 'whole' (model.upsample brings them to (h, w)), at (h, w) for 'slide'."""
    batch = image if image.dim() == 4 else image[None]  # (1, 3, h, w)
    if flip:
        # The flipped copy shares the forward pass: in eval mode the images of a batch do not
        # interact (BatchNorm uses running statistics, the GC softmax is per image).
        batch = torch.cat([batch, batch.flip(-1)])  # (2, 3, h, w)
    if mode == "whole":
        logits = model(batch, upsample=False)
    else:
        logits = slide_inference(model, batch, crop_size=crop_size, stride=stride, window_batch=window_batch)
    if logits.shape[1] != model.num_classes:
        raise ValueError(f"the model gives {logits.shape[1]} classes, expected {model.num_classes}")
    return logits, batch.shape[-2:]


def summed_pixel_losses(probabilities, label):
    """train.segmentation_loss's numerator and denominator, from (C, H, W) probabilities. A probability that
    underflowed float32 (a logit about 87 below the top one) counts as float32's smallest normal: 87.3."""
    labelled = label != data.IGNORE_INDEX
    true_class = torch.where(labelled, label.long(), 0)[None]  # (1, H, W)
    p = probabilities.gather(0, true_class)[0][labelled]
    loss_sum = -p.double().clamp_min(torch.finfo(torch.float32).tiny).log().sum()
    return torch.stack([loss_sum, loss_sum.new_tensor(label.numel())])  # and the pixels, ignored ones too


# Logits are resized this many classes at a time (about 140 MB at 1797x1176), not the scaled image's
# map of all classes at once beside the sum. Bilinear resizing treats each class apart, so a band gives
# the same bits, except on channels-last logits, whose resize a CPU vectorises over the classes: those
# are resized whole.
CLASS_BAND = 16
# The flipped maps are added back in bands of this many rows (about 70 MB for 150 classes and 1797
# pixels a row), never flipped whole.
FLIP_ROWS = 64


def resized_logits(model, logits, scaled_size, size):
    """One image's logits (1, C, h, w) in float32 at the original size (H, W): first at `scaled_size`
    by model.upsample when given ('whole' logits at 1/8), then bilinearly with model.align_corners (a
    resize to the same size samples exactly at the pixels: skipped)."""
    channels_last = not logits.is_contiguous()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    resized = torch.empty((1, logits.shape[1], *size), device=logits.device, memory_format=layout)
    band = logits.shape[1] if channels_last else CLASS_BAND
    for first in range(0, logits.shape[1], band):
        classes, out = logits[:, first : first + band].float(), resized[:, first : first + band]
        classes = model.upsample(classes, scaled_size) if scaled_size is not None else classes
        if classes.shape[-2:] == size:
            out.copy_(classes)
        else:  # F.interpolate's own kernel, writing straight into the band of the result
            torch.ops.aten.upsample_bilinear2d.out(classes, size, model.align_corners, None, None, out=out)
    return resized


def add_softmax(probabilities, logits, *, flipped):
    """probabilities (C, H, W) += the softmax over the classes of one image's resized logits (1, C, H, W),
    flipped back along W when `flipped`. The softmax overwrites the logits: beside the sum, one map of
    the original size is held."""
    softmax = class_softmax_(logits)[0]
    if not flipped:
        return probabilities.add_(softmax)
    for top in range(0, softmax.shape[1], FLIP_ROWS):
        probabilities[:, top : top + FLIP_ROWS] += softmax[:, top : top + FLIP_ROWS].flip(-1)
    return probabilities


def class_softmax_(logits):
    """Softmax over dim 1 of (N, C, H, W) logits in place, bit for bit an out-of-place one's values;
    channels_last logits stay channels_last."""
    channels_last = logits.dim() == 4 and logits.stride(1) == 1 and logits.shape[1] > 1
    view = logits.permute(0, 2, 3, 1) if channels_last else logits
    torch.softmax(view, -1 if channels_last else 1, out=view)
    return logits


# The table's columns: (title, key of metrics_from_confusion); recall is Acc under its other name.
TABLE_COLUMNS = (("IoU", "IoU"), ("Acc/Rec", "Acc"), ("F1", "F1"), ("Prec", "Precision"))


def format_table(metrics, classes):
    """Per-class table (percent, 2 decimals; nan where undefined) with the means below."""
    width = max([len("class")] + [len(name) for name in classes])
    lines = [f"{'class':<{width}}" + "".join(f"  {title:>7}" for title, _ in TABLE_COLUMNS)]
    for index, name in enumerate(classes):
        lines.append(
            f"{name:<{width}}" + "".join(f"  {metrics[key][index]:7.2f}" for _, key in TABLE_COLUMNS)
        )
    means = ("aAcc", "mIoU", "mAcc", "mF1", "mPrecision", "mRecall")
    return "\n".join([*lines, "  ".join(f"{key} {metrics[key]:.2f}" for key in means)])


def sum_over_processes(tensor):
    """all_reduce(SUM) on the device the backend wants (NCCL: CUDA, gloo: CPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    summed = tensor.to(tensor.device if dist.get_backend() == "nccl" else torch.device("cpu"))
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device)


@torch.no_grad()
def precision_agreement(
    model, reference_model, dataset, count, *, device, precision, workers=2, seconds=None, **protocol
):
    """Share of labelled pixels `model` at `precision` predicts as `reference_model` (unfolded: folding is
    checked too) in fp32, over the first `count` images or fewer when `seconds` are spent (one at least)."""
    device, start = torch.device(device), time.perf_counter()
    counts = torch.zeros(3, dtype=torch.int64, device=device)  # [agreeing, labelled] pixels, images
    with evaluation_mode(model), evaluation_mode(reference_model):
        for images, label, meta in test_images(dataset, device, workers, count, f"{precision} vs fp32 check"):
            with runtime.precision_context(device, precision):
                ours = predict(model, images, meta["original_size"], **protocol).argmax(dim=0)
            with runtime.precision_context(device, "fp32"):
                fp32 = predict(reference_model, images, meta["original_size"], **protocol).argmax(dim=0)
            labelled = label != data.IGNORE_INDEX
            counts += torch.stack(
                [(ours == fp32)[labelled].sum(), labelled.sum(), torch.ones_like(labelled.sum())]
            )
            if seconds is not None and time.perf_counter() - start > seconds:
                break
    agreeing, total, checked = sum_over_processes(counts).tolist()
    return {"images": checked, "pixels": total, "agreement": agreeing / max(total, 1)}


# -----------------------------------------------------------------------------------------------
# The command line: the flags, resolved once into a plain dict of settings, then one of three jobs

# predict()'s protocol, and the protocol as evaluate.py prints and records it
PROTOCOL = ("mode", "crop_size", "stride", "flip", "window_batch")
SHOWN_PROTOCOL = ("mode", "crop_size", "stride", "scale", "ratios", "flip", "align_corners")


def resolve_settings(args, info, device):
    """Every setting of the run in one plain dict; nothing reads `args` after this. The test protocol is
    the checkpoint's row of the table or recorded recipe, or with --crop that crop's row (Cityscapes' for
    an unknown dataset). Official checkpoints run in IEEE fp32 like the table, ours natively."""
    name, row = args.dataset or info["dataset"], info["row"]
    if args.crop is not None or row is None:
        crop = args.crop or info["crop_size"]
        row = recipe.row(name if name in recipe.DATASETS else "cityscapes", crop, depth=info["depth"])
    # A --crop of no row of the table: windows of that size, as its help says, not the row's rule (whole
    # images unless the crop is 769-like).
    windows = args.crop is not None and row["crop_size"] not in recipe.DATASETS[row["dataset"]]["crops"]
    # The scale recorded or named (--crop changes the windows, not it), or --crop's row's if it was guessed.
    scale_row = info["row"] if info["row"] and info["crop_size"] else row
    mode = args.mode or ("slide" if windows else row["test_mode"])
    crop_size = args.crop or recipe.parse_crop(row["test_crop"])  # 769 or [h, w] -> (h, w)
    stride = args.stride or recipe.parse_crop(row["test_stride"])
    if mode == "slide" and (stride[0] > crop_size[0] or stride[1] > crop_size[1]):
        raise ValueError(
            f"--stride {stride} is larger than the window {crop_size}: the windows would leave gaps"
        )
    precision = runtime.resolve_precision(args.precision, device, auto="native" if info["recipe"] else "fp32")
    fold = default_fold_batchnorm(precision) if args.fold_batchnorm is None else args.fold_batchnorm
    check = (0 if precision == "fp32" else 10) if args.check_agreement is None else args.check_agreement
    # The data root and the label rule (0 = 'ignore' or not) the checkpoint's run used, for its dataset.
    recorded = (info["recipe"] or {}) if name == info["dataset"] else {}
    root = args.data_root or recorded.get("data_root")
    whose = "recorded by the checkpoint's run" if root else "the dataset's default"
    # The pictures' class names and colours: the checkpoint's, else its dataset's, else numbered defaults.
    known, count = data.CLASSES_AND_PALETTES.get(name, {}), info["num_classes"]
    palette, classes = info["palette"] or known.get("palette"), info["classes"] or known.get("classes")
    if palette is None or len(palette) != count:
        palette = layouts.default_palette(count)
    if classes is None or len(classes) != count:
        classes = [f"class {index}" for index in range(count)]
    return dict(
        dataset=name,
        mode=mode,
        crop_size=crop_size,
        stride=stride,
        scale=recipe.parse_scale("x".join(map(str, scale_row["scale"])), "the recorded scale"),
        ratios=tuple(args.scales) if args.scales else (MS_RATIOS if args.ms_flip else (1.0,)),
        flip=args.ms_flip if args.flip is None else args.flip,
        align_corners=row["align_corners"] if info["align_corners"] is None else info["align_corners"],
        precision=precision,
        channels_last=runtime.resolve_channels_last(args.channels_last, device, precision),
        fold_batchnorm=fold,
        check_agreement=check,
        agreement_budget=args.check_agreement is None,
        data_root=data.data_root(name, root) if name in recipe.DATASETS else root,
        data_root_from="given by --data-root" if args.data_root is not None else whose,
        # train.py records its flag: True, or False (not given), which leaves the dataset's own rule (None).
        reduce_zero_label=recorded.get("reduce_zero_label") or None,
        images=layouts.image_files(args.image) if args.image else None,  # (files, skipped)
        palette=palette,
        classes=classes,
        **{key: getattr(args, key) for key in ("window_batch", "workers", "depth", "split", "format_only")},
        **{key: getattr(args, key) for key in ("save_dir", "opacity", "out")},
    )


def default_fold_batchnorm(precision):
    """Shared with train.py's validation, so that the two score a checkpoint alike at the same precision."""
    return precision != "fp32"


def inference_keywords(settings, device):
    """What evaluate_dataset and precision_agreement take, but the loader's workers."""
    return dict({key: settings[key] for key in PROTOCOL}, precision=settings["precision"], device=device)


def build_split(info, settings, checkpoint):
    """The split to evaluate or predict, checked against the checkpoint's classes."""
    name, root = settings["dataset"], settings["data_root"]
    if name is None:
        raise ValueError(
            f"cannot tell which dataset {checkpoint} ({info['num_classes']} classes) belongs to: "
            f"pass --dataset (one of {', '.join(sorted(recipe.DATASETS))}) and --data-root"
        )
    keywords = {key: settings[key] for key in ("split", "crop_size", "scale", "reduce_zero_label")}
    try:
        dataset = data.build_dataset(name, root, test_ratios=settings["ratios"], **keywords)
    except FileNotFoundError as error:
        if Path(root).is_dir():  # the root is there, a split or file of it is not: the error says which
            raise
        raise FileNotFoundError(
            f"{error}\n{checkpoint} holds a {info['dataset'] or name} model; this looked for {name} in {root}, "
            f"{settings['data_root_from']}: pass --data-root with the folder of its data (and --dataset "
            "if it is another dataset with the same classes)."
        ) from None
    if info["num_classes"] != dataset.num_classes:
        raise ValueError(
            f"{checkpoint} predicts {info['num_classes']} classes but the {name} dataset has "
            f"{dataset.num_classes}: pass the --dataset it was trained on"
        )
    # strip(): the original ADE20K class list has 'bed ' with a trailing space (mmseg v0.5.0 mmseg/datasets/
    # ade.py). A checkpoint that names no classes, or not as many as it predicts, is taken at its count.
    ours = info["classes"] if len(info["classes"] or []) == dataset.num_classes else dataset.classes
    differ = [i for i, (a, b) in enumerate(zip(ours, dataset.classes)) if a.strip() != b.strip()]
    if differ:
        raise ValueError(
            f"{checkpoint} was trained on other classes than the {name} dataset's: class {differ[0]} is "
            f"{ours[differ[0]].strip()!r} in the checkpoint, {dataset.classes[differ[0]].strip()!r} in the dataset"
        )
    return dataset


def say_what_runs(settings, what):
    world_size = runtime.rank_and_world_size()[1]
    protocol = ", ".join(f"{key} {settings[key]}" for key in SHOWN_PROTOCOL)
    where = f"{settings['precision']} on {settings['device']}"
    where += f" x {world_size} processes" if world_size > 1 else ""
    runtime.say(f"{settings['checkpoint']}: {what}, {protocol}, {where}")
    runtime.say(runtime.machine_line(settings["thread_choice"], settings["workers"]))


def evaluate_split(model, info, settings, reference_model):
    """Metrics on the val split: table on screen, everything in a JSON file."""
    checkpoint, device = settings["checkpoint"], settings["device"]
    world_size, dataset = runtime.rank_and_world_size()[1], build_split(info, settings, checkpoint)
    precision, validated = settings["precision"], info["validation"]
    differences = training_differences(validated, settings, dataset, device)
    say_what_runs(settings, f"{len(dataset)} {dataset.name} val images in {dataset.root}")
    if differences is not None:
        when = f"(iteration {validated['iteration']}) at mIoU {validated['mIoU']:.2f}"
        agree = "the same settings: expect the same score"
        same = "other settings: " + "; ".join(differences) if differences else agree
        runtime.say(f"training validated this checkpoint {when} with {same}")
    inference = dict(inference_keywords(settings, device), workers=settings["workers"])
    start = time.perf_counter()
    results = evaluate_dataset(
        model, dataset, save_dir=settings["save_dir"], opacity=settings["opacity"], **inference
    )
    seconds, agreement = time.perf_counter() - start, None
    if settings["check_agreement"] > 0:  # by default 0 in fp32; in fp32, folding is what it checks
        # At one scale without flips, whatever the protocol: it measures the precision, and with ms+flip
        # it would cost twelve forward passes per image. By default it takes at most a fifth of the
        # evaluation's time (an fp32 pass on a CPU costs several bf16 ones); --check-agreement N: N images.
        single_scale = copy.copy(dataset)
        single_scale.test_ratios = (1.0,)
        count, unflipped = settings["check_agreement"], dict(inference, flip=False)
        budget = seconds / 5 if settings["agreement_budget"] else None
        agreement = precision_agreement(
            model, reference_model, single_scale, count, seconds=budget, **unflipped
        )
        share, checked = 100 * agreement["agreement"], agreement["images"]
        folded = " with BatchNorm folded" if settings["fold_batchnorm"] else ""
        runtime.say(
            f"{precision}{folded} vs fp32 at a single scale, {checked} images: {share:.4f}% of the labelled "
            "pixels agree"
        )
    if runtime.rank_and_world_size()[0] != 0:
        return
    print(format_table(results, dataset.classes))
    print(f"loss {results['loss']:.4f} (the decode head's cross-entropy over the split, training's formula)")
    if differences is not None:
        why = "other settings, above" if differences else "same settings"
        print(f"mIoU {results['mIoU']:.2f} here, {validated['mIoU']:.2f} in training's validation ({why})")
    scores = ("num_images", "aAcc", "mIoU", "mAcc", "mF1", "mPrecision", "mRecall", "loss")
    per_class = ("IoU", "Acc", "F1", "Precision", "Recall")
    speed = ("precision", "channels_last", "fold_batchnorm", "window_batch")
    here = dict(
        depth=model.depth, num_classes=model.num_classes, world_size=world_size, torch=torch.__version__
    )
    here["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    record = dict(checkpoint=str(checkpoint), config_name=info["config_name"], dataset=dataset.name)
    record.update(data_root=settings["data_root"], **{key: results[key] for key in scores})
    record["per_class"] = {
        name: {key: results[key][i] for key in per_class} for i, name in enumerate(dataset.classes)
    }
    record["settings"] = dict({key: settings[key] for key in SHOWN_PROTOCOL + speed}, **here)
    record.update(
        precision_agreement=agreement, seconds=seconds, confusion_matrix=results["confusion_matrix"]
    )
    out = Path(settings["out"])  # claimed at the start (claim_outputs)
    runtime.write_text(out, json.dumps(without_nan(record), indent=1))
    print(f"wrote {out}" + (f" and pictures in {settings['save_dir']}" if settings["save_dir"] else ""))


def training_differences(validation, settings, dataset, device):
    """'what X in training, Y here' for each setting in which this evaluation differs from the training
    validation a best.pth records; None when the checkpoint records none."""
    if not validation:
        return None
    here = dict(settings, dataset=dataset.name, data_root=os.path.abspath(dataset.root), device=device.type)
    differences = []
    for key in checkpoints.VALIDATION_KEYS:
        there, ours = validation.get(key), here[key]
        if isinstance(ours, (tuple, list)):
            there, ours = list(there or []), list(ours)
        if there != ours:
            name = {"fold_batchnorm": "BatchNorm folded"}.get(key, key.replace("_", " "))
            differences.append(f"{name} {there} in training, {ours} here")
    return differences


def without_nan(value):
    """JSON has no NaN: undefined IoU / Acc become null."""
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(item) for item in value]
    return None if isinstance(value, float) and math.isnan(value) else value


@torch.no_grad()
def write_split_files(model, info, settings):
    """--format-only: pictures.server_file()'s files for a whole split; under torchrun each process writes its share."""
    dataset, device = build_split(info, settings, settings["checkpoint"]), settings["device"]
    split, save_dir = settings["split"], settings["save_dir"]
    Path(save_dir).mkdir(parents=True, exist_ok=True)  # under torchrun, each process writes its share
    written, protocol = 0, {key: settings[key] for key in PROTOCOL}
    with evaluation_mode(model):
        for images, _, meta in test_images(dataset, device, settings["workers"]):
            with runtime.precision_context(device, settings["precision"]):
                pred = predict(model, images, meta["original_size"], **protocol).argmax(dim=0)
            name, picture = pictures.server_file(dataset.name, pred, meta, dataset.palette)
            pictures.save_picture(picture, Path(save_dir) / name)
            written += 1
    total = int(sum_over_processes(torch.tensor([written], device=device)).item())
    runtime.say(f"wrote {total} {dataset.name} {split} predictions for its evaluation server in {save_dir}")


def predict_images(model, settings):
    """--image: the pictures of every file, an unreadable one named and skipped; returns how many failed on
    all ranks."""
    rank, world_size = runtime.rank_and_world_size()
    (files, skipped), save_dir = settings["images"], settings["save_dir"]
    palette, classes, device = settings["palette"], settings["classes"], settings["device"]
    scale, ratios, opacity = settings["scale"], settings["ratios"], settings["opacity"]
    say_what_runs(settings, f"{len(files)} image file{'s' * (len(files) != 1)}")
    mine = list(zip(files, layouts.picture_names(files)))[rank::world_size]
    written, failed = [], []
    bar = tqdm(mine, desc="predict", unit="img", disable=rank != 0 or len(mine) < 2)
    for path, name in bar:
        try:
            original = data.read_image(path, upright=True)  # uint8 (3, H, W), as the photo is to be seen
            height, width = original.shape[-2:]
            original = within_test_scale(original, scale)
            if original.shape[-2:] != (height, width):
                size = f"{original.shape[2]}x{original.shape[1]}"
                tqdm.write(
                    f"{path}: {width}x{height} is large; predicted and drawn at the test scale, {size}"
                )
            images, pred = image_prediction(model, original, settings)
            precision = settings["precision"]
            attention, title = pictures.attention_at_test_scale(
                model, images, ratios, original, scale, precision
            )
            written += pictures.save_pictures(
                save_dir, name, original, pred, palette, classes, attention, opacity, title=title
            )
        except (ValueError, OSError) as error:  # an unreadable or undecodable file: name it, go on
            failed.append(path)
            bar.set_postfix(failed=len(failed))  # the bar counts the images tried
            tqdm.write(f"evaluate.py: {path} failed: {error}", file=sys.stderr)
    counts = sum_over_processes(torch.tensor([len(mine) - len(failed), len(failed)], device=device)).tolist()
    if skipped:
        what = "file that is not an image" if len(skipped) == 1 else "files that are not images"
        runtime.say(f"skipped {len(skipped)} {what}: " + ", ".join(map(str, skipped)))
    if len(files) == 1 and not failed:
        runtime.say("wrote " + ", ".join(map(str, written)))
    else:
        images = f"{counts[0]} image" if counts[0] == 1 else f"{counts[0]} images"
        maps = " and" if model.head_block["context"] == "none" else ", attention and"  # FCN: no map
        where = f"{save_dir} ({counts[1]} of {len(files)} failed)" if counts[1] else save_dir
        runtime.say(f"wrote the label PNG, overlay{maps} composite pictures of {images} under {where}")
    if failed:
        what = "1 file" if len(failed) == 1 else f"{len(failed)} files"
        print(f"evaluate.py: {what} failed: " + ", ".join(map(str, failed)), file=sys.stderr)
    return counts[1]


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.format_only and args.image:
        parser.error("--format-only predicts a split, --image predicts files: pass one of them")
    if args.split == "test" and not (args.format_only or args.image):
        parser.error("--split test has no labels to score: add --format-only to write the server's files")
    if args.out and (args.format_only or args.image):
        parser.error("--out is where a split's scores go; --format-only and --image write to --save-dir")
    failed, held = 0, []
    try:
        info, settings, reference_model = load(args)
        # Freed memory is kept for speed (runtime.keep_freed_memory), but not where scales or flips on a
        # CPU sum maps of the image's size: there its fragments added 1 to 4 GB to a 4.5 GB peak.
        if settings["device"].type != "cpu" or (len(settings["ratios"]), settings["flip"]) == (1, False):
            runtime.keep_freed_memory()
        held = claim_outputs(settings)  # locks on the output places, until the end of the run
        # The fp32 reference of the agreement check keeps its BatchNorm; the model that runs may fold it.
        model = inference_model(reference_model, settings)
        if settings["images"]:
            failed = predict_images(model, settings)
        elif settings["format_only"]:
            write_split_files(model, info, settings)
        else:
            evaluate_split(model, info, settings, reference_model)
    except (OSError, ValueError) as error:  # a missing or locked file, a full disk: named in words
        raise SystemExit(f"evaluate.py: {error}") from None
    finally:
        release(held)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        raise SystemExit(1)  # the other images are written; a script still sees that some were not


def load(args):
    """The flags' checkpoint, read once: (what it says, the settings with it and the device, the model)."""
    _, _, device = runtime.setup_device(args.device)
    thread_choice = runtime.set_threads(args.threads, device)
    checkpoint = checkpoints.find_checkpoint(args.checkpoint)
    runtime.say(f"reading {checkpoint} and building its model")  # seconds for an R-101's 500 MB
    # For info and weights; under torchrun rank 0 downloads a URL first, then the others read its copy.
    loaded = runtime.rank_zero_first(
        lambda: checkpoints.read_checkpoint(checkpoint, trust=args.trust_checkpoint)
    )
    info = checkpoints.checkpoint_info(checkpoint, loaded)
    settings = resolve_settings(args, info, device)
    settings.update(checkpoint=checkpoint, device=device, thread_choice=thread_choice)
    # Default places, chosen here so that claim_outputs checks and locks them before any work.
    if settings["images"] and not settings["save_dir"]:
        settings["save_dir"] = "eval_out"
    if settings["format_only"] and not settings["save_dir"] and settings["dataset"]:
        settings["save_dir"] = f"eval_out/{settings['dataset']}_{settings['split']}"
    if not (settings["out"] or settings["images"] or settings["format_only"]):  # scores: a JSON file
        # <checkpoint dir>/eval_<dataset>_<mode>[_ms][_flip]_<time>.json; eval_out/ for a URL
        url = str(checkpoint).startswith(("http://", "https://", "file://"))
        folder = Path("eval_out") if url else Path(checkpoint).parent
        tag = settings["mode"] + "_ms" * (len(settings["ratios"]) > 1) + "_flip" * settings["flip"]
        settings["out"] = str(
            folder / f"eval_{settings['dataset']}_{tag}_{time.strftime('%Y%m%d_%H%M%S')}.json"
        )
    return info, settings, build_model(checkpoint, loaded, info, settings, device)


def claim_outputs(settings):
    """Lock --save-dir and --out (rank 0): a second evaluate.py writing into them at the same time is
    refused, naming it, instead of mixing their files; a place that cannot be written is refused before
    any work."""
    places = [(Path(settings["save_dir"]), ".evaluate.lock")] if settings["save_dir"] else []
    if settings["out"]:
        places.append((Path(settings["out"]).parent, f".{Path(settings['out']).name}.lock"))
    held = []
    for folder, name in places if runtime.rank_and_world_size()[0] == 0 else []:
        what, place = ("--save-dir", folder) if name == ".evaluate.lock" else ("--out", settings["out"])
        try:
            folder.mkdir(parents=True, exist_ok=True)
            held.append(runtime.hold_lock(folder / name))
        except runtime.Taken as holder:
            release(held)  # the --save-dir lock, when --out is refused
            raise FileExistsError(
                f"{what} {place} is being written by another evaluate.py ({holder}); wait for it to end or "
                f"pass another {what}"
            ) from None
        except OSError as error:  # a read-only folder, a file in the way
            release(held)
            raise ValueError(
                f"cannot write {what} {place}: {error.strerror or error}; pass {what} in a folder you can write to"
            ) from None
    return held


def release(locks):
    """Close claim_outputs' locks and remove their files: nothing of ours is left among the outputs."""
    for lock in locks:  # removed while locked: a run that opened the file meanwhile then opens anew
        Path(lock.name).unlink(missing_ok=True)
        lock.close()


USAGE = r"""examples:
  python evaluate.py                       # newest work_dirs/*/best.pth, single scale
  python evaluate.py --ms-flip             # the same file, multi-scale + flip only
  python evaluate.py --checkpoint gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth \
      --data-root data/cityscapes --ms-flip
  python evaluate.py --checkpoint CKPT --dataset folder --data-root data/mine   # when it can't tell
  python evaluate.py --save-dir eval_out/pictures      # + label PNG, overlay, GC attention per image
  python evaluate.py --checkpoint CKPT --image photos/ more/*.jpg --save-dir eval_out   # pictures
  python evaluate.py --checkpoint CKPT --split test --format-only --save-dir OUT   # server files
  torchrun --standalone --nproc_per_node=4 evaluate.py --ms-flip          # images split over 4 GPUs
"""


def build_parser():
    """A wrong flag value ends the run when parsed, before any work, naming the flag and what it allows."""
    number, path, size = runtime.number_flag, runtime.writable_path, runtime.size_flag
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument_group("what to evaluate").add_argument
    pattern = checkpoints.CHECKPOINT_PATTERN
    add("--checkpoint", type=runtime.named, help=f"file or URL (default: newest {pattern})")
    add("--trust-checkpoint", action="store_true", help="unpickle fully: only files you trust")
    add("--dataset", choices=sorted(recipe.DATASETS), help="default: the checkpoint's")
    add("--data-root", help="dataset folder (default: the one the checkpoint's run used, else the dataset's)")
    add("--depth", type=int, choices=(50, 101), help="default: what the checkpoint holds")
    add("--split", default="val", choices=("val", "test"), help="test only with --format-only")
    add("--format-only", action="store_true", help="write the files the dataset's server takes")
    add("--image", nargs="+", metavar="PATH", help="predict image files, folders, globs")
    add = parser.add_argument_group("test protocol (default: the checkpoint's row of the table)").add_argument
    add("--ms-flip", action="store_true", help="ratios 0.5..1.75 with flips: mIoU(ms+flip)")
    add("--scales", type=number(float, 0.01, 4), nargs="+", help="test scale ratios, 0.01..4")
    add("--flip", action=argparse.BooleanOptionalAction, help="add horizontally flipped passes")
    add("--mode", choices=("whole", "slide"), help="whole image or sliding windows")
    what = (
        "a crop of the table takes its row's protocol (769: windows, 512x1024: whole); another, windows of it"
    )
    add("--crop", type=size("--crop"), help=f"769 or HxW: {what}")
    add("--stride", type=size("--stride"), help="sliding window stride: 513 or HxW")
    runtime.add_arguments(parser)
    add = parser.add_argument_group("speed (results change by rounding only)").add_argument
    add("--fold-batchnorm", action=argparse.BooleanOptionalAction, help="default: on unless fp32")
    what = "images checked against fp32 (default: up to 10 in a fifth of the evaluation's time; 0 in fp32)"
    add("--check-agreement", type=number(int, 0), metavar="N", help=what)
    add("--window-batch", type=number(int, 1), default=4, help="sliding windows per pass (default 4)")
    workers = min(4, runtime.cores_per_process())
    cores = f"loader processes (default: 4, at most the cores per process: {workers} here)"
    add("--workers", type=runtime.per_core_flag(0), default=workers, help=cores)
    add = parser.add_argument_group("output").add_argument
    files = "<name>_pred.png, _overlay.jpg, _attention.png, _composite.png per image, confusion.png per split"
    add("--save-dir", type=path("folder"), help=f"pictures or server files go here: {files}")
    add("--opacity", type=number(float, 0, 1), default=0.5, help="colours' weight, 0..1")
    contents = "the scores (per class too), the confusion matrix and the settings"
    where = "default: <checkpoint dir>/eval_<dataset>_<mode>[_ms][_flip]_<time>.json"
    add("--out", type=path("file"), help=f"JSON of {contents} ({where})")
    return parser


def build_model(checkpoint, loaded, info, settings, device):
    """GCNet shaped by the checkpoint (depth and class count from its weights) with its weights."""
    depth = settings["depth"]
    if depth is not None and depth != info["depth"]:
        raise ValueError(f"--depth {depth} but {checkpoint} holds a ResNet-{info['depth']}: drop --depth")
    net = model.GCNet(info["num_classes"], info["depth"], settings["align_corners"], **info["block"])
    checkpoints.load_checkpoint(net, checkpoint, loaded)
    return net.to(device).eval()


def inference_model(net, settings):
    """The model as evaluate.py runs it: BatchNorm folded (a copy) and channels_last, as settings say."""
    if settings["fold_batchnorm"]:
        net = fold_batchnorm(net)
    return net.to(memory_format=torch.channels_last) if settings["channels_last"] else net


def fold_batchnorm(net):
    """A copy of `net` with each BatchNorm after a conv folded into it and replaced by nn.Identity: the same
    output up to rounding, one pass over each feature map fewer. No BatchNorm keys: save the original."""
    folded = copy.deepcopy(net).eval()
    for module in list(folded.modules()):
        # Bottleneck pairs conv1/bn1 ...; Sequentials (stem, downsample, ConvBNReLU) hold pairs side by side.
        pairs = [(f"conv{i}", f"bn{i}") for i in (1, 2, 3)] if isinstance(module, model.Bottleneck) else []
        names = [name for name, _ in module.named_children()]
        pairs += list(zip(names, names[1:])) if isinstance(module, nn.Sequential) else []
        for conv_name, bn_name in pairs:
            conv, bn = getattr(module, conv_name), getattr(module, bn_name)
            if isinstance(conv, nn.Conv2d) and isinstance(bn, (nn.BatchNorm2d, nn.SyncBatchNorm)):
                setattr(module, conv_name, fuse_conv_bn_eval(conv, bn))
                setattr(module, bn_name, nn.Identity())
    return folded


def within_test_scale(original, scale):
    """The photo, or if it has over 4 times the test scale's pixels, the photo shrunk to the test scale:
    the sum of the scores at the photo's size takes C floats a pixel (29 GB for 48 MP and 150 classes)."""
    height, width = original.shape[-2:]
    if height * width <= 4 * scale[0] * scale[1]:
        return original
    return data.resize_image(original, data.rescale_size(height, width, scale))


@torch.no_grad()
def image_prediction(model, original, settings):
    """(the image at each test ratio on the device, the (H, W) classes) of one uint8 (3, H, W) image."""
    device, scale, ratios = settings["device"], settings["scale"], settings["ratios"]
    images = [image.to(device) for image in data.test_transform(original, scale, ratios)]
    model.eval()
    with runtime.precision_context(device, settings["precision"]):
        probabilities = predict(model, images, original.shape[-2:], **{k: settings[k] for k in PROTOCOL})
    return images, probabilities.argmax(dim=0)


class Predictor:
    """A checkpoint ready to segment image files from Python, with the settings evaluate.py would use
    (the checkpoint's test protocol, its precision rule, BatchNorm folded outside fp32):

        predictor = evaluate.Predictor("work_dirs/gcnet_r50-d8_128x128_300it_toy/best.pth")
        labels = predictor("photo.jpg")   # (H, W) int64 class indices; predictor.classes names them

    `flags` are evaluate.py's, e.g. ["--ms-flip"] or ["--device", "cuda"]."""

    def __init__(self, checkpoint, flags=()):
        _, self.settings, built = load(build_parser().parse_args(["--checkpoint", str(checkpoint), *flags]))
        self.model = inference_model(built, self.settings)
        self.palette, self.classes = self.settings["palette"], self.settings["classes"]

    def __call__(self, path):
        """The class of every pixel of the image file at `path`, at its size (as EXIF turns it upright). A
        photo over 4 times the test scale's pixels is predicted at the test scale, as evaluate.py --image
        does, and its classes enlarged to the photo's size (nearest)."""
        original = data.read_image(path, upright=True)
        image = within_test_scale(original, self.settings["scale"])
        pred = image_prediction(self.model, image, self.settings)[1][None, None].float()
        return F.interpolate(pred, original.shape[-2:], mode="nearest")[0, 0].long().cpu()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # no traceback for a stop the user asked for
        raise SystemExit(
            "\nevaluate.py: stopped by Ctrl-C; the scores of a split are written only at its end"
        ) from None
