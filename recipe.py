"""The recipe of the results table, in one place: what each of its 16 rows trained and tested with.

Every number and rule of a row of the table lives here; train, evaluate, data and benchmark read `row()`:

    import recipe
    recipe.row("cityscapes", "769", depth=101)
    # {'config_name': 'gcnet_r101-d8_769x769_40k_cityscapes', 'batch_size': 2, 'lr': 0.01,
    #  'scale': (2049, 1025), 'test_mode': 'slide', 'test_stride': (513, 513), 'align_corners': True, ...}

Sources: mmsegmentation v0.5.0 configs/gcnet/*.py and what they inherit: configs/_base_/models/gcnet_r50-d8.py,
schedules/schedule_{20k,40k,80k,160k}.py, datasets/{cityscapes,cityscapes_769x769,ade20k,pascal_voc12_aug}.py.
"""

import math
import re

# Shared by every row: SGD on all parameters (BatchNorm and biases included), a poly learning rate
# per iteration without warmup, the auxiliary FCN loss weighted 0.4, 4 GPUs with SyncBN.
OPTIMIZER = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
SCHEDULE = dict(power=0.9, min_lr=1e-4)
AUX_WEIGHT = 0.4
ORIGINAL_GPUS = 4

# The datasets. batch_size and workers are per GPU; of the table's iters and crops the first is the default;
# images are rescaled to fit `scale` (W, H) for training and testing; root is the original's default, relative
# to the working directory; label 0 means "ignore" with reduce_zero_label (ADE20K only: mmseg v0.5.0
# mmseg/datasets/ade.py). `folder` (your own data) borrows the ADE20K/VOC recipe and reads its classes from
# ROOT/classes.txt; `toy` is the demo: small crops, from scratch, hence a larger lr and no ImageNet weights.
# Classes and palettes are in classes_and_palettes.json.
DATASETS = {
    "cityscapes": dict(
        batch_size=2,
        iters=(40000, 80000),
        crops=((512, 1024), (769, 769)),
        scale=(2048, 1024),
        workers=2,
        root="data/cityscapes",
    ),
    "ade20k": dict(
        batch_size=4,
        iters=(80000, 160000),
        crops=((512, 512),),
        scale=(2048, 512),
        workers=4,
        root="data/ade/ADEChallengeData2016",
        reduce_zero_label=True,
    ),
    "voc12aug": dict(
        batch_size=4,
        iters=(20000, 40000),
        crops=((512, 512),),
        scale=(2048, 512),
        workers=4,
        root="data/VOCdevkit/VOC2012",
    ),
    "folder": dict(
        batch_size=4,
        iters=(20000,),
        crops=((512, 512),),
        scale=(2048, 512),
        workers=4,
        root=None,
    ),
    "toy": dict(
        batch_size=4,
        iters=(300,),
        crops=((128, 128),),
        scale=(256, 128),
        workers=2,
        lr=0.05,
        pretrained="none",
        root="data/toy",
    ),
}
TABLE_DATASETS = ("cityscapes", "ade20k", "voc12aug")

# The 769x769 rule. An 8k+1 crop (769) marks the models built with align_corners=True in both heads,
# trained and tested on Cityscapes rescaled to 2049x1025, and tested with sliding windows of the crop
# at a stride of 2/3 of it (513). Every other row is tested on the whole image.
SCALE_769 = (2049, 1025)

# The decode head's block: the GC block of the table's models, with the paper's defaults.
GC_BLOCK = dict(context="gc", pooling="att", fusion="add")

# ImageNet-pretrained ResNetV1c weights each row starts from (open-mmlab://resnet50_v1c and
# resnet101_v1c in mmcv v1.0.2 mmcv/model_zoo/open_mmlab.json).
IMAGENET_URLS = {
    50: "https://download.openmmlab.com/pretrain/third_party/resnet50_v1c-2cccc1ad.pth",
    101: "https://download.openmmlab.com/pretrain/third_party/resnet101_v1c-e67eebb6.pth",
}


def is_769_crop(crop_size):
    return crop_size[0] % 8 == 1


def row(dataset, crop=None, depth=50, iters=None, block=None):
    """The whole recipe of one row as a plain dict: (dataset, crop, depth, iters, block) -> batch, lr,
    schedule, scale, test mode, window and stride, align_corners and the original config name. crop is
    '769', '512x1024', an int or an (h, w) pair; None takes the dataset's first crop, iters None its
    first schedule, block None the GC block (else model.GCNet's context, pooling, fusion: same recipe)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
    base = DATASETS[dataset]
    crop_size = parse_crop(crop) if crop is not None else base["crops"][0]
    iters = base["iters"][0] if iters is None else iters
    sliding = is_769_crop(crop_size)
    schedule = f"{iters // 1000}k" if iters % 1000 == 0 else f"{iters}it"
    return dict(
        dataset=dataset,
        depth=depth,
        crop_size=crop_size,
        iters=iters,
        batch_size=base["batch_size"],
        global_batch=base["batch_size"] * ORIGINAL_GPUS,
        lr=base.get("lr", OPTIMIZER["lr"]),
        momentum=OPTIMIZER["momentum"],
        weight_decay=OPTIMIZER["weight_decay"],
        **SCHEDULE,
        aux_weight=AUX_WEIGHT,
        scale=SCALE_769 if sliding and dataset == "cityscapes" else base["scale"],
        align_corners=sliding,
        test_mode="slide" if sliding else "whole",
        test_crop=crop_size,
        test_stride=tuple(math.ceil(2 * size / 3) for size in crop_size),  # 769 -> 513
        eval_interval=max(iters // 10, min(iters, 20)),  # every tenth of the schedule, 20 at least (or iters)
        workers=base["workers"],
        pretrained=base.get("pretrained", IMAGENET_URLS[depth]),
        block=dict(GC_BLOCK, **(block or {})),
        config_name=f"{method_name(block)}_r{depth}-d8_{crop_size[0]}x{crop_size[1]}_{schedule}_{dataset}",
        in_table=dataset in TABLE_DATASETS and crop_size in base["crops"] and iters in base["iters"],
    )


# Below this line: reading sizes and official file names. A first reading can stop here.


# The largest side of a crop, window or image, in pixels (data.MAX_IMAGE_PIXELS is its square).
MAX_SIZE = 8192
# The row's training values that train.py's flags of the same names may change, besides the batch
# (which has warnings of its own): a run that changes one is told so, and so is a resume.
FLAG_KEYS = ("lr", "min_lr", "power", "momentum", "weight_decay", "aux_weight", "scale")


def batchnorm_can_train(crop_size, batch):
    """Whether training BatchNorm gets the two values per channel it needs at 1/8 of the crop, over the
    batch it sees (SyncBN's is all processes') (train.py's and benchmark.py's check of their flags)."""
    return batch * math.ceil(crop_size[0] / 8) * math.ceil(crop_size[1] / 8) >= 2


def parse_crop(value, flag="--crop"):
    """'769' or 769 -> (769, 769); '512x1024' or (512, 1024) -> (512, 1024), height x width."""
    if isinstance(value, (tuple, list)):
        parts = [int(part) for part in value]
    else:
        try:
            parts = [int(part) for part in str(value).lower().split("x")]
        except ValueError:
            parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0 or max(parts) > MAX_SIZE:
        raise ValueError(
            f"{flag}: expected N or HxW with sizes from 1 to {MAX_SIZE} (e.g. 769 or 512x1024), got {value!r}"
        )
    return tuple(parts)


def parse_scale(value, flag="--scale"):
    """'512' -> (2048, 512): images rescaled to fit a short side of 512 and a long side of 4 times that, as
    the recipe's 2048x512; 'AxB' -> (A, B). Like the original's img_scale with keep_ratio=True, the
    order does not matter: the larger number bounds the long side, the smaller the short side."""
    parts = str(value).lower().split("x")
    try:
        short_and_long = (
            [int(parts[0]), 4 * int(parts[0])] if len(parts) == 1 else [int(part) for part in parts]
        )
    except ValueError:
        short_and_long = []
    if len(short_and_long) != 2 or min(short_and_long) <= 0 or max(short_and_long) > 4 * MAX_SIZE:
        raise ValueError(
            f"{flag}: expected N (the short side; the long side is up to 4N) or LONGxSHORT, e.g. 512 or "
            f"2048x512, with sizes up to {4 * MAX_SIZE}; got {value!r}"
        )
    return max(short_and_long), min(short_and_long)


# The table's datasets recognised by their class count (for checkpoints that do not say theirs).
DATASET_OF_NUM_CLASSES = {19: "cityscapes", 150: "ade20k", 21: "voc12aug"}

CONFIG_NAME = re.compile(
    r"(gcnet|nonlocal|fcn|gcnet-(?:att|avg)-(?:add|mul|both))_r(50|101)-d8_(\d+)x(\d+)_(\d+)k_(cityscapes|ade20k|voc12aug)"
)


def row_of_config_name(text):
    """The row named in a text such as an official checkpoint's file name
    (gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth), or None."""
    match = CONFIG_NAME.search(str(text))
    if match is None:
        return None
    method, depth, height, width, thousands, dataset = match.groups()
    return row(dataset, (int(height), int(width)), int(depth), int(thousands) * 1000, block_of_method(method))


# Config names begin with the model's: gcnet, nonlocal (the Non-local block) or fcn (no block). The GC
# block's other poolings and fusions, which the original toolbox has no configs for, are named here
# gcnet-<pooling>-<fusion>, e.g. gcnet-avg-mul (the squeeze-excitation-like block).
METHODS = {"nonlocal": "nonlocal", "none": "fcn"}


def method_name(block=None):
    """The config name's first word for a block (None: the GC block)."""
    block = dict(GC_BLOCK, **(block or {}))
    if block["context"] != "gc":
        return METHODS[block["context"]]
    return "gcnet" if block == GC_BLOCK else f"gcnet-{block['pooling']}-{block['fusion']}"


# How the original's tables name the three models.
MODEL_NAMES = {"gc": "GCNet", "nonlocal": "NonLocal", "none": "FCN"}


def model_name(block=None):
    """A block's model as the tables name it: 'GCNet', 'NonLocal', 'FCN', 'GCNet (avg pooling, mul fusion)'."""
    block = dict(GC_BLOCK, **(block or {}))
    name = MODEL_NAMES[block["context"]]
    if block["context"] != "gc" or block == GC_BLOCK:
        return name
    return f"{name} ({block['pooling']} pooling, {block['fusion']} fusion)"


def block_flags(block):
    """The train.py flags that build a block, e.g. '--context nonlocal'."""
    block = dict(GC_BLOCK, **block)
    if block["context"] != "gc" or block == GC_BLOCK:
        return f"--context {block['context']}"
    return f"--context gc --gc-pooling {block['pooling']} --gc-fusion {block['fusion']}"


def block_of_method(name):
    """The block a config name's first word names (method_name's inverse)."""
    if "-" in name:  # gcnet-<pooling>-<fusion>
        _, pooling, fusion = name.split("-")
        return dict(GC_BLOCK, pooling=pooling, fusion=fusion)
    contexts = {method: context for context, method in METHODS.items()}
    return dict(GC_BLOCK, context=contexts.get(name, "gc"))
