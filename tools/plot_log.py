"""Draw a training run's log: the losses, the learning rate and the validation mIoU against the iteration.

    python tools/plot_log.py work_dirs/gcnet_r50-d8_128x128_300it_toy
    # wrote work_dirs/gcnet_r50-d8_128x128_300it_toy/log.png

train.py draws the same picture (log.png) when a run ends; this draws it at any time, a running run's
too. The training losses are those of single logged steps (every --log-interval iterations); the
validation loss is the decode head's cross-entropy over the whole val split, the same formula as the
training loss, so a validation loss that rises while the training loss falls shows over-fitting.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's files sit in the root
import pictures  # noqa: E402
import run  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="a train.py work dir, or its log.jsonl")
    parser.add_argument("--out", help="the PNG to write (default: log.png beside log.jsonl)")
    args = parser.parse_args(argv)
    path = Path(args.run)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(
            f"plot_log.py: {path} not found: pass the work dir of a train.py run, or its log.jsonl"
        )
    records, unreadable = run.read_log(path)
    if unreadable:
        print(f"skipped {unreadable} unreadable line(s) of {path} (a run killed while writing leaves one)")
    if not any("iteration" in record for record in records):
        raise SystemExit(f"plot_log.py: {path} holds no training or validation records yet")
    out = Path(args.out) if args.out else path.with_name("log.png")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        pictures.save_picture(pictures.log_picture(records, title=path.resolve().parent.name), out)
    except ValueError as error:
        raise SystemExit(f"plot_log.py: --out {error}") from None
    except OSError as error:  # a file where a folder should be, a read-only folder
        raise SystemExit(f"plot_log.py: cannot write --out {out}: {error.strerror or error}") from None
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
