"""Pictures that evaluate.py and train.py write, drawn with Pillow: predictions and the GC block's attention
over an image, all of them side by side (the composite), a split's confusion matrix and a run's log. The
attention map is the one thing here that runs a model. `python tools/plot_log.py WORK_DIR` draws a log.
"""

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

import data
import layouts
import runtime

# -----------------------------------------------------------------------------------------------
# Predictions and attention over an image


def heat_colors(values):
    """A 'jet'-like colour map: (H, W) values in [0, 1] -> (H, W, 3) float RGB in [0, 255]. Each channel
    is a clipped tent 1.5 - 4 |value - peak| (blue peaks at 1/4, green 1/2, red 3/4)."""
    peaks = torch.tensor([0.75, 0.5, 0.25], device=values.device)  # R, G, B
    return 255 * (1.5 - 4 * (values.clamp(0, 1)[..., None] - peaks).abs()).clamp(0, 1)


def attention_overlay(picture, attention, opacity=0.5):
    """The attention map (H, W) in [0, 1], coloured by heat_colors, over a (H, W, 3) float picture."""
    return (1 - opacity) * picture + opacity * heat_colors(attention.float().cpu())


def rgb_picture(rgb):
    """(H, W, 3) float in [0, 255] -> PIL RGB image."""
    return Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy())


def label_picture(pred, palette):
    """(H, W) class indices -> palette PNG image ('P' mode)."""
    labels = Image.frombytes("P", pred.shape[::-1], pred.cpu().to(torch.uint8).numpy().tobytes())
    labels.putpalette([value for color in palette for value in color])
    return labels


def save_pictures(save_dir, name, image, pred, palette, classes, attention, opacity, label=None, title=None):
    """Write <name>_pred.png (palette PNG), <name>_overlay.jpg (class colours over the uint8 (3, H, W)
    image), given one <name>_attention.png (attention (H, W) in [0, 1]), and <name>_composite.png
    (composite_picture: image, label, prediction and attention side by side). Returns the paths."""
    stem = Path(save_dir) / name
    if not os.path.abspath(stem).startswith(os.path.join(os.path.abspath(save_dir), "")):
        raise ValueError(f"refusing to write {stem}: outside --save-dir {save_dir}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    pred = pred.cpu()
    paths = [Path(f"{stem}_pred.png"), Path(f"{stem}_overlay.jpg")]
    save_picture(label_picture(pred, palette), paths[0])
    picture = image.cpu().permute(1, 2, 0).float()  # (H, W, 3)
    colors = torch.tensor(palette, dtype=torch.float32)[pred.long()]  # (H, W, 3)
    save_picture(rgb_picture((1 - opacity) * picture + opacity * colors), paths[1], quality=95)
    if attention is not None:
        paths.append(Path(f"{stem}_attention.png"))
        save_picture(rgb_picture(attention_overlay(picture, attention, opacity)), paths[2])
    paths.append(Path(f"{stem}_composite.png"))
    composite = composite_picture(image, pred, palette, classes, attention, label, opacity, title)
    save_picture(composite, paths[-1])
    return paths


def save_picture(picture, path, **options):
    """A PIL image written atomically, in the format its name's suffix says (.png, .jpg, ...)."""
    path, known = Path(path), Image.registered_extensions()
    if path.suffix.lower() not in known:
        raise ValueError(
            f"{path}: Pillow writes no picture format named {path.suffix or '(no suffix)'}; name a .png file"
        )
    with runtime.written_atomically(path) as temporary:
        picture.save(temporary, format=known[path.suffix.lower()], **options)


# The composite's panels are at most this wide (pixels; a 2048-wide Cityscapes frame is drawn at 512),
# with this much white between them.
PANEL_WIDTH, COMPOSITE_GAP = 512, 6


def composite_picture(image, pred, palette, classes, attention=None, label=None, opacity=0.5, title=None):
    """A PIL image of the image, its ground truth (if given), the prediction and the attention map side by
    side, over a legend of the classes present in the label or the prediction. Ignored pixels are black."""
    picture = image.cpu().permute(1, 2, 0).float()  # (H, W, 3)
    colours = torch.tensor(list(palette) + [[0, 0, 0]], dtype=torch.float32)  # index -1: ignored

    def as_colours(labels):
        labels = labels.cpu().long()
        return colours[torch.where(labels == data.IGNORE_INDEX, -1, labels)]

    # (title, RGB, how it is resized to the panel): pictures smoothly, class maps without new colours
    panels = [("image", picture, Image.BILINEAR)]
    if label is not None:
        panels.append(("ground truth", as_colours(label), Image.NEAREST))
    panels.append(("prediction", as_colours(pred), Image.NEAREST))
    if attention is not None:
        heat = attention_overlay(picture, attention, opacity)
        panels.append((title or "GC attention (red: more weight)", heat, Image.BILINEAR))
    height, width = picture.shape[:2]
    size = (min(width, PANEL_WIDTH), max(1, round(height * min(width, PANEL_WIDTH) / width)))
    font, gap = font_of(14), COMPOSITE_GAP
    titles = [wrapped(name, font, size[0]) for name, _, _ in panels]  # a narrow panel's title on more lines
    title_height = 22 + 17 * (max(len(lines) for lines in titles) - 1)
    # A panel's room: its picture, or a title word wider than a narrow picture.
    slot = max([size[0]] + [int(font.getlength(line)) + 1 for lines in titles for line in lines])
    present = sorted(set(pred.unique().tolist()) | set([] if label is None else label.unique().tolist()))
    present = [index for index in present if 0 <= index < len(classes)]
    total_width = len(panels) * (slot + gap) - gap
    legend = legend_rows(present, classes, font, total_width)
    ends = [left + 18 + int(font.getlength(classes[index])) + 1 for row in legend for left, index in row]
    canvas_size = (max([total_width] + ends), title_height + size[1] + 8 + 20 * len(legend))
    canvas = Image.new("RGB", canvas_size, "white")
    draw = ImageDraw.Draw(canvas)
    for number, ((_, rgb, resample), lines) in enumerate(zip(panels, titles)):
        left = number * (slot + gap)
        canvas.paste(rgb_picture(rgb).resize(size, resample), (left, title_height))
        for line_number, line in enumerate(lines):
            draw.text((left, 3 + 17 * line_number), line, fill="black", font=font)
    for row, entries in enumerate(legend):
        top = title_height + size[1] + 8 + 20 * row
        for left, index in entries:
            draw.rectangle((left, top + 2, left + 13, top + 15), fill=tuple(palette[index]), outline="black")
            draw.text((left + 18, top), classes[index], fill="black", font=font)
    return canvas


def legend_rows(indices, classes, font, width):
    """The legend's entries, (left, class index) per row, wrapped to `width` pixels."""
    rows, left = [[]], 0
    for index in indices:
        entry = 18 + int(font.getlength(classes[index])) + 14
        if left and left + entry > width:
            rows.append([])
            left = 0
        rows[-1].append((left, index))
        left += entry
    return rows if rows[0] else []


def wrapped(text, font, width):
    """`text` in lines of at most `width` pixels, broken between words (a longer word has a line to itself)."""
    lines = [""]
    for word in text.split():
        joined = f"{lines[-1]} {word}".strip()
        if lines[-1] and font.getlength(joined) > width:
            lines.append(word)
        else:
            lines[-1] = joined
    return lines


def font_of(size):
    """Pillow's own font at `size` px (Pillow 10.1 and later), else its small bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def text_at(draw, xy, text, fill, font, anchor):
    """draw.text placed by a Pillow anchor such as "rm" (right, middle), computed here: the bitmap font of
    Pillow before 10.1 takes none."""
    left, top, right, bottom = font.getbbox(text)
    x = xy[0] - left - {"l": 0, "m": (right - left) / 2, "r": right - left}[anchor[0]]
    y = xy[1] - top - {"a": 0, "m": (bottom - top) / 2, "d": bottom - top}[anchor[1]]
    draw.text((x, y), text, fill=fill, font=font)


@torch.no_grad()
def attention_map(model, image, original_size):
    """(attention, title) of one image (3, h, w): the block's map at original_size, as displayed() scales it.
    A Non-local model gives the map of the centre position; an FCN model none (None, None)."""
    _, attention = model(image[None], return_attention=True)  # attention (1, 1, h/8, w/8)
    if attention is None:
        return None, None
    block = getattr(model, "head_block", {})  # a model of yours without one: titled as GCNet's
    title = "GC attention (red: more weight)"
    if block.get("context") == "nonlocal":
        title = "NL attention of the centre position"
    elif block.get("pooling") == "avg":
        title = "GC average pooling: the same weight everywhere"
    return displayed(attention[0, 0], original_size, model.align_corners), title


def displayed(attention, size, align_corners):
    """An attention map (h, w) bilinearly upsampled to `size` (H, W) and stretched to [0, 1] for display."""
    attention = F.interpolate(
        attention[None, None].float(), size=tuple(size), mode="bilinear", align_corners=align_corners
    )[0, 0]
    low, high = attention.min(), attention.max()
    return (attention - low) / (high - low).clamp_min(1e-12)


def attention_at_test_scale(model, images, ratios, original, scale, precision):
    """attention_map() of the image at the test scale (ratio 1.0): one of the images per ratio, or
    made from the original uint8 image when 1.0 is not among the ratios."""
    device = images[0].device
    image = images[ratios.index(1.0)] if 1.0 in ratios else data.test_transform(original, scale)[0].to(device)
    with runtime.precision_context(device, precision):
        return attention_map(model, image, original.shape[-2:])


def save_confusion_picture(matrix, classes, save_dir):
    if runtime.rank_and_world_size()[0] == 0:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        save_picture(confusion_picture(matrix, classes), Path(save_dir) / "confusion.png")


def save_split_pictures(model, dataset, pred, label, meta, images, precision, save_dir, opacity):
    original, ratios, scale = data.read_image(meta["image_path"]), dataset.test_ratios, dataset.scale
    attention, title = attention_at_test_scale(model, images, ratios, original, scale, precision)
    palette, classes = dataset.palette, dataset.classes
    save_pictures(save_dir, meta["name"], original, pred, palette, classes, attention, opacity, label, title)


# -----------------------------------------------------------------------------------------------
# The confusion matrix of a split

# Matrices up to this many classes are drawn with every class named and each cell's percentage written;
# larger ones (ADE20K's 150) as small cells numbered every tenth class, their names in the list beside.
NAMED_CLASSES, NUMBERED_CELL_PIXELS = 40, 4
MOST_CONFUSED = 20  # pairs listed beside the matrix


def confusion_picture(matrix, classes):
    """The row-normalised confusion matrix as a PIL image, darker for more, with the most confused pairs
    listed beside it and, above NAMED_CLASSES classes, a key to the numbers below."""
    matrix = torch.as_tensor(matrix, dtype=torch.float64).cpu()
    count = len(classes)
    totals = matrix.sum(dim=1, keepdim=True)
    shares = torch.where(totals > 0, matrix / totals.clamp_min(1), torch.nan)  # (count, count)
    named = count <= NAMED_CLASSES
    text, small = font_of(14), font_of(10)
    cell = 24 if named else NUMBERED_CELL_PIXELS
    labels = [name if named else str(index) for index, name in enumerate(classes)]
    margin = 6 + max(int(text.getlength(label)) for label in labels)  # room for the row / column names
    top = 28 + margin
    lines = most_confused_lines(shares, classes, numbered=not named)
    side = cell * count
    heading = "confusion matrix (rows: ground truth, columns: prediction; each row sums to 100%)"
    caption = (
        "the diagonal is each class's accuracy (recall); grey: no pixel of that class in the ground truth"
    )
    width = max(
        margin + side + 20 + max(int(text.getlength(line)) for line in lines),
        8 + int(text.getlength(heading)),
        margin + int(text.getlength(caption)),
    )
    bottom = max(top + side, 28 + 18 * len(lines)) + 8  # the caption goes below the matrix and the list
    key = [] if named else [f"{index} {name}" for index, name in enumerate(classes)]
    key_width = 16 + max([int(small.getlength(entry)) for entry in key], default=0)
    key_rows = math.ceil(len(key) / max(1, (width - 8) // key_width))  # as many columns as fit
    canvas = Image.new("RGB", (width, bottom + 22 + 14 * key_rows + 8 * bool(key)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), heading, "black", text)
    for row in range(count):
        for column in range(count):
            share = shares[row, column].item()
            left, upper = margin + column * cell, top + row * cell
            # Darker for more; the square root lets a few percent of confusion show beside the diagonal.
            fill = (200, 200, 200) if math.isnan(share) else blue_ramp(math.sqrt(share))
            draw.rectangle((left, upper, left + cell - 1, upper + cell - 1), fill=fill)
            if named and not math.isnan(share) and round(100 * share) > 0:
                colour = "white" if share > 0.3 else "black"
                text_at(draw, (left + cell / 2, upper + cell / 2), f"{100 * share:.0f}", colour, small, "mm")
    for index in range(0, count, 1 if named else 10):
        middle = index * cell + cell // 2
        text_at(draw, (margin - 4, top + middle), labels[index], "black", text, "rm")  # row names
        upright = Image.new("L", (margin, 18), 0)  # column names, read from bottom to top
        text_at(ImageDraw.Draw(upright), (margin - 4, 9), labels[index], 255, text, "rm")
        upright = upright.rotate(90, expand=True)
        canvas.paste(Image.new("RGB", upright.size, "black"), (margin + middle - 9, 28), upright)
    draw.text((margin, bottom), caption, "black", text)
    for number, line in enumerate(lines):
        draw.text((margin + side + 16, 28 + 18 * number), line, "black", text)
    for number, entry in enumerate(key):  # the names of the numbers, column by column
        column, row = divmod(number, key_rows)
        draw.text((8 + column * key_width, bottom + 30 + 14 * row), entry, "black", small)
    return canvas


def most_confused_lines(shares, classes, numbered=False):
    """'truth -> prediction  12.3%' for the largest off-diagonal shares, largest first; each class's
    number before its name if `numbered`."""
    off = torch.nan_to_num(shares.clone(), nan=0.0).fill_diagonal_(0)
    values, places = off.flatten().topk(min(MOST_CONFUSED, off.numel()))
    names = [f"{index} {name}" if numbered else name for index, name in enumerate(classes)]
    lines = ["most confused (share of the true class's pixels):"]
    for value, place in zip(values.tolist(), places.tolist()):
        if round(100 * value, 1) <= 0:
            break
        truth, predicted = divmod(place, len(classes))
        lines.append(f"{names[truth]} -> {names[predicted]}  {100 * value:.1f}%")
    if len(lines) == 1:
        lines.append("none: every labelled pixel is predicted right")
    return lines


def blue_ramp(value):
    """[0, 1] -> white .. dark blue."""
    return tuple(round(255 + (end - 255) * value) for end in (8, 48, 107))


# -----------------------------------------------------------------------------------------------
# A training run's log (log.jsonl, written by run.Run)

PLOT_WIDTH, PLOT_HEIGHT = 860, 190


def log_picture(records, title="training log"):
    """A PIL image of `records` (log.jsonl's dicts) against the iteration, one plot above another."""
    training, validation = split_log(records)
    last = max([*training, *validation, 1])
    losses = [  # (label, key, records, colour)
        ("training, decode + auxiliary", "loss", training, (31, 119, 180)),
        ("training, decode head", "decode_loss", training, (158, 202, 225)),
        ("validation, decode head", "val_loss", validation, (230, 85, 13)),
    ]
    plots = [  # (name, curves, logarithmic)
        ("loss (logarithmic)", losses, True),
        ("learning rate", [("learning rate", "lr", training, (49, 163, 84))], False),
        ("validation mIoU (%)", [("mIoU", "mIoU", validation, (117, 107, 177))], False),
    ]
    text = font_of(13)
    canvas = Image.new("RGB", (PLOT_WIDTH, 30 + len(plots) * (PLOT_HEIGHT + 40)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, "black", font_of(15))
    for number, (name, curves, logarithmic) in enumerate(plots):
        top = 30 + number * (PLOT_HEIGHT + 40)
        series = [(label, points(source, key, logarithmic), colour) for label, key, source, colour in curves]
        box = (70, top + 20, PLOT_WIDTH - 20, top + PLOT_HEIGHT)
        draw_plot(draw, box, name, series, last, text, logarithmic)
    text_at(draw, (PLOT_WIDTH - 20, canvas.height - 4), "iteration", "black", text, "rd")
    return canvas


def split_log(records):
    """{iteration: record} of the training steps and of the validations. A run's start drops the records
    after its first iteration: the steps of a crashed run, or those a resume from an earlier checkpoint
    abandons."""
    training, validation = {}, {}
    for record in records:
        if record.get("event") == "start" and isinstance(record.get("iteration"), int):
            for kept in (training, validation):
                for iteration in [i for i in kept if not isinstance(i, int) or i > record["iteration"]]:
                    del kept[iteration]
        elif "iteration" in record and "event" not in record:  # other events (a skipped step): no figures
            (validation if "mIoU" in record else training)[record["iteration"]] = record
    return training, validation


def points(records, key, positive=False):
    """(iteration, value) pairs of the finite (and positive, if asked) values under `key`, in order."""
    found = [(iteration, record.get(key)) for iteration, record in sorted(records.items())]
    found = [(x, float(y)) for x, y in found if isinstance(y, (int, float)) and math.isfinite(y)]
    return [(x, y) for x, y in found if y > 0 or not positive]


def draw_plot(draw, box, name, series, last_iteration, text, logarithmic):
    """One plot in `box` (left, top, right, bottom). A logarithmic axis keeps the first losses, ten times
    the later ones, from flattening the rest."""
    left, top, right, bottom = box
    values = [y for _, curve, _ in series for _, y in curve]
    if not values:  # e.g. no validation yet: an empty plot from 0 to 1
        scale, low, high, ticks, name = float, 0.0, 1.0, [], f"{name} (none yet)"
    elif logarithmic:
        scale = math.log10
        low, high = scale(min(values)), scale(max(values))
        low, high = low - 0.05 * max(high - low, 0.1), high + 0.05 * max(high - low, 0.1)
        ticks = log_ticks(10**low, 10**high)
    else:  # from 0 (the learning rate and mIoU are never negative), with a little room above
        low, high = min([0.0, *values]), 1.05 * max(values)
        high = high if high > low else low + 1  # a series of zeros
        scale, ticks = float, nice_ticks(low, high)

    def y_of(value):
        return bottom - (scale(value) - low) / (high - low) * (bottom - top)

    draw.rectangle(box, outline="black")
    draw.text((left, top - 18), name, "black", text)
    for value in ticks:
        y = y_of(value)
        draw.line((left - 4, y, left, y), fill="black")
        text_at(draw, (left - 6, y), f"{value:.3g}", "black", text, "rm")
    for value in nice_ticks(0, last_iteration):
        x = left + value / last_iteration * (right - left)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        text_at(draw, (x, bottom + 5), f"{value:g}", "black", text, "ma")
    legend_left = left + int(text.getlength(name)) + 24  # the legend follows the plot's name
    for label, curve, colour in series:
        xy = [(left + x / last_iteration * (right - left), y_of(y)) for x, y in curve]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        if len(xy) <= 30:
            for x, y in xy:
                draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        if len(series) > 1:
            label += "" if curve else " (none yet)"
            draw.line((legend_left, top - 10, legend_left + 16, top - 10), fill=colour, width=3)
            draw.text((legend_left + 20, top - 18), label, "black", text)
            legend_left += 36 + int(text.getlength(label))


def log_ticks(low, high, most=8):
    """1, 2 and 5 times the powers of ten between low and high (> 0); only the powers if that is too many."""
    powers = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    for factors in ((1, 2, 5), (1,)):
        ticks = [round(f * 10.0**p, 12) for p in powers for f in factors if low <= f * 10.0**p <= high]
        if len(ticks) <= most:
            break
    # A range narrower than a factor of 2 or so (a fine-tuning run's loss) gets evenly spaced ones.
    return ticks if len(ticks) >= 3 else nice_ticks(low, high, most=4)


def nice_ticks(low, high, most=6):
    """Round values (1, 2 or 5 times a power of ten apart) between low and high, at most `most`."""
    span = high - low
    if span <= 0:
        return [low]
    step = 10 ** math.floor(math.log10(span / most))
    for factor in (1, 2, 5, 10):
        if span / (step * factor) <= most:
            step *= factor
            break
    first, digits = math.ceil(low / step - 1e-9), max(0, 2 - math.floor(math.log10(step)))
    return [round(k * step, digits) for k in range(first, math.floor(high / step + 1e-9) + 1)]


# -----------------------------------------------------------------------------------------------
# Files for the datasets' evaluation servers (--format-only). Cityscapes scores labelIds: trainId -> id
# inverts the table data.py converts the labels with (cityscapesScripts helpers/labels.py).
CITYSCAPES_TRAINID_TO_ID = torch.tensor(layouts.CITYSCAPES_LABEL_IDS, dtype=torch.uint8)


def server_file(dataset_name, pred, meta, palette):
    """(file name, PIL image) the dataset's server takes for pred (H, W), named after the image. Cityscapes:
    labelIds; ADE20K: the scene-parsing challenge's 1..150 (class + 1; 0 is 'other', which the reduced
    labels ignore); VOC and the others: class indices in a palette PNG."""
    name, pred = Path(meta["image_path"]).stem + ".png", pred.cpu().long()
    if dataset_name == "cityscapes":
        return name, Image.fromarray(CITYSCAPES_TRAINID_TO_ID[pred].numpy())  # uint8 (H, W): mode L
    if dataset_name == "ade20k":
        return name, Image.fromarray((pred + 1).to(torch.uint8).numpy())
    return name, label_picture(pred, palette)
