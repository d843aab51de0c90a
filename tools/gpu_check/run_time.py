"""How long a whole training run would take, projected from a short one's log.jsonl:

    python train.py --dataset cityscapes --batch-size 8 --iters 300 --log-interval 1 --work-dir work_dirs/short ...
    python tools/gpu_check/run_time.py work_dirs/short --iters 40000 --validations 10

train.py logs, per logged iteration, `data_time` (waiting for the loader) and `step_time` (forward,
loss, backward and SGD step, up to a device sync), and per validation `val_seconds`. The projection is
iters x (mean data_time + mean step_time) + validations x mean val_seconds, over the iterations after
the first --skip (cuDNN's algorithm search and the loader's start make the first ones slow). It also
says what bounds the run: the loader where waiting for data is a large share of an iteration, else
the device's compute.
"""

import argparse
import json
import statistics
from pathlib import Path


def project(records, iters, validations, skip):
    """dict of the means and the projected seconds from log.jsonl records."""
    steps = [r for r in records if "step_time" in r and r["iteration"] > skip]
    if not steps:
        raise SystemExit(
            f"no training records after iteration {skip}: log more (--log-interval 1) or lower --skip"
        )
    data_time = statistics.mean(r["data_time"] for r in steps)
    step_time = statistics.mean(r["step_time"] for r in steps)
    vals = [r["val_seconds"] for r in records if "val_seconds" in r]
    val_seconds = statistics.mean(vals) if vals else 0.0
    iteration = data_time + step_time
    total = iters * iteration + validations * val_seconds
    share = data_time / iteration
    bound = "the loader" if share > 0.2 else "compute (the device's step)"
    figures = dict(records=len(steps), data_time=data_time, step_time=step_time, val_seconds=val_seconds)
    figures.update(validations_measured=len(vals), iters=iters, validations=validations, seconds=total)
    return dict(figures, data_share=share, bound=bound)


def main(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work_dir", help="the short run's work dir (its log.jsonl)")
    parser.add_argument("--iters", type=int, default=40000, help="the whole run's iterations (default 40000)")
    parser.add_argument("--validations", type=int, default=10, help="its validations (default 10)")
    parser.add_argument("--skip", type=int, default=20, help="leave out the first iterations (default 20)")
    args = parser.parse_args(argv)
    path = Path(args.work_dir) / "log.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} not found: pass the work dir of a train.py run")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    result = project(records, args.iters, args.validations, args.skip)
    print(
        f"{result['records']} iterations measured: data {result['data_time'] * 1000:.1f} ms + step "
        f"{result['step_time'] * 1000:.1f} ms per iteration; validation {result['val_seconds']:.1f} s "
        f"(mean of {result['validations_measured']})\n"
        f"projected: {args.iters} iterations + {args.validations} validations = {result['seconds'] / 60:.1f} min; "
        f"bound by {result['bound']} (waiting for data: {result['data_share']:.0%} of an iteration)"
    )
    return result


if __name__ == "__main__":
    main()
