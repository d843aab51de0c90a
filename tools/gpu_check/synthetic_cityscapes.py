"""A generated stand-in for Cityscapes, in its real layout and at its real size, for timing the loader
and the training loop where the real dataset is not at hand (a fresh GPU machine, CI):

    python tools/gpu_check/synthetic_cityscapes.py /tmp/cityscapes_synthetic              # 2975 train, 500 val
    python train.py --dataset cityscapes --data-root /tmp/cityscapes_synthetic --pretrained none ...

The images are photo-like PNGs (smooth colours plus noise, so they compress and decode about as a
photo does) and the labels blobs of the 19 train ids with an ignored band. A few distinct pairs are
written; the rest of the split are hard links to them (copies where the file system has no links),
so the folder takes seconds and little disk, and the loader still opens and decodes a file per sample.
Nothing learnt from it means anything: it is for speed, not accuracy.
"""

import argparse
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project's files, in the repository root
import data  # noqa: E402
import recipe  # noqa: E402

CITYSCAPES_SPLIT_SIZES = {"train": 2975, "val": 500}  # the real dataset's fine annotations
IMAGE_SIZE = (1024, 2048)  # (H, W) of every Cityscapes image


def write_pair(image_path, label_path, size, num_classes=19, seed=2):
    """Write a photo-like RGB PNG and a label PNG of `num_classes` blobs with an ignored top band, both
    of size (H, W)."""
    generator, (height, width) = torch.Generator().manual_seed(seed), size
    coarse = torch.rand(1, 3, max(height // 32, 2), max(width // 32, 2), generator=generator) * 255
    smooth = F.interpolate(coarse, size=size, mode="bilinear", align_corners=False)[0]
    noise = torch.randn(3, height, width, generator=generator) * 6
    image = (smooth + noise).round().clamp(0, 255).to(torch.uint8)
    blob_size = (1, 1, max(height // 64, 2), max(width // 64, 2))
    blobs = torch.randint(0, num_classes, blob_size, generator=generator)
    label = F.interpolate(blobs.float(), size=size, mode="nearest")[0].to(torch.uint8)
    label[:, : max(height // 20, 1)] = data.IGNORE_INDEX
    data.write_png(image, image_path)
    data.write_png(label, label_path)


def sample_paths(root, split, index):
    """(image, label) paths of sample `index` of a split, named as the real files are."""
    stem = f"synthetic_{index:06d}_000019"
    image = Path(root) / "leftImg8bit" / split / "synthetic" / f"{stem}_leftImg8bit.png"
    label = Path(root) / "gtFine" / split / "synthetic" / f"{stem}_gtFine_labelTrainIds.png"
    return image, label


def write_distinct(job):
    root, split, index, size = job
    write_pair(*sample_paths(root, split, index), size, seed=index + (0 if split == "train" else 100_000))


def link(source, target):
    try:
        os.link(source, target)
    except OSError:  # no hard links here (another file system, Windows without rights)
        shutil.copyfile(source, target)


def make(root, sizes=None, distinct=32, size=IMAGE_SIZE, workers=None):
    """Write the splits (default: Cityscapes' 2975 train and 500 val samples) under root, `distinct`
    different pairs per split and links to them for the rest. Existing files are kept."""
    sizes = dict(CITYSCAPES_SPLIT_SIZES if sizes is None else sizes)
    jobs = []
    for split, count in sizes.items():
        for path in sample_paths(root, split, 0):  # every sample of a split sits in these two folders
            path.parent.mkdir(parents=True, exist_ok=True)
        jobs += [(str(root), split, i, tuple(size)) for i in range(min(distinct, count))
                 if not all(p.exists() for p in sample_paths(root, split, i))]  # fmt: skip
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    if workers > 1:
        # One torch thread per process: the parallelism comes from the pool.
        with ProcessPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            list(pool.map(write_distinct, jobs))
    else:
        for job in jobs:
            write_distinct(job)
    for split, count in sizes.items():
        for index in range(min(distinct, count), count):
            for source, target in zip(
                sample_paths(root, split, index % distinct), sample_paths(root, split, index)
            ):
                if not target.exists():
                    link(source, target)
    return Path(root)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="folder to write (the --data-root of train.py)")
    parser.add_argument("--train", type=int, default=CITYSCAPES_SPLIT_SIZES["train"], help="train samples")
    parser.add_argument("--val", type=int, default=CITYSCAPES_SPLIT_SIZES["val"], help="val samples")
    parser.add_argument(
        "--distinct", type=int, default=32, help="different pairs per split; the rest are links"
    )
    parser.add_argument("--size", default="1024x2048", help="HxW of the images (default: Cityscapes')")
    args = parser.parse_args(argv)
    size = recipe.parse_crop(args.size, "--size")
    root = make(args.root, dict(train=args.train, val=args.val), args.distinct, size)
    print(f"wrote a synthetic Cityscapes ({args.train} train, {args.val} val, {size[0]}x{size[1]}) in {root}")


if __name__ == "__main__":
    main()
