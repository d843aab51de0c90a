"""Datasets, the training and test transforms, and dataset preparation for GCNet segmentation.

Everything here reproduces the data side of the original mmsegmentation recipe (gcnet-spec.md §3.3,
§4.1, §5) with plain torch tensor ops: images are decoded with torchvision, resized with OpenCV's
INTER_LINEAR / INTER_NEAREST semantics, and every random draw comes from torch's RNG, so a DataLoader
seeded with `torch.manual_seed` is reproducible and its workers differ from each other.

Layouts (default roots are relative to the working directory, as in the original):

    cityscapes  data/cityscapes/leftImg8bit/{train,val}/<city>/<name>_leftImg8bit.png
                data/cityscapes/gtFine/{train,val}/<city>/<name>_gtFine_labelTrainIds.png
    ade20k      data/ade/ADEChallengeData2016/images/{training,validation}/<name>.jpg
                data/ade/ADEChallengeData2016/annotations/{training,validation}/<name>.png
    voc12aug    data/VOCdevkit/VOC2012/JPEGImages/<name>.jpg
                data/VOCdevkit/VOC2012/SegmentationClass{,Aug}/<name>.png
                data/VOCdevkit/VOC2012/ImageSets/Segmentation/{train,val,aug}.txt
    folder      ROOT/images/{train,val}/<name>.{jpg,jpeg,png,webp}, ROOT/labels/{train,val}/<name>.png,
                ROOT/classes.txt (one class per line: a name, optionally followed by R G B)
    toy         data/toy, in the Cityscapes layout; generated on first use (80 images of shapes)

Labels are PNGs of class indices with 255 = ignore. Two datasets need a one-off preparation:

    python tools/prepare_datasets.py cityscapes data/cityscapes                  # *_labelIds -> *_labelTrainIds
    python tools/prepare_datasets.py voc12aug data/VOCdevkit data/VOCdevkit/VOCaug  # SBD .mat -> PNG, aug.txt

In code:

    import data
    train_set = data.build_dataset("cityscapes", split="train")  # (image, label) crops
    val_set = data.build_dataset("cityscapes", split="val")      # (images, label, meta)
"""

import json
import os
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_image, encode_png, read_file

import recipe

# ImageNet statistics in RGB order on the 0..255 scale (gcnet-spec.md §3.3 step 7).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
IGNORE_INDEX = 255

# The 40 names and colours of the three benchmark datasets sit in a JSON file beside this one.
with open(Path(__file__).resolve().parent / "classes_and_palettes.json") as file:
    CLASSES_AND_PALETTES = json.load(file)

# The toy dataset: background plus four shapes, each shape drawn in its own colour. The colours are
# 90 degrees of hue apart, so the hue shift of the photometric distortion (at most 36 degrees) never
# makes two classes look alike, and grey stays grey under any saturation change.
TOY_CLASSES = ["background", "disc", "square", "diamond", "bar"]
TOY_PALETTE = [[128, 128, 128], [220, 40, 40], [130, 220, 40], [40, 220, 220], [130, 40, 220]]
TOY_IMAGE_SIZE = (128, 256)  # (H, W)
TOY_COUNTS = {"train": 64, "val": 16}

# One plain dict per dataset: classes, palette, default root, and whether label 0 means "ignore"
# (ADE20K). Crops and scales are the recipe's: recipe.row(name, crop). The `folder` dataset reads its
# classes from ROOT/classes.txt.
DATASETS = {
    "cityscapes": dict(
        **CLASSES_AND_PALETTES["cityscapes"], default_root="data/cityscapes", reduce_zero_label=False
    ),
    "ade20k": dict(
        **CLASSES_AND_PALETTES["ade20k"], default_root="data/ade/ADEChallengeData2016", reduce_zero_label=True
    ),
    "voc12aug": dict(
        **CLASSES_AND_PALETTES["voc12aug"], default_root="data/VOCdevkit/VOC2012", reduce_zero_label=False
    ),
    "toy": dict(classes=TOY_CLASSES, palette=TOY_PALETTE, default_root="data/toy", reduce_zero_label=False),
}
SPLITS = ("train", "val", "test")  # test: images only, for predictions and the benchmark servers
FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Cityscapes id -> trainId (csscripts helpers/labels.py, gcnet-spec.md §5.1); every other id -> 255.
CITYSCAPES_ID_TO_TRAINID = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip


def build_dataset(
    name, root=None, split="train", crop_size=None, scale=None, test_ratios=(1.0,), reduce_zero_label=None
):
    """Build a dataset by name: 'cityscapes', 'ade20k', 'voc12aug', 'folder' or 'toy'.

    root: default DATASETS[name]['default_root'] ('folder' needs one). split: 'train', 'val' or 'test'
    (images only: labels are None and has_labels is False). crop_size: (h, w), 769 or '512x1024', default
    the recipe's; scale: (W, H) the images are rescaled to fit, for training and testing alike, default
    recipe.row(name, crop_size)['scale'] (a 769 crop on Cityscapes gives 2049x1025). test_ratios: the
    ratios of multi-scale testing. reduce_zero_label: True when label 0 means 'ignore' and the classes
    start at 1; None takes the dataset's own convention (ADE20K: True; folder: classes.txt).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if name != "folder" and name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS) + ['folder']}")
    if name == "folder" and root is None:
        raise ValueError("the folder dataset needs a root:\n" + LAYOUTS["folder"].format(root="ROOT"))
    row = recipe.row(name, crop_size)
    scale = tuple(scale) if scale is not None else row["scale"]
    root = Path(root if root is not None else DATASETS[name]["default_root"])

    if name == "toy" and not (root / "leftImg8bit").is_dir():
        make_toy_dataset(root)
    if not root.is_dir():
        raise missing_path_error(name, root, root)
    if name == "folder":
        classes, palette = read_classes_file(root)
        zero_is_ignore = False
    else:
        classes, palette = DATASETS[name]["classes"], DATASETS[name]["palette"]
        zero_is_ignore = DATASETS[name]["reduce_zero_label"]
    find_pairs = {
        "cityscapes": find_cityscapes_pairs,
        "toy": lambda root, split: find_cityscapes_pairs(root, split, name="toy"),
        "ade20k": find_ade20k_pairs,
        "voc12aug": find_voc12aug_pairs,
        "folder": find_folder_pairs,
    }[name]
    return SegmentationDataset(
        name,
        root,
        split,
        find_pairs(root, split),
        classes,
        palette,
        scale=scale,
        crop_size=row["crop_size"],
        test_ratios=test_ratios,
        reduce_zero_label=zero_is_ignore if reduce_zero_label is None else bool(reduce_zero_label),
        image_suffix="_leftImg8bit.png" if name in ("cityscapes", "toy") else None,
    )


# -----------------------------------------------------------------------------------------------
# Training pipeline


class TrainTransform:
    """The whole training pipeline: (uint8 3 x H x W RGB image, H x W label) -> (float32 3 x h x w,
    int64 h x w) at crop_size (h, w). train_scale is (W, H), e.g. (2048, 1024) for Cityscapes."""

    def __init__(self, train_scale, crop_size, ignore_index=IGNORE_INDEX, cat_max_ratio=0.75):
        self.steps = [
            RandomRescaleCrop(train_scale, crop_size, cat_max_ratio=cat_max_ratio, ignore_index=ignore_index),
            RandomHorizontalFlip(0.5),
            PhotometricDistortion(),  # on the crop, as in the original: cheap
            NormalizePad(crop_size, ignore_index),
        ]

    def __call__(self, image, label):
        label = label.to(torch.uint8)
        for step in self.steps:
            image, label = step(image, label)
        return image, label


class RandomRescaleCrop:
    """Steps 3 and 4 together: rescale by a random ratio, then take a crop of at most crop_size.

    The ratio r is uniform in [0.5, 2); the image is rescaled to fit (int(W_s*r), int(H_s*r)) keeping its
    aspect ratio. Only the pixels inside the crop boxes are computed, of the label (nearest) for each
    box the cat_max_ratio test looks at, and of the image (bilinear) for the chosen box; the result is
    that of resizing the whole image and label, then cropping (bit-exact, see resize_image_window).
    An image smaller than the crop gives a smaller crop; NormalizePad fills it up.
    """

    def __init__(
        self, scale, crop_size, ratio_range=(0.5, 2.0), cat_max_ratio=0.75, ignore_index=IGNORE_INDEX
    ):
        self.scale, self.crop_size, self.ratio_range = scale, crop_size, ratio_range
        self.cat_max_ratio, self.ignore_index = cat_max_ratio, ignore_index

    def __call__(self, image, label):
        low, high = self.ratio_range
        ratio = float(torch.rand(())) * (high - low) + low
        size = rescale_size(*label.shape, ratio_scale(self.scale, ratio))
        height, width = min(self.crop_size[0], size[0]), min(self.crop_size[1], size[1])

        def label_crop(top, left):
            return resize_label_window(label, size, top, left, height, width)

        top, left, label = choose_crop(
            size, self.crop_size, label_crop, self.cat_max_ratio, self.ignore_index
        )
        return resize_image_window(image, size, top, left, height, width), label


def ratio_scale(scale, ratio):
    """The scale (W, H) times a ratio, truncated as the original does: (int(W*r), int(H*r))."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def rescale_size(height, width, scale):
    """(h, w) of mmcv.imrescale: the largest keep-ratio size that fits `scale` (W, H), either way round.

    f = min(max(scale) / long side, min(scale) / short side), size = int(dim * f + 0.5).
    E.g. a 375x500 VOC image with scale (2048, 512) becomes 512x683 (gcnet-spec.md §4.1).
    """
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def random_crop_box(height, width, crop_size):
    """Top-left corner of a random crop; offsets are uniform over every position that fits."""
    top = int(torch.randint(0, max(height - crop_size[0], 0) + 1, ()))
    left = int(torch.randint(0, max(width - crop_size[1], 0) + 1, ()))
    return top, left


def crop_is_acceptable(label_crop, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
    """The cat_max_ratio test: at least two classes, and none covering cat_max_ratio or more of the
    non-ignored pixels."""
    counts = torch.bincount(label_crop.flatten(), minlength=256)
    counts[ignore_index] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def choose_crop(size, crop_size, label_crop, cat_max_ratio=0.75, ignore_index=IGNORE_INDEX):
    """Draw crop boxes in an image of `size` (h, w) until one passes the cat_max_ratio test, checking
    at most 10; after 10 failures the 11th draw is used unchecked (gcnet-spec.md §3.3 step 4).
    label_crop(top, left) gives the label inside a box. Returns (top, left, that label crop)."""
    top, left = random_crop_box(*size, crop_size)
    if cat_max_ratio < 1:
        for _ in range(10):
            crop = label_crop(top, left)
            if crop_is_acceptable(crop, cat_max_ratio, ignore_index):
                return top, left, crop
            top, left = random_crop_box(*size, crop_size)
    return top, left, label_crop(top, left)


class RandomHorizontalFlip:
    """Step 5: mirror image and label with probability 0.5."""

    def __init__(self, probability=0.5):
        self.probability = probability

    def __call__(self, image, label):
        if float(torch.rand(())) < self.probability:
            return image.flip(-1), label.flip(-1)
        return image, label


class PhotometricDistortion:
    """Step 6: mmseg's PhotoMetricDistortion with its default ranges, probabilities and order.

    Each step happens with probability 0.5, on uint8 pixels with clipping and truncation after each:
    brightness (add U(-32, 32)); contrast (multiply by U(0.5, 1.5)) either now or last, decided by a
    coin; saturation (multiply S by U(0.5, 1.5)); hue (add an integer in [-18, 17] to H, modulo 180).
    The original works on BGR; brightness and contrast act on every channel alike and the HSV
    conversion here takes RGB, so the arithmetic is the same.
    """

    def __init__(
        self, brightness_delta=32, contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta=18
    ):
        self.brightness_delta = brightness_delta
        self.contrast_range, self.saturation_range = contrast_range, saturation_range
        self.hue_delta = hue_delta

    def contrast(self, image):
        if coin_flip():
            image = scale_and_shift_uint8(image, alpha=uniform(*self.contrast_range))
        return image

    def __call__(self, image, label):
        if coin_flip():
            image = scale_and_shift_uint8(image, beta=uniform(-self.brightness_delta, self.brightness_delta))
        # The original's code (not its comment) puts contrast first when mode == 1.
        contrast_first = coin_flip()
        if contrast_first:
            image = self.contrast(image)
        if coin_flip():
            hue, saturation, value = rgb_to_hsv_uint8(image)
            saturation = scale_and_shift_uint8(saturation, alpha=uniform(*self.saturation_range))
            image = hsv_to_rgb_uint8(hue, saturation, value)
        if coin_flip():
            hue, saturation, value = rgb_to_hsv_uint8(image)
            # torch.randint's upper bound is exclusive, like numpy's: the delta is in [-18, 17]; the
            # new hue is (H + delta) mod 180.
            delta = int(torch.randint(-self.hue_delta, self.hue_delta, ()))
            image = hsv_to_rgb_uint8(hue, saturation, value, hue_shift=delta)
        if not contrast_first:
            image = self.contrast(image)
        return image, label


def coin_flip():
    """True with probability 0.5 (the original's `randint(2)`)."""
    return bool(torch.randint(2, ()))


def uniform(low, high):
    """A float drawn uniformly from [low, high)."""
    return float(torch.rand(())) * (high - low) + low


def scale_and_shift_uint8(image, alpha=1.0, beta=0.0):
    """image * alpha + beta in float32, clipped to 0..255, then truncated back to uint8."""
    return image.to(torch.float32, copy=True).mul_(alpha).add_(beta).clamp_(0, 255).to(torch.uint8)


MEAN_TENSOR = torch.tensor(MEAN).view(3, 1, 1)
STD_TENSOR = torch.tensor(STD).view(3, 1, 1)


def normalize(image):
    """uint8 RGB 3 x H x W -> float32 (image - MEAN) / STD, computed in place in one new tensor."""
    return image.to(torch.float32, copy=True).sub_(MEAN_TENSOR).div_(STD_TENSOR)


class NormalizePad:
    """Steps 7 and 8: normalise, then pad the image with 0 (the mean colour, since this comes after
    normalisation) and the label with 255 at the bottom/right up to crop_size."""

    def __init__(self, crop_size, ignore_index=IGNORE_INDEX):
        self.crop_size, self.ignore_index = crop_size, ignore_index

    def __call__(self, image, label):
        image = normalize(image)
        pad_bottom = self.crop_size[0] - image.shape[1]
        pad_right = self.crop_size[1] - image.shape[2]
        if pad_bottom > 0 or pad_right > 0:
            padding = (0, max(pad_right, 0), 0, max(pad_bottom, 0))  # (left, right, top, bottom)
            image = F.pad(image, padding, value=0.0)
            label = F.pad(label, padding, value=self.ignore_index)
        return image, label.long()


def denormalize(image):
    """Inverse of normalize, for pictures: float (N x) 3 x H x W -> uint8 RGB."""
    image = image.detach().float().cpu() * STD_TENSOR + MEAN_TENSOR
    return image.round_().clamp_(0, 255).to(torch.uint8)


# -----------------------------------------------------------------------------------------------
# Test transform


def test_transform(image, scale, ratios=(1.0,)):
    """uint8 RGB 3 x H x W -> one normalised float32 image per ratio, each rescaled to fit
    (int(W_s*r), int(H_s*r)) with its aspect ratio kept. The label is not touched: evaluation uses it
    at its original resolution."""
    height, width = image.shape[-2:]
    return [
        normalize(resize_image(image, rescale_size(height, width, ratio_scale(scale, r)))) for r in ratios
    ]


# -----------------------------------------------------------------------------------------------
# The dataset: files, labels and checks


class SegmentationDataset(torch.utils.data.Dataset):
    """A list of (image, label) files and the transform of its split.

    train items:     (image float32 3 x h x w, label int64 h x w) at crop_size.
    val/test items:  (images, label, meta): one normalised image per test ratio, the int64 label at its
                     original size (None in the test split, which has no labels), and
                     meta = dict(name, image_path, original_size=(H, W)).
    """

    def __init__(
        self,
        name,
        root,
        split,
        pairs,
        classes,
        palette,
        *,
        scale,
        crop_size,
        test_ratios=(1.0,),
        reduce_zero_label=False,
        image_suffix=None,
    ):
        self.name, self.root, self.split = name, str(root), split
        self.pairs = pairs  # [(image_path, label_path or None)] as str: cheap to send to DataLoader workers
        self.has_labels = all(label is not None for _, label in pairs)
        self.classes = list(classes)
        self.palette = [list(colour) for colour in palette]
        self.num_classes = len(self.classes)
        self.ignore_index = IGNORE_INDEX
        self.scale = tuple(scale)  # (W, H) for training and testing alike, as in the original
        self.crop_size, self.test_ratios = tuple(crop_size), tuple(test_ratios)
        self.reduce_zero_label = reduce_zero_label
        self.image_suffix = image_suffix  # stripped from file names to give meta["name"]
        self.train_transform = TrainTransform(self.scale, self.crop_size) if split == "train" else None

    @property
    def test_scale(self):  # the name evaluate.py used before `scale`
        return self.scale

    def __len__(self):
        return len(self.pairs)

    def load(self, index):
        """The image (uint8 3 x H x W RGB) and its checked label (uint8 H x W, or None without labels),
        before any transform."""
        image_path, label_path = self.pairs[index]
        image = read_image(image_path)
        if label_path is None:
            return image, None
        label = read_label(label_path)
        if image.shape[1:] != label.shape:
            raise ValueError(
                f"image {image_path} is {image.shape[2]}x{image.shape[1]} (WxH) but its label {label_path} is "
                f"{label.shape[1]}x{label.shape[0]}; an image and its label must have the same size."
            )
        if self.reduce_zero_label:
            label = reduce_zero_label(label)
        check_label_values(label, self.num_classes, label_path, self.name)
        return image, label

    def __getitem__(self, index):
        image, label = self.load(index)
        if self.train_transform is not None:
            return self.train_transform(image, label)
        image_path = self.pairs[index][0]
        file_name = Path(image_path).name
        if self.image_suffix and file_name.endswith(self.image_suffix):
            name = file_name[: -len(self.image_suffix)]
        else:
            name = Path(image_path).stem
        meta = dict(name=name, image_path=image_path, original_size=tuple(image.shape[-2:]))
        images = test_transform(image, self.scale, self.test_ratios)
        return images, None if label is None else label.long(), meta

    def __repr__(self):
        return f"SegmentationDataset({self.name!r}, {self.split!r}, {len(self)} images, root={self.root!r})"


def collate_val(batch):
    """Batch val or test items of different sizes: (list of image lists, labels stacked when they share
    a size else a list (of None in the test split), list of metas)."""
    images, labels, metas = zip(*batch, strict=True)
    if any(label is None for label in labels):
        return list(images), list(labels), list(metas)
    same_size = all(label.shape == labels[0].shape for label in labels)
    return list(images), torch.stack(labels) if same_size else list(labels), list(metas)


def decode_file(path, mode, apply_exif_orientation=False):
    """torchvision's decoder on a file. torchvision 0.29 marks its codecs deprecated in favour of
    TorchCodec, which is not a dependency here; silence that warning, which would come once per image."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        return decode_image(read_file(str(path)), mode=mode, apply_exif_orientation=apply_exif_orientation)


def read_image(path, upright=False):
    """Decode an image file to a uint8 tensor 3 x H x W, RGB (grey and RGBA are converted).

    upright=True turns the pixels as the file's EXIF orientation says (phone photos). Dataset images
    are read as stored: their label PNGs carry no orientation, so turning the image alone would
    misalign the two."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        image = decode_file(path, ImageReadMode.RGB, apply_exif_orientation=upright)
    except RuntimeError as error:
        raise ValueError(
            f"cannot decode image {path} ({error}). Expected a JPEG, PNG or WebP file; "
            "re-save or remove this file."
        ) from None
    if image.dtype != torch.uint8:  # 16-bit PNG: keep the 8 most significant bits
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def read_label(path):
    """Decode a label PNG to a uint8 tensor H x W of class indices.

    The PNG is decoded unchanged, so a palette PNG (VOC's SegmentationClass) gives its indices, as
    PIL's 'P' mode does in the original (gcnet-spec.md §3.3 step 2), and not its colours.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"label file not found: {path}")
    try:
        label = decode_file(path, ImageReadMode.UNCHANGED)
    except RuntimeError as error:
        raise ValueError(f"cannot decode label {path} ({error}). Expected a PNG of class indices.") from None
    if label.shape[0] != 1:
        raise ValueError(
            f"label {path} has {label.shape[0]} channels; expected a single-channel (greyscale or palette) PNG "
            "of class indices. A colour-coded mask must first be mapped to indices through its palette."
        )
    if label.dtype != torch.uint8:  # 16-bit PNG: fine as long as every value fits in 8 bits
        label = label.to(torch.int32)
        if int(label.max()) > 255:
            raise ValueError(
                f"label {path} is a 16-bit PNG with values up to {int(label.max())}; expected class "
                "indices 0..254 and 255 = ignore. Save the labels as 8-bit PNGs."
            )
    return label[0].to(torch.uint8)


def write_png(image, path, compression_level=6):
    """Write a uint8 C x H x W tensor as PNG through a temporary file, so that a file that exists is
    complete (an interrupted run is picked up where it stopped)."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with warnings.catch_warnings():  # see decode_file
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        encoded = encode_png(image.contiguous(), compression_level=compression_level)
    temporary.write_bytes(encoded.numpy().tobytes())
    os.replace(temporary, path)


def reduce_zero_label(label):
    """ADE20K's reduce_zero_label: 0 ('other') -> 255, v -> v - 1, 255 stays (gcnet-spec.md §5.2)."""
    label = label - 1  # uint8 arithmetic wraps 0 to 255, and turns 255 into 254 ...
    label[label == 254] = IGNORE_INDEX  # ... which goes back to 255
    return label


def check_label_values(label, num_classes, path, dataset_name):
    """Raise a ValueError naming the file when `label` holds values outside [0, C) and 255."""
    if int(label.max()) < num_classes:  # the common case: one cheap pass
        return
    outside = (label >= num_classes) & (label != IGNORE_INDEX)
    if not outside.any():
        # A 0/255 mask in a two-class dataset is almost surely a foreground mask: 255 means
        # "ignore" here, so the foreground would silently never be learned.
        if num_classes == 2 and not (label == 1).any() and (label == 0).any():
            raise ValueError(
                f"label {path} holds only the values 0 and 255, in a dataset of 2 classes. 255 means "
                "'ignore', so this looks like a 0/255 binary mask whose foreground would never be learned: "
                "store the foreground as 1 (e.g. `mask // 255`) and keep 255 for pixels to ignore."
            )
        return
    values = torch.unique(label).tolist()
    raise ValueError(
        f"label {path} holds the values {values}, but {dataset_name} has {num_classes} classes: expected "
        f"0..{num_classes - 1} and 255 (ignore). {label_value_hint(values, num_classes)}"
    )


def label_value_hint(values, num_classes):
    """The likely cause of out-of-range label values, for the error message."""
    classes = [value for value in values if value != IGNORE_INDEX]
    if num_classes == 19 and max(classes) <= 33:
        return (
            "These look like raw Cityscapes labelIds (0..33) rather than trainIds (0..18): run "
            "`python tools/prepare_datasets.py cityscapes ROOT` and use the *_gtFine_labelTrainIds.png it writes."
        )
    if num_classes <= 2:
        return (
            "This looks like a 0/255 binary mask (values in between come from anti-aliasing or JPEG): store "
            "class indices instead, e.g. `(mask > 127)` saved as a PNG of 0/1."
        )
    if max(classes) == num_classes:
        return (
            f"The values run up to {num_classes}: if 0 means 'other/unlabelled' and 1..{num_classes} are the "
            "classes (as in raw ADE20K), reduce the labels (0 -> 255, v -> v-1) or add a class for 0 to "
            "classes.txt."
        )
    return "Check that the labels are PNGs of class indices (not colours) and that every class is listed."


# -----------------------------------------------------------------------------------------------
# Finding the files of a split


# Shown when a root or a split is missing or empty.
LAYOUTS = {
    "cityscapes": (
        "  {root}/leftImg8bit/{{train,val}}/<city>/<name>_leftImg8bit.png\n"
        "  {root}/gtFine/{{train,val}}/<city>/<name>_gtFine_labelTrainIds.png\n"
        "Get leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com,"
        " unzip both into {root}, then run `python tools/prepare_datasets.py cityscapes {root}`."
    ),
    "ade20k": (
        "  {root}/images/{{training,validation}}/<name>.jpg\n"
        "  {root}/annotations/{{training,validation}}/<name>.png\n"
        "Unzip ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/) into the parent"
        " of {root}; the root is the ADEChallengeData2016 folder itself."
    ),
    "voc12aug": (
        "  {root}/JPEGImages/<name>.jpg\n"
        "  {root}/SegmentationClass/<name>.png, {root}/SegmentationClassAug/<name>.png\n"
        "  {root}/ImageSets/Segmentation/{{train,val,aug}}.txt\n"
        "Unpack VOCtrainval_11-May-2012.tar (gives VOCdevkit/VOC2012) and the SBD benchmark.tgz (into"
        " VOCdevkit/VOCaug), then run `python tools/prepare_datasets.py voc12aug data/VOCdevkit data/VOCdevkit/VOCaug`"
        " to write SegmentationClassAug and aug.txt."
    ),
    "folder": (
        "  {root}/images/{{train,val}}/<name>.jpg (or .jpeg/.png/.webp)\n"
        "  {root}/labels/{{train,val}}/<name>.png (class indices 0..C-1, 255 = ignore)\n"
        "  {root}/classes.txt (one class per line: a name, optionally followed by R G B)"
    ),
}
LAYOUTS["toy"] = (
    "  {root}/leftImg8bit/{{train,val}}/toy/<name>_leftImg8bit.png\n"
    "  {root}/gtFine/{{train,val}}/toy/<name>_gtFine_labelTrainIds.png\n"
    "It is generated when {root} does not exist: delete {root} to generate it again."
)


def missing_path_error(name, root, path, what="not found"):
    layout = LAYOUTS[name].format(root=root)
    return FileNotFoundError(f"{name}: {path} {what}.\nExpected layout under the root {root}:\n{layout}")


def check_partners(name, pairs, image_dir, hint=lambda label_path: ""):
    """Fail early, naming the files, when images lack their label file; hint(label_path) adds advice."""
    missing = [(image, label) for image, label in pairs if not os.path.isfile(label)]
    if missing:
        image, label = missing[0]
        raise FileNotFoundError(
            f"{name}: {len(missing)} of {len(pairs)} images in {image_dir} have no label file, e.g. {image} "
            f"(expected {label}). {hint(label)}".rstrip()
        )


def find_cityscapes_pairs(root, split, name="cityscapes"):
    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise missing_path_error(name, root, image_dir)
    images = sorted(image_dir.rglob("*_leftImg8bit.png"))  # recursive, as the original scans img_dir
    if not images:
        raise missing_path_error(name, root, image_dir, "holds no *_leftImg8bit.png files")
    if split == "test":
        return [(str(image), None) for image in images]
    label_dir = root / "gtFine" / split
    pairs = []
    for image in images:
        relative = image.relative_to(image_dir)
        label_name = relative.name.replace("_leftImg8bit.png", "_gtFine_labelTrainIds.png")
        pairs.append((str(image), str(label_dir / relative.parent / label_name)))

    def hint(label_path):
        raw_ids = label_path.replace("_labelTrainIds.png", "_labelIds.png")
        return (
            f"Run `python tools/prepare_datasets.py cityscapes {root}` to write them."
            if os.path.isfile(raw_ids)
            else ""
        )

    check_partners(name, pairs, image_dir, hint)
    return pairs


def find_ade20k_pairs(root, split):
    subset = {"train": "training", "val": "validation", "test": "testing"}[split]
    image_dir = root / "images" / subset
    if not image_dir.is_dir():
        raise missing_path_error("ade20k", root, image_dir)
    images = sorted(image_dir.glob("*.jpg"))
    if not images:
        raise missing_path_error("ade20k", root, image_dir, "holds no .jpg files")
    if split == "test":
        return [(str(image), None) for image in images]
    pairs = [(str(image), str(root / "annotations" / subset / (image.stem + ".png"))) for image in images]
    check_partners("ade20k", pairs, image_dir)
    return pairs


def find_voc12aug_pairs(root, split):
    """train = train.txt with SegmentationClass + aug.txt with SegmentationClassAug (10582 images in
    all); val = val.txt with SegmentationClass (gcnet-spec.md §5.3)."""
    parts = [("train.txt", "SegmentationClass"), ("aug.txt", "SegmentationClassAug")]
    if split != "train":
        parts = [(f"{split}.txt", "SegmentationClass")]
    prepare_hint = "Run `python tools/prepare_datasets.py voc12aug VOCDEVKIT SBD_ROOT` to write aug.txt and SegmentationClassAug."
    pairs = []
    for list_name, label_dir in parts:
        list_path = root / "ImageSets" / "Segmentation" / list_name
        if not list_path.is_file() and list_name == "aug.txt":
            raise FileNotFoundError(f"voc12aug: {list_path} not found. {prepare_hint}")
        if not list_path.is_file():
            raise missing_path_error("voc12aug", root, list_path)
        names = list_path.read_text().split()
        if not names:
            raise ValueError(f"voc12aug: {list_path} lists no images; expected one image name per line.")
        part = [(str(root / "JPEGImages" / f"{n}.jpg"), str(root / label_dir / f"{n}.png")) for n in names]
        missing_images = [image for image, _ in part if not os.path.isfile(image)]
        if missing_images:
            raise FileNotFoundError(
                f"voc12aug: {len(missing_images)} images listed in {list_path} are missing, e.g. {missing_images[0]}."
            )
        if split == "test":
            return [(image, None) for image, _ in part]
        hint = prepare_hint if label_dir == "SegmentationClassAug" else ""
        check_partners("voc12aug", part, root / "JPEGImages", lambda _, hint=hint: hint)
        pairs += part
    return pairs


def find_folder_pairs(root, split):
    image_dir = root / "images" / split
    if not image_dir.is_dir():
        raise missing_path_error("folder", root, image_dir)
    images = sorted(path for path in image_dir.iterdir() if path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS)
    if not images:
        raise missing_path_error("folder", root, image_dir, "holds no .jpg/.jpeg/.png/.webp images")
    if split == "test":
        return [(str(image), None) for image in images]
    pairs = [(str(image), str(root / "labels" / split / (image.stem + ".png"))) for image in images]
    check_partners("folder", pairs, image_dir)
    return pairs


def read_classes_file(root):
    """ROOT/classes.txt: one class per line, a name optionally followed by R G B; '#' starts a comment."""
    path = root / "classes.txt"
    if not path.is_file():
        raise missing_path_error("folder", root, path)
    classes, palette = [], []
    for line in path.read_text().splitlines():
        words = line.split("#")[0].split()
        if not words:
            continue
        if len(words) >= 4 and all(word.isdigit() for word in words[-3:]):
            colour = [int(word) for word in words[-3:]]
            if max(colour) > 255:
                raise ValueError(
                    f"{path}: colour {colour} of class {' '.join(words[:-3])!r} is not in 0..255."
                )
            classes.append(" ".join(words[:-3]))
            palette.append(colour)
        else:
            classes.append(" ".join(words))
            palette.append(None)
    if len(classes) < 2:
        raise ValueError(
            f"{path} lists {len(classes)} classes; expected at least 2 (e.g. background and one more)."
        )
    fallback = default_palette(len(classes))
    return classes, [colour or fallback[index] for index, colour in enumerate(palette)]


def default_palette(num_classes):
    """Distinct colours for classes.txt lines without R G B: the bit-spreading colour map of the VOC
    devkit (index bits go to the high bits of R, G and B in turn)."""
    palette = []
    for index in range(num_classes):
        colour, bits = [0, 0, 0], index
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((bits >> channel) & 1) << shift
            bits >>= 3
        palette.append(colour)
    return palette


# -----------------------------------------------------------------------------------------------
# Appendix A: OpenCV-exact pixel arithmetic (resize, HSV)


def linear_taps(in_size, out_size, start, count, clamp_weights):
    """Source indices and 11-bit fixed-point weights of output positions start..start+count-1 along
    one axis, as OpenCV's INTER_LINEAR computes them for 8-bit images: the source position
    (d + 0.5) * in/out - 0.5 in float, weights cvRound(w * 2048). Along columns OpenCV pins the
    positions outside the image to the edge pixel (weight 0 on the other tap); along rows it only
    clamps the indices and keeps the weights."""
    positions = torch.arange(start, start + count, dtype=torch.float64)
    source = ((positions + 0.5) * (1.0 / (out_size / in_size)) - 0.5).float()
    index0 = torch.floor(source).long()
    fraction = source - index0
    if clamp_weights:
        outside = (index0 < 0) | (index0 >= in_size - 1)
        fraction[outside] = 0
        index0 = torch.where(index0 < 0, 0, index0)
    weight1, weight0 = torch.round(fraction * 2048).int(), torch.round((1 - fraction) * 2048).int()
    index1 = (index0 + 1).clamp(0, in_size - 1)
    return index0.clamp(0, in_size - 1), index1, weight0, weight1


def resize_image_window(image, size, top, left, height, width):
    """The window [top:top+height, left:left+width] of `image` (uint8 3 x H x W) resized to `size`,
    bit-exact with cv2.resize(INTER_LINEAR) followed by the crop, and computing only the window.

    A training crop is a small part of the rescaled image (at ratio 2 a 512x1024 crop is 1/16 of a
    2048x4096 Cityscapes image), so resizing only the crop saves most of the work. The arithmetic is
    OpenCV's fixed-point one for 8 bits (gcnet-spec.md §7.13): columns are interpolated with 11-bit
    weights into int32, then rows with 11-bit weights, shifting as OpenCV's vectorised code does.
    Float bilinear resizing, rounded, differs by 1 on about 12% of the values.

    For speed (this runs once per training sample): the column taps are read with `gather` on an
    expanded index, which torch vectorises (index_select along the last dimension is 8x slower), and
    the arithmetic is in place, as fresh multi-megabyte tensors cost page faults on every call.
    """
    col0, col1, col_weight0, col_weight1 = linear_taps(image.shape[2], size[1], left, width, True)
    row0, row1, row_weight0, row_weight1 = linear_taps(image.shape[1], size[0], top, height, False)
    # Only the source rows the window reads take part; indices become relative to them.
    first_row, last_row = int(row0.min()), int(row1.max())
    source = image[:, first_row : last_row + 1]
    shape = (source.shape[0], source.shape[1], width)
    columns = source.gather(2, col0.expand(shape)).to(torch.int32).mul_(col_weight0)
    columns += source.gather(2, col1.expand(shape)).to(torch.int32).mul_(col_weight1)
    columns >>= 4
    upper = columns.index_select(1, row0 - first_row).mul_(row_weight0[:, None])
    upper >>= 16
    lower = columns.index_select(1, row1 - first_row).mul_(row_weight1[:, None])
    lower >>= 16
    upper += lower
    upper += 2
    upper >>= 2
    return upper.clamp_(0, 255).to(torch.uint8)  # (C, height, width)


def resize_image(image, size):
    """uint8 3 x H x W -> uint8 3 x h x w, bit-exact with cv2.resize(INTER_LINEAR): half-pixel
    centres, no antialiasing (a downscale samples rather than averages)."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    return resize_image_window(image, size, 0, 0, size[0], size[1])


def nearest_indices(in_size, out_size, start=0, count=None):
    """OpenCV's INTER_NEAREST source indices floor(d * (1 / (out / in))) of the output positions
    start..start+count-1 (all by default), computed in double as it does (torch's 'nearest' computes
    in float and picks another pixel for about 8% of size pairs)."""
    count = out_size - start if count is None else count
    positions = torch.arange(start, start + count, dtype=torch.float64)
    return torch.floor(positions * (1.0 / (out_size / in_size))).long().clamp_(max=in_size - 1)


def resize_label_window(label, size, top, left, height, width):
    """The window [top:top+height, left:left+width] of `label` (uint8 H x W) resized to `size` with
    cv2 INTER_NEAREST: rows are copied whole, columns gathered."""
    rows = nearest_indices(label.shape[0], size[0], top, height)
    columns = nearest_indices(label.shape[1], size[1], left, width)
    return label.index_select(0, rows).gather(1, columns.expand(height, width))


def resize_label(label, size):
    """uint8 H x W -> h x w, nearest like cv2 INTER_NEAREST."""
    if tuple(label.shape) == tuple(size):
        return label
    return resize_label_window(label, size, 0, 0, size[0], size[1])


# OpenCV's 8-bit BGR<->HSV conversion is fixed-point (12 fractional bits) with these division tables.
# No entry is a tie, so round() is OpenCV's saturate_cast here.
SATURATION_DIVISORS = torch.tensor([0] + [round((255 << 12) / v) for v in range(1, 256)], dtype=torch.int32)
HUE_DIVISORS = torch.tensor([0] + [round((180 << 12) / (6 * d)) for d in range(1, 256)], dtype=torch.int32)


def lookup(table, indices):
    """table[indices] for an int32 index map; index_select on the flat map is the fast path."""
    return table.index_select(0, indices.flatten()).view(indices.shape)


def equal_mask(larger, other):
    """-1 (all bits set) where larger == other, 0 elsewhere, for int32 maps with larger >= other.

    larger - other - 1 is negative exactly where the two are equal, and an arithmetic shift by 31
    spreads its sign bit. Bit masks select without branches: torch.where is 10x slower here, as its
    kernel branches on every pixel of a condition that changes from pixel to pixel."""
    return (larger - other).sub_(1).bitwise_right_shift_(31)


def rgb_to_hsv_uint8(image):
    """uint8 RGB 3 x H x W -> (hue 0..179, saturation 0..255, value 0..255), int32 H x W each, bit-exact
    with cv2.cvtColor(COLOR_BGR2HSV) on the same pixels in BGR order.

    As OpenCV: V = max, S = 255 * (max - min) / V, and H from the channel holding the maximum
    (red first, then green): 30 * (G - B) / spread, 60 + 30 * (B - R) / spread or
    120 + 30 * (R - G) / spread, with the divisions as table multiplies in 12-bit fixed point."""
    red, green, blue = image.to(torch.int32).unbind(0)
    value = torch.maximum(red, green)
    torch.maximum(value, blue, out=value)
    spread = torch.minimum(red, green)
    torch.minimum(spread, blue, out=spread)
    torch.sub(value, spread, out=spread)  # max - min
    saturation = lookup(SATURATION_DIVISORS, value).mul_(spread).add_(1 << 11).bitwise_right_shift_(12)

    red_is_max, green_is_max = equal_mask(value, red), equal_mask(value, green)
    from_green = (blue - red).add_(spread, alpha=2).bitwise_and_(green_is_max)
    from_blue = (red - green).add_(spread, alpha=4).bitwise_and_(green_is_max.bitwise_not_())
    from_red = (green - blue).bitwise_and_(red_is_max)
    hue = from_green.add_(from_blue).bitwise_and_(red_is_max.bitwise_not_()).add_(from_red)
    hue.mul_(lookup(HUE_DIVISORS, spread)).add_(1 << 11).bitwise_right_shift_(12)  # arithmetic: floor, as C
    hue += hue.bitwise_right_shift(31).bitwise_and_(180)  # negative angles wrap around: + 180
    return hue, saturation, value


def hsv_to_rgb_factors():
    """(3, 256, 180) float32: for R, G, B, each saturation S and each hue H, the factor x such that
    the channel is trunc(V / 255 * x * 255) in OpenCV's 8-bit COLOR_HSV2BGR.

    OpenCV (4.1.1 and later, on x86 with FMA: the version and machines the published models were
    trained on, and any current cv2) converts in float32: h = H * (6 / 180), sector = trunc(h),
    f = h - sector, s = S / 255, and each channel takes one of V, V(1 - s), V(1 - s f), V(1 - s (1 - f))
    by a table of sectors, i.e. V(1 - s w) with w = 0, 1, f or 1 - f. Its compiler fuses 1 - s w into
    one multiply-subtract (rounded once, as here through float64), and the result times 255 is
    truncated, not rounded. (OpenCV before 4.1.1 rounded; that would differ on 74% of HSV triples.)
    x depends on (S, H) alone, so it is tabulated: 138 K entries instead of arithmetic per pixel.

    One OpenCV detail is not reproduced: it converts blocks of 64 pixels (32 with AVX2) with SIMD and
    the remainder of each row in scalar code, which rounds. A crop whose width is a multiple of 64
    (1024, 512) is converted alike; a 769-wide crop, or a narrower one cut from an image smaller
    than the crop (e.g. VOC or ADE20K at a small ratio), differs by rounding in its last
    width mod 64 columns. Which pixels those are depends on OpenCV's SIMD width and on whether
    the array it gets is contiguous, so no single answer exists."""
    h = torch.arange(180, dtype=torch.float32) * (torch.tensor(6.0) / 180)  # float32, as OpenCV
    fraction = h - h.trunc()
    weights = torch.stack([torch.zeros(180), torch.ones(180), fraction, 1 - fraction])  # V, p, q, t
    # Which of (V, p, q, t) each of R, G, B takes in each 60-degree sector.
    sectors = torch.tensor([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])
    channel_weights = weights.gather(0, sectors[h.long()].T)  # 3 x 180
    s = torch.arange(256, dtype=torch.float32) * torch.tensor(1 / 255)  # float32
    fused = 1 - s.double()[:, None] * channel_weights.double()[:, None, :]  # exact product, one rounding
    return fused.float()


HSV_TO_RGB_FACTORS = hsv_to_rgb_factors()


def hsv_to_rgb_uint8(hue, saturation, value, hue_shift=0):
    """Inverse of rgb_to_hsv_uint8, bit-exact with OpenCV's COLOR_HSV2BGR for 8 bits (see
    hsv_to_rgb_factors). hue_shift=d converts the hues (H + d) mod 180 instead of H, by rolling the
    tables along the hue axis rather than touching every pixel."""
    factors = HSV_TO_RGB_FACTORS.roll(-hue_shift, dims=2).flatten(1)  # [c, S*180 + H] = x(S, H + d)
    index = (saturation.to(torch.int32) * 180).add_(hue)  # a new tensor: the inputs stay as they are
    v = value.to(torch.float32, copy=True).mul_(torch.tensor(1 / 255))  # float32, as OpenCV
    channels = []
    for channel_factors in factors:
        channel = lookup(channel_factors, index).mul_(v).mul_(255)  # V * x, then * 255: two roundings
        channels.append(channel.clamp_(0, 255).to(torch.uint8))  # float -> uint8 truncates, as OpenCV
    return torch.stack(channels)


# -----------------------------------------------------------------------------------------------
# Appendix B: the toy dataset


def draw_toy_sample(seed):
    """One toy image (uint8 H x W x 3) and label (uint8 H x W): 3 to 6 shapes on a grey texture.

    The class is given by the colour (and the shape): a network from scratch learns it in minutes.
    """
    rng = np.random.RandomState(seed)
    height, width = TOY_IMAGE_SIZE
    # Grey texture: mostly brightness noise shared by the channels, so its saturation stays low.
    image = (
        rng.randint(70, 180)
        + rng.normal(0, 12, size=(height, width, 1))
        + rng.normal(0, 3, (height, width, 3))
    )
    label = np.zeros((height, width), np.uint8)
    rows, cols = np.mgrid[0:height, 0:width]
    for _ in range(rng.randint(3, 7)):
        class_index = rng.randint(1, len(TOY_CLASSES))
        centre_row, centre_col, size = rng.randint(0, height), rng.randint(0, width), rng.randint(10, 32)
        dy, dx = np.abs(rows - centre_row), np.abs(cols - centre_col)
        mask = {
            1: dy**2 + dx**2 < size**2,  # disc
            2: np.maximum(dy, dx) < size,  # square
            3: dy + dx < size,  # diamond
            4: (dy < size // 3) & (dx < 2 * size),  # horizontal bar
        }[class_index]
        colour = np.array(TOY_PALETTE[class_index]) * rng.uniform(0.75, 1.1)
        image[mask] = colour + rng.normal(0, 10, size=(int(mask.sum()), 3))
        label[mask] = class_index
    return image.clip(0, 255).astype(np.uint8), label


def write_toy_files(folder):
    """All toy images and labels, in the Cityscapes layout under `folder`; sample i uses seed i."""
    seed = 0
    for split, count in TOY_COUNTS.items():
        image_dir = folder / "leftImg8bit" / split / "toy"
        label_dir = folder / "gtFine" / split / "toy"
        image_dir.mkdir(parents=True)
        label_dir.mkdir(parents=True)
        for index in range(count):
            image, label = draw_toy_sample(seed)
            seed += 1
            stem = f"toy_{index:06d}"
            # Fast compression: the noise does not compress anyway.
            image_file = image_dir / f"{stem}_leftImg8bit.png"
            write_png(torch.from_numpy(image).permute(2, 0, 1), image_file, compression_level=1)
            write_png(torch.from_numpy(label)[None], label_dir / f"{stem}_gtFine_labelTrainIds.png", 1)


def make_toy_dataset(root):
    """Write the toy dataset into `root` in the Cityscapes layout, atomically: everything goes to a
    temporary folder that is renamed to `root` at the end, so an interrupted run leaves no half dataset
    (and two processes generating at once do not mix their files)."""
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    total = sum(TOY_COUNTS.values())
    print(
        f"toy: writing {total} images of {TOY_IMAGE_SIZE[1]}x{TOY_IMAGE_SIZE[0]} into {root}", file=sys.stderr
    )
    try:
        write_toy_files(temporary)
        try:
            os.rename(temporary, root)  # atomic; replaces `root` only if it is an empty folder
        except OSError:
            if not (root / "leftImg8bit").is_dir():
                raise FileExistsError(
                    f"toy: cannot create the toy dataset at {root}: the folder exists and is not a toy "
                    "dataset. Delete it or pass another root."
                ) from None
            # else another process finished first: use its (identical) dataset
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # nothing left after the rename
