"""Train GCNet with the original mmsegmentation recipe (recipe.py holds every number of it).

The built-in toy demo, on the CPU or one GPU, a few minutes:
    python train.py
A row of the results table, on 4 GPUs of one node (the original setting):
    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769
    torchrun --nproc_per_node=4 train.py --dataset ade20k --depth 101 --iters 160000
One large GPU, the same images per step as the table's 4 x 2 (see the README for more setups):
    python train.py --dataset cityscapes --batch-size 8
Several nodes (on each node):
    torchrun --nnodes=2 --nproc_per_node=2 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 train.py --dataset voc12aug
Resume the newest checkpoint of a run (or --resume PATH); fine-tune from any GCNet checkpoint:
    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769 --resume
    python train.py --dataset folder --data-root data/mine --load-from CHECKPOINT_OR_URL

The recipe: SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter), poly learning rate
(power 0.9, down to 1e-4, per iteration, no warmup), cross-entropy averaged over all pixels,
auxiliary FCN loss weighted 0.4, SyncBN over 4 GPUs, batch 2 (Cityscapes) or 4 (ADE20K, VOC) per
GPU, ImageNet-pretrained ResNetV1c, evaluation and checkpoint every tenth of the schedule.
Read `main` for the whole run; the helpers follow in the order it calls them.
"""

import argparse
import errno
import fcntl
import json
import math
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import evaluate
import model as gcnet
import recipe as table
import runtime

# -----------------------------------------------------------------------------------------------
# The recipe's two formulas


def poly_lr(iteration, max_iters, base_lr=0.01, min_lr=1e-4, power=0.9):
    """Learning rate before iteration `iteration` (0-based): (base - min) (1 - it/max)^power + min."""
    return (base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr


def segmentation_loss(logits, labels, ignore_index=data.IGNORE_INDEX):
    """Cross-entropy summed over the labelled pixels and divided by ALL pixels, ignored ones
    included, as the original (avg_non_ignore=False in mmseg v0.5.0 mmseg/models/losses/
    cross_entropy_loss.py). PyTorch's own mean would divide by the labelled pixels only, which
    weighs padded crops more."""
    logits = logits.float()
    if logits.dim() == 4 and logits.stride(1) == 1:
        # channels_last: each pixel's class scores are adjacent in memory, so the logits are a
        # (pixels, classes) matrix without a copy; softmax along dim 1 would copy them to NCHW.
        logits, labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), labels.reshape(-1)
    total = F.cross_entropy(logits, labels, reduction="sum", ignore_index=ignore_index)
    return total / labels.numel()


# -----------------------------------------------------------------------------------------------
# main: set up, then one visible loop


def main(argv=None):
    args = build_parser().parse_args(argv)
    runtime.keep_freed_memory()

    # 1. processes, device, precision, and the recipe of this run: the table's row plus the flags
    rank, world_size, device, config = set_up(args)
    say = print if rank == 0 else (lambda *a, **k: None)

    # 2. the work dir: one run at a time; stale temporary files of a crashed run are removed
    work_dir = Path(config["work_dir"])
    lock = claim_work_dir(work_dir) if rank == 0 else None
    resume_path = find_resume_checkpoint(args.resume, work_dir)

    # 3. data (rank 0 first: it may write the toy dataset, which the others then read)
    train_set, val_set = rank_zero_first(lambda: build_datasets(args, config, say), rank, world_size)
    config["num_classes"] = train_set.num_classes

    # 4. the model, from ImageNet (the recipe) or --load-from (fine-tuning); SGD; precision
    raw_model = build_model(args, config, train_set.num_classes, resume_path, rank, world_size, say)
    # One group, weight decay on everything, BatchNorm and biases included, as the original.
    optimizer = torch.optim.SGD(
        raw_model.parameters(),
        lr=config["lr"],
        momentum=config["momentum"],
        weight_decay=config["weight_decay"],
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")  # fp16 only

    # 5. resume: weights, optimizer, iteration, best score, random streams
    start_iteration, best_miou, validation_pending = 0, -1.0, False
    if resume_path:
        start_iteration, best_miou, validation_pending = resume(
            resume_path, args.trust_checkpoint, raw_model, optimizer, scaler, config, say
        )
    model = torch.compile(raw_model) if args.compile else raw_model
    if world_size > 1:
        # As the original: no buffer broadcast (SyncBN keeps the statistics in step on CUDA).
        device_ids = [device.index] if device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)

    # 6. tell the user what will run and where it differs from the table
    say("recipe:\n" + "\n".join(f"  {k:15s} {v}" for k, v in config.items()))
    for line in describe_setup(config):
        say(line)
    stop, log = StopRequest(), Log(work_dir / "log.jsonl" if rank == 0 else None)
    restart = restart_command(sys.argv[1:] if argv is None else argv, world_size)
    saver = CheckpointWriter(
        work_dir, raw_model, optimizer, scaler, config, train_set, rank, args.keep, restart
    )
    last_path = resume_path
    if validation_pending:  # the run stopped between a checkpoint and its validation: validate now
        best_miou = validate_and_keep_best(
            raw_model, val_set, config, saver, start_iteration, best_miou, log, say
        )

    # 7. the training loop
    batches = training_batches(train_set, config, start_iteration, rank, world_size)
    bar = tqdm(total=config["iters"], initial=start_iteration, disable=rank != 0, dynamic_ncols=True)
    nonfinite_in_a_row, iteration, tick = 0, start_iteration, time.perf_counter()
    while iteration < config["iters"]:
        # 7a. data
        images, labels = next(batches)
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if config["channels_last"]:
            images = images.contiguous(memory_format=torch.channels_last)
        data_time = time.perf_counter() - tick

        # 7b. learning rate: a pure function of the iteration, so resuming needs nothing else
        lr = poly_lr(iteration, config["iters"], config["lr"], config["min_lr"], config["power"])
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_scope, forward_scope = runtime.training_scopes(device, config["precision"])  # fp32: IEEE
        with step_scope:
            # 7c. forward and loss (in fp32: the model returns fp32 logits)
            with forward_scope:
                logits, aux_logits = model(images)
            decode_loss = segmentation_loss(logits, labels)
            aux_loss = segmentation_loss(aux_logits, labels)
            loss = decode_loss + config["aux_weight"] * aux_loss

            # 7d. agree across ranks whether the loss is finite and whether to stop
            loss_value = loss.item()
            flags = torch.tensor([loss_value, not math.isfinite(loss_value), stop.requested], device=device)
            if world_size > 1:
                dist.all_reduce(flags)
            mean_loss, finite, stop_now = (
                flags[0].item() / world_size,
                flags[1].item() == 0,
                flags[2].item() > 0,
            )

            # 7e. backward and step, or skip a non-finite one
            optimizer.zero_grad(set_to_none=True)
            if finite:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                nonfinite_in_a_row = 0
            else:
                nonfinite_in_a_row += 1
                say(f"\niteration {iteration}: non-finite loss, step skipped ({nonfinite_in_a_row} in a row)")
                log.write({"iteration": iteration, "event": "nonfinite_loss"})
                if nonfinite_in_a_row >= args.max_nonfinite:
                    raise SystemExit(
                        f"stopping: {nonfinite_in_a_row} non-finite losses in a row at iteration {iteration}. "
                        f"Lower --lr (now {config['lr']}), try --precision fp32, or check the labels. "
                        f"The last good checkpoint is {last_path or 'not written yet'}."
                    )
        iteration += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # honest step times (one sync per step costs little)
        step_time = time.perf_counter() - tick - data_time

        # 7f. progress and log
        if rank == 0 and finite:
            memory = runtime.peak_memory_gb(device)
            bar.set_postfix(loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", data=f"{data_time:.2f}s",
                            step=f"{step_time:.2f}s", mem=f"{memory:.1f}G")  # fmt: skip
            if iteration % args.log_interval == 0 or iteration == config["iters"]:
                log.write(dict(iteration=iteration, loss=mean_loss, decode_loss=decode_loss.item(),
                               aux_loss=aux_loss.item(), lr=lr, data_time=data_time, step_time=step_time,
                               memory_gb=memory))  # fmt: skip
        bar.update(1)

        # 7g. checkpoint, then evaluate, every tenth of the schedule and at the end; or stop when asked
        if stop_now:
            last_path = saver.save(iteration, best_miou, last_path)
            say(f"\nstopped by a signal at iteration {iteration}; checkpoint {last_path}")
            say(f"continue with: {restart}")
            break
        if iteration % config["eval_interval"] == 0 or iteration == config["iters"]:
            # The checkpoint comes first, so a failing validation loses no training.
            last_path = saver.save(iteration, best_miou, last_path, validation_pending=True)
            pictures = work_dir / "pictures" if iteration == config["iters"] and config["pictures"] else None
            best_miou = validate_and_keep_best(
                raw_model, val_set, config, saver, iteration, best_miou, log, say, pictures
            )
        tick = time.perf_counter()
    bar.close()

    # 8. the end: where things are
    if iteration >= config["iters"]:
        say(f"\ndone: {iteration} iterations, best val mIoU {best_miou:.2f}")
        say(f"checkpoints and log.jsonl in {work_dir}")
        if config["pictures"]:
            say(
                f"pictures of the last validation (prediction, overlay, GC attention) in {work_dir / 'pictures'}"
            )
        if (work_dir / "best.pth").exists():
            say(f"evaluate with: python evaluate.py --checkpoint {work_dir / 'best.pth'} --ms-flip")
    log.close()
    if world_size > 1:
        dist.destroy_process_group()
    if lock is not None:
        lock.close()
    return best_miou


# -----------------------------------------------------------------------------------------------
# 1. The recipe of this run


def set_up(args):
    """(rank, world_size, device, config): the processes and the device, then the recipe."""
    if args.load_from and args.resume:
        raise SystemExit("train.py: --load-from starts a new run and --resume continues one: pass only one")
    try:
        rank, world_size, device = runtime.setup_device(args.device)
        precision = runtime.resolve_precision(args.precision, device)
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    config = resolve_recipe(args, world_size)
    config.update(
        precision=precision,
        channels_last=runtime.resolve_channels_last(args.channels_last, device, precision),
        sync_bn=device.type == "cuda" and world_size > 1,
        device=str(device),
    )
    torch.backends.cudnn.benchmark = not args.deterministic  # the original trains with it on
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return rank, world_size, device, config


def resolve_recipe(args, world_size):
    """The table's row for (dataset, crop, depth, iters) with the flags that override it: one plain
    dict, printed at start and stored in every checkpoint. An explicit flag always wins, 0 too
    (the parser has refused values outside their range)."""
    try:
        row = table.row(args.dataset, args.crop, args.depth, args.iters)
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in row.items()}
    overrides = dict(batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr, power=args.power,
                     momentum=args.momentum, weight_decay=args.weight_decay, aux_weight=args.aux_weight,
                     eval_interval=args.eval_interval, workers=args.workers, pretrained=args.pretrained)  # fmt: skip
    config.update({key: value for key, value in overrides.items() if value is not None})
    config.update(
        data_root=args.data_root,
        world_size=world_size,
        table_global_batch=row["global_batch"],
        global_batch=config["batch_size"] * world_size,
        seed=args.seed,
        pictures=args.dataset == "toy" if args.pictures is None else args.pictures,
        activation_checkpointing=args.activation_checkpointing,
        reduce_zero_label=args.reduce_zero_label,
        work_dir=args.work_dir or str(Path("work_dirs") / row["config_name"]),
    )
    return config


def describe_setup(config):
    """Which of the README's setups this run is in ("Fewer GPUs, more nodes"), and where it differs
    from the table's recipe, before hours are spent."""
    lines = []
    batch, world, table_batch = config["batch_size"], config["world_size"], config["table_global_batch"]
    if config["dataset"] in table.TABLE_DATASETS:
        setup = f"{world} process(es) x {batch} images = {config['global_batch']} per step"
        if config["global_batch"] != table_batch:
            lines.append(
                f"WARNING: global batch {config['global_batch']} differs from the table's {table_batch} "
                f"({table.ORIGINAL_GPUS} GPUs x {table_batch // table.ORIGINAL_GPUS}): {setup}. Expect other "
                f"numbers; with the linear scaling rule the lr would be {config['lr'] * config['global_batch'] / table_batch:g} "
                "(--lr)."
            )
        elif world == 1:
            lines.append(
                f"setup: one process with the table's {table_batch} images per step; its BatchNorm "
                "statistics cover all of them, as the table's SyncBN over 4 GPUs did."
            )
        elif config["sync_bn"]:
            lines.append(f"setup: {setup} with SyncBN: the table's images per step and BatchNorm statistics.")
    if world > 1 and not config["sync_bn"]:
        lines.append(
            f"WARNING: plain BatchNorm per process (SyncBN needs CUDA): its statistics see {batch} images, "
            f"not {config['global_batch']}."
        )
    if config["dataset"] != "toy" and config["precision"] != "fp32":
        lines.append(
            f"WARNING: {config['precision']} mixed precision; the table's models were trained in fp32."
        )
    return lines


# -----------------------------------------------------------------------------------------------
# 2. The work dir and its checkpoints: one run at a time, atomic writes, exact names

CHECKPOINT_NAME = re.compile(r"iter_(\d+)\.pth")


def claim_work_dir(work_dir):
    """Lock the work dir for this process's lifetime (the OS releases the lock on any exit, a crash
    included) and remove temporary files that a crashed run left. A second run is refused."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = open(work_dir / "run.lock", "a+")  # held open, and locked, until the process ends
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        raise SystemExit(
            f"train.py: {work_dir} is in use by another training run ({holder}). Wait for it to end, stop it "
            "(SIGTERM checkpoints it), or pass another --work-dir."
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    for stale in work_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    return lock


def checkpoints_in(work_dir):
    """iter_<N>.pth files, oldest first; any other name (a copy, a note) is not a checkpoint."""
    found = [
        (int(m.group(1)), p)
        for p in Path(work_dir).glob("iter_*.pth")
        if (m := CHECKPOINT_NAME.fullmatch(p.name))
    ]
    return [path for _, path in sorted(found)]


def find_resume_checkpoint(resume, work_dir):
    if resume is None:
        return None
    if resume != "latest":
        return resume
    found = checkpoints_in(work_dir)
    if not found:
        raise SystemExit(f"--resume: no iter_<N>.pth in {work_dir}; pass --resume PATH or start without it")
    return found[-1]


def save_checkpoint(path, checkpoint):
    """Write `checkpoint` to `path` atomically: a temporary file unique to this writer, then a rename,
    so a crash leaves the old file or the new one, never half. Non-finite weights are never written."""
    path = Path(path)
    bad = [
        k
        for k, v in checkpoint["state_dict"].items()
        if v.is_floating_point() and not torch.isfinite(v).all()
    ]
    if bad:
        raise RuntimeError(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        torch.save(checkpoint, temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)  # no partial file left to fill the disk
        raise


class CheckpointWriter:
    """Writes iter_<N>.pth (and best.pth) on rank 0 after gathering every rank's random state."""

    def __init__(self, work_dir, raw_model, optimizer, scaler, config, train_set, rank, keep, restart):
        self.work_dir, self.raw_model, self.optimizer, self.scaler = (
            Path(work_dir),
            raw_model,
            optimizer,
            scaler,
        )
        self.config, self.rank, self.keep, self.restart = config, rank, keep, restart
        self.meta = {"CLASSES": list(train_set.classes), "PALETTE": [list(c) for c in train_set.palette]}

    def save(self, iteration, best_miou, last_path, validation_pending=False, name=None):
        rng = gather_rng_states()
        if self.rank != 0:
            return None
        path = self.work_dir / (name or f"iter_{iteration}.pth")
        checkpoint = {
            "state_dict": self.raw_model.state_dict(),  # the official layout: no module. / _orig_mod.
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "iteration": iteration,  # finished iterations
            "best_miou": best_miou,
            "validation_pending": validation_pending,  # written before its validation ran
            "rng": rng,  # one entry per rank
            "recipe": self.config,
            "meta": self.meta,
        }
        try:
            save_checkpoint(path, checkpoint)
        except RuntimeError as error:
            again = f"then continue from {last_path} with: {self.restart} {last_path}"
            raise SystemExit(
                f"{error}. Lower --lr or use --precision fp32, {again if last_path else 'then start again'}"
            ) from None
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise SystemExit(disk_full_message(path, checkpoint, last_path, self.restart)) from None
        if name is None:
            for old in checkpoints_in(self.work_dir)[: -self.keep]:
                old.unlink()
        return path


def restart_command(argv, world_size):
    """The command that continues this run: the same flags, --resume instead of --resume/--load-from."""
    kept, skip = [], False
    for word in argv:
        if skip and not word.startswith("--"):
            skip = False
            continue
        skip = word in ("--resume", "--load-from")
        if not skip and not word.startswith(("--resume=", "--load-from=")):
            kept.append(shlex.quote(word))
    launcher = "python train.py" if world_size == 1 else "torchrun --nproc_per_node=N train.py"
    return " ".join([launcher, *kept, "--resume"])


def disk_full_message(path, checkpoint, last_path, restart):
    tensors = [checkpoint["state_dict"].values()] + [
        value.values() for value in checkpoint["optimizer"]["state"].values()
    ]
    needed = sum(t.numel() * t.element_size() for group in tensors for t in group if torch.is_tensor(t))
    free = shutil.disk_usage(path.parent).free
    kept = (
        f"The previous checkpoint {last_path} is intact." if last_path else "No checkpoint was written yet."
    )
    return (
        f"train.py: the disk is full: writing {path} needs about {needed / 1e6:.0f} MB and {path.parent} has "
        f"{free / 1e6:.0f} MB free. The partial file was removed. {kept} Free some space (or pass --keep 1 "
        f"or another --work-dir), then continue with: {restart}"
    )


# -----------------------------------------------------------------------------------------------
# 3. Data: the datasets, seeded batches that resume exactly


def rank_zero_first(function, rank, world_size):
    """Call `function` on rank 0, then on the other ranks: for work that writes shared files."""
    result = function() if rank == 0 else None
    if world_size > 1:
        dist.barrier()
    return result if rank == 0 else function()


def build_datasets(args, config, say):
    if args.dataset == "toy":
        say("Toy demo: a small synthetic dataset (written on first use) in the Cityscapes layout, trained")
        say("from scratch. For the real datasets see the README, e.g.")
        say("    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769\n")
    extra = {"reduce_zero_label": True} if args.reduce_zero_label else {}
    try:
        return [
            data.build_dataset(
                args.dataset, config["data_root"], split, crop_size=config["crop_size"], **extra
            )
            for split in ("train", "val")
        ]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"{args.dataset}: {error}") from None


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


def training_batches(dataset, config, start_iteration, rank, world_size):
    """Yield batches forever from iteration `start_iteration` on; the order is a pure function of
    the seed, so a resumed run sees exactly the batches the uninterrupted one would have."""
    seeded = SeededSamples(dataset, config["seed"])
    batches_per_epoch = len(epoch_batches(len(dataset), config["batch_size"], 0, 0, rank, world_size))
    if batches_per_epoch == 0:
        raise SystemExit(
            f"the {config['dataset']} training split has {len(dataset)} images, fewer than one global batch "
            f"of {config['global_batch']}; lower --batch-size or add images"
        )
    epoch, skip = divmod(start_iteration, batches_per_epoch)
    while True:
        batches = epoch_batches(len(dataset), config["batch_size"], epoch, config["seed"], rank, world_size)
        loader = torch.utils.data.DataLoader(
            seeded,
            batch_sampler=batches[skip:],
            num_workers=config["workers"],
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator(),  # its own, so making a loader leaves the global RNG alone
        )
        yield from loader
        epoch, skip = epoch + 1, 0


# -----------------------------------------------------------------------------------------------
# 4-5. Starting weights: fine-tuning, resuming


def build_model(args, config, num_classes, resume_path, rank, world_size, say):
    """GCNet on the run's device and layout, with the weights a new run starts from (a resumed run
    gets its own weights later)."""
    torch.manual_seed(args.seed + rank)
    raw_model = gcnet.GCNet(num_classes, args.depth, config["align_corners"], args.activation_checkpointing)
    if args.load_from:
        say(load_for_fine_tuning(raw_model, args.load_from, args.trust_checkpoint))
    elif config["pretrained"] != "none" and not resume_path:
        say(f"loading the ImageNet backbone {config['pretrained']}")
        # Rank 0 first: it downloads the file into torch.hub's cache, the others then read it.
        load = lambda: gcnet.load_weights(raw_model, config["pretrained"], trust=args.trust_checkpoint)  # noqa: E731
        rank_zero_first(load, rank, world_size)
    if config["sync_bn"]:
        raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
    layout = torch.channels_last if config["channels_last"] else torch.preserve_format
    return raw_model.to(config["device"], memory_format=layout)


def load_for_fine_tuning(raw_model, source, trust):
    """--load-from: every weight of a GCNet checkpoint (official or ours); with another class count
    the two classifiers start fresh. Returns the line to show."""
    try:
        checkpoint = gcnet.read_checkpoint(source, trust)
        info = evaluate.checkpoint_info(source, checkpoint)
        if info["depth"] != raw_model.depth:
            raise ValueError(
                f"it holds a GCNet R-{info['depth']}-D8 but this run builds R-{raw_model.depth}-D8: pass --depth {info['depth']}"
            )
        kind = gcnet.load_weights(raw_model, source, checkpoint, new_classes=True)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--load-from {source}: {error}") from None
    if kind == "segmentor, new classifiers":
        return (
            f"fine-tuning from {source}: {info['num_classes']} classes there, {raw_model.num_classes} here, so "
            "decode_head.conv_seg and auxiliary_head.conv_seg start fresh; every other weight is loaded"
        )
    return f"fine-tuning from {source}: every weight loaded"


def resume(path, trust, raw_model, optimizer, scaler, config, say):
    """Load a train.py checkpoint into the run; (iteration, best mIoU, validation pending)."""
    checkpoint = read_resume_checkpoint(path, trust)
    for key in ("dataset", "depth", "crop_size", "iters", "global_batch", "lr"):
        if checkpoint["recipe"].get(key) != config[key]:
            say(
                f"WARNING: resuming with {key} = {config[key]}, the checkpoint has {checkpoint['recipe'].get(key)}"
            )
    gcnet.load_weights(raw_model, path, checkpoint)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scaler.load_state_dict(checkpoint["scaler"])
    restore_rng_states(checkpoint.get("rng") or [], torch.device(config["device"]))
    say(f"resumed from {path} at iteration {checkpoint['iteration']}")
    return (
        checkpoint["iteration"],
        checkpoint.get("best_miou", -1.0),
        checkpoint.get("validation_pending", False),
    )


def read_resume_checkpoint(path, trust):
    try:
        checkpoint = gcnet.read_checkpoint(path, trust)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--resume: {error}") from None
    needed = ("state_dict", "optimizer", "scaler", "iteration", "recipe")
    missing = [key for key in needed if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SystemExit(
            f"--resume {path}: not a checkpoint written by train.py (it has no {', '.join(missing)}), so there "
            f"is no run to continue. To start a new run from its weights, use --load-from {path}."
        )
    return checkpoint


def rng_states():
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def gather_rng_states():
    """Every rank's random state, in rank order (every rank must call this)."""
    _, world_size = runtime.rank_and_world_size()
    if world_size == 1:
        return [rng_states()]
    states = [None] * world_size
    dist.all_gather_object(states, rng_states())
    return states


def restore_rng_states(states, device):
    """Continue every rank's random stream exactly, when the world size is the same."""
    rank, world_size = runtime.rank_and_world_size()
    if len(states) == world_size:
        torch.set_rng_state(states[rank]["torch"])
        if "cuda" in states[rank] and device.type == "cuda":
            torch.cuda.set_rng_state_all(states[rank]["cuda"])


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


class Log:
    """log.jsonl, one JSON record a line, appended and flushed (rank 0 only: None elsewhere)."""

    def __init__(self, path):
        self.file = open(path, "a") if path else None

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


# -----------------------------------------------------------------------------------------------
# 7g. Validation, through evaluate.py's functions, and best.pth


def validate(raw_model, val_set, config, rank, save_dir=None):
    """Single-scale val mIoU. It runs in a forked RNG so that validating (its data loader draws a
    seed) leaves the training's random stream exactly as it was: resuming stays exact."""
    device = next(raw_model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return evaluate.evaluate_dataset(
            raw_model,
            val_set,
            mode=config["test_mode"],
            crop_size=tuple(config["test_crop"]),
            stride=tuple(config["test_stride"]),
            flip=False,
            device=device,
            precision=config["precision"],
            channels_last=config["channels_last"],
            save_dir=save_dir,
            show_progress=rank == 0,
            workers=config["workers"],
        )


def validate_and_keep_best(raw_model, val_set, config, saver, iteration, best_miou, log, say, pictures=None):
    """Validate the checkpoint just written; on a new best, write best.pth. The iteration's own
    checkpoint still records the previous best, so a crash before best.pth is complete leaves the
    old best.pth, and the resumed run validates this iteration again (validation_pending)."""
    results = validate(raw_model, val_set, config, saver.rank, pictures)
    say(
        f"\niteration {iteration}: val mIoU {results['mIoU']:.2f}  mAcc {results['mAcc']:.2f}  aAcc {results['aAcc']:.2f}"
    )
    say(evaluate.format_table(results, val_set.classes))
    log.write(dict(iteration=iteration, mIoU=results["mIoU"], mAcc=results["mAcc"], aAcc=results["aAcc"]))
    if results["mIoU"] > best_miou:
        saver.save(iteration, results["mIoU"], None, name="best.pth")
    return max(best_miou, results["mIoU"])


# -----------------------------------------------------------------------------------------------
# The command line


def build_parser():
    positive, at_least_0 = runtime.number_flag(int, 1), runtime.number_flag(int, 0)
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", default="toy", choices=sorted(table.DATASETS))
    parser.add_argument("--crop", help="crop size, N or HxW: 512x1024 or 769 for Cityscapes, 512 otherwise")
    parser.add_argument("--depth", type=int, default=50, choices=(50, 101))
    parser.add_argument("--iters", type=positive, help="iterations (default: the row's schedule, e.g. 40000)")
    parser.add_argument("--data-root", help="dataset root (default: data/<dataset> as in the original)")
    parser.add_argument("--work-dir", help="default: work_dirs/<config name>")
    parser.add_argument(
        "--batch-size", type=positive, help="per GPU/process (default 2 Cityscapes, 4 otherwise)"
    )
    parser.add_argument(
        "--lr", type=runtime.number_flag(float, 0, exclusive=True), help="base lr (default 0.01)"
    )
    parser.add_argument("--min-lr", type=runtime.number_flag(float, 0), help="poly floor (default 1e-4)")
    parser.add_argument(
        "--power", type=runtime.number_flag(float, 0, exclusive=True), help="poly power (0.9)"
    )
    parser.add_argument("--momentum", type=runtime.number_flag(float, 0, 1), help="SGD momentum (0.9)")
    parser.add_argument("--weight-decay", type=runtime.number_flag(float, 0), help="default 5e-4")
    parser.add_argument(
        "--aux-weight", type=runtime.number_flag(float, 0), help="auxiliary loss weight (0.4)"
    )
    parser.add_argument(
        "--pretrained", help="ImageNet ResNetV1c weights: path, URL or 'none' (default: the URL)"
    )
    parser.add_argument(
        "--load-from", help="fine-tune: start a new run from the weights of a GCNet checkpoint or URL"
    )
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoints with full unpickling (runs code in the file: only for files you trust)")  # fmt: skip
    parser.add_argument("--reduce-zero-label", action="store_true",
                        help="folder dataset: label 0 means ignore and classes start at 1 (as ADE20K)")  # fmt: skip
    parser.add_argument("--workers", type=at_least_0, help="data loader workers per process")
    parser.add_argument("--seed", type=at_least_0, default=0)
    runtime.add_arguments(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each backbone block in backward: less memory, slower steps")  # fmt: skip
    parser.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels, no cudnn.benchmark"
    )
    parser.add_argument("--eval-interval", type=positive, help="default: a tenth of the schedule")
    parser.add_argument("--log-interval", type=positive, default=50)
    parser.add_argument("--keep", type=positive, default=3, help="newest iter_*.pth checkpoints to keep")
    parser.add_argument(
        "--max-nonfinite", type=positive, default=5, help="stop after this many bad losses in a row"
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
