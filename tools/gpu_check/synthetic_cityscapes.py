"""A generated stand-in for Cityscapes, in its real layout and at its real size, for timing the loader
and the training loop where the real dataset is not at hand (a fresh GPU machine, CI):

    python tools/gpu_check/synthetic_cityscapes.py /tmp/cityscapes_synthetic    # 2975 train, 500 val
    python train.py --dataset cityscapes --data-root /tmp/cityscapes_synthetic --pretrained none ...

The pairs are benchmark.py's photo-like PNGs (smooth colours plus noise, so they compress and decode
about as a photo does) with labels of blobs of the 19 train ids and an ignored band. A few distinct
pairs are written; the rest of the split are hard links to them (copies where the file system has no links),
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project's files, in the repository root
import benchmark  # noqa: E402
import runtime  # noqa: E402

CITYSCAPES_SPLIT_SIZES = {"train": 2975, "val": 500}  # the real dataset's fine annotations


def sample_paths(root, split, index):
    """(image, label) paths of sample `index` of a split, named as the real files are."""
    stem = f"synthetic_{index:06d}_000019"
    image = Path(root) / "leftImg8bit" / split / "synthetic" / f"{stem}_leftImg8bit.png"
    label = Path(root) / "gtFine" / split / "synthetic" / f"{stem}_gtFine_labelTrainIds.png"
    return image, label


def write_distinct(job):
    root, split, index, size = job
    seed = index + (0 if split == "train" else 100_000)
    benchmark.write_photo_like_pair(*sample_paths(root, split, index), size, seed=seed)


def make(root, sizes, distinct=32, size=benchmark.CITYSCAPES_IMAGE_SIZE, workers=None):
    """Write the splits ({split: samples}) under root, `distinct` different pairs per split and links to
    them for the rest. Existing files are kept."""
    jobs = []
    for split, count in sizes.items():
        for path in sample_paths(root, split, 0):  # every sample of a split sits in these two folders
            path.parent.mkdir(parents=True, exist_ok=True)
        for index in range(min(distinct, count)):
            if not all(path.exists() for path in sample_paths(root, split, index)):
                jobs.append((str(root), split, index, tuple(size)))
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
                    try:
                        os.link(source, target)
                    except OSError:  # no hard links here (another file system, Windows without rights)
                        shutil.copyfile(source, target)
    return Path(root)


def main(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="folder to write (the --data-root of train.py)")
    count, size = runtime.number_flag(int, 0), runtime.size_flag("--size")
    parser.add_argument("--train", type=count, default=CITYSCAPES_SPLIT_SIZES["train"], help="train samples")
    parser.add_argument("--val", type=count, default=CITYSCAPES_SPLIT_SIZES["val"], help="val samples")
    pairs = runtime.number_flag(int, 1)
    parser.add_argument(
        "--distinct", type=pairs, default=32, help="different pairs per split; the rest links"
    )
    parser.add_argument("--size", type=size, default=(1024, 2048), help="HxW (default: Cityscapes')")
    args = parser.parse_args(argv)
    size = args.size
    root = make(args.root, dict(train=args.train, val=args.val), args.distinct, size)
    print(f"wrote a synthetic Cityscapes ({args.train} train, {args.val} val, {size[0]}x{size[1]}) in {root}")


if __name__ == "__main__":
    main()
