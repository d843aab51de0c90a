"""Where each dataset keeps its files: the layouts of Cityscapes, ADE20K, Pascal VOC 2012 + aug and your
own folder, the (image, label) pairs of a split found in them, classes.txt, and the image files named on
evaluate.py's command line. data.py builds its datasets from what this finds.
"""

import collections
import glob
import os
import warnings
from pathlib import Path

FOLDER_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")

# Cityscapes labelId -> trainId (cityscapesScripts helpers/labels.py); every other labelId -> 255.
CITYSCAPES_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)  # 0..18

# The layout of each dataset, shown when a root or a split is missing or empty.
LAYOUTS = {
    "cityscapes": (
        "  {root}/leftImg8bit/{{train,val,test}}/<city>/<name>_leftImg8bit.png\n"
        "  {root}/gtFine/{{train,val}}/<city>/<name>_gtFine_labelTrainIds.png\n"
        "Get leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from https://www.cityscapes-dataset.com,"
        " unzip both into {root}, then run `python tools/prepare_datasets.py cityscapes {root}`."
    ),
    "ade20k": (
        "  {root}/images/{{training,validation}}/<name>.jpg\n"
        "  {root}/annotations/{{training,validation}}/<name>.png\n"
        "  test split: {root}/images/testing/, or release_test/testing/ inside or beside {root}\n"
        "Unzip ADEChallengeData2016.zip (http://data.csail.mit.edu/places/ADEchallenge/) into the parent"
        " of {root}; the root is the ADEChallengeData2016 folder itself."
    ),
    "voc12aug": (
        "  {root}/JPEGImages/<name>.jpg\n"
        "  {root}/SegmentationClass/<name>.png, {root}/SegmentationClassAug/<name>.png\n"
        "  {root}/ImageSets/Segmentation/{{train,val,aug}}.txt (test.txt for the test split)\n"
        "Unpack VOCtrainval_11-May-2012.tar (gives VOCdevkit/VOC2012) and the SBD benchmark.tgz (into"
        " VOCdevkit/VOCaug), then run `python tools/prepare_datasets.py voc12aug data/VOCdevkit"
        " data/VOCdevkit/VOCaug` to write SegmentationClassAug and aug.txt."
    ),
    "folder": (
        "  {root}/images/{{train,val,test}}/<name>.jpg (or .jpeg/.png/.webp)\n"
        "  {root}/labels/{{train,val}}/<name>.png (class indices 0..C-1, 255 = ignore)\n"
        "  {root}/classes.txt (one class per line: a name, optionally followed by R G B; a line\n"
        "  `label0: ignore` says that label 0 means 'ignore' and the listed classes are 1..C)"
    ),
    "toy": (
        "  {root}/leftImg8bit/{{train,val}}/toy/<name>_leftImg8bit.png\n"
        "  {root}/gtFine/{{train,val}}/toy/<name>_gtFine_labelTrainIds.png\n"
        "It is generated when {root} does not exist: delete {root} to generate it again."
    ),
}


def missing_path_error(name, root, path, what="not found"):
    layout = LAYOUTS[name].format(root=root)
    return FileNotFoundError(f"{name}: {path} {what}.\nExpected layout under the root {root}:\n{layout}")


def find_pairs(name, root, split):
    """[(image path, label path or None)] of a split, as str, in the dataset's own layout."""
    if name in ("voc12aug", "folder"):
        return find_voc12aug_pairs(root, split) if name == "voc12aug" else find_folder_pairs(root, split)
    if name == "ade20k":
        subset = {"train": "training", "val": "validation", "test": "testing"}[split]
        image_dir, label_dir = root / "images" / subset, root / "annotations" / subset
        if split == "test" and not image_dir.is_dir():  # the challenge's release_test.zip, in or beside root
            found = [path for path in (root / "release_test", root.parent / "release_test") if path.is_dir()]
            image_dir = found[0] / "testing" if found else image_dir
        pattern, label_pattern, hint = "*.jpg", "*.png", ""
    else:  # Cityscapes and the toy dataset: <city>/<name>_leftImg8bit.png, <city>/<name>_gtFine_labelTrainIds.png
        image_dir, label_dir = root / "leftImg8bit" / split, root / "gtFine" / split
        pattern, label_pattern = "*_leftImg8bit.png", "*_gtFine_labelTrainIds.png"
        prepare = f"`python tools/prepare_datasets.py cityscapes {root}` writes them from the labelIds."
        hint = prepare if name == "cityscapes" else ""
    images = sorted(image_dir.rglob(pattern)) if image_dir.is_dir() else []  # as the original scans img_dir
    if not images:
        what = f"holds no {pattern} files" if image_dir.is_dir() else "not found"
        raise missing_path_error(name, root, image_dir, what)
    names = [image.relative_to(image_dir).parent / image.name.removesuffix(pattern[1:]) for image in images]
    labels = [label_dir / f"{name}{label_pattern[1:]}" for name in names]
    return pair_up(name, split, image_dir, images, labels, (label_dir, f"**/{label_pattern}"), hint)


def pair_up(name, split, image_dir, images, labels, orphans=None, hint=""):
    """[(image, label)] as str, or [(image, None)] in the test split. Images without their label fail here,
    with the hint; the labels in orphans = (folder, pattern) that no image uses are named in a warning."""
    if split == "test":
        return [(str(image), None) for image in images]
    pairs = [(str(image), str(label)) for image, label in zip(images, labels, strict=True)]
    missing = [(image, label) for image, label in pairs if not os.path.isfile(label)]
    if missing:
        image, label = missing[0]
        raise FileNotFoundError(
            f"{name}: {len(missing)} of {len(pairs)} images in {image_dir} have no label file, e.g. {image} "
            f"(expected {label}). {hint}".rstrip()
        )
    if orphans:
        used = {os.path.normpath(label) for _, label in pairs}
        unused = sorted(path for path in orphans[0].glob(orphans[1]) if os.path.normpath(path) not in used)
        warn_about(name, unused, "label files have no image", "Add their images or remove them.")
    return pairs


def warn_about(name, files, what, advice):
    if files:
        more = f" and {len(files) - 5} more" if len(files) > 5 else ""
        shown = ", ".join(str(path) for path in files[:5]) + more
        warnings.warn(f"{name}: {len(files)} {what}: {shown}. {advice}", stacklevel=4)


def find_voc12aug_pairs(root, split):
    """train = train.txt with SegmentationClass + aug.txt with SegmentationClassAug (10582 images in
    all); val = val.txt with SegmentationClass (mmseg v0.5.0 configs/_base_/datasets/pascal_voc12_aug.py);
    test = test.txt, images only."""
    parts = [("train.txt", "SegmentationClass"), ("aug.txt", "SegmentationClassAug")]
    pairs = []
    for list_name, label_dir in parts if split == "train" else [(f"{split}.txt", "SegmentationClass")]:
        list_path = root / "ImageSets" / "Segmentation" / list_name
        if not list_path.is_file():  # the layout says how to write aug.txt
            raise missing_path_error("voc12aug", root, list_path)
        images = [root / "JPEGImages" / f"{name}.jpg" for name in list_path.read_text().split()]
        if not images:
            raise ValueError(f"voc12aug: {list_path} lists no images; expected one image name per line.")
        missing = [image for image in images if not image.is_file()]
        if missing:
            raise FileNotFoundError(
                f"voc12aug: {len(missing)} images listed in {list_path} are missing, e.g. {missing[0]}."
            )
        labels = [root / label_dir / f"{image.stem}.png" for image in images]
        prepare = "Run `python tools/prepare_datasets.py voc12aug VOCDEVKIT SBD_ROOT` to write them."
        hint = prepare if label_dir == "SegmentationClassAug" else ""
        pairs += pair_up("voc12aug", split, root / "JPEGImages", images, labels, hint=hint)
    return pairs


def find_folder_pairs(root, split):
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    if not image_dir.is_dir():
        raise missing_path_error("folder", root, image_dir)
    entries = sorted(path for path in image_dir.iterdir() if not path.name.startswith("."))
    files = [path for path in entries if path.is_file()]
    others = [path.name for path in entries if not path.is_file() and not path.is_dir()]
    what = f"entries in {image_dir} are not regular files (FIFOs, devices) and are skipped"
    warn_about("folder", others, what, "Copy the images they stand for into the folder.")
    folders = [path.name for path in entries if path.is_dir()]
    what = f"folders in {image_dir} are not read: a split's images lie in it, not in folders of it"
    warn_about("folder", folders, what, "Move their images (and their labels) up to use them.")
    images = [path for path in files if path.suffix.lower() in FOLDER_IMAGE_EXTENSIONS]
    if not images:
        raise missing_path_error("folder", root, image_dir, "holds no .jpg/.jpeg/.png/.webp images")
    skipped = [path.name for path in files if path.suffix.lower() not in FOLDER_IMAGE_EXTENSIONS]
    what = f"files in {image_dir} are not .jpg/.jpeg/.png/.webp images and are skipped"
    warn_about("folder", skipped, what, "Convert images in other formats (e.g. .bmp) to PNG to use them.")
    stems = {}
    for image in images:
        stems.setdefault(image.stem, []).append(image.name)
    shared = [" + ".join(names) for names in stems.values() if len(names) > 1]
    if shared:  # x.jpg beside x.png: one label file, and outputs that would overwrite each other
        raise ValueError(
            f"folder: images in {image_dir} share a name: {', '.join(shared)}. Its label file and its "
            "outputs (pictures, server files) are named after an image's name: rename or remove all but one."
        )
    labels = [label_dir / f"{image.stem}.png" for image in images]
    return pair_up("folder", split, image_dir, images, labels, (label_dir, "*.png"))


def read_classes_file(root, override=None):
    """ROOT/classes.txt -> (classes, palette, zero_is_ignore). One class per line: a name, optionally
    followed by R G B (0..255); '#' starts a comment. The line `label0: ignore` declares that label 0
    means 'ignore' and the listed classes are the values 1..C (ADE20K's convention). override: that rule
    as a flag sets it instead (train.py --reduce-zero-label), which the default colours follow too."""
    path = root / "classes.txt"
    if not path.is_file():
        raise missing_path_error("folder", root, path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM, as Notepad wrote, goes
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8.") from None
    first_line, palette, zero_is_ignore = {}, [], False  # first_line: class name -> line number, in order
    for number, line in enumerate(lines, start=1):
        words, where = line.split("#")[0].split(), f"{path}, line {number} ({line.strip()!r})"
        if not words:
            continue
        if words[0].endswith(":") or words[0].lower().startswith("label0"):  # a directive, or a typo of one
            if words not in (["label0:", "ignore"], ["label0:", "class"]):
                raise ValueError(
                    f"{where}: unknown directive; the known ones are `label0: ignore` and `label0: class`."
                )
            zero_is_ignore = words[1] == "ignore"
            continue
        numbers = 0  # trailing integers: 1 is part of a name ("class 2"), 3 are a colour
        while numbers < len(words) - 1 and words[-1 - numbers].lstrip("+-").isdigit():
            numbers += 1
        if numbers == 2 or (numbers >= 3 and not all(0 <= int(word) <= 255 for word in words[-3:])):
            raise ValueError(
                f"{where}: expected a class name, optionally followed by a colour R G B of "
                "three integers in 0..255 (e.g. `road 128 64 128`)."
            )
        name = " ".join(words[:-3] if numbers >= 3 else words)
        if name in first_line:
            raise ValueError(f"{where}: class {name!r} is listed twice (first on line {first_line[name]}).")
        first_line[name] = number
        palette.append([int(word) for word in words[-3:]] if numbers >= 3 else None)
    if len(first_line) < 2:
        raise ValueError(
            f"{path} lists {len(first_line)} classes; expected 2 or more (e.g. background and another)."
        )
    # A class without a colour gets the VOC colour of the value it is stored as (1..C with label0: ignore),
    # so that a VOC-style colour mask, black for 0, converts without colours written out.
    zero_is_ignore = zero_is_ignore if override is None else bool(override)
    defaults = default_palette(len(palette) + zero_is_ignore)[zero_is_ignore:]
    palette = [colour or default for colour, default in zip(palette, defaults)]
    return list(first_line), palette, zero_is_ignore


def default_palette(num_classes):
    """Distinct colours for classes.txt lines without R G B: the bit-spreading colour map of the VOC
    devkit (index bits go to the high bits of R, G and B in turn)."""
    return [
        [sum(((index >> (3 * bit + channel)) & 1) << (7 - bit) for bit in range(8)) for channel in range(3)]
        for index in range(num_classes)
    ]


# Image files given on the command line (evaluate.py --image)


def image_files(patterns):
    """--image: (files as given, a folder's images, a glob pattern's images, each sorted; skipped: the
    files of folders and patterns not named as images)."""
    files, skipped, kinds = [], [], FOLDER_IMAGE_EXTENSIONS
    for pattern in patterns:
        path = Path(pattern)
        if path.is_file():
            files.append(path)
            continue
        if path.is_dir():  # and its subfolders, but not hidden files or folders
            below = [file.relative_to(path) for file in sorted(path.rglob("*")) if file.is_file()]
            found = [path / file for file in below if not any(part.startswith(".") for part in file.parts)]
        elif any(character in pattern for character in "*?["):
            found = sorted(filter(Path.is_file, map(Path, glob.glob(pattern, recursive=True))))
        else:
            raise FileNotFoundError(f"--image {pattern}: no such file or folder")
        images = [file for file in found if file.suffix.lower() in kinds]
        if not images:
            raise FileNotFoundError(f"--image {pattern}: no {'/'.join(kinds)} images there")
        files += images
        skipped += [file for file in found if file.suffix.lower() not in kinds]
    return list(dict.fromkeys(files)), skipped  # a file named twice is predicted once


def picture_names(files):
    """Each file's name under --save-dir: its path below the files' common folder, without the
    extension (a/x.jpg, b/x.jpg -> a/x, b/x); x.jpg beside x.png keep it (x_jpg, x_png)."""
    absolute = [Path(os.path.abspath(file)) for file in files]  # '..' resolved: no name climbs out
    common = os.path.commonpath([file.parent for file in absolute])
    names = [str(file.relative_to(common).with_suffix("")) for file in absolute]
    counts = collections.Counter(names)
    names = [
        name if counts[name] == 1 else f"{name}_{file.suffix[1:]}" for name, file in zip(names, absolute)
    ]
    # Any name still shared (x.png beside x_png.jpg) is numbered, never taking another file's name.
    wanted, taken = set(names), set()
    for index, name in enumerate(names):
        number, candidate = 1, name
        while candidate in taken or (number > 1 and candidate in wanted):
            number, candidate = number + 1, f"{name}_{number + 1}"
        names[index] = candidate
        taken.add(candidate)
    return names
