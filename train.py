"""Train GCNet with the original mmsegmentation recipe (gcnet-spec.md §3).

The built-in toy demo, on the CPU or one GPU, a few minutes:
    python train.py
A row of the results table, on 4 GPUs of one node (the original setting):
    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769
    torchrun --nproc_per_node=4 train.py --dataset ade20k --depth 101 --iters 160000
Several nodes:
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --nproc_per_node=2 train.py --dataset voc12aug
Resume the newest checkpoint of a run (or --resume PATH):
    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769 --resume

The recipe: SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter), poly learning rate
(power 0.9, down to 1e-4, per iteration, no warmup), cross-entropy averaged over all pixels,
auxiliary FCN loss weighted 0.4, SyncBN over 4 GPUs, batch 2 (Cityscapes) or 4 (ADE20K, VOC) per
GPU, ImageNet-pretrained ResNetV1c, evaluation and checkpoint every tenth of the schedule.
"""

import argparse
import json
import math
import os
import resource
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import evaluate
import model as gcnet
import recipe as recipe_table
import runtime

# -----------------------------------------------------------------------------------------------
# Recipes: the rows of the results table (gcnet-spec.md §3.2). Everything else is shared.

RECIPES = {
    # dataset: per-GPU batch, schedules in the table (the first is the default), crops, loader workers
    "cityscapes": dict(batch_size=2, iters=(40000, 80000), crops=("512x1024", "769"), workers=2),
    "ade20k": dict(batch_size=4, iters=(80000, 160000), crops=("512",), workers=4),
    "voc12aug": dict(batch_size=4, iters=(20000, 40000), crops=("512",), workers=4),
    # Your own data: the VOC-like recipe is a reasonable start (no row of the table to match).
    "folder": dict(batch_size=4, iters=(20000,), crops=("512",), workers=4),
    # The demo: small crops, from scratch, a larger lr since it does not start from ImageNet.
    "toy": dict(batch_size=4, iters=(300,), crops=("128",), workers=2, lr=0.05, pretrained="none"),
}
ORIGINAL_GPUS = 4
IGNORE_INDEX = 255


def parse_size(text, flag="--crop"):
    """'769' -> (769, 769); '512x1024' -> (512, 1024) as height x width."""
    try:
        parts = [int(part) for part in str(text).lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2 or min(parts) <= 0:
        raise SystemExit(f"{flag}: expected N or HxW (e.g. 769 or 512x1024), got {text!r}")
    return tuple(parts)


def resolve_recipe(args, world_size):
    """The flags, with every unset one filled from the dataset's row: one plain dict."""
    row = RECIPES[args.dataset]
    crop = parse_size(args.crop or row["crops"][0])
    iters = args.iters or row["iters"][0]
    pretrained = args.pretrained or row.get("pretrained") or recipe_table.IMAGENET_URLS[args.depth]
    schedule = f"{iters // 1000}k" if iters % 1000 == 0 else f"{iters}it"
    config_name = f"gcnet_r{args.depth}-d8_{crop[0]}x{crop[1]}_{schedule}_{args.dataset}"  # as the original
    # 8x+1 crops (769) pair with align_corners=True; they are tested by sliding windows (§1.7, §4.3).
    align_corners = crop[0] % 8 == 1
    batch_size = args.batch_size or row["batch_size"]
    return dict(
        dataset=args.dataset,
        data_root=args.data_root,
        depth=args.depth,
        crop_size=list(crop),
        iters=iters,
        batch_size=batch_size,
        world_size=world_size,
        global_batch=batch_size * world_size,
        lr=args.lr or row.get("lr", 0.01),
        min_lr=args.min_lr,
        power=args.power,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        aux_weight=args.aux_weight,
        align_corners=align_corners,
        test_mode="slide" if align_corners else "whole",
        test_crop=list(crop),
        test_stride=[math.ceil(c * 2 / 3) for c in crop],  # 769 -> 513 as the original; used by slide only
        eval_interval=args.eval_interval or max(iters // 10, 1),
        pretrained=pretrained,
        workers=row["workers"] if args.workers is None else args.workers,
        seed=args.seed,
        config_name=config_name,
        work_dir=args.work_dir or str(Path("work_dirs") / config_name),
    )


def warn_about_differences(recipe, row, sync_bn, precision):
    """Where this run differs from the table's recipe, say so before hours are spent."""
    warnings = []
    original_batch = row["batch_size"] * ORIGINAL_GPUS
    if recipe["dataset"] in ("cityscapes", "ade20k", "voc12aug") and recipe["global_batch"] != original_batch:
        warnings.append(
            f"global batch {recipe['global_batch']} differs from the table's {original_batch} "
            f"({ORIGINAL_GPUS} GPUs x {row['batch_size']}); expect different numbers"
        )
    if recipe["world_size"] > 1 and not sync_bn:
        warnings.append("plain BatchNorm per process (SyncBN needs CUDA): BN statistics see a smaller batch")
    if recipe["dataset"] != "toy" and precision != "fp32":
        warnings.append(f"{precision} mixed precision; the table's models were trained in fp32")
    return warnings


# -----------------------------------------------------------------------------------------------
# The pieces of the recipe


def poly_lr(iteration, max_iters, base_lr=0.01, min_lr=1e-4, power=0.9):
    """Learning rate before iteration `iteration` (0-based): (base - min) (1 - it/max)^power + min."""
    return (base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr


def segmentation_loss(logits, labels, ignore_index=IGNORE_INDEX):
    """Cross-entropy summed over the labelled pixels and divided by ALL pixels, ignored ones
    included, as the original (mmseg avg_non_ignore=False, gcnet-spec.md §3.1). PyTorch's own
    mean would divide by the labelled pixels only, which weighs padded crops more."""
    logits = logits.float()
    if logits.dim() == 4 and logits.stride(1) == 1:
        # channels_last: each pixel's class scores are adjacent in memory, so the logits are a
        # (pixels, classes) matrix without a copy; along dim 1, torch's softmax would first copy
        # them to the NCHW layout (about 2x slower at 2x19x512x1024).
        logits, labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), labels.reshape(-1)
    total = F.cross_entropy(logits, labels, reduction="sum", ignore_index=ignore_index)
    return total / labels.numel()


class SeededSamples(torch.utils.data.Dataset):
    """Runs the training transform of sample i in epoch e under its own seed, so augmentation depends
    only on (seed, epoch, index): not on the number of workers nor on where a run was resumed."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed * 1_000_003 + epoch * 100_003 + index)
            return self.dataset[index]


def epoch_batches(num_samples, batch_size, epoch, seed, rank, world_size):
    """This rank's batches of one epoch: a seeded shuffle, split across ranks, incomplete batches
    dropped (drop_last=True as the original). Each batch is a list of (epoch, index) keys."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_rank = num_samples // world_size
    mine = order[rank * per_rank : (rank + 1) * per_rank]  # disjoint shares of equal size
    return [
        [(epoch, i) for i in mine[b * batch_size : (b + 1) * batch_size]]
        for b in range(per_rank // batch_size)
    ]


def training_batches(dataset, recipe, start_iteration, rank, world_size):
    """Yield batches forever from iteration `start_iteration` on; the order is a pure function of
    the seed, so a resumed run sees exactly the batches the uninterrupted one would have."""
    seeded = SeededSamples(dataset, recipe["seed"])
    batches_per_epoch = len(epoch_batches(len(dataset), recipe["batch_size"], 0, 0, rank, world_size))
    if batches_per_epoch == 0:
        raise SystemExit(
            f"the {recipe['dataset']} training split has {len(dataset)} images, fewer than one global batch "
            f"of {recipe['global_batch']}; lower --batch-size or add images"
        )
    epoch, skip = divmod(start_iteration, batches_per_epoch)
    while True:
        batches = epoch_batches(len(dataset), recipe["batch_size"], epoch, recipe["seed"], rank, world_size)
        loader = torch.utils.data.DataLoader(
            seeded,
            batch_sampler=batches[skip:],
            num_workers=recipe["workers"],
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),  # its own, so making a loader leaves the global RNG alone
        )
        yield from loader
        epoch, skip = epoch + 1, 0


# -----------------------------------------------------------------------------------------------
# Checkpoints: atomic, complete, never with non-finite weights


def rng_states():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_checkpoint(path, raw_model, optimizer, scaler, iteration, recipe, classes, palette, rng, best_miou):
    state_dict = raw_model.state_dict()
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise RuntimeError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    checkpoint = {
        "state_dict": state_dict,  # the official layout: no module. / _orig_mod. prefixes
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "iteration": iteration,  # finished iterations
        "best_miou": best_miou,
        "rng": rng,  # one entry per rank
        "recipe": recipe,
        "meta": {"CLASSES": list(classes), "PALETTE": [list(c) for c in palette]},
    }
    temporary = Path(path).with_suffix(".tmp")
    torch.save(checkpoint, temporary)
    os.replace(temporary, path)  # atomic: a crash leaves the old file or the new one, never half


def newest_checkpoint(work_dir):
    found = sorted(Path(work_dir).glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    return found[-1] if found else None


def prune_checkpoints(work_dir, keep):
    found = sorted(Path(work_dir).glob("iter_*.pth"), key=lambda p: int(p.stem.split("_")[1]))
    for old in found[:-keep]:
        old.unlink()


# -----------------------------------------------------------------------------------------------
# Devices, precision, processes


def setup_distributed(device_flag):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    wants_cuda = device_flag == "cuda" or (device_flag == "auto" and torch.cuda.is_available())
    if wants_cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available; use --device cpu")
    device = torch.device(f"cuda:{local_rank}" if wants_cuda else "cpu")
    if wants_cuda:
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(
            backend="nccl" if wants_cuda else "gloo", device_id=device if wants_cuda else None
        )
    return rank, world_size, device


def rank_zero_first(function, rank, world_size):
    """Call `function` on rank 0, then on the other ranks: for work that writes shared files."""
    result = function() if rank == 0 else None
    if world_size > 1:
        dist.barrier()
    return result if rank == 0 else function()


def resolve_precision(flag, device):
    if flag == "fp16" and device.type != "cuda":
        raise SystemExit("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return runtime.resolve_precision("auto", device) if flag == "auto" else flag


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, kB on Linux


class StopRequest:
    """SIGTERM (cluster pre-emption, torchrun shutdown) or Ctrl-C: finish the step, checkpoint, exit.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self.handle)
        signal.signal(signal.SIGINT, self.handle)

    def handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True


# -----------------------------------------------------------------------------------------------
# Validation, through evaluate.py's functions


def validate(raw_model, val_set, recipe, device, precision, channels_last, rank, save_dir=None):
    """Single-scale val mIoU. It runs in a forked RNG so that validating (its data loader draws a
    seed) leaves the training's random stream exactly as it was: resuming stays exact."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return evaluate.evaluate_dataset(
            raw_model,
            val_set,
            mode=recipe["test_mode"],
            crop_size=tuple(recipe["test_crop"]),
            stride=tuple(recipe["test_stride"]),
            flip=False,
            device=device,
            precision=precision,
            channels_last=channels_last,
            save_dir=save_dir,
            show_progress=rank == 0,
            workers=recipe["workers"],
        )


# -----------------------------------------------------------------------------------------------
# main: set up, then one visible loop


def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.keep_freed_memory()
    rank, world_size, device = setup_distributed(args.device)
    recipe = resolve_recipe(args, world_size)
    row = RECIPES[args.dataset]
    precision = resolve_precision(args.precision, device)
    channels_last = (
        runtime.resolve_channels_last(None, device, precision)
        if args.channels_last is None
        else args.channels_last
    )
    sync_bn = device.type == "cuda" and world_size > 1
    pictures_wanted = args.dataset == "toy" if args.pictures is None else args.pictures
    work_dir = Path(recipe["work_dir"])
    say = print if rank == 0 else (lambda *a, **k: None)
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not args.deterministic  # the original trains with it on

    # 1. data
    crop = tuple(recipe["crop_size"])
    if args.dataset == "toy":
        say("Toy demo: a small synthetic dataset (written on first use) in the Cityscapes layout, trained")
        say("from scratch. For the real datasets see the README, e.g.")
        say("    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769\n")

    def build_datasets():
        try:
            return [
                data.build_dataset(args.dataset, recipe["data_root"], split, crop_size=crop)
                for split in splits
            ]
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"{args.dataset}: {error}") from None

    splits = ("train", "val")
    # Rank 0 first: it may write the toy dataset, which the others then read.
    train_set, val_set = rank_zero_first(build_datasets, rank, world_size)
    recipe["num_classes"] = train_set.num_classes
    resume_path = newest_checkpoint(work_dir) if args.resume == "latest" else args.resume
    if args.resume == "latest" and resume_path is None:
        raise SystemExit(f"--resume: no iter_*.pth in {work_dir}; pass --resume PATH or start without it")

    # 2. model, optimizer, precision
    torch.manual_seed(args.seed + rank)
    raw_model = gcnet.GCNet(train_set.num_classes, depth=args.depth, align_corners=recipe["align_corners"])
    if recipe["pretrained"] != "none" and not resume_path:
        say(f"loading the ImageNet backbone {recipe['pretrained']}")
        # Rank 0 first: it downloads the file into torch.hub's cache, the others then read it.
        rank_zero_first(lambda: gcnet.load_weights(raw_model, recipe["pretrained"]), rank, world_size)
    if sync_bn:
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    raw_model.to(device)
    if channels_last:
        raw_model.to(memory_format=torch.channels_last)
    # One group, weight decay on everything, BN and biases included (gcnet-spec.md §3.1).
    optimizer = torch.optim.SGD(
        raw_model.parameters(),
        lr=recipe["lr"],
        momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"],
    )
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # loss scaling for fp16 only

    # 3. resume
    start_iteration, best_miou = 0, -1.0
    if resume_path:
        checkpoint = gcnet.read_checkpoint(resume_path)
        for key in ("dataset", "depth", "crop_size", "iters", "global_batch", "lr"):
            if checkpoint["recipe"].get(key) != recipe[key]:
                say(f"WARNING: resuming with {key} = {recipe[key]}, the checkpoint was trained with "
                    f"{checkpoint['recipe'].get(key)}")  # fmt: skip
        gcnet.load_weights(raw_model, resume_path, checkpoint)
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        start_iteration = checkpoint["iteration"]
        best_miou = checkpoint.get("best_miou", -1.0)
        states = checkpoint.get("rng") or []
        if len(states) == world_size:  # same world size: continue every rank's random stream exactly
            torch.set_rng_state(states[rank]["torch"])
            if "cuda" in states[rank] and device.type == "cuda":
                torch.cuda.set_rng_state_all(states[rank]["cuda"])
        say(f"resumed from {resume_path} at iteration {start_iteration}")
    model = raw_model
    if args.compile:
        model = torch.compile(model)
    if world_size > 1:
        # As the original: no buffer broadcast (SyncBN keeps the statistics in step on CUDA).
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    # 4. tell the user what will run
    recipe.update(precision=precision, channels_last=channels_last, sync_bn=sync_bn, device=str(device))
    if rank == 0:
        work_dir.mkdir(parents=True, exist_ok=True)
        say("recipe:\n" + "\n".join(f"  {k:15s} {v}" for k, v in recipe.items()))
        for warning in warn_about_differences(recipe, row, sync_bn, precision):
            say(f"WARNING: {warning}")
    stop = StopRequest()
    log_file = open(work_dir / "log.jsonl", "a") if rank == 0 else None

    def log(record):
        if log_file:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()

    def checkpoint_now(iteration, also_best=False):
        """Every rank takes part (their RNG states are gathered); rank 0 writes."""
        rng = [None] * world_size
        if world_size > 1:
            dist.all_gather_object(rng, rng_states())
        else:
            rng = [rng_states()]
        if rank != 0:
            return None
        path = work_dir / f"iter_{iteration}.pth"
        names = [path] + ([work_dir / "best.pth"] if also_best else [])
        try:
            for name in names:
                save_checkpoint(
                    name, raw_model, optimizer, scaler, iteration, recipe, classes, palette, rng, best_miou
                )
        except RuntimeError as error:
            raise SystemExit(
                f"{error}. Lower --lr or use --precision fp32, then --resume {last_path}"
            ) from None
        prune_checkpoints(work_dir, args.keep)
        return path

    classes, palette = train_set.classes, train_set.palette
    batches = training_batches(train_set, recipe, start_iteration, rank, world_size)
    bar = tqdm(total=recipe["iters"], initial=start_iteration, disable=rank != 0, dynamic_ncols=True)
    nonfinite_in_a_row, last_path, iteration = 0, None, start_iteration
    tick = time.perf_counter()

    # 5. the training loop
    while iteration < recipe["iters"]:
        # 5a. data
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        data_time = time.perf_counter() - tick

        # 5b. learning rate: a pure function of the iteration, so resuming needs nothing else
        lr = poly_lr(iteration, recipe["iters"], recipe["lr"], recipe["min_lr"], recipe["power"])
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 5c. forward and loss (the loss in fp32: the model returns fp32 logits)
        with autocast:
            logits, aux_logits = model(images)
        decode_loss = segmentation_loss(logits, labels)
        aux_loss = segmentation_loss(aux_logits, labels)
        loss = decode_loss + recipe["aux_weight"] * aux_loss

        # 5d. agree across ranks whether the loss is finite and whether to stop
        loss_value = loss.item()
        flags = torch.tensor([loss_value, not math.isfinite(loss_value), stop.requested], device=device)
        if world_size > 1:
            dist.all_reduce(flags)
        mean_loss = flags[0].item() / world_size
        finite, stop_now = flags[1].item() == 0, flags[2].item() > 0

        # 5e. backward and step, or skip a non-finite one
        optimizer.zero_grad(set_to_none=True)
        if finite:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            nonfinite_in_a_row = 0
        else:
            nonfinite_in_a_row += 1
            say(f"\niteration {iteration}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
            log({"iteration": iteration, "event": "nonfinite_loss"})
            if nonfinite_in_a_row >= args.max_nonfinite:
                raise SystemExit(
                    f"stopping: {nonfinite_in_a_row} non-finite losses in a row at iteration {iteration}. "
                    f"Lower --lr (now {recipe['lr']}), try --precision fp32, or check the labels. "
                    f"The last good checkpoint is {last_path or 'not written yet'}."
                )
        iteration += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # honest step times (one sync per step costs little)
        step_time = time.perf_counter() - tick - data_time

        # 5f. progress and log
        if rank == 0 and finite:
            memory = peak_memory_gb(device)
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", data=f"{data_time:.2f}s",
                            step=f"{step_time:.2f}s", mem=f"{memory:.1f}G")  # fmt: skip
            if iteration % args.log_interval == 0 or iteration == recipe["iters"]:
                log(dict(iteration=iteration, loss=mean_loss, decode_loss=decode_loss.item(),
                         aux_loss=aux_loss.item(), lr=lr, data_time=data_time, step_time=step_time,
                         memory_gb=memory))  # fmt: skip
        bar.update(1)

        # 5g. evaluate and checkpoint every tenth of the schedule, at the end, or when asked to stop
        if stop_now:
            last_path = checkpoint_now(iteration)
            say(f"\nstopped by a signal at iteration {iteration}; checkpoint {last_path}")
            say(f"continue with: {' '.join(sys.argv)} --resume")
            break
        if iteration % recipe["eval_interval"] == 0 or iteration == recipe["iters"]:
            last = iteration == recipe["iters"]
            pictures = work_dir / "pictures" if last and pictures_wanted else None
            results = validate(raw_model, val_set, recipe, device, precision, channels_last, rank, pictures)
            if rank == 0:
                say(f"\niteration {iteration}: val mIoU {results['mIoU']:.2f}  mAcc {results['mAcc']:.2f}  "
                    f"aAcc {results['aAcc']:.2f}")  # fmt: skip
                say(evaluate.format_table(results, classes))
                log(
                    dict(
                        iteration=iteration, mIoU=results["mIoU"], mAcc=results["mAcc"], aAcc=results["aAcc"]
                    )
                )
            improved = results["mIoU"] > best_miou
            best_miou = max(best_miou, results["mIoU"])
            last_path = checkpoint_now(iteration, also_best=improved)
        tick = time.perf_counter()
    bar.close()

    # 6. the end: where things are
    if rank == 0 and iteration >= recipe["iters"]:
        say(f"\ndone: {iteration} iterations, best val mIoU {best_miou:.2f}")
        say(f"checkpoints and log.jsonl in {work_dir}")
        if pictures_wanted:
            say(
                f"pictures of the last validation (prediction, overlay, GC attention) in {work_dir / 'pictures'}"
            )
        say(f"evaluate with: python evaluate.py --checkpoint {work_dir / 'best.pth'} --ms-flip")
    if log_file:
        log_file.close()
    if world_size > 1:
        dist.destroy_process_group()
    return best_miou


def build_parser():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="toy", choices=sorted(RECIPES))
    parser.add_argument("--crop", help="crop size, N or HxW: 512x1024 or 769 for Cityscapes, 512 otherwise")
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
    parser.add_argument("--iters", type=int, help="iterations (default: the row's schedule, e.g. 40000)")
    parser.add_argument("--data-root", help="dataset root (default: data/<dataset> as in the original)")
    parser.add_argument("--work-dir", help="default: work_dirs/<config name>")
    parser.add_argument("--batch-size", type=int, help="per GPU/process (default 2 Cityscapes, 4 otherwise)")
    parser.add_argument("--lr", type=float, help="base learning rate (default 0.01)")
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--power", type=float, default=0.9, help="poly power")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--aux-weight", type=float, default=0.4)
    parser.add_argument(
        "--pretrained", help="ImageNet ResNetV1c weights: path, URL or 'none' (default: the URL)"
    )
    parser.add_argument("--workers", type=int, help="data loader workers per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="default: on CUDA, and with bf16 on CPU",
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels, no cudnn.benchmark"
    )
    parser.add_argument("--eval-interval", type=int, help="default: a tenth of the schedule")
    parser.add_argument("--log-interval", type=int, default=50)
    parser.add_argument("--keep", type=int, default=3, help="newest iter_*.pth checkpoints to keep")
    parser.add_argument(
        "--max-nonfinite", type=int, default=5, help="stop after this many bad losses in a row"
    )
    parser.add_argument(
        "--pictures",
        action=argparse.BooleanOptionalAction,
        help="save prediction, overlay and GC-attention pictures of the last validation (default: toy only)",
    )
    parser.add_argument("--resume", nargs="?", const="latest", help="resume the newest checkpoint, or PATH")
    return parser


if __name__ == "__main__":
    main()
