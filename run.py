"""A training run's machinery, for train.main: its work dir, safe from crashes, full disks and second
runs; its checkpoints; resuming; stop signals; its log. Nothing here is part of the recipe.

The rules:
- one run per work dir: a lock held until the run ends (the OS releases it on any exit, a crash too);
- every file is written through runtime.written_atomically: a crash leaves the old file or the new one;
- only names that are exactly iter_<N>.pth are checkpoints; a checkpoint never holds NaN weights;
- a checkpoint holds everything an exact resume needs: weights, optimizer, loss scaler, iteration,
  best score, every rank's random state, the recipe, and the classes and palette.
"""

import contextlib
import errno
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoints
import data
import pictures
import recipe
import runtime


class Run:
    """The machinery of one training run. No callbacks: train.main calls these methods where its loop
    needs them. Leaving the `with` block by any way (the end, a stop signal, too many non-finite losses,
    a failing validation, an error) closes the log and the bar, puts the signal handlers and float32
    settings back, ends the process group and releases the work dir."""

    def __init__(self, config, argv, resume=None, trust=False, keep=3, max_nonfinite=5):
        self.config, self.work_dir = config, Path(config["work_dir"])
        self.rank, self.world_size = runtime.rank_and_world_size()
        self.resume_flag, self.trust, self.keep, self.max_nonfinite = resume, trust, keep, max_nonfinite
        self.restart, self.start_again = restart_commands(argv, self.world_size)
        self.best_miou, self.validation_pending, self.last_path, self.start = -1.0, False, None, 0
        self.iteration = self.saved_iteration = 0  # steps done, and of them in the last checkpoint
        self.nonfinite_in_a_row, self.mean_loss, self.stop_requested = 0, math.nan, False
        self.writer = self.bar = self.resume_path = None
        self.pictures = self.work_dir / "pictures" if config["pictures"] else None  # of the last validation
        self.cleanup = contextlib.ExitStack()

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # if this fails halfway, what it did is undone
            if self.world_size > 1:
                stack.callback(dist.destroy_process_group)
            if self.rank == 0:
                stack.enter_context(claim_work_dir(self.work_dir))  # the lock file, held until the end
            self.resume_path = find_resume_checkpoint(self.resume_flag, self.work_dir)
            # A new run, or one resumed from a checkpoint kept elsewhere, changes nothing of an earlier run.
            if self.resume_path is None or Path(self.resume_path).resolve().parent != self.work_dir.resolve():
                refuse_an_earlier_run(self.work_dir)
            stack.enter_context(runtime.training_float32(self.config["precision"]))
            self.stop = StopRequest(self.how_to_continue)
            stack.callback(self.stop.restore)
            self.log = stack.enter_context(Log(self.work_dir / "log.jsonl" if self.rank == 0 else None))
            self.cleanup = stack.pop_all()
        return self

    def __exit__(self, kind, exception, traceback):
        self.cleanup.close()

    @contextlib.contextmanager
    def checkpoint_and_exit_on_a_bad_file(self):
        """A training or validation file that cannot be used (data.FileProblem): checkpoint the steps
        done (one process: under torchrun the other ranks are not here to gather their random states),
        name the file, say how to continue, and exit."""
        try:
            yield
        except data.FileProblem as problem:
            if self.world_size == 1 and self.writer is not None and self.iteration > self.saved_iteration:
                self.checkpoint(self.iteration)
            saved = f"checkpoint {self.last_path}" if self.last_path else "no checkpoint yet"
            raise SystemExit(
                f"train.py: {problem}\nStopped at iteration {self.iteration} ({saved}). Mend or remove the file, "
                f"then {self.how_to_continue()}"
            ) from None

    def how_to_continue(self):
        """The command that continues this run from its last checkpoint: a bare --resume once this process
        has written one (last_checkpoint names it), else --resume with the checkpoint it resumed from; or,
        before any checkpoint, the command as given."""
        if self.last_path is None:
            return f"start again with: {self.start_again}"
        path = f" {shlex.quote(str(self.last_path))}" if self.last_path == self.resume_path else ""
        return f"continue with: {self.restart}{path}"

    def new_checkpoint_writer(self, raw_model, optimizer, scaler, train_set):
        meta = {"CLASSES": list(train_set.classes), "PALETTE": [list(c) for c in train_set.palette]}
        self.writer = CheckpointWriter(
            self.work_dir, raw_model, optimizer, scaler, self.config, meta, self.keep, self.how_to_continue
        )

    def load_resumed_state(self, raw_model, optimizer, scaler):
        """With --resume, load everything back; returns the iteration to start at (0 for a new run), which
        log.jsonl records: the records after it that an earlier run left are not this run's."""
        if not self.resume_path:
            self.log.write(dict(iteration=0, event="start"))
            return 0
        path = self.resume_path  # a URL is downloaded by rank 0, then read from its copy by the others
        checkpoint = runtime.rank_zero_first(lambda: read_resume_checkpoint(path, self.trust))
        theirs = checkpoint["recipe"]
        for key in ("dataset", "depth"):  # another model: the command lacks a flag
            if theirs.get(key) != self.config[key]:
                raise SystemExit(
                    f"--resume {path}: that run has --{key} {theirs.get(key)}, this command --{key} "
                    f"{self.config[key]}. Pass --{key} {theirs.get(key)} to continue it (or --load-from "
                    f"{path} to start a new run from its weights, in another --work-dir)."
                )
        # The label rule in effect (the flag, ADE20K's own, or classes.txt's `label0: ignore`); a checkpoint
        # from before it was recorded has the flag alone.
        rules = [theirs.get("zero_is_ignore"), self.config["zero_is_ignore"]]
        if rules[0] is None:
            rules = [bool(theirs.get("reduce_zero_label")), self.config["reduce_zero_label"]]
        if rules[0] != rules[1]:
            that_run, this_one = ("as 'ignore' (classes 1..C)" if rule else "as a class" for rule in rules)
            raise SystemExit(
                f"--resume {path}: that run read label 0 {that_run}, this command reads it {this_one}: every "
                "class would shift by one. Read the labels as that run did (--reduce-zero-label, or the line "
                "`label0: ignore` in a folder dataset's classes.txt) to continue it."
            )
        block = dict(recipe.GC_BLOCK, **theirs.get("block", {}))
        if block != self.config["block"]:
            raise SystemExit(
                f"--resume {path}: that run trains a {recipe.method_name(block)} model, this command a "
                f"{recipe.method_name(self.config['block'])} one. Pass {recipe.block_flags(block)} to continue it."
            )
        # The run goes on with the new values, not exactly as it was: another process count at the same
        # global batch trains the same images, but with other random states and BatchNorm batches.
        warned = ("crop_size", "iters", "global_batch", "world_size", "precision", "seed") + recipe.FLAG_KEYS
        for key in warned:
            if theirs.get(key) != self.config[key]:
                runtime.say(
                    f"WARNING: resuming with {key} = {self.config[key]}, the checkpoint has {theirs.get(key)}"
                )
        try:
            checkpoints.load_checkpoint(raw_model, path, checkpoint)
        except ValueError as error:
            raise SystemExit(f"--resume: {error}") from None
        optimizer.load_state_dict(checkpoint["optimizer"])  # that run's momentum and decay: this one's win
        for group in optimizer.param_groups:
            group.update(momentum=self.config["momentum"], weight_decay=self.config["weight_decay"])
        if checkpoint["scaler"]:  # empty where that run had no fp16 loss scaling
            scaler.load_state_dict(checkpoint["scaler"])
        states = checkpoint.get("rng") or []
        if len(states) == self.world_size:
            torch.set_rng_state(states[self.rank]["torch"])
            if "cuda" in states[self.rank] and torch.device(self.config["device"]).type == "cuda":
                # (one state per GPU the writer saw; a host that shows fewer takes the first ones)
                torch.cuda.set_rng_state_all(states[self.rank]["cuda"][: torch.cuda.device_count()])
        runtime.say(f"resumed from {path} at iteration {checkpoint['iteration']}")
        if self.rank == 0 and Path(path).parent.resolve() == self.work_dir.resolve():
            # A bare --resume after a crash before the next checkpoint continues from here, not from the
            # higher-numbered files of the branch that this one abandons.
            runtime.write_text(self.work_dir / LAST_CHECKPOINT, Path(path).name)
        self.start, self.last_path = checkpoint["iteration"], path
        self.iteration = self.saved_iteration = self.start
        # best.pth may hold a later validation than this checkpoint knows of (--resume PATH of an earlier
        # iter_<N>.pth): it is replaced only by a better score. A work dir without one (--resume PATH of
        # another run's file) gets one at the first validation.
        recorded = checkpoint.get("best_miou", -1.0) if (self.work_dir / "best.pth").exists() else -1.0
        self.best_miou = max(recorded, best_score_in(self.work_dir))
        pending = checkpoint.get("validation_pending", False)  # and it may have ended since
        self.validation_pending = pending and not validation_logged(self.work_dir / "log.jsonl", self.start)
        self.log.write(dict(iteration=self.start, event="start"))
        return self.start

    def all_reduce_loss(self, loss):
        """One all-reduce per step, so that all ranks step, skip or stop together: the mean loss
        (self.mean_loss), whether any rank asked to stop (self.stop_requested), and whether the loss is
        finite on every rank, which it returns."""
        value, self.stop.training = loss.item(), True  # a stop from now on keeps the steps done
        flags = torch.tensor([value, not math.isfinite(value), self.stop.requested], device=loss.device)
        if self.world_size > 1:
            dist.all_reduce(flags)
        self.mean_loss, self.stop_requested = flags[0].item() / self.world_size, flags[2].item() > 0
        return flags[1].item() == 0

    def count_nonfinite_losses_or_exit(self, finite, iteration):
        self.nonfinite_in_a_row = 0 if finite else self.nonfinite_in_a_row + 1
        if finite:
            return
        runtime.say(
            f"\niteration {iteration}: non-finite loss, step skipped ({self.nonfinite_in_a_row} in a row)"
        )
        self.log.write({"iteration": iteration, "event": "nonfinite_loss"})
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise SystemExit(
                f"stopping: {self.nonfinite_in_a_row} non-finite losses in a row at iteration {iteration}. "
                f"{divergence_advice(self.config)}, or check the labels and images. "
                f"The last good checkpoint is {self.last_path or 'not written yet'}."
            )

    def log_step(self, iteration, finite, values):
        """`iteration` counts the finished steps; `values` are the last one's losses, lr and times."""
        self.iteration = iteration
        if self.bar is None:
            bar = tqdm(
                total=self.config["iters"], initial=self.start, disable=self.rank != 0, dynamic_ncols=True
            )
            self.bar = self.cleanup.enter_context(bar)
        logged = iteration % self.config["log_interval"] == 0 or iteration == self.config["iters"]
        if finite and logged and self.world_size > 1:  # the heads' losses as `loss`: means over the ranks
            heads = torch.stack([values["decode_loss"].detach(), values["aux_loss"].detach()])
            dist.all_reduce(heads)  # (as mmseg v0.5.0 mmseg/models/segmentors/base.py _parse_losses does)
            values = dict(values, decode_loss=heads[0] / self.world_size, aux_loss=heads[1] / self.world_size)
        if self.rank == 0 and finite:
            memory = runtime.peak_memory_gb(torch.device(self.config["device"]))
            self.bar.set_postfix(
                loss=f"{self.mean_loss:.3f}",
                lr=f"{values['lr']:.2e}",
                data=f"{values['data_time']:.2f}s",
                step=f"{values['step_time']:.2f}s",
                mem=f"{memory:.1f}G",
            )
            if logged:
                numbers = {
                    key: value.item() if torch.is_tensor(value) else value for key, value in values.items()
                }
                self.log.write(dict(iteration=iteration, loss=self.mean_loss, **numbers, memory_gb=memory))
        self.bar.update(1)

    def checkpoint(self, iteration, validation_pending=False):
        """iter_<N>.pth after `iteration` finished steps; validation_pending when a validation follows."""
        self.last_path = self.writer.save(iteration, self.best_miou, self.last_path, validation_pending)
        self.saved_iteration, self.validation_pending = iteration, validation_pending

    def checkpoint_and_stop(self, iteration, validation_pending):
        self.checkpoint(iteration, validation_pending)
        runtime.say(f"\nstopped by a signal at iteration {iteration}; checkpoint {self.last_path}")
        runtime.say(self.how_to_continue())

    def log_scores_and_keep_best(self, iteration, results, seconds):
        """The iteration's own checkpoint still records the previous best, so a crash before best.pth is
        complete leaves the old best.pth, and the resumed run validates this iteration again."""
        if results["mIoU"] > self.best_miou:
            settings = checkpoints.validation_settings(self.config)
            validation = dict(settings, iteration=iteration, mIoU=results["mIoU"])
            self.writer.save(
                iteration, results["mIoU"], self.last_path, name="best.pth", validation=validation
            )
        self.best_miou = max(self.best_miou, results["mIoU"])
        # After best.pth: a resume takes the record as the sign that the validation ended.
        scores = {key: results[key] for key in ("mIoU", "mAcc", "aAcc", "mF1")}
        self.log.write(dict(iteration=iteration, **scores, val_loss=results["loss"], val_seconds=seconds))
        self.validation_pending = False

    def draw_log_and_say_where_things_are(self, iteration):
        if iteration < self.config["iters"] or self.validation_pending:  # stopped before the end
            return
        runtime.say(
            f"\ndone: {iteration} iterations, best val mIoU {self.best_miou:.2f}; checkpoints and log in {self.work_dir}"
        )
        if self.rank == 0:
            records, _ = read_log(self.work_dir / "log.jsonl")
            pictures.save_picture(
                pictures.log_picture(records, self.config["config_name"]), self.work_dir / "log.png"
            )
            runtime.say(f"the losses, learning rate and validation mIoU: {self.work_dir / 'log.png'}")
        if self.pictures:
            maps = "" if self.config["block"]["context"] == "none" else "attention, "  # FCN: no block, no map
            runtime.say(
                f"pictures of the last validation (labels, overlay, {maps}and all three beside the ground truth in <name>_composite.png; the confusion matrix in confusion.png) in {self.pictures}"
            )
        if (self.work_dir / "best.pth").exists():
            runtime.say(
                f"evaluate with: python evaluate.py --checkpoint {self.work_dir / 'best.pth'} --ms-flip"
            )


# -----------------------------------------------------------------------------------------------
# The work dir of a run


CHECKPOINT_NAME = re.compile(r"iter_(0|[1-9]\d*)\.pth")  # iter_04.pth is a copy, not checkpoint 4
# Names the newest iter_<N>.pth this work dir's run wrote, or the file it resumed from since (best.pth...)
LAST_CHECKPOINT = "last_checkpoint"


def claim_work_dir(work_dir):
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        lock = runtime.hold_lock(work_dir / "run.lock")
    except OSError as error:  # a file in the way, a read-only disk, no permission
        raise SystemExit(
            f"train.py: cannot use --work-dir {work_dir}: {error.strerror or error} ({error.filename}). "
            "Pass a --work-dir in a folder you can write to."
        ) from None
    except runtime.Taken as holder:
        raise SystemExit(
            f"train.py: {work_dir} is in use by another training run ({holder}). Wait for it to end, stop it "
            "(SIGTERM checkpoints it), or pass another --work-dir."
        ) from None
    # Left by a killed run: its own files' temporaries (other tools may write elsewhere in the folder)
    for stale in runtime.temporaries_in(work_dir) + runtime.temporaries_in(work_dir / "pictures", True):
        stale.unlink(missing_ok=True)
    return lock


def checkpoints_in(work_dir):
    """iter_<N>.pth files, oldest first; any other name (a copy, a note) is not a checkpoint."""
    found = [path for path in Path(work_dir).glob("iter_*.pth") if CHECKPOINT_NAME.fullmatch(path.name)]
    return sorted(found, key=checkpoint_number)


def checkpoint_number(path):
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name).group(1))


def refuse_an_earlier_run(work_dir):
    """A run without --resume starts only in a work dir that holds no checkpoints: it would overwrite
    the earlier run's best.pth and mix its iter_<N>.pth with the earlier ones."""
    found = checkpoints_in(work_dir) + [path for path in [Path(work_dir) / "best.pth"] if path.is_file()]
    if found:
        names = ", ".join(path.name for path in found[-3:])
        raise SystemExit(
            f"train.py: {work_dir} holds the checkpoints of an earlier run ({names}). Continue that run "
            "with --resume; or start a new run in another --work-dir (the earlier run stays as it is); "
            "or move or delete that folder first."
        )


def best_score_in(work_dir):
    """The validation mIoU that best.pth in `work_dir` records, or -1 when there is none (or it is unreadable:
    then the run's own record decides, as before best.pth existed)."""
    path = Path(work_dir) / "best.pth"
    try:
        validation = checkpoints.read_checkpoint(path).get("validation") if path.is_file() else None
    except (ValueError, OSError):
        validation = None
    return float(validation["mIoU"]) if isinstance(validation, dict) and "mIoU" in validation else -1.0


def find_resume_checkpoint(resume, work_dir):
    """--resume PATH, or for a bare --resume the newest checkpoint this work dir's run wrote: the one
    last_checkpoint names (a run resumed from an earlier iter_<N>.pth writes lower numbers than the
    abandoned ones beside them), else the highest iter_<N>.pth."""
    if resume is None:
        return None
    if resume != "latest":
        return resume
    # A name only, never a path: a hand-edited or damaged pointer can neither leave the work dir nor stop
    # the resume (the highest number is taken instead).
    pointer = Path(work_dir) / LAST_CHECKPOINT
    name = pointer.read_bytes().decode(errors="replace").strip() if pointer.is_file() else ""
    if name and name == Path(name).name and name.endswith(".pth") and (Path(work_dir) / name).is_file():
        return Path(work_dir) / name
    found = checkpoints_in(work_dir)
    if not found:
        raise SystemExit(f"--resume: no iter_<N>.pth in {work_dir}; pass --resume PATH or start without it")
    return found[-1]


def divergence_advice(config):
    """What to try when training diverges: a lower --lr, and fp32 when the run is not in it."""
    fp32 = "" if config["precision"] == "fp32" else ", or try --precision fp32"
    return f"Lower --lr (now {config['lr']}){fp32}"


def restart_commands(argv, world_size):
    """(the command that continues this run: the same flags, --resume instead of --resume/--load-from;
    the command that starts it again: the same flags)."""
    kept, skip = [], False
    for word in argv:
        if skip and not word.startswith("--"):
            skip = False
            continue
        skip = word in ("--resume", "--load-from")
        if not skip and not word.startswith(("--resume=", "--load-from=")):
            kept.append(shlex.quote(word))
    launcher = "python train.py" if world_size == 1 else "torchrun --nproc_per_node=N train.py"
    return " ".join([launcher, *kept, "--resume"]), " ".join([launcher, *map(shlex.quote, argv)])


# -----------------------------------------------------------------------------------------------
# Writing checkpoints


class NonFiniteWeights(RuntimeError):
    """The weights to be saved hold NaN or inf: the training diverged."""


def save_checkpoint(path, checkpoint):
    state_dict = checkpoint["state_dict"]
    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteWeights(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    with runtime.written_atomically(path) as temporary:
        torch.save(checkpoint, temporary)


class CheckpointWriter:
    """Writes iter_<N>.pth (and best.pth) on rank 0 after gathering every rank's random state; keeps
    the newest `keep` iter_<N>.pth. `meta` holds the classes and palette, as the official files do."""

    def __init__(self, work_dir, raw_model, optimizer, scaler, config, meta, keep, how_to_continue):
        self.work_dir, self.raw_model, self.optimizer = Path(work_dir), raw_model, optimizer
        self.scaler, self.config, self.meta, self.keep = scaler, config, meta, keep
        self.how_to_continue = how_to_continue  # a function: the command that continues the run, in words
        self.rank = runtime.rank_and_world_size()[0]

    def save(self, iteration, best_miou, last_path, validation_pending=False, name=None, validation=None):
        rng = gather_rng_states()
        path = self.work_dir / (name or f"iter_{iteration}.pth")
        if self.rank != 0:  # rank 0 writes it; the others know its name, to say how to continue
            return path
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
        if validation:  # best.pth: the settings and score of its validation, which evaluate.py compares with
            checkpoint["validation"] = validation
        try:
            save_checkpoint(path, checkpoint)
        except NonFiniteWeights as error:
            raise SystemExit(
                f"{error}. {divergence_advice(self.config)}, then {self.how_to_continue()}"
            ) from None
        except (OSError, RuntimeError) as error:
            if not disk_is_full(error, path, checkpoint):
                raise
            needed, free = checkpoint_bytes(checkpoint), shutil.disk_usage(path.parent).free
            kept, older = "No checkpoint was written yet.", ""
            if last_path:  # --keep removes older ones only after a write: they must go by hand
                kept = f"The previous checkpoint {last_path} is intact."
                older = (
                    f"; iter_<N>.pth older than {Path(last_path).name} may go, and --keep 1 keeps one "
                    "from then on"
                )
            raise SystemExit(
                f"train.py: the disk is full: writing {path} needs about {needed / 1e6:.0f} MB and "
                f"{path.parent} has {free / 1e6:.0f} MB free. The partial file was removed. {kept} Free some "
                f"space{older}, then {self.how_to_continue()}"
            ) from None
        if name is None:
            runtime.write_text(self.work_dir / LAST_CHECKPOINT, path.name)
            # Only earlier checkpoints of this run go: never the one just written, and never higher
            # numbers, which a run resumed from an earlier checkpoint left beside it.
            earlier = [old for old in checkpoints_in(self.work_dir) if checkpoint_number(old) < iteration]
            for old in earlier[: max(0, len(earlier) - (self.keep - 1))]:
                old.unlink()
        return path


def checkpoint_bytes(checkpoint):
    """About the size of a checkpoint file: its weights and the optimizer's buffers."""
    optimizer_state = checkpoint["optimizer"]["state"].values()
    tensors = [checkpoint["state_dict"].values()] + [value.values() for value in optimizer_state]
    return sum(t.numel() * t.element_size() for group in tensors for t in group if torch.is_tensor(t))


def disk_is_full(error, path, checkpoint):
    """Whether a failed save ran out of space. torch.save reports ENOSPC as an OSError or, from its
    zip writer, as a RuntimeError without the errno ("unexpected pos ..."): then the free space says."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    if isinstance(error, RuntimeError):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(path.parent).free < checkpoint_bytes(checkpoint)
    return False


# -----------------------------------------------------------------------------------------------
# Reading a checkpoint back for --resume


RESUME_KEYS = {
    "state_dict": dict,
    "optimizer": dict,
    "scaler": dict,
    "iteration": int,
    "recipe": dict,
    "meta": dict,
    "rng": list,
    "best_miou": float,
}


def read_resume_checkpoint(path, trust):
    try:
        checkpoint = checkpoints.read_checkpoint(path, trust)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"--resume: {error}") from None
    needed = ("state_dict", "optimizer", "scaler", "iteration", "recipe")
    missing = [key for key in needed if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise SystemExit(
            f"--resume {path}: not a checkpoint written by train.py (it has no {', '.join(missing)}), so there "
            f"is no run to continue. To start a new run from its weights, use --load-from {path}."
        )
    wrong = [
        f"{key} is {type(checkpoint[key]).__name__}, expected {kind.__name__}"
        for key, kind in RESUME_KEYS.items()
        if key in checkpoint and not isinstance(checkpoint[key], kind)
    ]
    if isinstance(checkpoint["iteration"], int) and checkpoint["iteration"] < 0:
        wrong.append(f"iteration is {checkpoint['iteration']}")
    rng = checkpoint.get("rng") or []
    if isinstance(rng, list) and not all(
        isinstance(s, dict) and torch.is_tensor(s.get("torch")) for s in rng
    ):
        wrong.append("rng lacks a rank's 'torch' random state")
    if wrong:
        raise SystemExit(
            f"--resume {path}: the file is damaged or was edited: {'; '.join(wrong)}. Resume from another "
            "checkpoint of the run, or start a new run from its weights with --load-from."
        )
    return checkpoint


def gather_rng_states():
    """Every rank's random state, in rank order (every rank must call this)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    _, world_size = runtime.rank_and_world_size()
    if world_size == 1:
        return [state]
    states = [None] * world_size
    dist.all_gather_object(states, state)
    return states


# -----------------------------------------------------------------------------------------------
# Stop signals and the log


class StopRequest:
    """SIGTERM (cluster pre-emption, torchrun shutdown) or Ctrl-C: finish the step, checkpoint, exit.
    The first Ctrl-C is acknowledged at once; a second one stops at once, in words. Before the first
    step (`training` still False: the data checks, a download) there is nothing to keep: it stops at once."""

    def __init__(self, how_to_continue=lambda: "continue with: python train.py --resume"):
        self.requested, self.training, self.pid = False, False, os.getpid()
        self.how_to_continue = how_to_continue  # a function: the command that continues the run, in words
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked child (a pool worker) inherited this: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if not self.training:
            # Noted as well: raised inside a finaliser (a loader's, say) the exit is swallowed, and the
            # run must still stop, after its first step.
            self.requested = True
            raise SystemExit(f"\ntrain.py: stopped by {signal.Signals(signum).name} before training started")
        if self.requested and signum == signal.SIGINT:
            raise SystemExit(
                f"\ntrain.py: stopped at once by a second Ctrl-C, without a checkpoint of the steps since the last one; "
                f"{self.how_to_continue()}"
            )
        rank, world_size = runtime.rank_and_world_size()
        if signum == signal.SIGINT and rank == 0:
            # Under torchrun a second Ctrl-C reaches torchrun only, which ends the processes itself.
            again = "press Ctrl-C again to stop now without one" if world_size == 1 else "torchrun waits 30 s"
            print(
                f"\nCtrl-C: stopping after this step, with a checkpoint; {again}", file=sys.stderr, flush=True
            )
        self.requested = True

    def restore(self):
        """Put back the handlers that were there before (train.main called from Python returns)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def validation_logged(path, iteration):
    """Whether log.jsonl records a validation of `iteration` on this branch of the run (the records
    log.png draws: a start drops what an abandoned branch or an earlier run logged after it). A
    validation's record is written once best.pth is."""
    records = read_log(path)[0] if Path(path).is_file() else []
    return iteration in pictures.split_log(records)[1]


def read_log(path):
    """log.jsonl's records, and how many lines could not be read (a run killed mid-line leaves one)."""
    records, unreadable = [], 0
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        else:
            unreadable += bool(line.strip())
    return records, unreadable


class Log(contextlib.AbstractContextManager):
    """log.jsonl, one JSON record a line, appended and flushed (rank 0 only: path None elsewhere)."""

    def __init__(self, path):
        # Opened for appending only, as a write-only file or a pipe allows; the last byte is read apart.
        torn = False
        if path and os.path.isfile(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as file:  # a line cut by a crash: the next record starts a line of its own
                file.seek(-1, os.SEEK_END)
                torn = file.read(1) != b"\n"
        self.file = open(path, "a") if path else None
        if torn:
            self.file.write("\n")

    def write(self, record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __exit__(self, *exception):
        if self.file:
            self.file.close()
