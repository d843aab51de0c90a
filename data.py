"""Datasets and the training and test transforms of GCNet, as the original mmsegmentation recipe has them.

Read in order: `build_dataset`; the training pipeline (`TrainTransform`, then its steps as they run);
`test_transform`; the Dataset class. All is plain torch: every random draw comes from torch's RNG, and
pixels match those of OpenCV, which the original used, bit for bit (opencv_arithmetic.py;
tools/opencv_pipelines.py writes the same pipelines with OpenCV). Labels are PNGs of class indices, 255 = ignore. E.g.:
    train_set = data.build_dataset("cityscapes", split="train")  # (image, label) crops
    val_set = data.build_dataset("cityscapes", split="val")      # (images, label, meta)
"""

import contextlib
import importlib.metadata
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

import layouts
import recipe
import runtime
from opencv_arithmetic import (
    hsv_to_rgb_uint8,
    lookup,
    resize_image,
    resize_image_window,
    resize_label_window,
    rgb_to_hsv_uint8,
)

# ImageNet statistics in RGB order on the 0..255 scale (mmseg v0.5.0 configs/_base_/datasets/*.py).
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
MEAN_TENSOR, STD_TENSOR = torch.tensor(MEAN).view(3, 1, 1), torch.tensor(STD).view(3, 1, 1)
IGNORE_INDEX = 255

# The names and colours of the classes of each dataset, in a JSON file beside this one. The rest of
# what a dataset is (its root, batch, scale, whether label 0 means 'ignore') is in recipe.DATASETS.
CLASSES_AND_PALETTES = json.loads((Path(__file__).resolve().parent / "classes_and_palettes.json").read_text())


def build_dataset(
    name, root=None, split="train", crop_size=None, scale=None, test_ratios=(1.0,), reduce_zero_label=None
):
    """A dataset by name: 'cityscapes', 'ade20k', 'voc12aug', 'folder' (needs a root) or 'toy'. split 'test'
    has images only (labels None). crop_size: (h, w), 769 or '512x1024'; scale: (W, H) the images are
    rescaled to fit, in training and testing alike. reduce_zero_label (label 0 means 'ignore', classes start
    at 1): None takes the dataset's (ADE20K: True; folder: `label0: ignore` in classes.txt). Every file is
    checked here, cheaply (headers and last bytes), so a bad one fails no run hours in. Where root's decoded
    copy (root/decoded, from tools/prepare_datasets.py decoded) holds the split, the samples are read from
    it, the same to the bit, once it is checked to be whole and as new as its files."""
    row = recipe.row(name, crop_size)  # refuses an unknown name
    root = dataset_folder(name, split, root)  # the toy dataset is written there on first use
    if name == "folder":
        classes, palette, zero_is_ignore = layouts.read_classes_file(root, reduce_zero_label)
    else:
        classes, palette = CLASSES_AND_PALETTES[name]["classes"], CLASSES_AND_PALETTES[name]["palette"]
        zero_is_ignore = recipe.DATASETS[name].get("reduce_zero_label", False)
    pairs = layouts.find_pairs(name, root, split)
    check_files(name, pairs, root, split)
    if any(Path(image).suffix.lower() != ".png" for image, _ in pairs):
        torchvision_io()  # JPEGs: torchvision decodes them
    reduce_zero_label = zero_is_ignore if reduce_zero_label is None else bool(reduce_zero_label)
    check_first_labels(pairs, name, len(classes), reduce_zero_label)
    scale = row["scale"] if scale is None else scale
    return SegmentationDataset(
        name, root, split, pairs, classes, palette, scale, row["crop_size"], test_ratios, reduce_zero_label
    )


# -----------------------------------------------------------------------------------------------
# Training pipeline (mmseg v0.5.0 configs/_base_/datasets/*.py train_pipeline, the steps in
# mmseg/datasets/pipelines/transforms.py). The dataset loads the image and its label; the transform
# does the rest. Images are uint8 3 x H x W RGB, labels uint8 H x W, until the last step.


class TrainTransform:
    """The whole training pipeline: (uint8 3 x H x W RGB image, H x W label) -> (float32 3 x h x w,
    int64 h x w) at crop_size (h, w). train_scale is (W, H), e.g. (2048, 1024) for Cityscapes."""

    def __init__(self, train_scale, crop_size, cat_max_ratio=0.75):
        self.train_scale, self.crop_size, self.cat_max_ratio = train_scale, crop_size, cat_max_ratio

    def __call__(self, image, label):
        # 1. Rescale by a random ratio r in [0.5, 2): to fit (int(W_s*r), int(H_s*r)), keeping the aspect
        #    ratio. Lazily: step 2 computes only the pixels of its crop of the rescaled image (opencv_arithmetic.py).
        size = rescale_size(*label.shape, ratio_scale(self.train_scale, uniform(0.5, 2.0)))
        # 2. Crop at most crop_size, redrawn while one class covers 75% of it (a smaller image gives a
        #    smaller crop, padded in step 5).
        image, label = random_crop(image, label, size, self.crop_size, self.cat_max_ratio)
        # 3. Mirror image and label with probability 0.5.
        if float(torch.rand(())) < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        # 4. Photometric distortion, on the crop as in the original: cheap.
        image = photometric_distortion(image)
        # 5. Normalise, and pad to crop_size.
        return normalize_and_pad(image, label, self.crop_size)


def ratio_scale(scale, ratio):
    """The scale (W, H) times a ratio, truncated as the original does: (int(W*r), int(H*r))."""
    return int(scale[0] * ratio), int(scale[1] * ratio)


def rescale_size(height, width, scale):
    """(h, w) of mmcv.imrescale (mmcv v1.0.2 mmcv/image/geometric.py): the largest keep-ratio size that fits
    `scale` (W, H) either way round. E.g. a 375x500 VOC image with scale (2048, 512) becomes 512x683."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    # At least a pixel a side: a small --scales ratio of a small scale would otherwise leave none.
    return max(int(height * factor + 0.5), 1), max(int(width * factor + 0.5), 1)


def random_crop(image, label, size, crop_size, cat_max_ratio=0.75):
    """A random box of at most crop_size of the image and label rescaled to `size` (h, w), bilinear and
    nearest. With cat_max_ratio < 1 the box is redrawn while crop_is_acceptable fails, checking at most
    10 boxes; the 11th is used unchecked (mmseg v0.5.0 RandomCrop)."""
    height, width = min(crop_size[0], size[0]), min(crop_size[1], size[1])
    for attempt in range(11):  # a box uniform over every position that fits
        top = int(torch.randint(0, max(size[0] - crop_size[0], 0) + 1, ()))
        left = int(torch.randint(0, max(size[1] - crop_size[1], 0) + 1, ()))
        label_crop = resize_label_window(label, size, top, left, height, width)
        if cat_max_ratio >= 1 or attempt == 10 or crop_is_acceptable(label_crop, cat_max_ratio):
            return resize_image_window(image, size, top, left, height, width), label_crop


def crop_is_acceptable(label_crop, cat_max_ratio=0.75):
    """The cat_max_ratio test: at least two classes, each under cat_max_ratio of the non-ignored pixels."""
    counts = torch.bincount(label_crop.flatten(), minlength=256)
    counts[IGNORE_INDEX] = 0
    counts = counts[counts > 0]
    return len(counts) > 1 and float(counts.max()) / float(counts.sum()) < cat_max_ratio


def photometric_distortion(image):
    """Step 4: mmseg's PhotoMetricDistortion, its ranges and order; each step with probability 0.5, on uint8
    pixels clipped and truncated after each. RGB here, BGR there: the same."""
    if coin_flip():  # brightness
        image = scale_and_shift_uint8(image, beta=uniform(-32, 32))
    contrast_first = coin_flip()  # the original's code (not its comment) puts contrast first when mode == 1
    if contrast_first and coin_flip():  # contrast
        image = scale_and_shift_uint8(image, alpha=uniform(0.5, 1.5))
    if coin_flip():  # saturation
        hue, saturation, value = rgb_to_hsv_uint8(image)
        image = hsv_to_rgb_uint8(hue, scale_and_shift_uint8(saturation, alpha=uniform(0.5, 1.5)), value)
    if coin_flip():  # hue, mod 180; torch.randint's upper bound is exclusive, like numpy's: [-18, 17]
        image = hsv_to_rgb_uint8(*rgb_to_hsv_uint8(image), hue_shift=int(torch.randint(-18, 18, ())))
    if not contrast_first and coin_flip():  # contrast, last
        image = scale_and_shift_uint8(image, alpha=uniform(0.5, 1.5))
    return image


def normalize(image):
    return image.to(torch.float32, copy=True).sub_(MEAN_TENSOR).div_(STD_TENSOR)


def normalize_and_pad(image, label, crop_size):
    """Step 5. The image is padded with 0, which after normalisation is the mean colour."""
    image = normalize(image)
    pad_bottom, pad_right = max(crop_size[0] - image.shape[1], 0), max(crop_size[1] - image.shape[2], 0)
    if pad_bottom or pad_right:
        padding = (0, pad_right, 0, pad_bottom)  # (left, right, top, bottom)
        image, label = F.pad(image, padding, value=0.0), F.pad(label, padding, value=IGNORE_INDEX)
    return image, label.long()


# -----------------------------------------------------------------------------------------------
# Test transform (mmseg v0.5.0 configs/_base_/datasets/*.py test_pipeline, MultiScaleFlipAug), and the dataset


def test_transform(image, scale, ratios=(1.0,)):
    """uint8 RGB 3 x H x W -> one normalised float32 image per ratio r, each rescaled to fit (int(W_s*r),
    int(H_s*r)) keeping its aspect ratio. The label is untouched: evaluation uses it at full resolution."""
    sizes = [rescale_size(*image.shape[-2:], ratio_scale(scale, ratio)) for ratio in ratios]
    return [normalize(resize_image(image, size)) for size in sizes]


class SegmentationDataset(torch.utils.data.Dataset):
    """(image, label) files and their split's transform. train items: (float32 3 x h x w, int64 h x w) at
    crop_size. val/test items: (images, label, meta): a normalised image per test ratio, the int64 label at
    its original size (None in the test split), meta = dict(name, image_path, original_size)."""

    def __init__(
        self, name, root, split, pairs, classes, palette, scale, crop_size, test_ratios, reduce_zero_label
    ):
        self.name, self.root, self.split, self.reduce_zero_label = name, str(root), split, reduce_zero_label
        self.pairs = pairs  # [(image_path, label_path or None)] as str: cheap to send to DataLoader workers
        self.classes, self.palette, self.num_classes = classes, palette, len(classes)
        self.has_labels = pairs[0][1] is not None
        self.scale = tuple(scale)  # (W, H) for training and testing alike, as in the original
        self.crop_size, self.test_ratios = tuple(crop_size), tuple(test_ratios)
        self.train_transform = TrainTransform(self.scale, self.crop_size) if split == "train" else None
        self.decoded = has_decoded_copy(root, pairs)  # then read from it, not from the files

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, index):
        image, label = read_pair(*self.pairs[index], self)
        if self.train_transform is not None:
            return self.train_transform(image, label)
        image_path = self.pairs[index][0]
        name = Path(image_path).stem  # Cityscapes' names without their _leftImg8bit
        name = name.removesuffix("_leftImg8bit") if self.name in ("cityscapes", "toy") else name
        meta = dict(name=name, image_path=image_path, original_size=tuple(image.shape[-2:]))
        label = None if label is None else label.long()
        return test_transform(image, self.scale, self.test_ratios), label, meta

    def __repr__(self):
        return f"SegmentationDataset({self.name!r}, {self.split!r}, {len(self)} images, root={self.root!r})"


# Below this line: how it runs: reading and checking the files (a split's files are found by layouts.py),
# the decoded copy, random draws and 8-bit arithmetic (appendix A) and the toy dataset (appendix B). A
# first reading can stop here.


# -----------------------------------------------------------------------------------------------
# Reading and checking the files


def data_root(name, root=None):
    return root or recipe.DATASETS[name]["root"]


def dataset_folder(name, split, root):
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    if name == "toy" and split == "test":
        raise ValueError("the toy dataset has a train and a val split only; use the val split")
    if name == "folder" and not root:
        raise ValueError(
            "the folder dataset needs a root (--data-root ROOT), laid out as:\n"
            + layouts.LAYOUTS["folder"].format(root="ROOT")
        )
    root = Path(data_root(name, root))
    if name == "toy" and not (root / "leftImg8bit").is_dir():
        make_toy_dataset(root)
    if not root.is_dir():
        raise layouts.missing_path_error(name, root, root)
    return root


class FileProblem(ValueError):
    """A file that cannot be used, named with what to do. Raised in a DataLoader worker, it is made again
    in the main process from the worker's traceback text, and keeps only the words after it."""

    def __init__(self, message):
        if message.startswith("Caught FileProblem"):
            message = message.rsplit("FileProblem: ", 1)[-1].strip()
        super().__init__(message)


def read_pair(image_path, label_path, dataset):
    """The image (uint8 3 x H x W RGB) and checked label (uint8 H x W, or None) of a pair, label 0 made
    'ignore' where the dataset says so. A file that cannot be used raises FileProblem, naming it."""
    try:
        copy = dataset.root if dataset.decoded else None
        image = read_decoded(copy, image_path, "image") if copy else read_image(image_path)
        if label_path is None:
            return image, None
        label = read_decoded(copy, label_path, "label") if copy else read_label(label_path)
        if image.shape[1:] != label.shape:
            raise ValueError(size_mismatch(image_path, image.shape[:0:-1], label_path, label.shape[::-1]))
        check_label_values(label, dataset.num_classes, label_path, dataset.name, dataset.reduce_zero_label)
        if dataset.reduce_zero_label:
            check_not_reduced_already(label, label_path, dataset.name, dataset.num_classes)
            # reduce_zero_label (mmseg v0.5.0 mmseg/datasets/pipelines/loading.py): 0 ('other') -> 255,
            # v -> v - 1. uint8 arithmetic wraps 0 to 255, and turns 255 into 254, which goes back.
            label = label - 1
            label[label == 254] = IGNORE_INDEX
    except (ValueError, OSError) as error:
        raise FileProblem(str(error)) from None
    return image, label


def collate_val(batch):
    """Batch val or test items of different sizes: (list of image lists, labels stacked when they share
    a size, else a list (of None in the test split), list of metas)."""
    images, labels, metas = zip(*batch, strict=True)
    stack = all(label is not None and label.shape == labels[0].shape for label in labels)
    return list(images), torch.stack(labels) if stack else list(labels), list(metas)


# Every image and label file is refused above this many pixels before it is decoded (8192 x 8192; a
# Cityscapes frame has 2 million): a small PNG can declare 20000 x 20000 and ask for gigabytes.
MAX_IMAGE_PIXELS = recipe.MAX_SIZE**2


def open_header(path, kind, file=None):
    """The file (or the open `file` of that path) opened with Pillow, which reads the header only;
    refused beyond MAX_IMAGE_PIXELS."""
    with warnings.catch_warnings():  # Pillow warns from 89 million pixels on; the limit below is ours
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            picture = Image.open(file or path)
        except Image.DecompressionBombError as error:  # beyond 179 million pixels Pillow refuses itself
            size = str(error).split(" exceeds")[0]
        else:
            if picture.size[0] * picture.size[1] <= MAX_IMAGE_PIXELS:
                return picture
            picture.close()
            size = "{}x{}".format(*picture.size)
    raise ValueError(
        f"{kind} {path} is too large ({size}): at most {MAX_IMAGE_PIXELS:,} pixels are read. Downscale it "
        "first (e.g. with Pillow's Image.thumbnail), or cut it into tiles."
    )


def torchvision_io():
    """torchvision.io, imported where a JPEG or WebP is first decoded or a PNG written: importing it takes
    over a second, which a run on PNGs never needs. build_dataset imports it for a split of such images,
    so that a torchvision built for another torch is said in words at the start."""
    try:
        import torchvision.io
    except RuntimeError as error:  # "operator torchvision::nms does not exist": built for another torch
        raise SystemExit(
            f"torchvision {importlib.metadata.version('torchvision')} does not fit torch {torch.__version__} "
            f"({error}). Install the pair released together, e.g. `pip install -U torch torchvision`, or "
            "the versions paired on https://pytorch.org/get-started/previous-versions/."
        ) from None
    return torchvision.io


def decode_file(path, kind, mode, upright=False):
    """An image or label file as a uint8 (or, 16-bit, int32) tensor C x H x W; mode "RGB" or "UNCHANGED".
    PNGs are decoded by Pillow: torchvision's PNG decoder crashes the whole process (a segfault) on
    damaged data, where Pillow raises; the pixels are the same. JPEG and WebP go through torchvision,
    which raises."""
    if not Path(path).is_file():
        raise FileNotFoundError(not_a_file(path, kind))
    contents = None
    try:
        # Read whole (Pillow decodes a PNG from memory about 10% faster than through the file's small
        # reads), unless it is larger than any image we decode.
        contents = io.BytesIO(Path(path).read_bytes()) if os.path.getsize(path) < 2**28 else None
        with open_header(path, kind, contents) as picture:
            # torchvision does not turn a WebP by its EXIF orientation: Pillow decodes those photos.
            if picture.format != "PNG" and not (upright and picture.format == "WEBP"):
                vision = torchvision_io()  # 0.29 marks its codecs deprecated (for TorchCodec)
                with warnings.catch_warnings(), what_libjpeg_says() as said:
                    warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
                    encoded, mode = vision.read_file(str(path)), vision.ImageReadMode[mode]
                    image = vision.decode_image(encoded, mode=mode, apply_exif_orientation=upright)
                if "premature end of data segment" in said[0]:  # decoded all the same, the rest grey
                    raise OSError(said[0].strip().splitlines()[0])
                return image
            # RGB (palettes and grey expanded, alpha dropped; 1-bit as 0/255, as torchvision's decoder
            # gives them), or the stored values (palette indices, grey levels; 1-bit as 0/1, as the
            # original reads labels: mmcv's Pillow backend takes np.array of the picture).
            picture = ImageOps.exif_transpose(picture) if upright else picture
            if picture.mode.startswith("I"):  # 16-bit grey: the values as stored
                array = torch.from_numpy(np.asarray(picture).astype(np.int32))[None]
                return array.expand(3 if mode == "RGB" else 1, -1, -1).contiguous()
            if mode == "RGB" and picture.mode != "RGB":
                picture = picture.convert("RGB")
            array = np.array(picture, dtype=np.uint8)  # decodes now; damaged data raises here
            if array.ndim == 2:
                return torch.from_numpy(array)[None]
            # To C x H x W: numpy's transposing copy takes a third of the time of torch's here.
            return torch.from_numpy(np.array(array.transpose(2, 0, 1), order="C"))
    except (OSError, RuntimeError, SyntaxError) as error:  # Pillow's damaged-file errors, torchvision's
        # In words: without the source paths and C++ stack torchvision's codecs add ("decode_webp,
        # /__w/vision/.../decode_webp.cpp:85, WebPDecodeRGB[A] failed.\nException raised from ...").
        words = re.sub(r"\S*\.(?:cpp|h|hpp):\d+,?\s*", "", str(error).split("\nException raised from")[0])
        words = words.replace(f" {contents!r}", "") if contents else words  # Pillow names the bytes it read
        wanted = (
            "a PNG of class indices" if kind == "label" else "a JPEG, PNG or WebP file; re-save or remove it"
        )
        raise ValueError(f"cannot decode {kind} {path} ({words.strip()}). Expected {wanted}.") from None


@contextlib.contextmanager
def what_libjpeg_says():
    """[what libjpeg writes to the standard error meanwhile]: a JPEG cut short is decoded with only a
    warning there ("premature end of data segment"). Other warnings are passed on."""
    said = [""]
    with tempfile.TemporaryFile() as capture:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(capture.fileno(), 2)
        try:
            yield said
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            said[0] = capture.read().decode(errors="replace")
            sys.stderr.write("" if "premature end of data segment" in said[0] else said[0])


def read_image(path, upright=False):
    """Decode an image file to a uint8 tensor 3 x H x W, RGB. upright=True turns it as its EXIF
    orientation says (phone photos); dataset images are read as stored, like their labels."""
    image = decode_file(path, "image", "RGB", upright)
    return image if image.dtype == torch.uint8 else (image >> 8).to(torch.uint8)  # 16-bit: the high 8 bits


def read_label(path):
    """Decode a label PNG to a uint8 tensor H x W of class indices. A palette PNG (VOC's
    SegmentationClass) gives its indices, not its colours, as PIL's 'P' mode does in the original."""
    label = decode_file(path, "label", "UNCHANGED")
    if label.shape[0] != 1:
        raise ValueError(label_channels_error(path, label.shape[0]))
    if label.dtype != torch.uint8 and int(label.max()) > 255:  # 16-bit: fine if every value fits in 8 bits
        raise ValueError(
            f"label {path} is a 16-bit PNG with values up to {int(label.max())}; expected class "
            "indices 0..254 and 255 = ignore. Save the labels as 8-bit PNGs."
        )
    return label[0].to(torch.uint8)


def label_channels_error(path, channels):
    return (
        f"label {path} has {channels} channels; expected a single-channel (greyscale or palette) PNG "
        "of class indices. A colour-coded mask must first be mapped to indices through its palette."
    )


def size_mismatch(image_path, image_size, label_path, label_size):  # sizes (W, H)
    message = (
        f"image {image_path} is {image_size[0]}x{image_size[1]} (WxH) but its label {label_path} is "
        f"{label_size[0]}x{label_size[1]}; an image and its label must have the same size."
    )
    if tuple(image_size) == tuple(label_size)[::-1]:
        message += (
            " The sizes are turned: the photo likely has an EXIF orientation, which dataset images are read "
            "without (as stored, like their labels); save it upright (Pillow's ImageOps.exif_transpose)."
        )
    return message


def write_png(image, path, compression_level=6):
    """Write a uint8 C x H x W tensor as PNG, its folder made, through a temporary file: a file that
    exists is complete (an interrupted run is picked up where it stopped)."""
    with warnings.catch_warnings():  # see decode_file
        warnings.filterwarnings("ignore", "The image decoding and encoding", DeprecationWarning)
        encoded = torchvision_io().encode_png(image.contiguous(), compression_level=compression_level)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with runtime.written_atomically(path) as temporary:
        temporary.write_bytes(encoded.numpy().tobytes())


def check_label_values(label, num_classes, path, dataset_name, zero_is_ignore=False):
    """Refuses values outside 0..C-1 and 255 (the label is uint8, as stored: 0..C where 0 is to be
    ignored), naming the file and the likely cause."""
    stored = num_classes + zero_is_ignore  # how many values below 255 there may be
    if int(label.max()) < stored:  # no pixel ignored: one cheap pass
        return
    if int((label + 1).max()) <= stored:  # uint8 wraps 255 to 0: the largest value, plus one
        return
    values = torch.unique(label).tolist()
    largest = max(value for value in values if value != IGNORE_INDEX)
    if num_classes == 19 and largest <= 33:
        hint = (
            "These look like raw Cityscapes labelIds (0..33), not trainIds (0..18): run `python "
            "tools/prepare_datasets.py cityscapes ROOT` and use the *_gtFine_labelTrainIds.png it writes."
        )
    elif largest == num_classes and not zero_is_ignore:
        hint = (
            f"The values run up to {num_classes}: if 0 means 'other' and 1..{num_classes} are the classes (as "
            "in raw ADE20K), reduce the labels with a line `label0: ignore` in classes.txt, or add a class for 0."
        )
    elif num_classes <= 2 and (largest >= 128 or IGNORE_INDEX in values):  # values near 255: a mask
        hint = "This looks like a 0/255 binary mask (anti-aliased, or JPEG): store 0/1, e.g. `mask > 127`."
    else:
        hint = "Check that the labels are PNGs of class indices (not colours) and that every class is listed."
    expected = f"0 (ignored), 1..{num_classes}" if zero_is_ignore else f"0..{num_classes - 1}"
    raise ValueError(
        f"label {path} holds the values {values}, but {dataset_name} has {num_classes} classes: expected "
        f"{expected} and 255 (ignore). {hint}"
    )


def check_first_labels(pairs, name, num_classes, zero_is_ignore, count=8):
    """What the first labels tell cheaply: ADE20K labels reduced already (refused), and labels of 2
    classes stored as 0/255 masks, whose foreground, 255, would be ignored (only warned: a label of
    background and ignored pixels is a true label, so it is said when no 1 is among the first few)."""
    if zero_is_ignore and pairs[0][1]:
        check_not_reduced_already(read_label(pairs[0][1]), pairs[0][1], name, num_classes)
    if num_classes != 2 or zero_is_ignore:
        return
    labels = {path: torch.unique(read_label(path)).tolist() for _, path in pairs[:count] if path}
    masks = [path for path, values in labels.items() if values == [0, IGNORE_INDEX]]
    if masks and not any(1 in values for values in labels.values()):
        runtime.say(
            f"WARNING: label {masks[0]} holds only the values 0 and 255, in a dataset of 2 classes: if it is a "
            "0/255 binary mask, its foreground, 255, means 'ignore' and is never learned. Store the foreground "
            "as 1 (e.g. `mask // 255`)."
        )


def check_not_reduced_already(label, path, name, num_classes):
    """Raw ADE20K labels are 0 (other) and 1..150. One holding 255 and no 150 was reduced already:
    reducing it again would shift every class. (Folder data may use 255 beside 0: not checked.)"""
    if name == "ade20k" and (label == IGNORE_INDEX).any() and not (label == num_classes).any():
        raise ValueError(
            f"label {path} holds 255 and no {num_classes}: it looks already reduced (classes 0..{num_classes - 1}"
            f"), while ade20k reduces the original annotations (0 = other, 1..{num_classes}) itself. Use the "
            "original ADEChallengeData2016 annotations, or build the dataset with reduce_zero_label=False."
        )


def not_a_file(path, kind):
    if not os.path.exists(path):
        return f"{kind} file not found: {path}"
    return f"{kind} {path} is not a regular file (a FIFO, a device or a folder); expected a JPEG, PNG or WebP file"


def file_problem(path, kind):
    """(what is wrong with an image or label file, or None; its (W, H)), from its header and its last
    bytes only: a JPEG ends with the marker FFD9, a PNG with its IEND chunk."""
    if not os.path.isfile(path):  # opening a FIFO would wait for a writer for ever
        return not_a_file(path, kind), None
    try:
        with open(path, "rb") as file, open_header(path, kind, file) as image:  # the header only
            size, image_format, mode = image.size, image.format, image.mode
            file.seek(-min(os.path.getsize(path), 1024), os.SEEK_END)
            tail = file.read()
    except ValueError as error:  # too many pixels
        return str(error), None
    except OSError as error:  # PIL's UnidentifiedImageError is an OSError
        return f"cannot decode {kind} {path} ({error})", None
    image_format = "JPEG" if image_format == "MPO" else image_format  # a JPEG holding more pictures after it
    expected = "PNG" if kind == "label" else "JPEG/PNG/WEBP"
    if image_format not in expected.split("/"):
        return f"cannot decode {kind} {path}: it is a {image_format} file, expected {expected}", None
    if {"JPEG": b"\xff\xd9", "PNG": b"IEND"}.get(image_format, b"") not in tail:
        try:  # data after the end (a phone's "motion photo" holds a video there): fine if it all decodes
            decode_file(path, kind, "RGB" if kind == "image" else "UNCHANGED")
        except ValueError:
            return f"cannot decode {kind} {path}: the {image_format} file is truncated (no end marker)", None
    # Even a one-colour JPEG takes a byte per 100 pixels; a header that declares far more is a cut file.
    if image_format == "JPEG" and size[0] * size[1] > 512 * os.path.getsize(path):
        declared = f"{size[0]}x{size[1]} pixels in {os.path.getsize(path):,} bytes"
        return f"cannot decode {kind} {path}: the JPEG declares {declared}, so it is cut or damaged", None
    if kind == "label" and mode in ("RGB", "RGBA", "LA"):
        return label_channels_error(path, len(mode)), None
    return None, size


def check_files(name, pairs, root=None, split="train"):
    """Name every unreadable, truncated or mismatched image and label of a split at once; where the
    dataset's root holds a decoded copy, then every file whose copy is missing, torn or older than it.
    Returns {path: (W, H)} of every image and label, read from their headers."""
    decoded_root = root if root and has_decoded_copy(root, pairs) else None
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun rank 0 shows the bar
    problems, stale, sizes = [], [], {}
    for image_path, label_path in tqdm(pairs, f"{name}: checking files", unit="pair", delay=2, disable=quiet):
        image_problem, image_size = file_problem(image_path, "image")
        label_problem, label_size = file_problem(label_path, "label") if label_path else (None, None)
        sizes.update({image_path: image_size, label_path: label_size})
        problems += [problem for problem in (image_problem, label_problem) if problem]
        if image_size and label_size and image_size != label_size:
            problems.append(size_mismatch(image_path, image_size, label_path, label_size))
        if decoded_root and image_size:
            stale.append(copy_problem(decoded_root, image_path, "image", image_size))
            stale.append(label_size and copy_problem(decoded_root, label_path, "label", label_size))
    if problems:
        raise ValueError(
            f"{name}: {len(problems)} problem(s) with the files of this split:\n  {listed(problems)}\n"
            "Re-download or re-save these files, or remove them (with their labels) from the split."
        )
    stale = [problem for problem in stale if problem]
    if stale:
        raise ValueError(
            f"{name}: the decoded copy in {Path(decoded_root) / DECODED} does not match {len(stale)} "
            f"file(s) of the {split} split:\n  {listed(stale)}\nBring it up to date with `python "
            f"tools/prepare_datasets.py decoded {name} {decoded_root} --splits {split}` (it writes only "
            "these), or delete it to read the files."
        )
    return sizes


def listed(problems, shown=10):
    more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
    return "\n  ".join(problems[:shown]) + more


# The decoded copy: each image (uint8 3 x H x W) and label (H x W) of a dataset as its raw pixels in a
# .npy file, at its path under root/decoded with .npy added, stamped with its file's modification time.
# Reading it back is a memory map: no decoding, and only the pages a crop touches are read.
DECODED = "decoded"


def has_decoded_copy(root, pairs):
    """Whether a split is read from root's decoded copy: once its first image has one (then check_files
    refuses a copy begun and stopped); a split the copy was not asked for reads its files."""
    return decoded_path(root, pairs[0][0]).is_file()


def decoded_path(root, path):
    # A file beside the root (ADE20K's release_test) keeps its copy inside: '..' becomes '@parent'.
    parts = ["@parent" if part == ".." else part for part in Path(os.path.relpath(path, root)).parts]
    return Path(root, DECODED, *parts[:-1], parts[-1] + ".npy")


def decoded_shape(kind, size):  # size (W, H)
    return (3, size[1], size[0]) if kind == "image" else (size[1], size[0])


def copy_problem(root, path, kind, size):
    """What makes the decoded copy of the image or label `path` (of size (W, H)) unusable, or None."""
    copy = decoded_path(root, path)
    if not copy.is_file():
        return f"{copy} is missing"
    try:
        with open(copy, "rb") as file:  # the header np.save wrote, then the pixels to the end
            np.lib.format.read_magic(file)
            stored, _, dtype = np.lib.format.read_array_header_1_0(file)
            whole = os.fstat(file.fileno()).st_size == file.tell() + math.prod(stored)
    except (OSError, ValueError):
        stored = None
    if stored != decoded_shape(kind, size) or dtype != np.uint8 or not whole:
        return f"{copy} does not hold the {size[0]}x{size[1]} pixels of its file: it is torn, or the file changed"
    if copy.stat().st_mtime_ns != os.stat(path).st_mtime_ns:
        return f"{path} and its copy differ in modification time: one was changed after the copy was made"
    return None


def write_decoded(root, path, kind):
    stamp = os.stat(path).st_mtime_ns  # before decoding: a file saved again meanwhile leaves a stale copy
    pixels = read_image(path) if kind == "image" else read_label(path)
    copy = decoded_path(root, path)
    copy.parent.mkdir(parents=True, exist_ok=True)
    with runtime.written_atomically(copy) as temporary:
        with open(temporary, "wb") as file:
            np.save(file, pixels.numpy())
        os.utime(temporary, ns=(stamp, stamp))


def read_decoded(root, path, kind):
    """The image or label `path` as data.read_image or read_label gives it, from the decoded copy."""
    copy = decoded_path(root, path)
    try:
        array = np.load(copy, mmap_mode="c", allow_pickle=False)  # copy-on-write: torch may write to it
        if array.dtype != np.uint8 or array.ndim != (3 if kind == "image" else 2):
            raise ValueError(f"a {array.dtype} array of shape {array.shape}")
    except (OSError, ValueError) as error:
        raise ValueError(
            f"the decoded copy {copy} of {kind} {path} cannot be read ({error}). Rewrite it with "
            f"`python tools/prepare_datasets.py decoded DATASET {root}`, or delete {Path(root) / DECODED}."
        ) from None
    return torch.from_numpy(array)


# -----------------------------------------------------------------------------------------------
# Appendix A: random draws and 8-bit arithmetic; OpenCV's fixed-point resizing and colour conversions,
# which the original used (mmcv v1.0.2), are in opencv_arithmetic.py.


def coin_flip():
    """True with probability 0.5 (the original's `randint(2)`)."""
    return bool(torch.randint(2, ()))


def uniform(low, high):
    return float(torch.rand(())) * (high - low) + low


def scale_and_shift_uint8(image, alpha=1.0, beta=0.0):
    """image * alpha + beta in float32, clipped to 0..255, then truncated back to uint8: worked out once
    for each of the 256 values, then looked up (the same values, in a third less time)."""
    table = torch.arange(256, dtype=torch.float32).mul_(alpha).add_(beta).clamp_(0, 255).to(torch.uint8)
    return lookup(table, image.int())


# -----------------------------------------------------------------------------------------------
# Appendix B: the toy dataset, written on first use (a network from scratch learns it in minutes)


# Background plus four shapes, each drawn in its own colour. The colours (classes_and_palettes.json)
# are 90 degrees of hue apart, so the hue shift of the photometric distortion (at most 36 degrees)
# never makes two classes look alike, and grey stays grey under any saturation change.
TOY_CLASSES, TOY_PALETTE = CLASSES_AND_PALETTES["toy"]["classes"], CLASSES_AND_PALETTES["toy"]["palette"]
TOY_IMAGE_SIZE = (128, 256)  # (H, W)
TOY_COUNTS = {"train": 64, "val": 16}


def draw_toy_sample(seed):
    """One toy image (uint8 H x W x 3) and label (uint8 H x W): 3 to 6 shapes on a grey texture."""
    rng = np.random.RandomState(seed)
    height, width = TOY_IMAGE_SIZE
    # Grey texture: mostly brightness noise shared by the channels, so its saturation stays low.
    image = rng.randint(70, 180) + rng.normal(0, 12, (height, width, 1))
    image = image + rng.normal(0, 3, (height, width, 3))
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


def make_toy_dataset(root):
    """Write the toy dataset into `root` in the Cityscapes layout, through a temporary folder renamed at
    the end: an interrupted run leaves no half dataset, and two processes writing at once mix no files."""
    temporary = root.parent / f".{root.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    total, (height, width) = sum(TOY_COUNTS.values()), TOY_IMAGE_SIZE
    print(f"toy: writing {total} images of {width}x{height} into {root}", file=sys.stderr)
    try:
        stems = [f"{split}/toy/toy_{i:06d}" for split, count in TOY_COUNTS.items() for i in range(count)]
        for seed, stem in enumerate(stems):  # sample i from seed i, train first
            image, label = (torch.from_numpy(array) for array in draw_toy_sample(seed))
            # PNG compression level 1: the noise does not compress anyway
            write_png(image.permute(2, 0, 1), temporary / f"leftImg8bit/{stem}_leftImg8bit.png", 1)
            write_png(label[None], temporary / f"gtFine/{stem}_gtFine_labelTrainIds.png", 1)
        try:
            os.rename(temporary, root)  # atomic; replaces `root` only if it is an empty folder
        except OSError:
            if not (root / "leftImg8bit").is_dir():
                raise ValueError(
                    f"toy: cannot create the toy dataset at {root}: the folder exists and is not a toy "
                    "dataset. Delete it or pass another root."
                ) from None
            # else another process finished first: use its (identical) dataset
    finally:
        shutil.rmtree(temporary, ignore_errors=True)  # nothing left after the rename
