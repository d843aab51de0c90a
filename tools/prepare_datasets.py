"""One-off preparation of the downloaded datasets, run once before training, from the repository root:

    python tools/prepare_datasets.py cityscapes data/cityscapes
        writes gtFine/**/*_gtFine_labelTrainIds.png from the *_gtFine_labelIds.png of the download
    python tools/prepare_datasets.py voc12aug data/VOCdevkit data/VOCdevkit/VOCaug
        writes VOC2012/SegmentationClassAug/*.png from SBD's cls/*.mat, and aug.txt and trainaug.txt
    python tools/prepare_datasets.py decoded cityscapes data/cityscapes
        writes the decoded copy of any dataset (ROOT/decoded: raw pixels, read without decoding), which
        data.py then reads instead of the files (docs/datasets.md says when it pays off)

The original toolbox does the same in mmseg v0.5.0 tools/convert_datasets/{cityscapes,voc_aug}.py.
Every command skips files that are done, so an interrupted run continues where it stopped. ADE20K
needs no preparation. Reading SBD's .mat files needs scipy (pip install scipy); nothing else here does.
"""

import argparse
import math
import os
import shutil
import sys
from collections import Counter
from contextlib import nullcontext
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data.py sits in the repository root
import data  # noqa: E402
import layouts  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402

CITYSCAPES_TRAINID_TABLE = torch.full((256,), data.IGNORE_INDEX, dtype=torch.uint8)
CITYSCAPES_TRAINID_TABLE[list(layouts.CITYSCAPES_LABEL_IDS)] = torch.arange(19, dtype=torch.uint8)


def run_in_pool(function, jobs, workers, description):
    """function(*job) for each job, None being a file done before, with a process pool and a progress
    bar; returns the counts of 'converted' and 'skipped'. A file that cannot be converted does not stop
    the others: all of them are named at the end, in one error."""
    task = partial(convert_one, function)
    # One torch thread per process: the parallelism comes from the pool.
    pool = Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) if workers > 1 else None
    with pool or nullcontext():
        results = pool.imap_unordered(task, jobs, chunksize=8) if pool else map(task, jobs)
        statuses = list(tqdm(results, total=len(jobs), desc=description))
    counts = Counter(statuses)
    failed = sorted(status for status in statuses if status not in ("converted", "skipped"))
    if failed:
        raise ValueError(
            f"{len(failed)} of {len(jobs)} files could not be converted ({counts['converted']} were, "
            f"{counts['skipped']} were done before):\n  {data.listed(failed)}\nMend or "
            "re-download them, then run the same command again: what is done is skipped."
        )
    return counts


def convert_one(function, job):
    if job is None:
        return "skipped"
    try:
        function(*job)
    except (OSError, ValueError) as error:
        return str(error)
    return "converted"


# -----------------------------------------------------------------------------------------------
# Cityscapes: labelIds -> trainIds


def convert_cityscapes_label(label_ids_path, target):
    data.write_png(CITYSCAPES_TRAINID_TABLE[data.read_label(label_ids_path).long()][None], target)


def prepare_cityscapes(root, workers=8):
    """Write gtFine/**/*_gtFine_labelTrainIds.png from *_gtFine_labelIds.png (train, val and test)."""
    root = Path(root)
    gt_dir = root / "gtFine"
    if not gt_dir.is_dir():
        raise layouts.missing_path_error("cityscapes", root, gt_dir)
    sources = sorted(str(path) for path in gt_dir.rglob("*_gtFine_labelIds.png"))
    if not sources:
        raise layouts.missing_path_error("cityscapes", root, gt_dir, "holds no *_gtFine_labelIds.png files")
    targets = [source.replace("_gtFine_labelIds.png", "_gtFine_labelTrainIds.png") for source in sources]
    jobs = [None if os.path.isfile(target) else (source, target) for source, target in zip(sources, targets)]
    counts = run_in_pool(convert_cityscapes_label, jobs, workers, "cityscapes labelTrainIds")
    print(
        f"cityscapes: {counts['converted']} converted, {counts['skipped']} skipped (already done) in {gt_dir}"
    )
    return counts


# -----------------------------------------------------------------------------------------------
# VOC 2012 + SBD: SegmentationClassAug and the aug lists


def import_loadmat():
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(
            "preparing voc12aug reads SBD's .mat files with scipy, which is not installed: pip install scipy"
        ) from None
    return loadmat


def read_sbd_segmentation(path):
    """The class-index map of an SBD cls/*.mat file: the field Segmentation of its struct GTcls.
    scipy's loadmat reads MATLAB data only (no code runs)."""
    loadmat = import_loadmat()
    try:
        contents = loadmat(path, squeeze_me=True, struct_as_record=False)
    except Exception as error:  # an empty, cut or foreign file: scipy's errors are of many kinds
        raise ValueError(f"{path} is not a readable .mat file ({error}); download SBD again") from None
    if "GTcls" not in contents:
        keys = sorted(key for key in contents if not key.startswith("__"))
        raise ValueError(
            f"{path} has no GTcls struct (found {keys}); expected an SBD dataset/cls/*.mat file."
        )
    return np.asarray(contents["GTcls"].Segmentation, dtype=np.uint8)


def convert_sbd_label(mat_path, png_path):
    data.write_png(torch.from_numpy(read_sbd_segmentation(mat_path))[None], png_path)


def read_names(path):
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path} not found; expected a list of image names, one per line.")
    return Path(path).read_text().split()


def prepare_voc12aug(devkit, sbd_root, workers=8):
    """SBD's cls/*.mat -> VOC2012/SegmentationClassAug/*.png, then ImageSets/Segmentation/aug.txt and
    trainaug.txt (as mmseg v0.5.0 tools/convert_datasets/voc_aug.py):
        trainaug = (VOC train | SBD train | SBD val) - VOC val   (10582 names with the full data)
        aug      = (SBD train | SBD val) - VOC train - VOC val   (9118)
    """
    devkit, sbd_root = Path(devkit), Path(sbd_root)
    voc = devkit / "VOC2012" if (devkit / "VOC2012").is_dir() else devkit
    sbd = sbd_root / "dataset" if (sbd_root / "dataset" / "cls").is_dir() else sbd_root
    lists = voc / "ImageSets" / "Segmentation"
    if not lists.is_dir():
        raise layouts.missing_path_error("voc12aug", voc, lists)
    mats = sorted((sbd / "cls").glob("*.mat"))
    if not mats:
        raise FileNotFoundError(
            f"voc12aug: no .mat files in {sbd / 'cls'}. Expected SBD's benchmark_RELEASE/dataset (or its parent) "
            "with cls/*.mat, train.txt and val.txt; pass it as SBD_ROOT."
        )
    import_loadmat()  # fail before starting the pool when scipy is missing
    out_dir = voc / "SegmentationClassAug"
    out_dir.mkdir(exist_ok=True)
    jobs = [(str(mat), str(out_dir / f"{mat.stem}.png")) for mat in mats]
    jobs = [None if os.path.isfile(png) else (mat, png) for mat, png in jobs]
    counts = run_in_pool(convert_sbd_label, jobs, workers, "voc12aug SegmentationClassAug")

    sbd_names = read_names(sbd / "train.txt") + read_names(sbd / "val.txt")
    voc_train, voc_val = read_names(lists / "train.txt"), read_names(lists / "val.txt")
    trainaug = sorted((set(voc_train) | set(sbd_names)) - set(voc_val))
    aug = sorted(set(sbd_names) - set(voc_train) - set(voc_val))
    unconverted = [name for name in aug if not (out_dir / f"{name}.png").is_file()]
    if unconverted:
        raise FileNotFoundError(
            f"voc12aug: {len(unconverted)} SBD images have no {sbd / 'cls'}/<name>.mat, e.g. {unconverted[0]}."
        )
    # The original asserts these counts; they only hold for the complete VOC 2012 and SBD.
    is_complete = (len(voc_train), len(voc_val), len(set(sbd_names))) == (1464, 1449, 11355)
    if is_complete and (len(trainaug), len(aug)) != (10582, 9118):
        raise ValueError(
            f"voc12aug: expected 10582 trainaug and 9118 aug names from the complete VOC 2012 + SBD, got "
            f"{len(trainaug)} and {len(aug)}; check {lists} and {sbd}."
        )
    runtime.write_text(lists / "trainaug.txt", "".join(f"{name}\n" for name in trainaug))
    runtime.write_text(lists / "aug.txt", "".join(f"{name}\n" for name in aug))
    print(
        f"voc12aug: {counts['converted']} converted, {counts['skipped']} skipped (already done) in {out_dir}; "
        f"wrote aug.txt ({len(aug)}) and trainaug.txt ({len(trainaug)}) in {lists}"
    )
    return counts


# -----------------------------------------------------------------------------------------------
# The decoded copy of any dataset (data.py reads it)


def prepare_decoded(name, root=None, splits=("train", "val"), workers=8):
    """Write root/decoded for the splits of a dataset: every image and label as raw uint8 pixels."""
    jobs = []
    for split in splits:
        split_root = data.dataset_folder(name, split, root)
        pairs = layouts.find_pairs(name, split_root, split)
        sizes = data.check_files(name, pairs)  # the files themselves, not a copy half written
        files = [(path, kind) for pair in pairs for path, kind in zip(pair, ("image", "label")) if path]
        jobs += [(split_root, path, kind, sizes[path]) for path, kind in files]
    target = split_root / data.DECODED
    try:  # two runs at once would each clear the other's temporary files as left by a kill
        lock = runtime.hold_lock(split_root / ".decoded.lock")
    except OSError as error:
        raise ValueError(f"{name}: cannot write the decoded copy in {split_root}: {error}") from None
    except runtime.Taken as holder:
        raise ValueError(
            f"{name}: the decoded copy in {target} is being written by another run ({holder}); "
            "wait for it to end"
        ) from None
    with lock:
        return write_copy(name, splits, jobs, target, workers)


def write_copy(name, splits, jobs, target, workers):
    for stray in runtime.temporaries_in(target, recursive=True):  # left by a run that was killed
        stray.unlink()
    stale = [bool(data.copy_problem(*job)) for job in jobs]  # read once here, not again in the pool
    todo = [job for job, redo in zip(jobs, stale) if redo]
    needed = sum(growth(*job) for job in todo)
    free = shutil.disk_usage(target if target.is_dir() else target.parent).free
    print(
        f"{name} {'+'.join(splits)}: the decoded copy of {len(jobs)} files in {target} takes "
        f"{gigabytes(max(needed, 0))} more ({len(jobs) - len(todo)} files done before); {gigabytes(free)} free"
    )
    if needed > 0 and needed > free - 2**30:  # a gigabyte to spare for everything else
        raise ValueError(
            f"{name}: not enough disk space for the decoded copy in {target}: it needs {gigabytes(needed)}, "
            f"{gigabytes(free)} are free. Free some space (keeping 1 GB beside it), or delete {target} "
            "to train from the files."
        )
    jobs = [job[:3] if redo else None for job, redo in zip(jobs, stale)]
    counts = run_in_pool(data.write_decoded, jobs, workers, f"{name} decoded copy")
    print(f"{name}: {counts['converted']} decoded, {counts['skipped']} skipped (already done) in {target}")
    return counts


def growth(root, path, kind, size):
    """The bytes that writing a file's copy adds: its pixels, less those of a stale copy it replaces."""
    copy = data.decoded_path(root, path)
    return math.prod(data.decoded_shape(kind, size)) - (copy.stat().st_size if copy.is_file() else 0)


def gigabytes(size):
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def main(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="One-off preparation of a downloaded dataset for GCNet."
    )
    datasets = parser.add_subparsers(dest="dataset", required=True)
    default_workers = min(8, runtime.usable_cores())
    cityscapes = datasets.add_parser(
        "cityscapes", allow_abbrev=False, help="write *_gtFine_labelTrainIds.png from *_gtFine_labelIds.png"
    )
    cityscapes.add_argument("root", help="the Cityscapes root, holding leftImg8bit/ and gtFine/")
    voc = datasets.add_parser(
        "voc12aug", allow_abbrev=False, help="write SegmentationClassAug and aug.txt from SBD"
    )
    voc.add_argument("devkit", help="the VOCdevkit folder, holding VOC2012/")
    voc.add_argument("sbd_root", help="the SBD folder (VOCaug, holding dataset/cls/*.mat)")
    decoded = datasets.add_parser(
        "decoded", allow_abbrev=False, help="write ROOT/decoded: every image and label as raw pixels"
    )
    decoded.add_argument("name", choices=sorted(recipe.DATASETS), help="the dataset")
    decoded.add_argument("root", nargs="?", help="its root (default: the recipe's, e.g. data/cityscapes)")
    decoded.add_argument("--splits", nargs="+", default=["train", "val"], choices=["train", "val", "test"])
    for subparser in (cityscapes, voc, decoded):
        subparser.add_argument(
            "--workers", type=runtime.per_core_flag(1), default=default_workers, help="parallel processes"
        )
    args = parser.parse_args(argv)
    if args.dataset == "decoded" and args.name == "folder" and not args.root:  # no default root to take
        decoded.error("the folder dataset needs its ROOT: decoded folder ROOT")
    try:
        if args.dataset == "cityscapes":
            prepare_cityscapes(args.root, args.workers)
        elif args.dataset == "decoded":
            prepare_decoded(args.name, args.root, args.splits, args.workers)
        else:
            prepare_voc12aug(args.devkit, args.sbd_root, args.workers)
    except (OSError, ValueError, ImportError) as error:  # OSError: a read-only folder, a full disk
        sys.exit(f"error: {error}")
    except KeyboardInterrupt:  # every file is written atomically: what is there is whole
        sys.exit("\nstopped by Ctrl-C: the files written so far are whole; the same command continues")


if __name__ == "__main__":
    main()
