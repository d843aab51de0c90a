"""The GCNet paper's argument, on your data: the same model with no block (FCN), a Non-local block or a GC
block between its decode head's convs, scored, timed and looked at side by side.

The paper observed that a Non-local block's attention maps are nearly the same for every query position,
so one query-independent map per image (the GC block) should keep its accuracy at a fraction of its cost.
For checkpoints of the three kinds (told apart by their keys) and a split, this measures:

  (a) the scores, with evaluate.py's protocol (the checkpoint's test mode; --ms-flip for multi-scale + flip);
  (b) inference speed, FLOPs and training memory, with benchmark.py's code, at the row's sizes, fp32;
  (c) what the paper measured: the mean cosine distance between the Non-local maps of query positions
      sampled in one image (0: the same map for every query), beside the same distance between the GC
      maps of different images (what the GC block keeps: a map that depends on the image); each also
      with the maps' means taken away, which compares their shapes alone (nearly flat maps are close
      under the paper's measure whatever their shapes);
  (d) per image, the Non-local maps at four query points (the white crosses) beside the GC block's map;
  (e) where the GC map's weight goes, by ground-truth class against the class's share of the pixels, and
      how peaked each map is: exp(entropy) as a fraction of the positions (1: uniform, as average pooling).

    python tools/compare_context_blocks.py             # the original's Cityscapes 512x1024 40k models (GPU)
    python tools/compare_context_blocks.py --checkpoints work_dirs/fcn_r50-d8_128x128_300it_toy/best.pth \\
        work_dirs/nonlocal_r50-d8_128x128_300it_toy/best.pth work_dirs/gcnet_r50-d8_128x128_300it_toy/best.pth

It prints a table and writes compare.json, maps_<image>.png and gc_attention_by_class.png to --out.
"""

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's files sit in the root
import benchmark  # noqa: E402
import checkpoints  # noqa: E402
import data  # noqa: E402
import evaluate  # noqa: E402
import pictures  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402

# The original's three Cityscapes R-50-D8 512x1024 40k models (mmsegmentation v0.5 model zoo; their
# published figures: README, "Why a GC block", and benchmark.py).
OFFICIAL = [
    "https://download.openmmlab.com/mmsegmentation/v0.5/fcn/fcn_r50-d8_512x1024_40k_cityscapes/"
    "fcn_r50-d8_512x1024_40k_cityscapes_20200604_192608-efe53f0d.pth",
    "https://download.openmmlab.com/mmsegmentation/v0.5/nonlocal_net/nonlocal_r50-d8_512x1024_40k_cityscapes/"
    "nonlocal_r50-d8_512x1024_40k_cityscapes_20200605_210748-c75e81e3.pth",
    "https://download.openmmlab.com/mmsegmentation/v0.5/gcnet/gcnet_r50-d8_512x1024_40k_cityscapes/"
    "gcnet_r50-d8_512x1024_40k_cityscapes_20200618_074436-4b0fd17b.pth",
]
SAMPLED_QUERIES = 64  # query positions per image whose Non-local maps are compared (c)
QUERY_POINTS = ((0.3, 0.25), (0.3, 0.75), (0.7, 0.25), (0.7, 0.75))  # (y, x) fractions: the maps drawn (d)
PANEL_WIDTH = 320  # pixels per panel of the maps picture


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    try:
        _, _, device = runtime.setup_device(args.device)
        runtime.set_threads(args.threads, device)
        models = [
            load(path, args, device) for path in tqdm(args.checkpoints, desc="checkpoints", disable=None)
        ]
        dataset = check_models(models)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"compare_context_blocks.py: {error}") from None
    try:  # the speed's sizes, checked before the scores are spent
        for entry in [] if args.no_speed else models:
            entry["row"] = speed_row(entry, args, device)
            benchmark.check_sizes(entry["row"], [benchmark.make_variant("fp32", False)], device)
    except ValueError as error:
        raise SystemExit(f"compare_context_blocks.py: {error} (or pass --no-speed)") from None
    out.mkdir(parents=True, exist_ok=True)
    for entry in models:  # (a) the scores
        keywords = evaluate.inference_keywords(entry["settings"], device)
        # A copy: channels_last converts a model in place, and (b) to (e) use the model as loaded.
        net = evaluate.inference_model(copy.deepcopy(entry["net"]), entry["settings"])
        entry["scores"] = evaluate.evaluate_dataset(net, entry["dataset"], workers=args.workers, **keywords)
    for entry in [] if args.no_speed else models:  # (b) speed and memory
        try:
            entry["speed"] = measure_speed(entry, args, device)
        except ValueError as error:
            raise SystemExit(f"compare_context_blocks.py: {error} (or pass --no-speed)") from None
    looked = look(models, dataset, args, device, out)  # (c), (d), (e)
    report = dict(models=[summary(entry) for entry in models], dataset=dataset.name, num_images=len(dataset))
    report.update(looked)
    print("\n" + table(models) + "\n")
    for line in findings(looked):
        print(line)
    runtime.write_text(out / "compare.json", json.dumps(evaluate.without_nan(report), indent=1))
    print(f"wrote {out / 'compare.json'} and the pictures in {out}")
    return report


# -----------------------------------------------------------------------------------------------
# The models, their split and their scores


def load(path, args, device):
    """A checkpoint built and loaded as evaluate.py does, with its split (evaluate's settings)."""
    loaded = checkpoints.read_checkpoint(path, trust=args.trust_checkpoint)
    info = checkpoints.checkpoint_info(path, loaded)
    flags = ["--checkpoint", str(path), "--precision", args.precision, "--workers", str(args.workers)]
    for flag, value in (("--dataset", args.dataset), ("--data-root", args.data_root)):
        flags += [flag, value] if value else []
    flags += ["--ms-flip"] if args.ms_flip else []
    if args.channels_last is not None:
        flags.append("--channels-last" if args.channels_last else "--no-channels-last")
    settings = evaluate.resolve_settings(evaluate.build_parser().parse_args(flags), info, device)
    net = evaluate.build_model(path, loaded, info, settings, device)
    dataset = evaluate.build_split(info, settings, path)
    dataset.pairs = dataset.pairs[: args.max_images]  # None: all
    block = info["block"]
    gc = f" ({block['pooling']}, {block['fusion']})" if block["context"] == "gc" else ""
    return dict(
        path=str(path),
        info=info,
        settings=settings,
        net=net,
        dataset=dataset,
        kind=block["context"] + gc,
        name=recipe.model_name(block),
    )


def check_models(models):
    """The split they share: the checkpoints must be of one dataset. Says which measures are left out."""
    first = models[0]["dataset"]
    for entry in models[1:]:
        if (entry["dataset"].name, entry["dataset"].classes) != (first.name, first.classes):
            raise ValueError(
                f"{entry['path']} is a {entry['dataset'].name} model, {models[0]['path']} a {first.name} one: "
                "compare checkpoints of one dataset (or pass --dataset and --data-root)"
            )
    if all(entry["info"]["block"]["context"] == "gc" for entry in models):
        runtime.say(
            "note: only GC models among the checkpoints: no FCN (--context none) or Non-local model to compare "
            "the block with; pass their checkpoints too for the paper's comparison (docs/comparison.md)"
        )
    nonlocal_model, gc_model = attention_models(models)
    if nonlocal_model is None:
        runtime.say("note: no Non-local model among the checkpoints: its measures and maps are left out")
    if gc_model is None:
        runtime.say(
            "note: no GC model with attention pooling among the checkpoints (average pooling has one "
            "uniform map): its measures and maps are left out"
        )
    return first


def attention_models(models):
    """The models whose maps are measured: the first Non-local one and the first GC one with attention
    pooling (or None)."""
    blocks = [(entry, entry["info"]["block"]) for entry in models]
    nonlocal_model = next((entry for entry, block in blocks if block["context"] == "nonlocal"), None)
    gc_model = next(
        (e for e, block in blocks if block["context"] == "gc" and block["pooling"] == "att"), None
    )
    return nonlocal_model, gc_model


def speed_row(entry, args, device):
    """benchmark.row_settings of the entry's row of the table, at --size, --train-crop, --train-batch."""
    info, block = entry["info"], entry["info"]["block"]
    name, crop = entry["dataset"].name, info["row"]["crop_size"] if info["row"] else None
    if name not in data.CLASSES_AND_PALETTES:  # your own data: timed at the Cityscapes row's sizes
        name, crop = "cityscapes", None
    train_crop = args.train_crop
    if crop is not None and tuple(crop) not in recipe.DATASETS[name]["crops"]:  # trained at a crop of yours
        train_crop, crop = train_crop or tuple(crop), None
    gc = block["context"] == "gc"  # the GC switches, as benchmark.py's flags
    options = dict(
        dataset=name,
        crop=crop,
        depth=info["depth"],
        size=args.size,
        train_crop=train_crop,
        train_batch=args.train_batch,
        num_classes=info["num_classes"],
        context=block["context"],
        gc_pooling=block["pooling"] if gc else None,
        gc_fusion=block["fusion"] if gc else None,
    )
    return benchmark.row_settings(argparse.Namespace(**options), device)


def measure_speed(entry, args, device):
    """benchmark.py's fp32 eager measures of the entry's row: inference images/s and FLOPs at the row's
    image size (--size for another); at its training crop and batch (--train-crop, --train-batch) the
    memory a training step keeps, counted on fake tensors, and on CUDA the measured peak."""
    row = entry["row"]
    variant, timed = benchmark.make_variant("fp32", False), args.timed or (20 if device.type == "cuda" else 2)
    batch, peak = row["train_batches"][0], None
    try:
        net = entry["net"]  # the checkpoint's own model, in fp32 as loaded
        inference = benchmark.measure_inference(variant, row, device, 1, timed, count_flops=True, model=net)
        if device.type == "cuda":  # the table's "Mem (GB)"; a CPU process's peak would count everything
            peak = benchmark.measure_training(variant, row, device, 1, timed, False, batch)["peak_memory_gb"]
    finally:
        runtime.release_memory(device)
    kept = benchmark.estimate_on_fake_tensors(row, "fp32", False, row["train_crop"], batch)
    return dict(
        images_per_s=inference["images_per_s"],
        gflop_per_image=inference["flops"] / 1e9,
        inference_size=list(row["input_size"]),
        train_crop=list(row["train_crop"]),
        train_batch=batch,
        peak_training_memory_gb=peak,
        estimated_training_memory_gb=kept["estimated_training_memory_gb"],
    )


# -----------------------------------------------------------------------------------------------
# (c), (d), (e): the attention maps


@torch.no_grad()
def look(models, dataset, args, device, out):
    """The attention measures over the first --look images, and their pictures; in float32 whatever the
    scores' precision, so that the distances do not depend on it."""
    nonlocal_model, gc_model = attention_models(models)
    generator = torch.Generator().manual_seed(0)
    nl_distances, nl_centred, nl_spread, gc_maps, gc_spread = [], [], [], [], []
    mass, area = torch.zeros(2, dataset.num_classes + 1, dtype=torch.float64)  # per class; the last: ignored
    count = min(args.look, len(dataset)) if nonlocal_model or gc_model else 0
    at_scale_one = copy.copy(dataset)  # the maps are drawn at the test scale alone, even with --ms-flip
    at_scale_one.test_ratios = (1.0,)
    for index in tqdm(range(count), desc="attention maps", disable=None):
        images, label, meta = at_scale_one[index]
        original, image = data.read_image(meta["image_path"]), images[0].to(device)
        panels = [("image", original.permute(1, 2, 0).float(), [])]
        if nonlocal_model:
            # The block's input: the backbone's last map through the head's first conv (GCNet.forward).
            net = nonlocal_model["net"]
            features = net.decode_head.convs[0](net.backbone(image[None])[3])  # (1, C, h, w)
            block, (h, w) = net.decode_head.nl_block, features.shape[-2:]
            sampled = torch.randperm(h * w, generator=generator)[:SAMPLED_QUERIES].tolist()
            points = [(min(h - 1, int(fy * h)), min(w - 1, int(fx * w))) for fy, fx in QUERY_POINTS]
            # The sampled queries' maps and the drawn ones, from one pass of theta and phi.
            every = block.attention_maps(features, sampled + [y * w + x for y, x in points])[0].float().cpu()
            maps, drawn = every[: len(sampled)].flatten(1), every[len(sampled) :]  # (K, h*w), (4, h, w)
            nl_distances.append(mean_cosine_distance(maps))
            nl_centred.append(mean_cosine_distance(maps, centred=True))
            nl_spread.append(effective_fraction(maps).mean().item())
            crosses = [((y + 0.5) / h, (x + 0.5) / w) for y, x in points]  # as fractions of the picture
            panels[0] = ("image, NL queries", panels[0][1], crosses)
            for number, (where, attention) in enumerate(zip(crosses, drawn), 1):
                panels.append(
                    (f"NL map of query {number}", heat(original, attention, nonlocal_model), [where])
                )
        if gc_model:
            net = gc_model["net"]
            attention = net(image[None], return_attention=True)[1].float().cpu()  # (1, 1, h, w), sums to 1
            gc_maps.append(attention)
            gc_spread.append(effective_fraction(attention.flatten(1)).item())
            weights = F.interpolate(attention, label.shape, mode="bilinear", align_corners=net.align_corners)
            weights = weights.clamp_min(0).double().flatten()  # over the pixels; the last class: ignored
            classes = torch.where(label == data.IGNORE_INDEX, dataset.num_classes, label).flatten()
            mass.index_add_(0, classes, weights / weights.sum())
            area += torch.bincount(classes, minlength=len(area)).double() / classes.numel()
            panels.append(("GC map (one per image)", heat(original, attention[0, 0], gc_model), []))
        pictures.save_picture(maps_picture(panels), out / f"maps_{meta['name'].replace('/', '_')}.png")
    result = dict(looked_at_images=count, sampled_queries=SAMPLED_QUERIES)
    if nl_distances:
        result["nonlocal"] = dict(
            mean_cosine_distance_between_queries=sum(nl_distances) / count,
            centred=sum(nl_centred) / count,
            effective_fraction=sum(nl_spread) / count,
            per_image=nl_distances,
        )
    if gc_maps:
        size = gc_maps[0].shape[-2:]  # the first image's: other sizes are resized to it
        resized = torch.cat([F.interpolate(m, size, mode="bilinear") for m in gc_maps]).flatten(1)
        between = mean_cosine_distance(resized) if count > 1 else None
        centred = mean_cosine_distance(resized, centred=True) if count > 1 else None
        shares = zip([*dataset.classes, "(ignored)"], (mass / count).tolist(), (area / count).tolist())
        by_class = {
            name: dict(mass=weight, area=pixels) for name, weight, pixels in shares if weight or pixels
        }
        result["gc"] = dict(
            mean_cosine_distance_between_images=between,
            centred=centred,
            effective_fraction=sum(gc_spread) / count,
            mass_by_class=by_class,
        )
        pictures.save_picture(class_mass_picture(by_class), out / "gc_attention_by_class.png")
    return result


def mean_cosine_distance(maps, centred=False):
    """1 - cos between every two rows of (K, P) maps, averaged over the K (K - 1) / 2 pairs: the paper's
    measure. Nearly flat maps are close under it whatever their shapes; centred=True takes each map's
    mean away first (1 - their correlation), which compares the shapes alone."""
    maps = maps.double() - (maps.double().mean(dim=1, keepdim=True) if centred else 0)
    unit = F.normalize(maps, dim=1)
    cosine = unit @ unit.T
    k = len(maps)
    return (1 - (cosine.sum() - cosine.diagonal().sum()) / (k * (k - 1))).item()


def effective_fraction(maps):
    """exp(entropy) / P of each row of (K, P) maps (made to sum to 1): 1 when uniform, 1/P at one position."""
    maps = maps.double() / maps.double().sum(dim=1, keepdim=True)
    entropy = -(maps * maps.clamp_min(1e-300).log()).sum(dim=1)
    return entropy.exp() / maps.shape[1]


def heat(original, attention, entry):
    """An attention map (h, w) over the image (3, H, W): scaled to [0, 1], coloured, half transparent."""
    scaled = pictures.displayed(attention, original.shape[-2:], entry["net"].align_corners)
    return pictures.attention_overlay(original.permute(1, 2, 0).float(), scaled)


def maps_picture(panels):
    """Titled panels (title, (H, W, 3) RGB, crosses) side by side; a cross at each (y, x) fraction."""
    height, width = panels[0][1].shape[:2]
    size = (PANEL_WIDTH, max(1, round(height * PANEL_WIDTH / width)))
    font, title, gap = pictures.font_of(13), 20, pictures.COMPOSITE_GAP
    canvas = Image.new("RGB", (len(panels) * (size[0] + gap) - gap, title + size[1]), "white")
    draw = ImageDraw.Draw(canvas)
    for number, (name, rgb, crosses) in enumerate(panels):
        left = number * (size[0] + gap)
        canvas.paste(pictures.rgb_picture(rgb).resize(size, Image.BILINEAR), (left, title))
        pictures.text_at(draw, (left + size[0] / 2, title / 2), name, "black", font, "mm")
        for y, x in crosses:
            cx, cy = left + x * size[0], title + y * size[1]
            for colour, width_ in (("black", 4), ("white", 2)):
                draw.line([(cx - 6, cy), (cx + 6, cy)], fill=colour, width=width_)
                draw.line([(cx, cy - 6), (cx, cy + 6)], fill=colour, width=width_)
    return canvas


def class_mass_picture(by_class):
    """One row per class: its share of the pixels (grey) and of the GC map's weight (red)."""
    font, row, label_width, bar_width = pictures.font_of(13), 22, 170, 420
    largest = max(max(v["mass"], v["area"]) for v in by_class.values()) or 1
    canvas = Image.new("RGB", (label_width + bar_width + 70, 30 + row * len(by_class)), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (6, 6), "GC map weight (red) vs pixel share (grey), mean over the images", fill="black", font=font
    )
    for number, (name, shares) in enumerate(by_class.items()):
        top = 30 + number * row
        pictures.text_at(draw, (label_width - 6, top + row / 2), name, "black", font, "rm")
        for offset, key, colour in ((2, "area", (170, 170, 170)), (11, "mass", (214, 39, 40))):
            length = round(bar_width * shares[key] / largest)
            draw.rectangle([label_width, top + offset, label_width + length, top + offset + 8], fill=colour)
        text = f"{100 * shares['mass']:.1f}%"
        pictures.text_at(draw, (label_width + bar_width + 64, top + row / 2), text, "black", font, "rm")
    return canvas


# -----------------------------------------------------------------------------------------------
# The report


def summary(entry):
    scores = entry["scores"]
    return dict(
        checkpoint=entry["path"],
        model=entry["name"],
        block=entry["info"]["block"],
        config_name=entry["info"]["config_name"],
        **{key: scores[key] for key in ("mIoU", "mAcc", "aAcc", "mF1", "loss", "num_images")},
        IoU=dict(zip(entry["dataset"].classes, scores["IoU"])),
        speed=entry.get("speed"),
    )


def table(models):
    header = ["model", "block", "mIoU", "mAcc", "aAcc", "val loss", "img/s", "GFLOP/img", "train mem (GB)"]
    styles = ["{:.2f}"] * 3 + ["{:.4f}", "{:.3g}", "{:.1f}", "{:.2f}"]  # the figures'; "-" for None
    rows = []
    for entry in models:
        scores, speed = entry["scores"], entry.get("speed") or {}
        memory = speed.get("peak_training_memory_gb") or speed.get("estimated_training_memory_gb")
        figures = [scores[key] for key in ("mIoU", "mAcc", "aAcc", "loss")]
        figures += [speed.get("images_per_s"), speed.get("gflop_per_image"), memory]
        cells = ["-" if value is None else style.format(value) for value, style in zip(figures, styles)]
        rows.append([entry["name"], entry["kind"], *cells])
    widths = [max(len(str(cells[i])) for cells in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{cell:<{width}}" for cell, width in zip(cells, widths)) for cells in [header, *rows]]
    first = next((entry["speed"] for entry in models if entry.get("speed")), None)
    if first:
        measured = (
            "peak (CUDA)" if first["peak_training_memory_gb"] is not None else "kept by a step, counted"
        )
        lines.append(
            f"fp32; inference at {first['inference_size'][0]}x{first['inference_size'][1]}, training memory "
            f"{measured} at crop {first['train_crop'][0]}x{first['train_crop'][1]}, batch {first['train_batch']}"
        )
    return "\n".join(lines)


def findings(looked):
    count = looked["looked_at_images"]
    if "nonlocal" in looked:
        nl = looked["nonlocal"]
        yield (
            f"Non-local block, {count} image(s): the maps of {SAMPLED_QUERIES} query positions of one image "
            f"differ by a mean cosine distance of {nl['mean_cosine_distance_between_queries']:.4f} (0: one map "
            f"for all), {nl['centred']:.4f} with each map's mean taken away (their shapes alone); each map "
            f"spreads over {nl['effective_fraction']:.2f} of the positions (1: uniform)"
        )
    if "gc" in looked:
        gc, between = looked["gc"], looked["gc"]["mean_cosine_distance_between_images"]
        differ = "(one image: no pair)"
        if between is not None:
            differ = f"differ by a mean cosine distance of {between:.4f}, {gc['centred']:.4f} with the means taken away"
        yield (
            f"GC block, {count} image(s): its maps of different images {differ}; each spreads over "
            f"{gc['effective_fraction']:.2f} of the positions"
        )
        ranked = sorted(gc["mass_by_class"].items(), key=lambda item: -item[1]["mass"])
        shares = ", ".join(
            f"{name} {100 * v['mass']:.1f}% ({100 * v['area']:.1f}% of pixels)" for name, v in ranked
        )
        yield f"GC map weight by class: {shares}"


def build_parser():
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add(
        "--checkpoints",
        nargs="+",
        default=OFFICIAL,
        help="files or URLs of FCN, NonLocal and GC models of one "
        "dataset, any order (default: the original's Cityscapes 512x1024 40k three)",
    )
    add("--dataset", choices=sorted(recipe.DATASETS), help="as evaluate.py (default: the checkpoints')")
    add(
        "--data-root",
        help="as evaluate.py (default: the one the checkpoints' runs used, else data/<dataset>)",
    )
    add("--max-images", type=runtime.number_flag(int, 1), help="score the first N images only (default: all)")
    add(
        "--look",
        type=runtime.number_flag(int, 1),
        default=8,
        help="images whose attention maps are measured and drawn (default 8)",
    )
    add("--ms-flip", action="store_true", help="score multi-scale + flip (the maps stay at scale 1)")
    add("--no-speed", action="store_true", help="skip the speed and memory measures (b)")
    add(
        "--size",
        type=runtime.size_flag("--size"),
        help="HxW of the timed inference (default: the row's image)",
    )
    add(
        "--train-crop",
        type=runtime.size_flag("--train-crop"),
        help="crop of the training memory measure (default: the row's)",
    )
    add(
        "--train-batch",
        type=runtime.number_flag(int, 1),
        nargs=1,
        help="batch of the training memory measure (default: the row's per-GPU batch)",
    )
    add("--timed", type=runtime.number_flag(int, 1), help="timed images and steps (default 20 CUDA, 2 CPU)")
    add("--workers", type=runtime.per_core_flag(0), default=2, help="data loader workers (default 2)")
    add("--trust-checkpoint", action="store_true", help="unpickle checkpoints fully: runs code in them")
    where = "folder of compare.json and the pictures, created if absent (default compare_out)"
    add("--out", type=runtime.writable_path("folder"), default="compare_out", help=where)
    group = runtime.add_arguments(parser)
    group.description = "the scores' precision and layout, as evaluate.py's (the speed is fp32)"
    return parser


if __name__ == "__main__":
    main()
