"""A run's work dir, safe from crashes, full disks and second runs: its lock, its checkpoints, resuming.

train.py calls these; nothing here is part of the recipe. The rules:
- one run per work dir: a lock held for the process's lifetime (the OS releases it on any exit);
- every file is written to a temporary name unique to its writer, then renamed: a crash leaves the
  old file or the new one, never half, and a failed write leaves no partial file;
- only names that are exactly iter_<N>.pth are checkpoints; a checkpoint never holds NaN weights;
- a checkpoint holds everything an exact resume needs: weights, optimizer, loss scaler, iteration,
  best score, every rank's random state, the recipe, and the classes and palette.
"""

import errno
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

import model as gcnet
import runtime

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
