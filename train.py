"""Train GCNet with the original mmsegmentation recipe (recipe.py holds every number of it).

The recipe: SGD (lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter), poly learning rate
(power 0.9, down to 1e-4, per iteration, no warmup), cross-entropy averaged over all pixels,
auxiliary FCN loss weighted 0.4, SyncBN over 4 GPUs, batch 2 (Cityscapes) or 4 (ADE20K, VOC) per
GPU, ImageNet-pretrained ResNetV1c, evaluation and checkpoint every tenth of the schedule.
Read `main` for the whole run; the helpers follow under its numbered steps, the recipe (step 0) last.
`python train.py` trains the toy demo in minutes; `--help` shows how to run the rows of the table.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import checkpoints
import data
import evaluate
import model
import recipe
import runtime
from run import Run

# -----------------------------------------------------------------------------------------------
# The recipe's two formulas


def poly_lr(iteration, max_iters, base_lr=0.01, min_lr=1e-4, power=0.9):
    """Learning rate before iteration `iteration` (0-based): (base - min) (1 - it/max)^power + min."""
    return (base_lr - min_lr) * (1 - iteration / max_iters) ** power + min_lr


def segmentation_loss(logits, labels, ignore_index=data.IGNORE_INDEX):
    """Cross-entropy summed over the labelled pixels and divided by ALL pixels, ignored ones
    included, as the original (per-pixel losses, then their mean over all: mmseg v0.5.0 mmseg/models/
    losses/cross_entropy_loss.py). PyTorch's own mean would divide by the labelled pixels only, which
    weighs padded crops more."""
    logits = logits.float()
    if logits.dim() == 4:
        # As a (pixels, classes) matrix: without a copy for channels_last logits, whose class scores are
        # adjacent in memory. The 4-d form would go through nll_loss2d, which sums with atomics on CUDA
        # (no deterministic version: --deterministic refuses it).
        logits, labels = logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1]), labels.reshape(-1)
    # Per-pixel losses (0 where ignored), then one sum: CUDA's reduction="sum" kernel for this shape
    # runs in a single thread block, slow for millions of pixels (docs/benchmarks.md).
    total = F.cross_entropy(logits, labels, reduction="none", ignore_index=ignore_index).sum()
    return total / labels.numel()


# -----------------------------------------------------------------------------------------------
# main: the whole run


def main(argv=None):
    args = build_parser().parse_args(argv)
    device, world_size = set_up_processes(args)  # torchrun, the device, cuDNN's autotuning
    # The recipe of this run: the table's row with the flags that change it, and how this host runs it.
    config = recipe_of_run(args, world_size)
    config.update(host_settings(args, config, device, world_size))  # precision, layout, threads, workers
    argv = sys.argv[1:] if argv is None else argv
    run = Run(config, argv, args.resume, args.trust_checkpoint, args.keep, args.max_nonfinite)
    # The work dir is this run's until the block ends, by whatever way; a bad image checkpoints first.
    with run, run.checkpoint_and_exit_on_a_bad_file():
        # 1. data (rank 0 first: it may write the toy dataset, which the others then read)
        train_set, val_set = runtime.rank_zero_first(lambda: build_datasets(config))
        # recorded: a resume must read the labels alike (label 0 'ignore' by flag, dataset or classes.txt)
        config.update(num_classes=train_set.num_classes, zero_is_ignore=train_set.reduce_zero_label)
        show_recipe(config)

        # 2. the model, from ImageNet weights (the recipe) or a GCNet checkpoint (--load-from); SGD with
        # one group, weight decay on everything, BatchNorm and biases included, as the original
        raw_model = build_model(
            config, train_set.num_classes, args.load_from, args.trust_checkpoint, run.resume_path
        )
        sgd = {key: config[key] for key in ("lr", "momentum", "weight_decay")}
        optimizer = torch.optim.SGD(raw_model.parameters(), **sgd)
        scaler = torch.amp.GradScaler(device.type, enabled=config["precision"] == "fp16")  # fp16 only
        run.new_checkpoint_writer(raw_model, optimizer, scaler, train_set)
        iteration = run.load_resumed_state(raw_model, optimizer, scaler)  # 0, or where --resume continues
        net = compile_and_distribute(raw_model, config, device)  # as the flags say
        if run.validation_pending:  # the run stopped between a checkpoint and its validation
            validate_and_keep_best(raw_model, val_set, config, run, iteration)

        # 3. the training loop
        batches = training_batches(train_set, config, iteration)
        layout = torch.channels_last if config["channels_last"] else torch.preserve_format
        while iteration < config["iters"]:
            tick = time.perf_counter()
            images, labels = next(batches)
            images = images.to(device, non_blocking=True, memory_format=layout)
            labels = labels.to(device, non_blocking=True)
            data_time = time.perf_counter() - tick

            # 3a. the learning rate: a pure function of the iteration, so resuming needs nothing else
            lr = poly_lr(iteration, config["iters"], config["lr"], config["min_lr"], config["power"])
            for group in optimizer.param_groups:
                group["lr"] = lr

            # 3b. forward and loss (the model returns float32 logits, so the loss is float32); the forward
            # pass also moves BatchNorm's running statistics, so they are kept aside for a skipped step
            statistics = [buffer.clone() for buffer in raw_model.buffers()]
            with runtime.autocast(device, config["precision"]):
                logits, aux_logits = net(images)
            decode_loss, aux_loss = segmentation_loss(logits, labels), segmentation_loss(aux_logits, labels)
            loss = decode_loss + config["aux_weight"] * aux_loss

            # 3c. backward and step; every rank skips it when the loss is not finite on one
            optimizer.zero_grad(set_to_none=True)
            finite = run.all_reduce_loss(loss)  # also the mean loss and any rank's stop request
            if finite:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:  # the model as before the step: a non-finite input would poison the statistics for good
                for kept, buffer in zip(statistics, raw_model.buffers()):
                    buffer.copy_(kept)
            iteration += 1
            run.count_nonfinite_losses_or_exit(finite, iteration)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # honest step times (one sync per step costs little)
            step_time = time.perf_counter() - tick - data_time
            values = dict(
                decode_loss=decode_loss, aux_loss=aux_loss, lr=lr, data_time=data_time, step_time=step_time
            )
            run.log_step(iteration, finite, values)  # the progress bar; log.jsonl every --log-interval

            # 3d. checkpoint, then validate, every tenth of the schedule and at the end; or stop when asked
            validating = iteration % config["eval_interval"] == 0 or iteration == config["iters"]
            if run.stop_requested:  # a validation due now runs when the run is resumed
                run.checkpoint_and_stop(iteration, validation_pending=validating)
                break
            if validating:  # the checkpoint comes first, so a failing validation loses no training
                run.checkpoint(iteration, validation_pending=True)
                validate_and_keep_best(raw_model, val_set, config, run, iteration)
        run.draw_log_and_say_where_things_are(iteration)
    return run.best_miou


# -----------------------------------------------------------------------------------------------
# 1. Data: the datasets, seeded batches that resume exactly


def build_datasets(config):
    if config["dataset"] == "toy":
        runtime.say(TOY_DEMO)
    zero_is_ignore = config["reduce_zero_label"] or None  # None: the dataset's own rule
    options = dict(crop_size=config["crop_size"], scale=config["scale"], reduce_zero_label=zero_is_ignore)
    try:
        splits = [
            data.build_dataset(config["dataset"], config["data_root"], split, **options)
            for split in ("train", "val")
        ]
    except (OSError, ValueError) as error:  # a missing or bad file, a toy root that cannot be written
        raise SystemExit(f"train.py: {error}") from None
    check_class_count(splits[0])  # before any step: a checkpoint holds at most 255 classes
    return splits


def training_batches(dataset, config, start_iteration):
    """Yield batches forever from iteration `start_iteration` on; the order is a pure function of
    the seed, so a resumed run sees exactly the batches the uninterrupted one would have. One
    DataLoader serves every epoch: its workers start once, and keep working across epoch ends."""
    rank, world_size = runtime.rank_and_world_size()
    batches_per_epoch = len(epoch_batches(len(dataset), config["batch_size"], 0, 0, rank, world_size))
    check_enough_images(dataset, config, batches_per_epoch)

    class EveryEpoch:  # the loader's batch sampler: this rank's batches, epoch after epoch
        def __iter__(self):
            epoch, skip = divmod(start_iteration, batches_per_epoch)
            while True:
                yield from epoch_batches(
                    len(dataset), config["batch_size"], epoch, config["seed"], rank, world_size
                )[skip:]
                epoch, skip = epoch + 1, 0

    loader = torch.utils.data.DataLoader(
        SeededSamples(dataset, config["seed"]),
        batch_sampler=EveryEpoch(),
        num_workers=config["workers"],
        pin_memory=torch.device(config["device"]).type == "cuda",
        generator=torch.Generator(),  # its own, so making a loader leaves the global RNG alone
        worker_init_fn=runtime.leave_stop_signals_to_the_main_process,  # Ctrl-C checkpoints first
    )
    yield from loader


# -----------------------------------------------------------------------------------------------
# 2. The model and the weights a new run starts from


def build_model(config, num_classes, load_from=None, trust=False, resuming=False):
    """GCNet on the run's device and layout, with the weights a new run starts from: ImageNet (the
    recipe) or a GCNet checkpoint (fine-tuning). A resumed run gets its own weights later."""
    torch.manual_seed(config["seed"] + runtime.rank_and_world_size()[0])
    options = dict(depth=config["depth"], align_corners=config["align_corners"], **config["block"])
    net = model.GCNet(num_classes, activation_checkpointing=config["activation_checkpointing"], **options)
    if load_from:  # rank 0 first, as below: a URL is downloaded once
        runtime.say(runtime.rank_zero_first(lambda: load_for_fine_tuning(net, load_from, trust)))
    elif config["pretrained"] != "none" and not resuming:
        runtime.say(f"loading the ImageNet backbone {config['pretrained']}")
        # Rank 0 first: it downloads the file into torch.hub's cache, the others then read it.
        runtime.rank_zero_first(lambda: load_imagenet(net, config["pretrained"], trust))
    if config["sync_bn"]:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    layout = torch.channels_last if config["channels_last"] else torch.preserve_format
    return net.to(config["device"], memory_format=layout)


# -----------------------------------------------------------------------------------------------
# 3d. Validation, through evaluate.py's functions, and best.pth


def validate(raw_model, val_set, config, save_dir=None):
    """Single-scale val scores (evaluate_dataset's), in a forked RNG: the training's random stream stays."""
    device = next(raw_model.parameters()).device
    if not config["sync_bn"]:  # under torchrun on a CPU: the statistics that the checkpoint holds
        runtime.share_rank_zero_buffers(raw_model)
    net = evaluate.inference_model(raw_model, config)  # BatchNorm folded and the layout, as evaluate.py
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return evaluate.evaluate_dataset(
            net,
            val_set,
            mode=config["test_mode"],
            crop_size=tuple(config["test_crop"]),
            stride=tuple(config["test_stride"]),
            flip=False,
            device=device,
            precision=config["precision"],
            save_dir=save_dir,
            workers=config["workers"],
        )


def validate_and_keep_best(raw_model, val_set, config, run, iteration):
    """Validate the checkpoint just written; the last validation also draws its pictures (--pictures)."""
    start = time.perf_counter()
    results = validate(raw_model, val_set, config, run.pictures if iteration == config["iters"] else None)
    seconds = time.perf_counter() - start
    runtime.say(
        f"\niteration {iteration}: val loss {results['loss']:.4f} (the decode head's, as training's); the scores:"
    )
    runtime.say(evaluate.format_table(results, val_set.classes))  # per class, the means on its last line
    run.log_scores_and_keep_best(iteration, results, seconds)


# -----------------------------------------------------------------------------------------------
# 0. The recipe of this run: a row of the table and the flags that change it


def recipe_of_run(args, world_size):
    """The table's row for (dataset, crop, depth, iters) with the flags that override it: one plain
    dict, printed at start and stored in every checkpoint. An explicit flag always wins, 0 too
    (the parser has refused values outside their range)."""
    try:
        row = recipe.row(args.dataset, args.crop, args.depth, args.iters, block_of_flags(args))
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    config = {key: list(value) if isinstance(value, tuple) else value for key, value in row.items()}
    for key in (
        "batch_size lr min_lr power momentum weight_decay aux_weight eval_interval workers pretrained".split()
    ):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if args.scale is not None:
        config["scale"] = list(args.scale)
    # The original logs every 50 iterations; shorter runs log more often, so that their curves
    # (log.png, tools/plot_log.py) have a hundred points.
    config["log_interval"] = args.log_interval or min(50, max(1, config["iters"] // 100))
    if config["min_lr"] > config["lr"]:
        raise SystemExit(
            f"train.py: --min-lr {config['min_lr']} is above --lr {config['lr']}: the poly schedule would raise "
            "the learning rate. Pass a --min-lr below --lr (the recipe's is 1e-4 under 0.01)."
        )
    root = data.data_root(args.dataset, args.data_root)  # None for folder: refused, with its layout, below
    config.update(
        # The default: the original's (data/cityscapes...). Absolute, so that evaluate.py finds it anywhere.
        data_root=root and os.path.abspath(root),
        world_size=world_size,
        table_global_batch=row["global_batch"],
        global_batch=config["batch_size"] * world_size,
        seed=args.seed,
        pictures=args.dataset == "toy" if args.pictures is None else args.pictures,
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        reduce_zero_label=args.reduce_zero_label,
        work_dir=args.work_dir or str(Path("work_dirs") / row["config_name"]),
    )
    return config


# Below this line: how it runs: the seeded samples and batches of an exact resume, the run's set-up,
# the flags and their checks, fine-tuning's checks, the command line. A first reading can stop here.


TOY_DEMO = """Toy demo: a small synthetic dataset (written on first use) in the Cityscapes layout, trained
from scratch. For the real datasets see the README, e.g.
    torchrun --nproc_per_node=4 train.py --dataset cityscapes --crop 769
"""


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
    """This rank's batches of one epoch: a seeded shuffle cut into global batches, each split across
    ranks, so that a step trains the same images on any number of processes; an incomplete global
    batch is dropped (drop_last=True as the original). Each batch is a list of (epoch, index) keys."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    size, start = batch_size * world_size, rank * batch_size
    return [
        [(epoch, i) for i in order[b * size + start : b * size + start + batch_size]]
        for b in range(num_samples // size)
    ]


def check_class_count(dataset):
    # Labels are 8-bit with 255 for 'ignore'; where label 0 also means 'ignore', class i is stored as i + 1.
    most = checkpoints.MAX_CLASSES - dataset.reduce_zero_label
    if dataset.num_classes > most:
        stored = " as 1..C (label 0 means 'ignore')" if dataset.reduce_zero_label else ""
        raise SystemExit(
            f"train.py: the {dataset.name} dataset at {dataset.root} has {dataset.num_classes} classes; labels "
            f"are 8-bit class indices{stored} with 255 for 'ignore', so a run trains at most {most} classes "
            f"(a checkpoint holds at most {checkpoints.MAX_CLASSES}). Merge classes to at most {most}."
        )


def check_enough_images(dataset, config, batches_per_epoch):
    if batches_per_epoch == 0:
        raise SystemExit(
            f"train.py: the {config['dataset']} training split has {len(dataset)} images, fewer than one global batch "
            f"of {config['global_batch']}; lower --batch-size or add images"
        )


def set_up_processes(args):
    if args.load_from and args.resume:
        raise SystemExit("train.py: --load-from starts a new run and --resume continues one: pass only one")
    if args.reduce_zero_label and args.dataset != "folder":  # on the others it would shift every class
        raise SystemExit(
            f"train.py: --reduce-zero-label is for --dataset folder; {args.dataset}'s labels follow its own "
            "rule (ADE20K's label 0 is 'ignore' already)"
        )
    runtime.keep_freed_memory()
    try:
        _, world_size, device = runtime.setup_device(args.device)
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    torch.backends.cudnn.benchmark = not args.deterministic  # the original trains with it on
    if args.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return device, world_size


def host_settings(args, config, device, world_size):
    (height, width), batch = config["crop_size"], config["batch_size"]
    sync_bn = device.type == "cuda" and world_size > 1  # BatchNorm then sees every process's batch
    if not recipe.batchnorm_can_train((height, width), batch * (world_size if sync_bn else 1)):
        raise SystemExit(
            f"train.py: --crop {height}x{width} at --batch-size {batch} leaves training BatchNorm one value per "
            "channel at 1/8 of the crop; give a crop over 8 pixels on a side, or a batch of 2"
        )
    try:
        precision = runtime.resolve_precision(args.precision, device)
    except ValueError as error:
        raise SystemExit(f"train.py: {error}") from None
    return dict(
        workers=default_workers(config["workers"], device) if args.workers is None else args.workers,
        thread_choice=runtime.set_threads(args.threads, device),
        threads=torch.get_num_threads(),
        precision=precision,
        fold_batchnorm=evaluate.default_fold_batchnorm(precision),  # validation folds as evaluate.py does
        channels_last=runtime.resolve_channels_last(args.channels_last, device, precision),
        sync_bn=sync_bn,
        device=str(device),
    )


def default_workers(recipe_workers, device, cores=None, processes=None):
    """Loader workers per process when --workers is not given. On a GPU: every core this process may use
    but its own, shared among the node's GPU processes, or the recipe's if more. The recipe's 2 per GPU
    fed a batch of 2; one GPU at batch 8 needs several times that. On a CPU the training itself uses the
    cores: the recipe's count, at most this process's share of the cores."""
    cores = cores or runtime.usable_cores()
    processes = processes or runtime.processes_on_this_node()
    if device.type != "cuda":
        return min(recipe_workers, max(1, cores // processes))
    return max(recipe_workers, cores // processes - 1)


def block_of_flags(args):
    """The head's block that --context, --gc-pooling, --gc-fusion ask for (train.py's and benchmark.py's)."""
    if args.context != "gc" and (args.gc_pooling or args.gc_fusion):
        raise ValueError(
            f"--gc-pooling and --gc-fusion switch the GC block, and --context {args.context} has none: drop them"
        )
    pooling = args.gc_pooling or recipe.GC_BLOCK["pooling"]
    return model.check_block(args.context, pooling, args.gc_fusion or recipe.GC_BLOCK["fusion"])


def compile_and_distribute(raw_model, config, device):
    if config["compile"]:
        runtime.say("--compile: the first steps compile the model, which takes a minute or more")
    net = torch.compile(raw_model) if config["compile"] else raw_model
    if config["world_size"] > 1:  # as the original: no buffer broadcast (SyncBN keeps BN in step)
        device_ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=device_ids, **runtime.no_buffer_sync())
    return net


def show_recipe(config):
    runtime.say("recipe:\n" + "\n".join(f"  {k:15s} {v}" for k, v in config.items()))
    for line in describe_setup(config):
        runtime.say(line)


def describe_setup(config):
    """Which of the README's setups ("Fewer GPUs, more nodes") this run is in, and where it differs
    from the table's recipe, said before hours are spent."""
    batch, world, table_batch = config["batch_size"], config["world_size"], config["table_global_batch"]
    images = f"{world} process(es) x {batch} images = {config['global_batch']} per step"
    table_row = config["in_table"]  # the table's warnings are for its rows only
    lines = [runtime.machine_line(config["thread_choice"], config["workers"])]
    if not table_row and config["dataset"] in recipe.TABLE_DATASETS:
        lines.append(f"setup: not a row of the table ({config['config_name']}), so no comparison with it")
    short_side, crop = min(config["scale"]), config["crop_size"]
    if max(crop) > short_side:  # the recipe's crops fit the short side at ratio 1
        lines.append(
            f"WARNING: crops of {crop[0]}x{crop[1]} from images rescaled to a short side of {short_side} "
            f"(times 0.5 to 2) are often partly padding; consider --crop {short_side}"
        )
    table = recipe.row(config["dataset"], tuple(config["crop_size"]), config["depth"], config["iters"])
    changed = [
        key for key in recipe.FLAG_KEYS if config[key] != (list(table[key]) if key == "scale" else table[key])
    ]
    if table_row and changed:
        flags = ", ".join(
            f"--{key.replace('_', '-')} {config[key]} (the table's {table[key]})" for key in changed
        )
        lines.append(f"WARNING: {flags}: not the table's recipe; expect other numbers")
    if table_row and config["global_batch"] != table_batch:
        scaled = table["lr"] * config["global_batch"] / table_batch
        lines.append(
            f"WARNING: global batch {config['global_batch']} differs from the table's {table_batch} "
            f"({images}): expect other numbers; the linear scaling rule would give --lr {scaled:g}"
        )
    elif table_row and (world == 1 or config["sync_bn"]):
        lines.append(
            f"setup: {images}{' with SyncBN' if world > 1 else ''}: the table's images per step, "
            "and BatchNorm statistics over all of them as its SyncBN over 4 GPUs"
        )
    if config["block"]["context"] == "nonlocal":  # an (h/8 w/8) x (h/8 w/8) matrix per image, formed whole
        positions = -(-crop[0] // 8) * -(-crop[1] // 8)
        lines.append(
            f"Non-local block: each attention matrix at crop {crop[0]}x{crop[1]}, batch {batch} is "
            f"{batch * positions**2 * 4 / 1024**3:.2f} GB ({batch} x {positions} x {positions} positions, "
            "float32); a training step holds about three at its peak, beside the rest"
        )
    if world > 1 and not config["sync_bn"]:
        lines.append(
            f"WARNING: plain BatchNorm per process (SyncBN needs CUDA): its statistics see {batch} "
            f"images, not {config['global_batch']}"
        )
    lines.append(
        "the first step is the slowest (loader workers start, kernels are chosen); a progress bar follows"
    )
    if table_row and config["precision"] != "fp32":
        lines.append(
            f"WARNING: {config['precision']} mixed precision; the table's models were trained in fp32"
        )
    return lines


def load_imagenet(net, source, trust):
    try:
        checkpoint = checkpoints.read_checkpoint(source, trust)
        if any(key.startswith("backbone.") for key in checkpoints.extract_state_dict(checkpoint)):
            raise ValueError(
                f"{source} is a whole GCNet checkpoint, not an ImageNet backbone: pass it with --load-from "
                "to start from all its weights"
            )
        return checkpoints.load_checkpoint(net, source, checkpoint)
    except checkpoints.DownloadFailed as error:
        raise SystemExit(
            f"--pretrained: {error}\nOr train without ImageNet weights with --pretrained none: that is not the "
            "table's recipe (its models start from ImageNet) and gives far lower scores."
        ) from None
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--pretrained: {error}") from None


def load_for_fine_tuning(raw_model, source, trust):
    """--load-from: every weight of a GCNet checkpoint (official or ours); with another class count
    the two classifiers start fresh. Returns the line to show."""
    try:
        checkpoint = checkpoints.read_checkpoint(source, trust)
        info = checkpoints.checkpoint_info(source, checkpoint)
        if info["depth"] != raw_model.depth:
            raise ValueError(
                f"it holds a GCNet R-{info['depth']}-D8 but this run builds R-{raw_model.depth}-D8: pass --depth {info['depth']}"
            )
        if info["block"] != raw_model.head_block:
            raise ValueError(
                f"it holds a {recipe.method_name(info['block'])} model but this run builds a "
                f"{recipe.method_name(raw_model.head_block)} one: pass {recipe.block_flags(info['block'])}"
            )
        kind = checkpoints.load_checkpoint(raw_model, source, checkpoint, new_classes=True)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--load-from {source}: {error}") from None
    if kind == "segmentor, new classifiers":
        return (
            f"fine-tuning from {source}: {info['num_classes']} classes there, {raw_model.num_classes} here, so "
            "decode_head.conv_seg and auxiliary_head.conv_seg start fresh; every other weight is loaded"
        )
    return f"fine-tuning from {source}: every weight loaded"


USAGE = """examples:
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
outputs, in --work-dir: iter_<N>.pth and best.pth; log.jsonl (training loss, lr and times every
  --log-interval; validation loss, mIoU, mAcc, aAcc, mF1 at each validation); log.png (drawn at the end,
  or any time with python tools/plot_log.py WORK_DIR); pictures/ with --pictures.
"""


def build_parser():
    positive = runtime.number_flag(int, 1)
    above_0, at_least_0_float = runtime.number_flag(float, 0, exclusive=True), runtime.number_flag(float, 0)
    # allow_abbrev=False: --iter is refused, not taken for --iters.
    parser = argparse.ArgumentParser(
        description=__doc__,
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    # The row of the table; every unset flag below takes its value from it (recipe.row).
    add("--dataset", default="toy", choices=sorted(recipe.DATASETS), help="default: toy, the demo")
    add(
        "--crop",
        type=runtime.size_flag("--crop"),
        help="crop, N or HxW (default: the dataset's first: 512x1024 Cityscapes (or 769), 512 ADE20K, VOC "
        "and folder, 128 toy); an 8k+1 height (257, 513, 769) validates with sliding windows, align_corners=True",
    )
    add("--depth", type=int, default=50, choices=(50, 101), help="ResNet depth (default 50)")
    add(
        "--context",
        default="gc",
        choices=model.CONTEXTS,
        help="the block between the decode head's convs: gc "
        "(GCNet, default), nonlocal or none (the original's NonLocal and FCN models; README: the paper's argument)",
    )
    add(
        "--gc-pooling", choices=model.POOLINGS, help="the GC block's pooling: att (attention, default) or avg"
    )
    add(
        "--gc-fusion",
        choices=model.FUSIONS,
        help="the GC block's fusion: add (default), mul (a sigmoid gate per "
        "channel) or both; --gc-pooling avg --gc-fusion mul is the squeeze-excitation-like block",
    )
    add("--iters", type=positive, help="iterations (default: the row's schedule, e.g. 40000; toy 300)")
    add("--batch-size", type=positive, help="per GPU/process (default 2 Cityscapes, 4 otherwise)")
    add("--lr", type=above_0, help="base learning rate (default 0.01; toy 0.05)")
    add("--min-lr", type=at_least_0_float, help="poly floor (default 1e-4)")
    add("--power", type=above_0, help="poly power (default 0.9)")
    add("--momentum", type=runtime.number_flag(float, 0, 1), help="SGD momentum (default 0.9)")
    add("--weight-decay", type=at_least_0_float, help="default 5e-4")
    add("--aux-weight", type=at_least_0_float, help="auxiliary loss weight (default 0.4)")
    add(
        "--eval-interval",
        type=positive,
        help="validate and checkpoint every N iterations (default: a tenth of --iters, at least 20)",
    )
    add(
        "--workers",
        type=runtime.per_core_flag(0),
        help="data loader workers per process (default: the recipe's 2 or 4, "
        "at most the cores per process on a CPU; on a GPU the cores per GPU process less one if more)",
    )
    # Data, weights and files.
    add("--data-root", help="dataset root (default: the original's, e.g. data/cityscapes; see README)")
    add(
        "--scale",
        type=runtime.size_flag("--scale", recipe.parse_scale),
        help="rescale images to fit: N (short side N, long side up to 4N) or "
        "LONGxSHORT (default: the dataset's: 2048x1024 Cityscapes, 2048x512 ADE20K, VOC and folder, 256x128 toy)",
    )
    add("--reduce-zero-label", action="store_true", help="folder dataset: label 0 = ignore, classes from 1")
    add(
        "--pretrained",
        type=runtime.named,
        help="ImageNet ResNetV1c weights: path, URL or 'none' (default: the URL)",
    )
    add(
        "--load-from",
        type=runtime.named,
        help="fine-tune: a new run from the weights of a GCNet checkpoint (file or URL)",
    )
    add(
        "--resume",
        nargs="?",
        const="latest",
        type=runtime.named,
        help="continue the newest iter_<N>.pth of the work dir, or PATH",
    )
    add("--trust-checkpoint", action="store_true", help="unpickle checkpoints fully: runs code in them")
    add("--work-dir", help="where the run's files go (default: work_dirs/<config name>)")
    add("--keep", type=positive, default=3, help="newest iter_<N>.pth checkpoints to keep")
    add(
        "--log-interval",
        type=positive,
        help="iterations between log.jsonl records (default 50, or a hundredth "
        "of --iters if less: 3 for the toy)",
    )
    add(
        "--pictures",
        action=argparse.BooleanOptionalAction,
        help="pictures of the last validation in "
        "<work dir>/pictures: per image as evaluate.py --save-dir writes them, and confusion.png (default: toy)",
    )
    # How it runs.
    runtime.add_arguments(parser)
    add("--compile", action=argparse.BooleanOptionalAction, default=False, help="torch.compile the model")
    add("--activation-checkpointing", action="store_true", help="recompute backbone blocks: less memory")
    add("--deterministic", action="store_true", help="deterministic kernels, no cudnn.benchmark")
    add("--seed", type=runtime.number_flag(int, 0, 2**32 - 1), default=0, help="default 0")
    add("--max-nonfinite", type=positive, default=5, help="stop after this many bad losses in a row")
    return parser


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # a Ctrl-C before the run's own handler is in place (data, model, download)
        raise SystemExit("\ntrain.py: stopped by Ctrl-C before training started") from None
