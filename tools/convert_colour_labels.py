"""Convert colour-coded label PNGs (one RGB colour per class) to the class-index PNGs that
`--dataset folder` reads, using the colours of the dataset's classes.txt. Run from the repository root:

    python tools/convert_colour_labels.py data/mine
        ROOT/labels_colour/<split>/<name>.png -> ROOT/labels/<split>/<name>.png, colours from ROOT/classes.txt
    python tools/convert_colour_labels.py --src masks/ --dst data/mine/labels/train --classes data/mine/classes.txt
    python tools/convert_colour_labels.py data/mine --ignore-colour 255 255 255   # white -> 255 (ignore)

Class i is the i-th class line of classes.txt (`name R G B`; a line without a colour gets the VOC
colour map's colour of the value it is stored as, so VOC-style colour masks need no colours written out). The output is a
single-channel uint8 PNG of class indices, 255 where a pixel has an --ignore-colour (with `label0: ignore`
in classes.txt: class i as i + 1 and the ignore colours as 0). A colour that is
neither a class's nor an ignore colour is an error naming the file, the colour and its pixel count;
such a file is not written and the others go on. Files that exist are skipped, so an interrupted run
continues where it stopped; --overwrite converts them again (after classes.txt changed). Every file is
written through a temporary file and renamed, so a file that exists is complete.
"""

import argparse
import sys
from collections import Counter
from contextlib import nullcontext
from multiprocessing import Pool
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # data.py sits in the repository root
import data  # noqa: E402
import layouts  # noqa: E402
import runtime  # noqa: E402

UNKNOWN = -1
MAX_COLOURS_NAMED = 10  # per file; a mask with more unknown colours was saved lossily (JPEG, antialiasing)


def lookup_table(palette, ignore_colours=(), zero_is_ignore=False):
    """An int16 table over all 2^24 colours: the label value of each class colour, the ignore value for
    the ignore colours, UNKNOWN elsewhere. 32 MB, and one gather converts a whole image."""
    if len(palette) > data.IGNORE_INDEX - zero_is_ignore:  # with label0: ignore, classes are 1..C
        values = "1..254 (0 and 255 = ignore)" if zero_is_ignore else "0..254 (255 = ignore)"
        raise ValueError(
            f"classes.txt lists {len(palette)} classes; a uint8 label holds at most "
            f"{data.IGNORE_INDEX - zero_is_ignore}: {values}."
        )
    table = torch.full((1 << 24,), UNKNOWN, dtype=torch.int16)
    owner = {}  # colour -> what it stands for, to refuse a colour given twice
    first, ignore = (1, 0) if zero_is_ignore else (0, data.IGNORE_INDEX)
    entries = [(tuple(colour), first + index, f"class {index}") for index, colour in enumerate(palette)]
    entries += [(tuple(colour), ignore, "--ignore-colour") for colour in ignore_colours]
    for colour, value, what in entries:
        if any(not 0 <= channel <= 255 for channel in colour):
            raise ValueError(f"colour {list(colour)} of {what} is not in 0..255")
        if colour in owner:
            raise ValueError(
                f"colour {list(colour)} stands for both {owner[colour]} and {what}; give each class its own "
                "colour in classes.txt, and an --ignore-colour that no class has."
            )
        owner[colour] = what
        red, green, blue = colour
        table[(red << 16) | (green << 8) | blue] = value
    return table


def convert_image(image, table, rows=256):
    """uint8 (3, H, W) RGB -> (uint8 (H, W) class indices, {unknown colour (R, G, B): pixel count}), in
    bands of `rows` rows: an 8000x8000 mask then needs about its own size beside it, not ten times that."""
    labels, unknown = torch.empty(image.shape[1:], dtype=torch.uint8), Counter()
    for top in range(0, image.shape[1], rows):
        band = image[:, top : top + rows].to(torch.int32)
        codes = (band[0] << 16) | (band[1] << 8) | band[2]  # R * 65536 + G * 256 + B
        indices = table[codes]  # (rows, W) int16
        missing = indices == UNKNOWN
        if missing.any():
            found, counts = torch.unique(codes[missing], return_counts=True)
            for code, count in zip(found.tolist(), counts.tolist()):
                unknown[(code >> 16) & 255, (code >> 8) & 255, code & 255] += count
        labels[top : top + rows] = indices.clamp(min=0)
    return (None, dict(unknown.most_common())) if unknown else (labels, {})


def describe_unknown(path, colours):
    named = ", ".join(
        f"RGB {r} {g} {b} ({count} px)" for (r, g, b), count in list(colours.items())[:MAX_COLOURS_NAMED]
    )
    more = len(colours) - MAX_COLOURS_NAMED
    text = f"{path}: {len(colours)} unknown colour{'s' if len(colours) > 1 else ''}: {named}"
    if more > 0:
        text += (
            f", and {more} more. So many colours mean the mask was saved lossily (JPEG) or with "
            "antialiased edges; export it as PNG without smoothing"
        )
    return text


def convert_file(source, target, overwrite, table):
    if target.exists() and not overwrite:
        return "skipped", None
    try:
        image = data.read_image(source)
    except ValueError as error:  # a damaged file: named at the end with the others, which go on
        return "unreadable", str(error)
    labels, unknown = convert_image(image, table)
    if unknown:
        return "failed", describe_unknown(source, unknown)
    target.parent.mkdir(parents=True, exist_ok=True)
    data.write_png(labels[None], target)
    return "converted", None


# Each pool process gets the table once, not once per file.
_TABLE = None


def _set_table(table):
    global _TABLE
    _TABLE = table
    torch.set_num_threads(1)  # the parallelism comes from the pool


def _convert_in_pool(job):
    return convert_file(*job, _TABLE)


def convert_folder(src, dst, classes_file, ignore_colours=(), overwrite=False, workers=1):
    if classes_file.name != "classes.txt":
        raise ValueError(
            f"--classes {classes_file}: expected the dataset's classes.txt, which --dataset folder reads "
            "as ROOT/classes.txt; name the file classes.txt."
        )
    if dst.resolve().is_relative_to(src.resolve()):  # a rerun would read the written labels as masks
        same = "are the same folder" if src.resolve() == dst.resolve() else "is inside --src"
        raise ValueError(
            f"--dst {dst} {same} ({src}): the colour masks would be overwritten or written labels read as "
            "masks. Pass a --dst outside --src."
        )
    classes, palette, zero_is_ignore = layouts.read_classes_file(classes_file.parent)
    table = lookup_table(palette, ignore_colours, zero_is_ignore)
    if not src.is_dir():
        raise FileNotFoundError(
            f"{src} is not a folder (--src). Expected the colour label PNGs there, e.g. "
            f"{src}/train/<name>.png and {src}/val/<name>.png."
        )
    sources = sorted(path for path in src.rglob("*") if path.suffix.lower() == ".png" and path.is_file())
    if not sources:
        raise FileNotFoundError(f"{src} holds no .png files (--src); expected colour label PNGs.")
    # Written as .png whatever the case of the source's suffix: the folder layout reads <image stem>.png.
    jobs = [(source, dst / source.relative_to(src).with_suffix(".png"), overwrite) for source in sources]
    sequential = (convert_file(*job, table) for job in jobs)
    pool = Pool(workers, initializer=_set_table, initargs=(table,)) if workers > 1 else None
    with pool or nullcontext():
        outcomes = pool.imap(_convert_in_pool, jobs, chunksize=4) if pool else sequential
        outcomes = list(tqdm(outcomes, total=len(jobs), desc=f"{src} -> {dst}", unit="file"))
    counts = Counter(status for status, _ in outcomes)
    said = {kind: [text for status, text in outcomes if status == kind] for kind in ("failed", "unreadable")}
    return dict(converted=counts["converted"], skipped=counts["skipped"], classes=classes, **said)


def build_parser():
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "root", nargs="?", help="the folder dataset: ROOT/labels_colour -> ROOT/labels with ROOT/classes.txt"
    )
    parser.add_argument(
        "--src", help="folder of colour label PNGs, searched recursively (default ROOT/labels_colour)"
    )
    parser.add_argument("--dst", help="where the index PNGs go, same relative paths (default ROOT/labels)")
    parser.add_argument("--classes", help="the classes.txt with the class colours (default ROOT/classes.txt)")
    parser.add_argument(
        "--ignore-colour",
        nargs=3,
        type=int,
        action="append",
        default=[],
        metavar=("R", "G", "B"),
        help=f"a colour that means 'ignore' (written as {data.IGNORE_INDEX}, or 0 with `label0: ignore`); repeat",
    )
    parser.add_argument("--overwrite", action="store_true", help="convert files that exist again")
    workers = min(4, runtime.usable_cores())
    parser.add_argument(
        "--workers",
        type=runtime.per_core_flag(1),
        default=workers,
        help=f"parallel processes (default {workers})",
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = {"src": "labels_colour", "dst": "labels", "classes": "classes.txt"}
    missing = [f"--{key}" for key in defaults if getattr(args, key) is None]
    if not args.root and missing:
        parser.error(f"give ROOT, or all of --src, --dst and --classes (missing {', '.join(missing)})")
    src, dst, classes_file = (
        Path(getattr(args, key) or Path(args.root) / default) for key, default in defaults.items()
    )
    try:
        results = convert_folder(src, dst, classes_file, args.ignore_colour, args.overwrite, args.workers)
    except (OSError, ValueError) as error:  # a file missing or in the way, a read-only or full disk
        sys.exit(f"error: {error}")
    failed, unreadable = results["failed"], results["unreadable"]
    print(
        f"{results['converted']} converted, {results['skipped']} skipped (exist; --overwrite converts them "
        f"again), {len(failed) + len(unreadable)} failed, into {dst} ({len(results['classes'])} classes from "
        f"{classes_file})"
    )
    said = []
    if unreadable:
        said += unreadable + [f"error: {len(unreadable)} files cannot be read: re-save them or remove them."]
    if failed:
        said += failed + [
            f"error: {len(failed)} files have colours that are not in {classes_file}: add the class (name R G "
            "B) to classes.txt, or pass --ignore-colour R G B for colours to ignore, then run again."
        ]
    if said:
        sys.exit("\n".join(said))


if __name__ == "__main__":
    main()
