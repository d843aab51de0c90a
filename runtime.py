"""Where and how the model runs: device and processes, precision, memory layout, host memory, and the
atomic writes, locks and flag types every script uses. train.py, evaluate.py and benchmark.py share
add_arguments, so --device, --precision, --channels-last and --threads mean the same in all three."""

import argparse
import contextlib
import ctypes
import fcntl
import gc
import inspect
import math
import os
import re
import resource
import secrets
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import recipe

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser):
    group = parser.add_argument_group("device and precision (shared by train, evaluate and benchmark)")
    group.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"), help="default: auto")
    group.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="fp32 = IEEE float32 (TF32 off); auto: bf16 where the hardware has it, else fp16 on a GPU "
        "and fp32 on a CPU",
    )
    group.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="default: on CUDA, and on a CPU with bf16",
    )
    group.add_argument(
        "--threads",
        type=per_core_flag(1),
        help="torch threads per process (default: torch's choice; under torchrun on CPUs, the usable "
        "cores shared among the node's processes)",
    )
    return group


def setup_device(flag="auto"):
    """(rank, world_size, device). torchrun sets RANK, WORLD_SIZE and LOCAL_RANK: one process per
    GPU (NCCL) or per CPU process (gloo); without them this is a single process."""
    rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if flag == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available; use --device cpu")
    use_cuda = flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
    if use_cuda and local_rank >= torch.cuda.device_count():  # torchrun --nproc_per_node above the GPUs
        raise ValueError(
            f"process {local_rank} of this machine has no GPU of its own: {torch.cuda.device_count()} are "
            "visible; give torchrun --nproc_per_node at most that many (the global batch follows)"
        )
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo", device_id=device if use_cuda else None
        )
    return rank, world_size, device


def no_buffer_sync():
    """DDP's keyword for no buffer broadcast per forward: forward_sync_buffers since torch 2.13, which warns
    about broadcast_buffers. Its initial sync is harmless: ranks start from the same BatchNorm statistics."""
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    return {"forward_sync_buffers" if renamed else "broadcast_buffers": False}


def share_rank_zero_buffers(net):
    """Under torchrun without SyncBN each process's BatchNorm statistics go their own way: give every
    process rank 0's, which its checkpoint holds, so that a validation over all of them scores that model."""
    if rank_and_world_size()[1] > 1:
        for buffer in net.buffers():
            dist.broadcast(buffer, 0)


def rank_and_world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_zero_first(function):
    """Call `function` on rank 0, then on the other ranks: for work that writes shared files."""
    rank, world_size = rank_and_world_size()
    result = function() if rank == 0 else None
    if world_size > 1:
        dist.barrier()
    return result if rank == 0 else function()


def resolve_precision(flag, device, auto="native"):
    """'auto': by the hardware, or fp32 with auto='fp32' (as evaluate.py has it for official checkpoints)."""
    if flag == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    if flag != "auto":
        return flag
    if auto == "fp32":
        return "fp32"
    if device.type == "cuda":
        # Emulated bf16 (a V100's, a T4's) is what torch reports by default: native only, else fp16.
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    # Emulated bf16 is slower than fp32, so bf16 only where the CPU computes it natively.
    native = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    native = native or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return "bf16" if native else "fp32"


def resolve_channels_last(flag, device, precision):
    """channels_last unless told otherwise on CUDA, and on the CPU with bf16, whose oneDNN
    convolutions want that layout and would otherwise convert around every conv."""
    return flag if flag is not None else device.type == "cuda" or precision == "bf16"


@contextlib.contextmanager
def ieee_float32():
    """IEEE float32 for convs and matmuls, i.e. TF32 off: cuDNN allows TF32 by default on Ampere and
    newer, and the V100s that made the table had none. The previous settings come back after."""
    # The fp32_precision API: torch refuses to read the legacy allow_tf32 flags once anything has set these.
    conv, matmul = torch.backends.cudnn.conv, torch.backends.cuda.matmul
    saved = conv.fp32_precision, matmul.fp32_precision
    conv.fp32_precision = matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision, matmul.fp32_precision = saved


def autocast(device, precision):
    """bf16/fp16: autocast, for the forward pass (the model keeps its GC softmax, LayerNorm and final
    resize in float32); fp32: a context that changes nothing."""
    if precision not in ("fp32", *AUTOCAST_DTYPES):
        raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision != "fp32")


def precision_context(device, precision):
    return ieee_float32() if precision == "fp32" else autocast(device, precision)


def training_float32(precision):
    """Around a whole training run or step: IEEE float32 for fp32 training, backward pass included;
    nothing for bf16/fp16, whose autocast covers the forward pass only."""
    return ieee_float32() if precision == "fp32" else contextlib.nullcontext()


@contextlib.contextmanager
def written_atomically(path, suffix=".tmp"):
    """`with written_atomically(path) as temporary:` write to `temporary`, a name beside `path` unique to
    this writer, which one rename puts at `path`: a crash leaves the old file or the new one, never half,
    and a failing block removes it. With the default suffix, a run's start clears what a crash left."""
    path = Path(path)
    # (the name cut to 200 characters: a 255-character name leaves no room for the rest)
    temporary = path.with_name(f".{path.name[:200]}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def temporaries_in(folder, recursive=False):
    """The temporary files written_atomically's writers left in `folder` when killed: its names only, so
    a user's own hidden .tmp file beside them stays."""
    found = Path(folder).rglob(".*.tmp") if recursive else Path(folder).glob(".*.tmp")
    return [path for path in found if re.fullmatch(r"\..+\.\d+-[0-9a-f]{8}\.tmp", path.name)]


class Taken(Exception):
    """A lock another process holds; the message says which (process, host, since when)."""


def hold_lock(path):
    """Lock the file `path` for this process's lifetime (the OS releases the lock on any exit, a crash
    included), writing who holds it; raise Taken, naming the holder, when another process does."""
    while True:
        lock = open(path, "a+")  # held open, and locked, until the process ends
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise Taken(holder) from None
        # The holder may have removed the file (evaluate.py does as it ends) between the open and the
        # lock: then this locks a file no one else can find, and the path is opened again.
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.stat(path), os.fstat(lock.fileno())):
                break
        lock.close()
    lock.truncate(0)  # "a+": the write goes to the end, now the start
    lock.write(f"process {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}")
    lock.flush()
    return lock


def write_text(path, text):
    with written_atomically(path) as temporary:
        temporary.write_text(text)


def say(*args, **kwargs):
    """print, on rank 0 only: under torchrun every process runs the same code."""
    if rank_and_world_size()[0] == 0:
        print(*args, **kwargs)


def leave_stop_signals_to_the_main_process(worker_id=None):
    """A DataLoader worker's worker_init_fn. Ctrl-C and a scheduler's SIGTERM reach the whole process
    group; a worker dying of them would take the run down before the main process could checkpoint. So it
    ignores Ctrl-C and is ended only by its parent's SIGTERM (loader or interpreter exit), as torch's does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to tell apart; the default stays
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held for the thread below

    def end_when_the_parent_says():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass  # the group's stop: the main process ends the run, then its workers
        os._exit(0)

    threading.Thread(target=end_when_the_parent_says, daemon=True).start()


def return_freed_memory():
    """Hand the freed memory glibc holds (keep_freed_memory) back to the OS now; the blocks a phase freed
    would otherwise stay beside those of the next one, which wants other sizes."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def release_memory(device):
    """Hand freed memory back (glibc's heap to the OS, the CUDA cache to the driver), so that the
    next peak starts from what is really in use."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return_freed_memory()


def keep_freed_memory():
    """Make glibc keep freed blocks for reuse (as a preloaded jemalloc or tcmalloc would): by default it
    unmaps every block above 32 MiB when freed, so the next feature map of that size page-faults in
    fresh zeroed pages. The process's memory then stays near its peak. Returns whether it took effect."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # M_MMAP_THRESHOLD (-3) and M_TRIM_THRESHOLD (-1) of malloc.h: 1 GiB, or 32 MiB where glibc refuses it
    return any([mallopt(option, 1 << 30) or mallopt(option, 32 << 20) for option in (-3, -1)])


def usable_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset
    or a container's CPU set), for sizing loader workers."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def processes_on_this_node():
    """How many processes torchrun started on this machine (1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def cores_per_process():
    return max(1, usable_cores() // processes_on_this_node())


def set_threads(flag, device):
    """Set torch's threads; returns why that many (for machine_line). Under torchrun on CPUs the node's
    processes share the usable cores: torchrun's OMP_NUM_THREADS=1 each would leave cores idle."""
    processes = processes_on_this_node()
    if flag:
        torch.set_num_threads(flag)
        return "--threads"
    if device.type == "cpu" and processes > 1:
        torch.set_num_threads(cores_per_process())
        return f"{usable_cores()} usable cores shared by {processes} processes"
    return "torch's choice; --threads N to change"


def machine_line(thread_choice, workers):
    threads = torch.get_num_threads()
    return (
        f"machine: {threads} torch thread{'s' if threads > 1 else ''} per process ({thread_choice}), "
        f"{workers} loader worker{'s' if workers != 1 else ''} per process (--workers N to change)"
    )


def peak_memory_gb(device):
    """CUDA: torch.cuda.max_memory_allocated, what the table's "Mem (GB)" is. CPU: the process's
    peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**3 if sys.platform == "darwin" else peak / 1024**2  # bytes on macOS, kB on Linux


def reset_peak_memory(device):
    """Start a new peak of peak_memory_gb. On the CPU it counts the whole process; Linux resets it
    through /proc/self/clear_refs (elsewhere earlier peaks carry over)."""
    release_memory(device)
    if device.type == "cuda":
        return torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size


def device_memory_gb(device):
    """All the memory of the device: the GPU's, or the machine's."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1024**3
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3


# -----------------------------------------------------------------------------------------------
# Flag checks for the three scripts' parsers: an impossible value ends the run when it is parsed,
# with argparse's "argument --flag:" in front of the message


def number_flag(kind, minimum, maximum=None, exclusive=False, why=""):
    """argparse type: a finite int or float >= minimum (> minimum if exclusive), <= maximum if given.
    An explicit 0 is a value like any other, never "unset". `why` explains the bounds in the error."""
    name = "an integer" if kind is int else "a number"
    bound = (
        f"{'>' if exclusive else '>='} {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    ) + why

    def parse(text):
        try:
            value = kind(text)
            finite = math.isfinite(value)  # an int beyond a float's range raises OverflowError here
        except (ValueError, OverflowError):
            value, finite = math.nan, False
        above = value > minimum if exclusive else value >= minimum
        if not (finite and above and (maximum is None or value <= maximum)):
            raise argparse.ArgumentTypeError(f"expected {name} {bound}, got {text!r}")
        return value

    return parse


def per_core_flag(minimum):
    """argparse type for --workers and --threads: at most four per usable core of this machine, so that a
    typo (1000 for 10) is refused instead of forking processes or threads without end."""
    cores = usable_cores()
    return number_flag(int, minimum, 4 * cores, why=f" (at most 4 per core; this machine has {cores})")


def writable_path(kind):
    """argparse type of an output file (kind 'file') or folder (kind 'folder'): refuses a folder where
    a file is wanted and the other way round, and a place this process cannot create or write."""

    def parse(text):
        if not text.strip():
            raise argparse.ArgumentTypeError(f"an empty path; pass a {kind} name")
        path = Path(text).absolute()
        if kind == "file" and path.is_dir():
            raise argparse.ArgumentTypeError(
                f"{text} is a directory; pass a file name such as {path / 'results.json'}"
            )
        if kind == "folder" and path.exists() and not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file; pass a folder")
        # A file is written beside itself and renamed over (written_atomically): its folder must be writable.
        places = [path, *path.parents] if kind == "folder" else list(path.parents)
        existing = next(parent for parent in places if parent.exists())
        if existing != path and not existing.is_dir():
            raise argparse.ArgumentTypeError(f"cannot create {text}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise argparse.ArgumentTypeError(
                f"cannot write {text}: {existing} is not writable; choose another place"
            )
        return text

    return parse


def named(text):
    """argparse type of a file or URL to read: an empty one (an unset variable: --resume "$CKPT") would
    read as the flag not given."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path (an unset variable?); pass a file or URL")
    return text


def size_flag(flag, parse_size=recipe.parse_crop):
    """argparse type of a size flag: '769' or '512x1024' (recipe.parse_crop; --scale: recipe.parse_scale)."""

    def parse(text):
        try:
            return parse_size(text, flag)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{flag}: ")) from None

    return parse
