r"""Evaluate a GCNet checkpoint the way the mmsegmentation GCNet results table was computed.

The table has two accuracy columns (mmseg v0.5.0 configs/_base_/datasets/*.py test_pipeline,
tools/test.py --aug-test):
  mIoU           one pass per image at the row's test scale: the whole image for the 512x1024,
                 ADE20K and VOC models; 769x769 sliding windows with stride 513 on the 2049x1025
                 image for the 769x769 models (align_corners=True).
  mIoU(ms+flip)  the same at 0.5, 0.75, 1.0, 1.25, 1.5, 1.75 times the test scale, each also
                 flipped; the 12 softmax maps are averaged at the original resolution.
The metric is an exact confusion matrix summed over the whole split at the original label
resolution; IoU and Acc per class, their nanmean over classes, and the overall pixel accuracy.

    python evaluate.py                       # newest work_dirs/*/best.pth, single scale
    python evaluate.py --ms-flip             # ... multi-scale + flip
    python evaluate.py --checkpoint gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth \
        --data-root data/cityscapes --ms-flip
    python evaluate.py --checkpoint CKPT --dataset folder --data-root data/mine   # when it can't tell
    python evaluate.py --save-dir eval_out/pictures      # + label PNG, overlay, GC attention per image
    python evaluate.py --checkpoint CKPT --image photo.jpg --save-dir eval_out   # one picture set
    torchrun --standalone --nproc_per_node=4 evaluate.py --ms-flip          # images split over 4 GPUs

The test protocol (mode, window, stride, test scale, align_corners) is the checkpoint's row of the
table (recipe.row), or for our checkpoints the recipe they record; flags override it. The results
go to <checkpoint dir>/eval_<dataset>_<whole|slide>[_ms][_flip]_<time>.json (or --out). Official
checkpoints are scored in IEEE fp32 by default, as the table was; ours in the hardware's native
precision (runtime.resolve_precision), checked against fp32 on the first 10 images.

Reading order: slide_windows, slide_inference, predict (the protocol); confusion_matrix,
metrics_from_confusion (the metric); evaluate_dataset (a whole split); save_pictures; then the CLI.
"""

import argparse
import glob
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import data
import recipe
import runtime
from model import DATASET_OF_NUM_CLASSES, GCNet, extract_state_dict, load_weights, read_checkpoint

# tools/test.py --aug-test: ratios of the test scale, each run plain and flipped (mmseg v0.5.0
# configs/_base_/datasets/*.py img_ratios).
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
CHECKPOINT_PATTERN = "work_dirs/*/best.pth"


def as_pair(value):
    """769 -> (769, 769); (h, w) stays (h, w)."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


# -----------------------------------------------------------------------------------------------
# The test protocol: sliding windows, then scales and flips of one image
# (mmseg v0.5.0 mmseg/models/segmentors/encoder_decoder.py whole_inference / slide_inference / aug_test)


def slide_windows(height, width, crop_size, stride):
    """Window boxes (y1, y2, x1, x2) of the original slide inference.

    The grid has enough windows for the stride to reach the last row/column; windows that would
    stick out are shifted back inside the image, so together they cover every pixel. 1025x2049
    with crop 769 and stride 513 gives 2 x 4 windows.
    """
    crop_h, crop_w = as_pair(crop_size)
    stride_h, stride_w = as_pair(stride)
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
    """Logits (N, C, H, W) for images (N, 3, H, W) from overlapping windows, C = model.num_classes.

    Each window's logits (already resized to the window by the model) are added into an
    accumulator and divided by how many windows covered each pixel: overlaps average LOGITS,
    not probabilities. Up to `window_batch` windows go through the model at once (with N images,
    window_batch // N window positions per pass).
    """
    crop_h, crop_w = as_pair(crop_size)
    n, channels, height, width = images.shape
    logits_sum = images.new_zeros((n, model.num_classes, height, width), dtype=torch.float32)
    count = images.new_zeros((1, 1, height, width), dtype=torch.float32)
    boxes = slide_windows(height, width, (crop_h, crop_w), stride)
    boxes_per_pass = max(1, window_batch // n)
    for start in range(0, len(boxes), boxes_per_pass):
        chunk = boxes[start : start + boxes_per_pass]
        # A window is smaller than the crop only where the image itself is, e.g. the 512 and 768
        # rows of the 0.5 and 0.75 ms ratios of the 769 models. mmseg v0.5.0, which produced the
        # published ms+flip numbers, zero-pads such a window (zero = the mean colour after
        # normalisation) at the bottom/right to the crop size and keeps the top-left part of the
        # output; v0.6+ feeds it unpadded (compare encoder_decoder.py slide_inference in v0.5.0
        # and v0.6.0). We pad, as v0.5.0.
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

    images: the image at each test scale, each (3, h, w) or (1, 3, h, w), normalised.
    For every scale (and its horizontal flip when flip=True): logits at the scaled image's size
    ('whole': one pass; 'slide': slide_inference), bilinearly resized to the original size with
    model.align_corners, softmax; flipped maps are flipped back; the maps are averaged. With one
    scale and no flip this is softmax(resize(logits)), whose argmax is the original's prediction.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and (crop_size is None or stride is None):
        raise ValueError("slide mode needs crop_size and stride (e.g. 769 and 513)")
    if len(images) == 0:
        raise ValueError("predict() needs the image at one scale at least; got an empty list")
    probabilities = None
    passes = 0
    for image in images:
        batch = image if image.dim() == 4 else image[None]  # (1, 3, h, w)
        if flip:
            # The flipped copy shares the forward pass: in eval mode the images of a batch do not
            # interact (BatchNorm uses running statistics, the GC softmax is per image).
            batch = torch.cat([batch, batch.flip(-1)])  # (2, 3, h, w)
        if mode == "whole":
            logits = model(batch)
        else:
            logits = slide_inference(
                model, batch, crop_size=crop_size, stride=stride, window_batch=window_batch
            )
        if logits.shape[1] != model.num_classes:
            raise ValueError(f"the model gives {logits.shape[1]} classes, expected {model.num_classes}")
        # The second resize of the original, scaled image -> original image, then softmax; resizing,
        # softmax and averaging run in float32 whatever the autocast. A resize to the same size
        # samples exactly at the pixels (either align_corners): skip it.
        logits = logits.float()
        if tuple(logits.shape[-2:]) != tuple(original_size):
            logits = F.interpolate(
                logits, size=tuple(original_size), mode="bilinear", align_corners=model.align_corners
            )
        scale_probabilities = class_softmax(logits)  # (1 or 2, C, H, W)
        if probabilities is None:
            probabilities = scale_probabilities[0]
        else:
            probabilities += scale_probabilities[0]
        if flip:
            probabilities += scale_probabilities[1].flip(-1)  # un-flip along W
        passes += len(batch)
    return probabilities if passes == 1 else probabilities.div_(passes)


def class_softmax(logits):
    """Softmax over the classes (dim 1) of (N, C, H, W) logits. For channels_last logits the classes
    are the innermost dimension in memory, so the softmax runs there, on a permuted view, instead of
    torch's dim-1 kernel, which would first copy them to the NCHW layout. The result keeps the
    channels_last layout, in which the argmax over the classes is also faster."""
    if logits.dim() == 4 and logits.stride(1) == 1 and logits.shape[1] > 1:
        return logits.permute(0, 2, 3, 1).softmax(dim=-1).permute(0, 3, 1, 2)
    return logits.softmax(dim=1)


# -----------------------------------------------------------------------------------------------
# Metrics (mmseg v0.5.0 mmseg/core/evaluation/mean_iou.py)


def confusion_matrix(pred, label, num_classes, ignore_index=data.IGNORE_INDEX):
    """int64 (num_classes, num_classes) matrix: rows = ground truth, columns = prediction.

    Pixels whose label is ignore_index are dropped, so a prediction there is no false positive.
    """
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
    counts = torch.bincount(num_classes * gt + predicted, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def metrics_from_confusion(matrix):
    """aAcc, mIoU, mAcc (percent) and per-class IoU / Acc lists (percent, NaN where undefined).

    IoU_c = I_c / U_c and Acc_c = I_c / GT_c over the whole split. A class with union 0 has IoU
    NaN and is skipped by the mean; one absent from the ground truth but predicted has IoU 0 and
    counts; Acc is NaN for every class absent from the ground truth.
    """
    matrix = matrix.double().cpu()
    intersection = matrix.diag()
    gt_area, predicted_area = matrix.sum(dim=1), matrix.sum(dim=0)
    iou = intersection / (gt_area + predicted_area - intersection)  # 0/0 -> NaN
    accuracy = intersection / gt_area
    return {
        "aAcc": 100 * (intersection.sum() / matrix.sum()).item(),
        "mIoU": 100 * torch.nanmean(iou).item(),
        "mAcc": 100 * torch.nanmean(accuracy).item(),
        "IoU": (100 * iou).tolist(),
        "Acc": (100 * accuracy).tolist(),
    }


def format_table(metrics, classes):
    """Per-class IoU / Acc table (percent, 2 decimals) with the summary line below."""
    width = max([len("class")] + [len(name) for name in classes])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, accuracy in zip(classes, metrics["IoU"], metrics["Acc"], strict=True):
        lines.append(f"{name:<{width}}  {iou:6.2f}  {accuracy:6.2f}")
    lines.append(f"aAcc {metrics['aAcc']:.2f}  mIoU {metrics['mIoU']:.2f}  mAcc {metrics['mAcc']:.2f}")
    return "\n".join(lines)


# -----------------------------------------------------------------------------------------------
# A whole split, on one or several processes


def my_images(dataset, indices, device, workers):
    """(images per scale, label or None, meta) on `device` for this process's share of `indices`:
    rank r of W takes indices[r::W], so no image is counted twice."""
    rank, world_size = runtime.rank_and_world_size()
    share = Subset(dataset, list(indices)[rank::world_size])
    loader = DataLoader(
        share,
        batch_size=1,
        num_workers=workers,
        collate_fn=data.collate_val,
        pin_memory=device.type == "cuda",
        # An item holds float32 images at every test scale (~235 MB for a Cityscapes ms+flip image)
        # and travels through /dev/shm: one item in flight per worker keeps that bounded.
        prefetch_factor=1 if workers > 0 else None,
    )
    for images_per_scale, labels, metas in loader:
        images = [image.to(device, non_blocking=True) for image in images_per_scale[0]]
        label = None if labels is None or labels[0] is None else labels[0].to(device, non_blocking=True)
        yield images, label, metas[0]


def sum_over_processes(tensor):
    """all_reduce(SUM) on the device the backend wants (NCCL: CUDA, gloo: CPU)."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    backend_device = tensor.device if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = tensor.to(backend_device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return summed.to(tensor.device)


@torch.no_grad()
def evaluate_dataset(
    model, dataset, *, mode, crop_size, stride, flip, device, precision, channels_last, window_batch=4,
    save_dir=None, opacity=0.5, show_progress=True, workers=2,
):  # fmt: skip
    """Metrics of `model` on a val split (items from data.build_dataset(..., split='val')).

    The scales are the dataset's test ratios (its items hold one image per ratio). Under torchrun
    each process takes every world_size-th image and the confusion matrices are summed across
    processes; every process returns the same dict: aAcc, mIoU, mAcc, IoU, Acc (percent, see
    metrics_from_confusion), num_images and confusion_matrix (list of rows). Pass the model
    itself, not a DDP wrapper. The model is put in eval mode and back in its previous mode after;
    channels_last changes its weights' memory layout in place (the values stay the same).
    """
    if len(dataset) == 0:
        raise ValueError(f"the {getattr(dataset, 'name', '')} val split has no images: check the data root")
    device = torch.device(device)
    rank, world_size = runtime.rank_and_world_size()
    was_training = model.training
    model.eval()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    num_classes = dataset.num_classes
    matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)
    share = len(range(rank, len(dataset), world_size))
    protocol = dict(mode=mode, crop_size=crop_size, stride=stride, flip=flip, window_batch=window_batch)
    progress = tqdm(
        total=share,
        desc=f"evaluate ({share} of {len(dataset)} images here)" if world_size > 1 else "evaluate",
        unit="img",
        disable=not show_progress or rank != 0,
    )
    try:
        for images, label, meta in my_images(dataset, range(len(dataset)), device, workers):
            with runtime.precision_context(device, precision):
                probabilities = predict(model, images, label.shape, **protocol)
            pred = probabilities.argmax(dim=0)  # (H, W) at the label's (original) resolution
            matrix += confusion_matrix(pred, label, num_classes)
            if save_dir is not None:
                original = data.read_image(meta["image_path"])
                at_ratio_one = image_at_ratio_one(images, dataset.test_ratios, original, dataset.test_scale)
                with runtime.precision_context(device, precision):
                    attention = attention_map(model, at_ratio_one, label.shape)
                save_pictures(save_dir, meta["name"], original, pred, dataset.palette, attention, opacity)
            progress.update(1)
    finally:
        progress.close()
        model.train(was_training)
    matrix = sum_over_processes(matrix)
    num_images = int(sum_over_processes(torch.tensor([share], device=device)).item())
    results = metrics_from_confusion(matrix)
    results.update(num_images=num_images, confusion_matrix=matrix.cpu().tolist())
    return results


@torch.no_grad()
def precision_agreement(
    model, dataset, num_images, *, mode, crop_size, stride, flip, device, precision, window_batch, workers=2,
    reference_model=None,
):  # fmt: skip
    """Fraction of labelled pixels whose predicted class is the same at `precision` and in fp32,
    over the first num_images images of the split (shared across processes like the evaluation).
    It shows that the precision changes the results by rounding only. The fp32 pass runs
    reference_model when given: evaluate.py passes the model before BatchNorm folding, so that the
    agreement covers the folding too."""
    device = torch.device(device)
    reference_model = model if reference_model is None else reference_model
    model.eval()
    reference_model.eval()
    protocol = dict(mode=mode, crop_size=crop_size, stride=stride, flip=flip, window_batch=window_batch)
    counts = torch.zeros(2, dtype=torch.int64, device=device)  # [agreeing pixels, labelled pixels]
    for images, label, _ in my_images(dataset, range(min(num_images, len(dataset))), device, workers):
        preds = []
        for run_model, run_precision in ((model, precision), (reference_model, "fp32")):
            with runtime.precision_context(device, run_precision):
                preds.append(predict(run_model, images, label.shape, **protocol).argmax(dim=0))
        labelled = label != data.IGNORE_INDEX
        counts += torch.stack([(preds[0] == preds[1])[labelled].sum(), labelled.sum()])
    agreeing, total = sum_over_processes(counts).tolist()
    return {"images": min(num_images, len(dataset)), "pixels": total, "agreement": agreeing / max(total, 1)}


# -----------------------------------------------------------------------------------------------
# Pictures: predicted labels, colour overlay, and the GC block's attention map


@torch.no_grad()
def attention_map(model, image, original_size):
    """The GC block's attention (softmax over positions, 1/8 resolution) for one image (3, h, w),
    bilinearly upsampled to original_size and scaled to [0, 1] for display."""
    _, attention = model(image[None], return_attention=True)  # attention (1, 1, h/8, w/8)
    attention = F.interpolate(
        attention.float(), size=tuple(original_size), mode="bilinear", align_corners=model.align_corners
    )[0, 0]  # (H, W)
    low, high = attention.min(), attention.max()
    return (attention - low) / (high - low).clamp_min(1e-12)


def image_at_ratio_one(images, ratios, original, test_scale):
    """The image at the test scale (ratio 1.0), for the attention picture: one of the images per
    ratio, or made from the original uint8 image when 1.0 is not among the ratios."""
    ratios = tuple(ratios)
    if 1.0 in ratios:
        return images[ratios.index(1.0)]
    return data.test_transform(original, test_scale)[0].to(images[0].device)


def heat_colors(values):
    """A 'jet'-like colour map: (H, W) values in [0, 1] -> (H, W, 3) float RGB in [0, 255].
    Each channel is a clipped tent, 1.5 - 4 |value - peak|, with blue peaking at 1/4, green at 1/2
    and red at 3/4: 0 is dark blue, 1/2 light green, 1 dark red."""
    peaks = torch.tensor([0.75, 0.5, 0.25], device=values.device)  # R, G, B
    return 255 * (1.5 - 4 * (values.clamp(0, 1)[..., None] - peaks).abs()).clamp(0, 1)


def rgb_picture(rgb):
    """(H, W, 3) float in [0, 255] -> PIL RGB image."""
    return Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy())


def label_picture(pred, palette):
    """(H, W) class indices -> palette PNG image ('P' mode)."""
    pred = pred.cpu()
    height, width = pred.shape
    labels = Image.frombytes("P", (width, height), pred.to(torch.uint8).numpy().tobytes())
    labels.putpalette([value for color in palette for value in color])
    return labels


def save_pictures(save_dir, name, image, pred, palette, attention=None, opacity=0.5):
    """Write <name>_pred.png (palette PNG of the class indices), <name>_overlay.jpg (class colours
    over the image) and, given an attention map, <name>_attention.png. image: uint8 (3, H, W) RGB at
    the original size; pred: (H, W) class indices; attention: (H, W) in [0, 1]. Returns the paths."""
    stem = Path(save_dir) / name
    stem.parent.mkdir(parents=True, exist_ok=True)
    pred = pred.cpu()
    paths = [Path(f"{stem}_pred.png"), Path(f"{stem}_overlay.jpg")]
    label_picture(pred, palette).save(paths[0])
    picture = image.cpu().permute(1, 2, 0).float()  # (H, W, 3)
    colors = torch.tensor(palette, dtype=torch.float32)[pred.long()]  # (H, W, 3)
    rgb_picture((1 - opacity) * picture + opacity * colors).save(paths[1], quality=95)
    if attention is not None:
        paths.append(Path(f"{stem}_attention.png"))
        rgb_picture((1 - opacity) * picture + opacity * heat_colors(attention.float().cpu())).save(paths[2])
    return paths


@torch.no_grad()
def predict_image(
    model, image_path, *, scale, ratios, mode, crop_size, stride, flip, device, precision, window_batch,
    palette, save_dir, name=None, opacity=0.5,
):  # fmt: skip
    """The pictures of save_pictures() for one image file, without a dataset. Returns their paths."""
    original = data.read_image(image_path, upright=True)  # uint8 (3, H, W), as the photo is meant to be seen
    ratios = tuple(ratios)
    images = [image.to(device) for image in data.test_transform(original, scale, ratios)]
    model.eval()
    with runtime.precision_context(device, precision):
        probabilities = predict(
            model, images, original.shape[-2:], mode=mode, crop_size=crop_size, stride=stride, flip=flip,
            window_batch=window_batch,
        )  # fmt: skip
        attention = attention_map(
            model, image_at_ratio_one(images, ratios, original, scale), original.shape[-2:]
        )
    pred = probabilities.argmax(dim=0)
    name = Path(image_path).stem if name is None else name
    return save_pictures(save_dir, name, original, pred, palette, attention, opacity)


# -----------------------------------------------------------------------------------------------
# Checkpoints: what they say about the model, the data and the row of the table they belong to


def find_checkpoint(path):
    """--checkpoint as given, or the newest work_dirs/*/best.pth (by modification time)."""
    if path is not None:
        if re.match(r"^(https?|file)://", path) or Path(path).is_file():
            return path
        raise FileNotFoundError(
            f"checkpoint not found: {path} (--checkpoint). Pass a .pth file written by train.py, an "
            "official GCNet checkpoint of the results table, or its download URL."
        )
    found = sorted(Path().glob(CHECKPOINT_PATTERN), key=lambda candidate: candidate.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint found: looked for {CHECKPOINT_PATTERN} in {Path.cwd()}; "
            "pass --checkpoint PATH or train first with python train.py"
        )
    return str(found[-1])


def checkpoint_info(path_or_url, checkpoint=None):
    """What a checkpoint says about the model and data it belongs to, without building a model.

    Returns a dict with 'depth', 'num_classes' and, where recorded (else None), 'dataset',
    'align_corners', 'crop_size' (h, w), 'classes', 'palette', 'config_name', 'recipe' (ours
    record theirs) and 'row': the recipe it was trained with, recipe.row() filled in by ours.
    For an official checkpoint the row of the table is read from its file name or meta
    (e.g. gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth).
    """
    checkpoint = read_checkpoint(path_or_url) if checkpoint is None else checkpoint
    state_dict = extract_state_dict(checkpoint)
    n_blocks = sum(1 for k in state_dict if re.fullmatch(r"backbone\.layer3\.\d+\.conv1\.weight", k))
    if "decode_head.conv_seg.weight" not in state_dict or n_blocks not in (6, 23):
        raise ValueError(
            f"{path_or_url} is not a GCNet checkpoint: it has no decode_head.conv_seg or backbone.layer3 keys"
        )
    info = dict(
        depth={6: 50, 23: 101}[n_blocks],
        num_classes=int(state_dict["decode_head.conv_seg.weight"].shape[0]),
        dataset=None, align_corners=None, crop_size=None, classes=None, palette=None, config_name=None,
        recipe=None, row=None,
    )  # fmt: skip
    meta = checkpoint.get("meta") or {}
    ours = checkpoint.get("recipe")
    if ours:
        info["recipe"] = ours
        for key in ("dataset", "align_corners", "config_name"):
            info[key] = ours.get(key)
        info["crop_size"] = tuple(ours["crop_size"]) if ours.get("crop_size") else None
    else:  # an official one: the row is named in the file name (or the meta's exp_name)
        row = recipe.row_of_config_name(f"{meta.get('exp_name', '')} {path_or_url}")
        config_text = str(meta.get("config", ""))
        if row is not None:
            info.update(config_name=row["config_name"], dataset=row["dataset"], crop_size=row["crop_size"])
        crop_match = re.search(r"crop_size\s*=\s*\((\d+),\s*(\d+)\)", config_text)
        if crop_match and info["crop_size"] is None:
            info["crop_size"] = (int(crop_match.group(1)), int(crop_match.group(2)))
        if info["dataset"] is None:
            dataset_types = {"Cityscapes": "cityscapes", "ADE20KDataset": "ade20k", "PascalVOC": "voc12aug"}
            found = [dataset for type_name, dataset in dataset_types.items() if type_name in config_text]
            info["dataset"] = found[0] if found else DATASET_OF_NUM_CLASSES.get(info["num_classes"])
        if "align_corners=True" in config_text.replace(" ", ""):
            info["align_corners"] = True
        elif info["crop_size"] is not None:
            info["align_corners"] = recipe.is_769_crop(info["crop_size"])
    if info["dataset"] in recipe.DATASETS:
        # Ours record their recipe; older ones lack some keys (the test scale): the row fills them.
        info["row"] = {**recipe.row(info["dataset"], info["crop_size"], depth=info["depth"]), **(ours or {})}
    if meta.get("CLASSES") is not None:
        info["classes"] = [str(c) for c in meta["CLASSES"]]
    if meta.get("PALETTE") is not None:
        info["palette"] = [[int(v) for v in color] for color in meta["PALETTE"]]
    return info


def build_model(checkpoint, loaded, info, settings, device):
    """GCNet shaped by the checkpoint (depth and class count from its weights) with its weights."""
    depth = settings["depth"]
    if depth is not None and depth != info["depth"]:
        raise ValueError(f"--depth {depth} but {checkpoint} holds a ResNet-{info['depth']}: drop --depth")
    model = GCNet(info["num_classes"], depth=info["depth"], align_corners=settings["align_corners"])
    load_weights(model, checkpoint, loaded)
    return model.to(device).eval()


def check_classes(info, dataset, checkpoint):
    """The checkpoint's classes must be the dataset's, in the same order."""
    if info["num_classes"] != dataset.num_classes:
        raise ValueError(
            f"{checkpoint} predicts {info['num_classes']} classes but the {dataset.name} dataset has "
            f"{dataset.num_classes}: pass the --dataset it was trained on"
        )
    if info["classes"] is not None:
        # strip(): the original ADE20K class list has 'bed ' with a trailing space (mmseg v0.5.0 mmseg/datasets/ade.py).
        ours, theirs = [c.strip() for c in info["classes"]], [c.strip() for c in dataset.classes]
        if ours != theirs:
            first = next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)
            raise ValueError(
                f"{checkpoint} was trained on other classes than the {dataset.name} dataset's: class "
                f"{first} is {ours[first]!r} in the checkpoint, {theirs[first]!r} in the dataset"
            )


# -----------------------------------------------------------------------------------------------
# Command line: the settings, resolved once into a plain dict, then one of three jobs


def protocol_settings(args, info):
    """Mode, window, stride, test scale, ratios, flip and align_corners: the checkpoint's row of the
    table (or its recorded recipe), then the flags. A --crop picks the row of that crop."""
    name = args.dataset or info["dataset"]
    row = info["row"]
    if args.crop is not None or row is None:  # unknown dataset: Cityscapes' test scale, 2048x1024
        crop = args.crop or info["crop_size"]
        row = recipe.row(name if name in recipe.DATASETS else "cityscapes", crop, depth=info["depth"])
    mode = args.mode or row["test_mode"]
    crop_size = args.crop or as_pair(row["test_crop"])
    stride = args.stride or as_pair(row["test_stride"])
    if mode == "slide" and min(crop_size[0] - stride[0], crop_size[1] - stride[1]) < 0:
        raise ValueError(f"--stride {stride} is larger than the window {crop_size}: windows would leave gaps")
    ratios = tuple(args.scales) if args.scales else (MS_RATIOS if args.ms_flip else (1.0,))
    return dict(
        dataset=name,
        mode=mode,
        crop_size=tuple(crop_size),
        stride=tuple(stride),
        scale=as_pair(row["scale"]),
        ratios=ratios,
        flip=args.flip if args.flip is not None else args.ms_flip,
        align_corners=info["align_corners"] if info["align_corners"] is not None else row["align_corners"],
    )


def speed_settings(args, device, official):
    """Precision, layout, BatchNorm folding and the agreement check. An official checkpoint is scored
    in IEEE fp32 like the table; ours in the native precision. BatchNorm is folded into the convs
    unless fp32, which keeps the original's arithmetic."""
    precision = runtime.resolve_precision(args.precision, device, auto="fp32" if official else "native")
    return dict(
        precision=precision,
        channels_last=runtime.resolve_channels_last(args.channels_last, device, precision),
        fold_batchnorm=args.fold_batchnorm if args.fold_batchnorm is not None else precision != "fp32",
        check_agreement=args.check_agreement if args.check_agreement is not None else (10 if precision != "fp32" else 0),
        window_batch=args.window_batch,
        workers=args.workers,
    )  # fmt: skip


def resolve_settings(args, info, device):
    """Every setting of the run in one plain dict; nothing reads `args` after this."""
    return dict(
        **protocol_settings(args, info),
        **speed_settings(args, device, official=info["recipe"] is None),
        depth=args.depth,
        data_root=args.data_root,
        images=image_files(args.image) if args.image else None,  # (files, skipped)
        save_dir=args.save_dir,
        opacity=args.opacity,
        out=args.out,
    )


def inference_keywords(settings, device):
    """What evaluate_dataset, precision_agreement and predict_image all take."""
    keys = ("mode", "crop_size", "stride", "flip", "precision", "window_batch")
    return dict({key: settings[key] for key in keys}, device=device)


def without_nan(value):
    """JSON has no NaN: undefined IoU / Acc become null."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {key: without_nan(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [without_nan(item) for item in value]
    return value


def default_output_path(checkpoint, name, settings):
    """<checkpoint dir>/eval_<dataset>_<mode>[_ms][_flip]_<time>.json; eval_out/ for a URL."""
    folder = Path("eval_out") if re.match(r"^(https?|file)://", checkpoint) else Path(checkpoint).parent
    tag = (
        settings["mode"]
        + ("_ms" if len(settings["ratios"]) > 1 else "")
        + ("_flip" if settings["flip"] else "")
    )
    return folder / f"eval_{name}_{tag}_{time.strftime('%Y%m%d_%H%M%S')}.json"


def evaluate_split(model, info, settings, checkpoint, device, reference_model):
    """Metrics on the val split: table on screen, everything in a JSON file."""
    rank, world_size = runtime.rank_and_world_size()
    name = settings["dataset"]
    if name is None:
        raise ValueError(
            f"cannot tell which dataset {checkpoint} ({info['num_classes']} classes) belongs to: "
            f"pass --dataset (one of {', '.join(sorted(data.DATASETS))}, or folder) and --data-root"
        )
    dataset = data.build_dataset(
        name,
        root=settings["data_root"],
        split="val",
        crop_size=settings["crop_size"],
        test_ratios=settings["ratios"],
    )
    check_classes(info, dataset, checkpoint)
    precision = settings["precision"]
    if rank == 0:
        print(
            f"{checkpoint}: {len(dataset)} {name} val images, {settings['mode']} "
            f"(crop {settings['crop_size']}, stride {settings['stride']}), ratios {settings['ratios']}, "
            f"flip {settings['flip']}, align_corners {settings['align_corners']}, "
            f"{precision} on {device}" + (f" x {world_size} processes" if world_size > 1 else "")
        )
    inference = dict(inference_keywords(settings, device), workers=settings["workers"])
    agreement = None
    if settings["check_agreement"] > 0 and precision != "fp32":
        agreement = precision_agreement(
            model, dataset, settings["check_agreement"], reference_model=reference_model, **inference
        )
        if rank == 0:
            print(f"{precision} vs fp32: {100 * agreement['agreement']:.4f}% of the labelled pixels agree")
    start = time.perf_counter()
    results = evaluate_dataset(
        model,
        dataset,
        channels_last=settings["channels_last"],
        save_dir=settings["save_dir"],
        opacity=settings["opacity"],
        **inference,
    )
    seconds = time.perf_counter() - start
    if rank != 0:
        return
    print(format_table(results, dataset.classes))
    protocol_keys = ("mode", "crop_size", "stride", "ratios", "flip", "align_corners")
    speed_keys = ("precision", "channels_last", "fold_batchnorm", "window_batch")
    record = {
        "checkpoint": str(checkpoint),
        "config_name": info["config_name"],
        "dataset": name,
        "data_root": settings["data_root"] or data.DATASETS.get(name, {}).get("default_root"),
        "num_images": results["num_images"],
        **{key: results[key] for key in ("aAcc", "mIoU", "mAcc")},
        "per_class": {
            c: {"IoU": i, "Acc": a} for c, i, a in zip(dataset.classes, results["IoU"], results["Acc"])
        },
        "settings": {
            **{key: settings[key] for key in protocol_keys + speed_keys},
            "depth": model.depth,
            "num_classes": model.num_classes,
            "world_size": world_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
        },
        "precision_agreement": agreement,
        "seconds": seconds,
        "confusion_matrix": results["confusion_matrix"],
    }
    out = Path(settings["out"]) if settings["out"] else default_output_path(str(checkpoint), name, settings)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(without_nan(record), indent=1))
    print(f"wrote {out}" + (f" and pictures in {settings['save_dir']}" if settings["save_dir"] else ""))


def image_files(patterns):
    """--image: files as given, a folder's images (sorted), a glob pattern's images (sorted). Returns
    (files, skipped): skipped are the files of folders and patterns that are not images by their name."""
    files, skipped = [], []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            files.append(path)
            continue
        if path.is_dir():
            found = sorted(child for child in path.iterdir() if child.is_file())
        elif any(character in pattern for character in "*?["):
            found = sorted(
                Path(match) for match in glob.glob(pattern, recursive=True) if Path(match).is_file()
            )
        else:
            raise FileNotFoundError(f"--image {pattern}: no such file or folder")
        images = [child for child in found if child.suffix.lower() in data.FOLDER_IMAGE_EXTENSIONS]
        if not images:
            raise FileNotFoundError(
                f"--image {pattern}: no {'/'.join(data.FOLDER_IMAGE_EXTENSIONS)} images there"
            )
        files += images
        skipped += [child for child in found if child not in images]
    return list(dict.fromkeys(files)), skipped  # a file named twice is predicted once


def picture_names(files):
    """Each file's name under --save-dir: its path below the files' common folder, without the
    extension (a/x.jpg, b/x.jpg -> a/x, b/x); x.jpg beside x.png keep it (x_jpg, x_png)."""
    common = Path(os.path.commonpath([file.absolute().parent for file in files]))
    names = [str(file.absolute().relative_to(common).with_suffix("")) for file in files]
    return [
        name if names.count(name) == 1 else f"{name}_{file.suffix[1:]}" for name, file in zip(names, files)
    ]


def predict_images(model, info, settings, device):
    """--image: the pictures of every file; under torchrun, rank r of W takes files[r::W]. An image
    that cannot be read is named and the others go on. Returns how many failed, over all ranks."""
    rank, world_size = runtime.rank_and_world_size()
    files, skipped = settings["images"]
    palette = info["palette"] or data.DATASETS.get(settings["dataset"], {}).get("palette")
    if palette is None or len(palette) != model.num_classes:
        palette = data.default_palette(model.num_classes)
    if settings["channels_last"]:
        model.to(memory_format=torch.channels_last)
    save_dir = settings["save_dir"] or "eval_out"
    keywords = dict(inference_keywords(settings, device), scale=settings["scale"], ratios=settings["ratios"])
    mine = list(zip(files, picture_names(files)))[rank::world_size]
    written, failed = [], []
    for path, name in tqdm(mine, desc="predict", unit="img", disable=rank != 0 or len(mine) < 2):
        try:
            written += predict_image(model, path, name=name, palette=palette, save_dir=save_dir,
                                     opacity=settings["opacity"], **keywords)  # fmt: skip
        except (ValueError, OSError) as error:  # an unreadable or undecodable file: name it, go on
            failed.append(path)
            tqdm.write(f"evaluate.py: {path} failed: {error}", file=sys.stderr)
    counts = sum_over_processes(torch.tensor([len(mine) - len(failed), len(failed)], device=device)).tolist()
    if rank == 0:
        if skipped:
            print(f"skipped {len(skipped)} files that are not images: " + ", ".join(map(str, skipped)))
        if len(files) == 1 and not failed:
            print("wrote " + ", ".join(str(path) for path in written))
        else:
            print(
                f"wrote the label PNG, overlay and attention picture of {counts[0]} images under {save_dir}"
            )
    if failed:
        print(f"evaluate.py: {len(failed)} images failed: " + ", ".join(map(str, failed)), file=sys.stderr)
    return counts[1]


def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.keep_freed_memory()
    failed = 0
    try:
        _, _, device = runtime.setup_device(args.device)
        checkpoint = find_checkpoint(args.checkpoint)
        loaded = read_checkpoint(checkpoint, trust=args.trust_checkpoint)  # read once, for info and weights
        info = checkpoint_info(checkpoint, loaded)
        settings = resolve_settings(args, info, device)
        model = build_model(checkpoint, loaded, info, settings, device)
        unfolded_model = model  # the fp32 reference of the agreement check
        if settings["fold_batchnorm"]:
            model = runtime.fold_batchnorm(model)
        if settings["images"]:
            failed = predict_images(model, info, settings, device)
        else:
            evaluate_split(model, info, settings, checkpoint, device, unfolded_model)
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        raise SystemExit(f"evaluate.py: {error}") from None
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if failed:
        raise SystemExit(1)  # the other images are written; a script still sees that some were not


# Every flag is checked when it is parsed, so that a mistake ends the run before any work.


def size_flag(flag):
    """argparse type of --crop / --stride: '769' or '512x1024' (recipe.parse_crop)."""

    def parse(text):
        try:
            return recipe.parse_crop(text, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag}: ")) from None

    return parse


def number_flag(kind, minimum, maximum=None, exclusive=False):
    """argparse type: a finite int or float >= minimum (> with exclusive) and <= maximum."""
    name = "an integer" if kind is int else "a number"
    allowed = (
        f"{name} in [{minimum}, {maximum}]"
        if maximum is not None
        else f"{name} {'>' if exclusive else '>='} {minimum}"
    )

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        above = value > minimum if exclusive else value >= minimum
        if not (math.isfinite(value) and above and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"expected {allowed}, got {text!r}")
        return value

    return parse


def output_path(kind):
    """argparse type of --out (kind 'file') and --save-dir (kind 'folder'): a place this process can
    write, checked before the evaluation rather than after it."""

    def parse(text):
        path = Path(text)
        if kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text} is a directory; pass a file name such as {path / 'results.json'}"
            )
        if kind == "folder" and path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file; pass a folder for the pictures")
        existing = next(parent for parent in [path.absolute(), *path.absolute().parents] if parent.exists())
        if existing != path.absolute() and not existing.is_dir():
            raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | (os.X_OK if existing.is_dir() else 0)):
            raise argparse.ArgumentTypeError(
                f"cannot write {text}: {existing} is not writable; choose another place"
            )
        return text

    return parse


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_argument_group("what to evaluate")
    what.add_argument("--checkpoint", help=f"a .pth file or URL (default: newest {CHECKPOINT_PATTERN})")
    what.add_argument(
        "--trust-checkpoint",
        action="store_true",
        help="unpickle the checkpoint fully even if it holds objects that can run code (only for files you trust)",
    )
    what.add_argument(
        "--dataset", help="cityscapes, ade20k, voc12aug, toy or folder (default: the checkpoint's)"
    )
    what.add_argument("--data-root", help="dataset folder (default: the dataset's, e.g. data/cityscapes)")
    what.add_argument("--depth", type=int, choices=(50, 101), help="only if the checkpoint cannot tell")
    what.add_argument(
        "--image",
        nargs="+",
        metavar="PATH",
        help="predict image files, folders or glob patterns and write their pictures instead",
    )
    test = parser.add_argument_group("test protocol (default: the checkpoint's row of the table)")
    test.add_argument("--ms-flip", action="store_true", help="ratios 0.5..1.75 with flips: mIoU(ms+flip)")
    test.add_argument(
        "--scales",
        type=number_flag(float, 0, exclusive=True),
        nargs="+",
        help="ratios of the test scale, e.g. 0.75 1.0 1.25",
    )
    test.add_argument("--flip", action=argparse.BooleanOptionalAction, help="add horizontally flipped passes")
    test.add_argument("--mode", choices=("whole", "slide"), help="whole image or sliding windows")
    test.add_argument("--crop", type=size_flag("--crop"), help="sliding window size: 769 or HxW (512x1024)")
    test.add_argument("--stride", type=size_flag("--stride"), help="sliding window stride: 513 or HxW")
    runtime.add_arguments(parser)
    speed = parser.add_argument_group("speed (results change by rounding only)")
    speed.add_argument(
        "--fold-batchnorm",
        action=argparse.BooleanOptionalAction,
        help="fold BatchNorm into the convs (default: on unless fp32, which keeps the original's arithmetic)",
    )
    speed.add_argument(
        "--check-agreement",
        type=number_flag(int, 0),
        metavar="N",
        help="compare with fp32 on N images (default 10 if not fp32; 0: off)",
    )
    speed.add_argument(
        "--window-batch", type=number_flag(int, 1), default=4, help="sliding windows per forward pass"
    )
    speed.add_argument(
        "--workers",
        type=number_flag(int, 0),
        default=min(4, os.cpu_count() or 1),
        help="data loading processes",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--save-dir",
        type=output_path("folder"),
        help="write label PNG, overlay and attention pictures per image here",
    )
    output.add_argument(
        "--opacity",
        type=number_flag(float, 0, 1),
        default=0.5,
        help="weight of the colours in the pictures, 0..1",
    )
    output.add_argument(
        "--out",
        type=output_path("file"),
        help="results JSON (default <checkpoint dir>/eval_<dataset>_<mode>_<time>.json)",
    )
    return parser


if __name__ == "__main__":
    main()
