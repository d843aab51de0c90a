"""Training samples per second of train.py's own data loader, for several worker counts: can this
machine's CPUs feed its GPU?

    python tools/gpu_check/loader_speed.py --workers 8 15                       # a synthetic Cityscapes, made once
    python tools/gpu_check/loader_speed.py --data-root data/cityscapes --workers 4 8 16
    python tools/gpu_check/loader_speed.py --workers 8 15 --decoded         # then from its decoded copy

It reads the training split through train.training_batches, the loader a run uses (decode, the whole
training transform, collation, pinned memory where there is a GPU), and times batches after the first
round of every worker, so that the workers' start is left out. Without --data-root it writes a
synthetic Cityscapes at the real image size (synthetic_cityscapes.py) into a temporary folder.
A GPU at batch 8 doing a step in t seconds needs 8 / t samples per second. --decoded then writes the
split's decoded copy (tools/prepare_datasets.py decoded; into --data-root too) and times the loader
again, reading it; a --data-root that holds a copy is read from it in any case (docs/datasets.md).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project's files, in the repository root
import benchmark  # noqa: E402
import data  # noqa: E402
import runtime  # noqa: E402
from tools import prepare_datasets  # noqa: E402
from tools.gpu_check import synthetic_cityscapes  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add, positive, size = parser.add_argument, runtime.number_flag(int, 1), runtime.size_flag("--crop")
    add("--data-root", help="a Cityscapes folder (default: a synthetic one at the real size)")
    add("--crop", type=size, default=(512, 1024), help="the row's crop: 512x1024 or 769")
    add("--workers", type=runtime.per_core_flag(0), nargs="+", default=[8], help="worker counts to time")
    add("--batch-size", type=positive, default=8, help="default 8: the table's 4 GPUs x 2 on one")
    add("--batches", type=positive, default=40, help="timed batches per worker count")
    add("--decoded", action="store_true", help="then write the decoded copy (ROOT/decoded) and time it too")
    add("--out", type=runtime.writable_path("file"), help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        root = args.data_root
        if root is None:
            root = Path(folder) / "cityscapes"
            # Enough samples that no timed batch comes from a second epoch.
            count = (max(args.workers) + args.batches + 1) * args.batch_size
            synthetic_cityscapes.make(root, dict(train=count, val=1))
        cores, pinned, results = runtime.usable_cores(), torch.cuda.is_available(), []
        for decoded in [False, True] if args.decoded else [False]:
            if decoded:
                prepare_datasets.prepare_decoded("cityscapes", root, ["train"], workers=cores)
            dataset = data.build_dataset("cityscapes", root, "train", crop_size=args.crop)
            source = "the decoded copy" if dataset.decoded else "the files"
            where = f"{dataset.name} train at {args.crop[0]}x{args.crop[1]} from {source} in {root}"
            print(f"loader: {where}, batch {args.batch_size}, {cores} cores, pinned memory {pinned}")
            for workers in args.workers:
                rate, first = benchmark.loader_rate(dataset, workers, args.batches, args.batch_size)
                per_worker = rate / max(workers, 1)
                figures = dict(samples_per_s=rate, per_worker=per_worker, first_batch_s=first)
                results.append(dict(workers=workers, decoded=dataset.decoded, **figures))
                rates = (
                    f"{rate:7.1f} samples/s ({per_worker:.1f} per worker; first batch after {first:.1f} s)"
                )
                print(f"  {workers:3d} workers: {rates}", flush=True)
    if args.out:
        report = dict(batch_size=args.batch_size, crop=args.crop, cores=cores, results=results)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        runtime.write_text(args.out, json.dumps(report, indent=1))
    return results


if __name__ == "__main__":
    main()
