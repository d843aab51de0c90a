"""Checkpoint files, read without running code, and a run's work dir, safe from crashes, full disks
and second runs: its lock, its checkpoints, resuming.

model.py, train.py and evaluate.py call these; nothing here is part of the recipe. The rules:
- a file is loaded with torch's weights_only unpickler: tensors, plain containers and numpy values;
  anything else is refused unless the user opts in with --trust-checkpoint;
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
import pickle
import pickletools
import re
import secrets
import shlex
import shutil
import signal
import socket
import sys
import time
import urllib.parse
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

import recipe
import runtime

try:
    from numpy._core import multiarray as np_multiarray  # numpy 2
except ImportError:
    from numpy.core import multiarray as np_multiarray  # numpy 1.x

# -----------------------------------------------------------------------------------------------
# Reading a checkpoint: nothing in the file may run code

# Besides tensors and plain containers, official mmcv checkpoints may hold numpy scalars, dtypes and
# arrays in their meta. They are allowed by name, under the names of numpy 1.x and 2.x; none of them
# runs code when loaded. Anything else is refused unless the user passes --trust-checkpoint.
NUMPY_SAFE_GLOBALS = (
    [np.ndarray, np.dtype]
    + [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSU"]
    + [
        (function, f"numpy.{core}.multiarray.{function.__name__}")
        for function in (np_multiarray.scalar, np_multiarray._reconstruct)
        for core in ("core", "_core")
    ]
)
TRUST_HINT = (
    "If you trust where the file comes from, --trust-checkpoint loads it with full unpickling, which "
    "runs whatever code the file contains."
)


def read_checkpoint(path_or_url, trust=False):
    """Load a checkpoint file or URL onto the CPU without running code from it: torch's
    weights_only unpickler, allowing tensors, plain Python containers and NUMPY_SAFE_GLOBALS.
    URLs (https://, file://) go through torch.hub's cache, so each file is downloaded once.
    trust=True unpickles fully (any code in the file runs) and says so."""
    source = str(path_or_url)
    is_url = re.match(r"^(https?|file)://", source) is not None
    local = hub_cache_path(source) if is_url else source
    if trust:
        print(f"WARNING: --trust-checkpoint: unpickling {source} fully; code in it can run.", file=sys.stderr)
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            if is_url:
                return torch.hub.load_state_dict_from_url(source, map_location="cpu", weights_only=not trust)
            return torch.load(source, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint not found: {source}. Pass the path of a .pth file (ours or an official one "
            "from the results table) or its download URL."
        ) from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, IndexError, ValueError, KeyError) as error:
        code = objects_in(local)
        if code:
            raise ValueError(
                f"refusing to load {source}: besides weights it holds pickled Python objects, which could "
                f"run code when loaded ({code}). {TRUST_HINT}"
            ) from None
        raise ValueError(f"cannot read checkpoint {source}: {describe_unreadable(local)}") from error


def hub_cache_path(url):
    """Where torch.hub keeps (or will keep) the download of `url`."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlparse(url).path))


def objects_in(path):
    """What a well-formed checkpoint holds beyond what the safe loader allows ('' if nothing, or
    if the file is damaged), read without unpickling: torch's own list for zip checkpoints, the
    pickle's opcodes for a bare pickle."""
    try:
        if zipfile.is_zipfile(path):
            return ", ".join(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        with open(path, "rb") as file:
            opcodes = [opcode.name for opcode, _, _ in pickletools.genops(file)]
    except Exception:  # damaged: not a well-formed zip or pickle
        return ""
    return "a bare pickle with Python objects" if {"GLOBAL", "STACK_GLOBAL"} & set(opcodes) else ""


def describe_unreadable(path):
    """Why a file that torch cannot load is not a checkpoint, in words, for the error message."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as file:
            head = file.read(64)
    except OSError as error:
        return f"it cannot be read ({error.strerror})"
    if size == 0:
        return "the file is empty (0 bytes): it was not written completely; use another checkpoint."
    if head.startswith(b"PK"):
        return (
            f"the file ({size} bytes) is truncated or damaged: it starts like a PyTorch checkpoint but "
            "cannot be read to its end. Download or copy it again, or use another checkpoint."
        )
    if head.startswith(b"\x80"):
        return f"the file ({size} bytes) is a damaged or truncated pickle; use another checkpoint."
    if all(32 <= byte < 127 or byte in (9, 10, 13) for byte in head):
        return (
            f"it is a text file, not a PyTorch checkpoint (it starts with {head[:40].decode(errors='replace')!r}); "
            "an HTML page saved instead of the download, or a wrong path?"
        )
    return f"it is not a PyTorch checkpoint (.pth written by torch.save), size {size} bytes."


def extract_state_dict(checkpoint):
    """The weights of a checkpoint without `module.` (DDP) or `_orig_mod.` (torch.compile) prefixes."""
    state_dict = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict) or not all(torch.is_tensor(v) for v in state_dict.values()):
        raise ValueError(
            f"expected a checkpoint dict of tensors (or one under 'state_dict'), got {type(checkpoint).__name__}"
        )
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(("module.", "_orig_mod.")):
            key = key.split(".", 1)[1]
        clean[key.replace("._orig_mod.", ".").replace(".module.", ".")] = value
    return clean


# -----------------------------------------------------------------------------------------------
# What a checkpoint says about the model, the data and the row of the table it belongs to


CHECKPOINT_PATTERN = "work_dirs/*/best.pth"  # evaluate.py's default: the newest such file


def find_checkpoint(path):
    """--checkpoint as given, or the newest work_dirs/*/best.pth (by modification time)."""
    if path is not None:
        if re.match(r"^(https?|file)://", path) or Path(path).is_file():
            return path
        raise FileNotFoundError(
            f"checkpoint not found: {path} (--checkpoint). Pass a .pth file written by train.py, an "
            "official GCNet checkpoint of the results table, or its download URL."
        )
    found = sorted(Path().glob(CHECKPOINT_PATTERN), key=lambda candidate: candidate.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no checkpoint found: looked for {CHECKPOINT_PATTERN} in {Path.cwd()}; "
            "pass --checkpoint PATH or train first with python train.py"
        )
    return str(found[-1])


def checkpoint_info(path_or_url, checkpoint=None):
    """What a checkpoint says about the model and data it belongs to, without building a model.

    Returns a dict with 'depth', 'num_classes' and, where recorded (else None), 'dataset',
    'align_corners', 'crop_size' (h, w), 'classes', 'palette', 'config_name', 'recipe' (ours
    record theirs) and 'row': the recipe it was trained with, recipe.row() filled in by ours.
    For an official checkpoint the row of the table is read from its file name or meta
    (e.g. gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth).
    """
    checkpoint = read_checkpoint(path_or_url) if checkpoint is None else checkpoint
    state_dict = extract_state_dict(checkpoint)
    n_blocks = sum(1 for k in state_dict if re.fullmatch(r"backbone\.layer3\.\d+\.conv1\.weight", k))
    if "decode_head.conv_seg.weight" not in state_dict or n_blocks not in (6, 23):
        raise ValueError(
            f"{path_or_url} is not a GCNet checkpoint: it has no decode_head.conv_seg or backbone.layer3 keys"
        )
    info = dict(
        depth={6: 50, 23: 101}[n_blocks],
        num_classes=int(state_dict["decode_head.conv_seg.weight"].shape[0]),
        dataset=None, align_corners=None, crop_size=None, classes=None, palette=None, config_name=None,
        recipe=None, row=None,
    )  # fmt: skip
    meta = checkpoint.get("meta") or {}
    ours = checkpoint.get("recipe")
    if ours:
        info["recipe"] = ours
        for key in ("dataset", "align_corners", "config_name"):
            info[key] = ours.get(key)
        info["crop_size"] = tuple(ours["crop_size"]) if ours.get("crop_size") else None
    else:  # an official one: the row is named in the file name (or the meta's exp_name)
        row = recipe.row_of_config_name(f"{meta.get('exp_name', '')} {path_or_url}")
        config_text = str(meta.get("config", ""))
        if row is not None:
            info.update(config_name=row["config_name"], dataset=row["dataset"], crop_size=row["crop_size"])
        crop_match = re.search(r"crop_size\s*=\s*\((\d+),\s*(\d+)\)", config_text)
        if crop_match and info["crop_size"] is None:
            info["crop_size"] = (int(crop_match.group(1)), int(crop_match.group(2)))
        if info["dataset"] is None:
            dataset_types = {"Cityscapes": "cityscapes", "ADE20KDataset": "ade20k", "PascalVOC": "voc12aug"}
            found = [dataset for type_name, dataset in dataset_types.items() if type_name in config_text]
            info["dataset"] = found[0] if found else recipe.DATASET_OF_NUM_CLASSES.get(info["num_classes"])
        if "align_corners=True" in config_text.replace(" ", ""):
            info["align_corners"] = True
        elif info["crop_size"] is not None:
            info["align_corners"] = recipe.is_769_crop(info["crop_size"])
    if info["dataset"] in recipe.DATASETS:
        # Ours record their recipe; older ones lack some keys (the test scale): the row fills them.
        info["row"] = {**recipe.row(info["dataset"], info["crop_size"], depth=info["depth"]), **(ours or {})}
    if meta.get("CLASSES") is not None:
        info["classes"] = [str(c) for c in meta["CLASSES"]]
    if meta.get("PALETTE") is not None:
        info["palette"] = [[int(v) for v in color] for color in meta["PALETTE"]]
    return info


# -----------------------------------------------------------------------------------------------
# The work dir of a run


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
    from model import load_weights  # model.py reads its files through this module

    checkpoint = read_resume_checkpoint(path, trust)
    for key in ("dataset", "depth", "crop_size", "iters", "global_batch", "lr"):
        if checkpoint["recipe"].get(key) != config[key]:
            say(
                f"WARNING: resuming with {key} = {config[key]}, the checkpoint has {checkpoint['recipe'].get(key)}"
            )
    load_weights(raw_model, path, checkpoint)
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
        checkpoint = read_checkpoint(path, trust)
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
        self.requested, self.pid = False, os.getpid()
        self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked child (a pool worker) inherited this: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        """Put back the handlers that were there before (train.main called from Python returns)."""
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


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
