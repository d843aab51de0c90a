"""Checkpoint files, read without running code and loaded into a GCNet with every key problem said in
words (load_checkpoint); and a training run's machinery (Run): its work dir, safe from crashes, full
disks and second runs, its checkpoints, resuming, stop signals, its log.

train.py and evaluate.py call these; nothing here is part of the recipe. The rules:
- a file is loaded with torch's weights_only unpickler: tensors, plain containers and numpy values;
  anything else is refused unless the user opts in with --trust-checkpoint;
- one run per work dir: a lock held until the run ends (the OS releases it on any exit, a crash too);
- every file is written to a temporary name unique to its writer, then renamed: a crash leaves the
  old file or the new one, never half, and a failed write leaves no partial file;
- only names that are exactly iter_<N>.pth are checkpoints; a checkpoint never holds NaN weights;
- a checkpoint holds everything an exact resume needs: weights, optimizer, loss scaler, iteration,
  best score, every rank's random state, the recipe, and the classes and palette.
"""

import contextlib
import errno
import fcntl
import hashlib
import http.client
import io
import json
import math
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
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
import model
import pictures
import recipe
import runtime

try:
    from numpy._core import multiarray as np_multiarray  # numpy 2
except ImportError:
    from numpy.core import multiarray as np_multiarray  # numpy 1.x

# -----------------------------------------------------------------------------------------------
# Reading a checkpoint: nothing in the file may run code

# Besides tensors and plain containers, official mmcv checkpoints may hold numpy scalars, dtypes and
# arrays in their meta. numpy's own functions would allocate whatever a file declares (a 2 KB file can
# ask for an object array of 10^8 elements, which numpy fills with zeros and then crashes on), so the
# names numpy pickles use are served by stand-ins that check each value against the bytes really in
# the file first: plain number and string dtypes only, arrays of at most MAX_META_ARRAY_BYTES.
MAX_META_ARRAY_BYTES = 16 << 20
UNSAFE = "unsafe value"  # starts every refusal of the stand-ins, found again in torch's error text


def checked_dtype(dtype):
    """A dtype as numpy writes it for numbers and strings; not objects, records or a doctored copy."""
    plain = np.dtype(dtype.str) if isinstance(dtype, np.dtype) and dtype.kind in "biufcSU" else None
    if plain is None or dtype.hasobject or dtype.fields or dtype.subdtype or dtype.itemsize > 1 << 16:
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy dtype {dtype!r} (objects, records or huge items)")
    if (dtype.flags, dtype.itemsize, dtype.alignment) != (plain.flags, plain.itemsize, plain.alignment):
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy dtype with a doctored state")
    return dtype


def numpy_dtype(spec, align=False, copy=True):
    """Stands in for numpy.dtype, which numpy pickles call as dtype('f8', False, True)."""
    if not (isinstance(spec, str) and re.fullmatch(r"[<>|=]?[biufcSU]\d{1,6}", spec)):
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy dtype {spec!r}")
    return checked_dtype(np.dtype(spec, bool(align), bool(copy)))


class NumpyArrayName:
    """Stands in for numpy.ndarray, which a numpy pickle only hands to _reconstruct, never calls."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(f"{UNSAFE}: numpy.ndarray called directly")


class CheckedArray(np.ndarray):
    """The arrays of a checkpoint's meta: their state is checked before numpy allocates anything."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(f"{UNSAFE}: numpy.ndarray called directly")

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state if isinstance(state, tuple) and len(state) == 5 else [None] * 5
        raw = raw.encode("latin1") if isinstance(raw, str) else raw  # as numpy reads Python 2 pickles
        sizes_ok = isinstance(shape, tuple) and all(type(size) is int and size >= 0 for size in shape)
        nbytes = math.prod(shape) * checked_dtype(dtype).itemsize if sizes_ok else -1
        if not (0 <= nbytes <= MAX_META_ARRAY_BYTES and isinstance(raw, bytes) and len(raw) == nbytes):
            raise pickle.UnpicklingError(f"{UNSAFE}: a numpy array whose size is not its data's")
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), raw))


def numpy_reconstruct(subtype, shape, typecode):
    """Stands in for numpy's _reconstruct: numpy pickles an empty array, then sets its state."""
    if subtype is not NumpyArrayName or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError(f"{UNSAFE}: numpy _reconstruct{(shape, typecode)}")
    return np.ndarray((0,), np.uint8).view(CheckedArray)


def numpy_scalar(dtype, data=None):
    """Stands in for numpy's scalar(dtype, bytes)."""
    if not isinstance(data, bytes) or len(data) != checked_dtype(dtype).itemsize:
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy scalar whose size is not its data's")
    return np_multiarray.scalar(dtype, data)


NUMPY_SAFE_GLOBALS = (
    [(numpy_dtype, "numpy.dtype"), (NumpyArrayName, "numpy.ndarray"), (CheckedArray, "CheckedArray")]
    + [(function, f"numpy.{core}.multiarray.{name}") for core in ("core", "_core")
       for function, name in ((numpy_reconstruct, "_reconstruct"), (numpy_scalar, "scalar"))]
    + list({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSU"} - {np.dtype})  # a dtype's state
)  # fmt: skip
# torch's weights_only unpickler allows bytearray itself, and bytearray(10**9) allocates a gigabyte.
REFUSED_GLOBALS = {"builtins.bytearray", "__builtin__.bytearray"}
TRUST_HINT = (
    "If you trust where the file comes from, --trust-checkpoint loads it with full unpickling, which "
    "runs whatever code the file contains."
)


def read_checkpoint(path_or_url, trust=False):
    """Load a checkpoint file or URL onto the CPU without running code from it: torch's
    weights_only unpickler, allowing tensors, plain Python containers and NUMPY_SAFE_GLOBALS, and
    no value that asks for more memory than the file holds (check_tensors). https:// URLs are
    downloaded once into torch.hub's cache (local_copy), file:// URLs are paths.
    trust=True unpickles fully (any code in the file runs) and says so."""
    source = str(path_or_url)
    local = local_copy(source)
    if trust:
        print(f"WARNING: --trust-checkpoint: unpickling {source} fully; code in it can run.", file=sys.stderr)
    else:
        refuse_globals(local, source)
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(local, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint not found: {source}. Pass the path of a .pth file (ours or an official one "
            "from the results table) or its download URL."
        ) from None
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        IndexError,
        ValueError,
        KeyError,
        MemoryError,
    ) as error:
        refused = [line for line in str(error).splitlines() if UNSAFE in line]
        if refused:
            raise ValueError(
                f"refusing to load {source}: it holds {refused[0].split(UNSAFE + ': ')[-1]}, a value that "
                "could take far more memory than the file has bytes"
            ) from None
        code = objects_in(local)
        if code:
            raise ValueError(
                f"refusing to load {source}: besides weights it holds pickled Python objects, which could "
                f"run code when loaded ({code}). {TRUST_HINT}"
            ) from None
        raise ValueError(f"cannot read checkpoint {source}: {describe_unreadable(local)}") from error
    if not trust:
        check_tensors(checkpoint, source)
    return checkpoint


def check_tensors(checkpoint, source):
    """Refuse tensors that are small in the file and huge in use: more elements than their storage
    holds (a 1-element storage viewed with stride 0 as 10^9 elements, which the NaN check would
    expand), elements beyond their storage, or not plain CPU tensors. Only shapes are read."""
    stack, seen = [checkpoint], set()
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, dict):
            stack += list(value.values())
        elif isinstance(value, (list, tuple)):
            stack += list(value)
        elif torch.is_tensor(value) and not stored_plainly(value):
            raise ValueError(
                f"refusing to load {source}: a tensor of shape {list(value.shape)} is not stored in the "
                "file as a plain array of its elements (a small file that would take much more memory)"
            )


def stored_plainly(tensor):
    """A dense CPU tensor whose elements all lie, once each at most, within its storage."""
    if type(tensor) not in (torch.Tensor, torch.nn.Parameter) or tensor.layout != torch.strided:
        return False
    if tensor.device.type != "cpu" or tensor.numel() == 0:
        return tensor.device.type == "cpu"
    room = tensor.untyped_storage().nbytes() // tensor.element_size()
    last = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    return tensor.numel() <= room and min(tensor.stride(), default=0) >= 0 and last < room


def refuse_globals(path, source):
    """Refuse REFUSED_GLOBALS before torch.load sees them (read without unpickling)."""
    found = set()
    if zipfile.is_zipfile(path):
        try:  # torch's own zip reader: torch.save may leave the CRC-32s out, which zipfile insists on
            archive = torch._C.PyTorchFileReader(str(path))
            records = [
                archive.get_record(name) for name in archive.get_all_records() if name.endswith("data.pkl")
            ]
        except RuntimeError:  # damaged: torch.load will say so
            records = []
        for record in records:
            found |= pickle_globals(io.BytesIO(record))
    elif os.path.isfile(path):
        with open(path, "rb") as file:
            found = pickle_globals(file)
    refused = sorted(found & REFUSED_GLOBALS)
    if refused:
        raise ValueError(
            f"refusing to load {source}: it builds {', '.join(refused)}, which can ask for any amount of memory"
        )


def local_copy(source):
    """The local path of a checkpoint: a path as given; a file:// URL as the path it names; an https
    URL downloaded once into torch.hub's cache (never unzipped). A name that carries the first digits
    of the file's SHA-256, as the official files do (...-4b0fd17b.pth), is checked against them and
    cached under that name, where torch.hub looks; any other URL is cached under a name made from the
    whole URL, so two URLs that end in the same file name never share a file."""
    url = urllib.parse.urlparse(source)
    if url.scheme == "file":
        return urllib.request.url2pathname(url.path)
    if url.scheme not in ("http", "https"):
        return source
    name = os.path.basename(url.path)
    digits = re.search(r"-([0-9a-f]{8,64})\.\w+$", name)
    if not digits:
        name = f"{hashlib.sha256(source.encode()).hexdigest()[:16]}-{name or 'download'}"
    cached = Path(torch.hub.get_dir()) / "checkpoints" / name
    if not cached.is_file():
        download(source, cached)
    if digits and not file_sha256(cached).startswith(digits.group(1)):
        raise ValueError(
            f"{cached} (from {source}) is not the file its name promises: its SHA-256 does not begin with "
            f"{digits.group(1)}. Delete it to download it again; to use a file of another content, pass its path."
        )
    return str(cached)


class DownloadFailed(ValueError):
    """A URL that could not be fetched; the message names it and the ways around it."""


def download(url, path):
    """Fetch `url` into `path` with a progress bar (torch.hub writes a temporary file and renames it).
    A failure says in a few lines which URL failed, whether the network was reached, and the two ways
    out: fetch the file elsewhere and pass its path, or put it where this URL is looked for."""
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        torch.hub.download_url_to_file(url, str(path), progress=runtime.rank_and_world_size()[0] == 0)
    except urllib.error.HTTPError as error:
        reason = f"the server answered HTTP {error.code} ({error.reason})"
    except urllib.error.URLError as error:
        host = urllib.parse.urlparse(url).hostname
        reason = f"no connection to {host} ({error.reason}): no network was reached, or the host is down"
    except (OSError, http.client.HTTPException) as error:
        reason = f"{type(error).__name__}: {error}"
    else:
        return
    raise DownloadFailed(
        f"cannot download {url}: {reason}.\nWays out: download the file on a machine that has a network "
        f"and pass its path instead of the URL, or copy it to {path}, where this URL is looked for first."
    )


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def allowed_names():
    """The names under which NUMPY_SAFE_GLOBALS appear in a pickle."""
    return {
        entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
        for entry in NUMPY_SAFE_GLOBALS
    }


def objects_in(path):
    """What a well-formed checkpoint holds beyond what the safe loader allows ('' if nothing, or
    if the file is damaged), read without unpickling: torch's own list for zip checkpoints (less the
    numpy names we allow), the opcodes of each pickle for a bare pickle or torch's legacy format,
    which is several pickles in a row followed by the tensors' bytes."""
    if zipfile.is_zipfile(path):
        try:
            found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # damaged: not a well-formed zip
            return ""
        return ", ".join(name for name in found if name not in allowed_names())
    with open(path, "rb") as file:
        names = pickle_globals(file)
    # What torch's weights_only unpickler itself allows besides torch's own names (protocol 2 pickles
    # bytes through _codecs.encode).
    harmless = allowed_names() | {f"builtins.{name}" for name in ("set", "frozenset", "bytearray", "complex")}
    harmless |= {"collections.OrderedDict", "_codecs.encode"}
    return ", ".join(sorted(n for n in names if n not in harmless and not n.startswith("torch.")))


def pickle_globals(file):
    """The names of the globals the pickles in `file` use, read without unpickling: one pickle after
    another (torch's legacy format writes several in a row, then the tensors' bytes, where reading stops)."""
    names, pushed, memo = set(), [None, None], {}  # pushed: the strings pushed, in order
    try:
        while file.read(1):
            file.seek(-1, os.SEEK_CUR)
            for opcode, argument, _ in pickletools.genops(file):
                if opcode.name == "GLOBAL":
                    names.add(argument.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL":  # module and name: the two last pushed strings
                    names.add(f"{pushed[-2]}.{pushed[-1]}")
                elif opcode.name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1]
                elif opcode.name.endswith("PUT"):
                    memo[argument] = pushed[-1]
                elif opcode.name.endswith("GET"):
                    pushed.append(memo.get(argument))
                elif "UNICODE" in opcode.name:
                    pushed.append(argument)
    except Exception:  # the tensors' bytes after the pickles, or damage: what was read counts
        pass
    return names


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
# Loading a checkpoint into a GCNet: model.load_weights, after checks that say what is wrong in words


CLASSIFIER_KEYS = [
    f"{head}.conv_seg.{name}" for head in ("decode_head", "auxiliary_head") for name in ("weight", "bias")
]


def load_checkpoint(net, path_or_url, checkpoint=None, trust=False, new_classes=False):
    """Load a checkpoint file or URL into the GCNet `net`, strictly: official checkpoints of the
    results table ({'state_dict', 'meta'}), this project's ({'state_dict', 'optimizer', ...}) and
    ImageNet ResNetV1c backbones (recipe.IMAGENET_URLS), which fill the backbone only.

    new_classes=True (fine-tuning): when the class count differs, the two classifiers keep the
    model's fresh initialisation and everything else loads strictly. Pass `checkpoint` when the file
    is already read; `path_or_url` then only names it in errors. Weights holding NaN or inf are
    refused. Returns 'segmentor', 'segmentor, new classifiers' or 'imagenet'."""
    checkpoint = read_checkpoint(path_or_url, trust) if checkpoint is None else checkpoint
    state_dict = extract_state_dict(checkpoint)
    check_class_count(state_dict, path_or_url)
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if non_finite:
        raise ValueError(
            f"refusing to load {path_or_url}: {len(non_finite)} tensor(s) hold NaN or infinite values, e.g. "
            f"{', '.join(non_finite[:5])}. The training diverged or the file is damaged: use an earlier checkpoint."
        )
    if any(k.startswith("backbone.") for k in state_dict):
        own, seg = net.state_dict(), "decode_head.conv_seg.weight"
        swap = new_classes and seg in state_dict and state_dict[seg].shape != own[seg].shape
        if swap:
            state_dict = {**state_dict, **{key: own[key] for key in CLASSIFIER_KEYS}}
        check_keys(net, state_dict, path_or_url)
        model.load_weights(net, state_dict)
        return "segmentor, new classifiers" if swap else "segmentor"
    if "stem.0.weight" not in state_dict:
        raise ValueError(
            f"cannot load {path_or_url}: it is neither a GCNet checkpoint (keys 'backbone.*') nor an "
            "ImageNet ResNetV1c backbone (keys 'stem.*', 'layer1.*'); a torchvision ResNet has a "
            "single-conv stem and does not fit. Use the files in recipe.IMAGENET_URLS."
        )
    check_keys(net.backbone, model.imagenet_backbone(net, state_dict), path_or_url)
    return model.load_weights(net, state_dict)


# Labels are uint8 class indices with 255 = 'ignore': a model has at most 255 classes.
MAX_CLASSES = 255


def check_class_count(state_dict, source):
    """Refuse a classifier of more than MAX_CLASSES classes before a model of that size is built."""
    for key in ("decode_head.conv_seg.weight", "auxiliary_head.conv_seg.weight"):
        if key in state_dict and state_dict[key].dim() > 0 and state_dict[key].shape[0] > MAX_CLASSES:
            raise ValueError(
                f"refusing to load {source}: {key} has {state_dict[key].shape[0]} classes; labels are "
                f"8-bit class indices, so a model has at most {MAX_CLASSES}"
            )


def check_keys(module, state_dict, source):
    """Raise one ValueError that lists every missing, unexpected and wrongly shaped key, with the
    likely cause in words: another class count (dataset) or another depth."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong_shape = [
        f"{k}: checkpoint {list(state_dict[k].shape)}, model {list(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"cannot load {source}:"]
    seg_key = "decode_head.conv_seg.weight"
    if (
        seg_key in state_dict
        and seg_key in expected
        and state_dict[seg_key].shape[:1] != expected[seg_key].shape[:1]
    ):
        lines.append(
            f"checkpoint has {describe_classes(state_dict[seg_key].shape[0])}, model has "
            f"{describe_classes(expected[seg_key].shape[0])}; build the model with the checkpoint's "
            "class count or evaluate on the matching dataset"
        )
    if isinstance(module, model.GCNet) and any(k.startswith("decode_head.") for k in state_dict):
        theirs = block_of_state_dict(state_dict)
        if theirs != module.head_block:
            lines.append(
                f"checkpoint is a {recipe.method_name(theirs)} model, the model built here a "
                f"{recipe.method_name(module.head_block)} one: build it with {recipe.block_flags(theirs)}"
            )
    n_blocks = sum(1 for k in state_dict if re.fullmatch(r"(backbone\.)?layer3\.\d+\.conv1\.weight", k))
    if n_blocks and isinstance(module, model.GCNet) and n_blocks != model.STAGE_BLOCKS[module.depth][2]:
        depth = {6: 50, 23: 101}.get(n_blocks, "unknown")
        lines.append(f"checkpoint is a ResNet-{depth} ({n_blocks} layer3 blocks), model: {module.depth}")
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"{len(keys)} {title} key(s):\n    " + "\n    ".join(shown))
    raise ValueError("\n".join(lines))


def block_of_state_dict(state_dict):
    """The decode head's block (model.GCNet's context, pooling, fusion) read from the keys: gc_block.*
    (conv_mask with attention pooling; channel_add_conv, channel_mul_conv by fusion), nl_block.*, or
    neither (the FCN model)."""

    def has(part):
        return any(key.startswith(f"decode_head.{part}") for key in state_dict)

    if has("nl_block."):
        return dict(recipe.GC_BLOCK, context="nonlocal")
    if not has("gc_block."):
        return dict(recipe.GC_BLOCK, context="none")
    fusion = {(True, False): "add", (False, True): "mul"}.get(
        (has("gc_block.channel_add_conv."), has("gc_block.channel_mul_conv.")), "both"
    )
    return dict(context="gc", pooling="att" if has("gc_block.conv_mask.") else "avg", fusion=fusion)


def describe_classes(num_classes):
    dataset = recipe.DATASET_OF_NUM_CLASSES.get(num_classes)
    return f"{num_classes} classes ({dataset})" if dataset else f"{num_classes} classes"


# -----------------------------------------------------------------------------------------------
# What a checkpoint says about the model, the data and the row of the table it belongs to


CHECKPOINT_PATTERN = "work_dirs/*/best.pth"  # evaluate.py's default: the newest such file


def find_checkpoint(path):
    """--checkpoint as given, or the newest work_dirs/*/best.pth (by modification time), named on screen
    with how to choose another."""
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
    runtime.say(f"no --checkpoint: evaluating {found[-1]}, the newest of {len(found)} {CHECKPOINT_PATTERN}; "
                "pass --checkpoint PATH for another")  # fmt: skip
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
    check_class_count(state_dict, path_or_url)
    n_blocks = sum(1 for k in state_dict if re.fullmatch(r"backbone\.layer3\.\d+\.conv1\.weight", k))
    if "decode_head.conv_seg.weight" not in state_dict or n_blocks not in (6, 23):
        raise ValueError(
            f"{path_or_url} is not a checkpoint of GCNet or of the FCN and NonLocal models beside it: it has "
            "no decode_head.conv_seg or backbone.layer3 keys"
        )
    info = dict(
        depth={6: 50, 23: 101}[n_blocks],
        block=block_of_state_dict(state_dict),
        num_classes=int(state_dict["decode_head.conv_seg.weight"].shape[0]),
        dataset=None, align_corners=None, crop_size=None, classes=None, palette=None, config_name=None,
        recipe=None, row=None, validation=None,
    )  # fmt: skip
    meta, ours = checkpoint.get("meta") or {}, checkpoint.get("recipe")
    for key, value in (("meta", meta), ("recipe", ours)):
        if not isinstance(value, (dict, type(None))):
            raise ValueError(
                f"{path_or_url}: its '{key}' is a {type(value).__name__}, expected a dict: the file is damaged "
                "or was written by another program"
            )
    if isinstance(checkpoint.get("validation"), dict):  # best.pth: the score of training's validation
        info["validation"] = checkpoint["validation"]
    if ours:
        info["recipe"] = ours
        for key in ("dataset", "align_corners", "config_name"):
            info[key] = ours.get(key)
        info["crop_size"] = tuple(ours["crop_size"]) if ours.get("crop_size") else None
    else:  # an official one: the row is named in the file name (or the meta's exp_name)
        row = recipe.row_of_config_name(f"{meta.get('exp_name', '')} {path_or_url}")
        config_text = str(meta.get("config", ""))
        if row is not None:
            if row["block"] != info["block"]:
                raise ValueError(
                    f"{path_or_url}: its name says {recipe.method_name(row['block'])} but its weights hold a "
                    f"{recipe.method_name(info['block'])} model: the file was renamed or is damaged"
                )
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
        row = recipe.row(info["dataset"], info["crop_size"], depth=info["depth"], block=info["block"])
        info["row"] = {**row, **(ours or {}), "block": info["block"]}
    if meta.get("CLASSES") is not None:
        info["classes"] = [str(c) for c in meta["CLASSES"]]
    if meta.get("PALETTE") is not None:
        info["palette"] = [[int(v) for v in color] for color in meta["PALETTE"]]
    return info


# -----------------------------------------------------------------------------------------------
# One training run: what train.main needs besides the recipe, behind one object


class Run:
    """The machinery of one training run, for train.main: the work dir's lock and a crashed run's
    temporary files, resuming and the pending validation, stop signals, the log and progress bar,
    checkpoints and best.pth, the ranks' agreement on each step's loss and on stopping. No callbacks:
    main calls these methods where its loop needs them. Leaving the `with` block by any way (the end,
    a stop signal, too many non-finite losses, a failing validation, an error) closes the log and the
    bar, puts the signal handlers and float32 settings back, ends the process group and releases the
    work dir."""

    def __init__(self, config, argv, *, resume=None, trust=False, keep=3, max_nonfinite=5):
        self.config, self.work_dir = config, Path(config["work_dir"])
        self.rank, self.world_size = runtime.rank_and_world_size()
        self.resume_flag, self.trust, self.keep = resume, trust, keep
        self.max_nonfinite = max_nonfinite
        self.restart = restart_command(argv, self.world_size)  # the command that continues this run
        self.best_miou, self.validation_pending, self.last_path, self.start = -1.0, False, None, 0
        self.iteration = self.saved_iteration = 0  # steps done, and of them in the last checkpoint
        self.nonfinite_in_a_row, self.mean_loss, self.stop_requested = 0, math.nan, False
        self.writer = self.bar = None
        self.pictures = self.work_dir / "pictures" if config["pictures"] else None  # of the last validation
        self.cleanup = contextlib.ExitStack()

    def __enter__(self):
        with contextlib.ExitStack() as stack:  # if this fails halfway, what it did is undone
            if self.world_size > 1:
                stack.callback(dist.destroy_process_group)
            if self.rank == 0:
                stack.enter_context(claim_work_dir(self.work_dir))  # the lock file, held until the end
            if self.resume_flag is None:
                refuse_an_earlier_run(self.work_dir)  # a new run changes nothing of an earlier one
            self.resume_path = find_resume_checkpoint(self.resume_flag, self.work_dir)
            stack.enter_context(runtime.training_float32(self.config["precision"]))
            self.stop = StopRequest()
            stack.callback(self.stop.restore)
            self.log = stack.enter_context(Log(self.work_dir / "log.jsonl" if self.rank == 0 else None))
            self.cleanup = stack.pop_all()
        return self

    def __exit__(self, kind, exception, traceback):
        try:
            if isinstance(exception, data.FileProblem):
                self.stop_for_a_bad_file(exception)
        finally:
            self.cleanup.close()
        return False

    def stop_for_a_bad_file(self, problem):
        """A training or validation file could not be used: checkpoint the steps done (one process:
        under torchrun the other ranks are not here to gather their random states), name the file, and
        say how to continue."""
        if self.world_size == 1 and self.writer is not None and self.iteration > self.saved_iteration:
            self.checkpoint(self.iteration)
        kept = f"checkpoint {self.last_path}" if self.last_path else "no checkpoint yet"
        raise SystemExit(
            f"train.py: {problem}\nStopped at iteration {self.iteration} ({kept}). Mend or remove the file, "
            f"then continue with: {self.restart}"
        ) from None

    def resume(self, raw_model, optimizer, scaler, train_set):
        """Hand the run what its checkpoints hold; with --resume, load it all back: weights, optimizer,
        loss scaler, every rank's random stream, the best score, whether a validation is pending.
        Returns the iteration to start at: 0 for a new run."""
        meta = {"CLASSES": list(train_set.classes), "PALETTE": [list(c) for c in train_set.palette]}
        self.writer = CheckpointWriter(work_dir=self.work_dir, raw_model=raw_model, optimizer=optimizer,
                                       scaler=scaler, config=self.config, meta=meta, keep=self.keep,
                                       restart=self.restart)  # fmt: skip
        if not self.resume_path:
            return 0
        path, checkpoint = self.resume_path, read_resume_checkpoint(self.resume_path, self.trust)
        for key in ("dataset", "depth"):  # another model: the command lacks a flag
            if checkpoint["recipe"].get(key) != self.config[key]:
                raise SystemExit(
                    f"--resume {path}: that run has --{key} {checkpoint['recipe'].get(key)}, this command "
                    f"--{key} {self.config[key]}. Pass --{key} {checkpoint['recipe'].get(key)} to continue it (or "
                    f"--load-from {path} to start a new run from its weights, in another --work-dir)."
                )
        theirs = dict(recipe.GC_BLOCK, **checkpoint["recipe"].get("block", {}))
        if theirs != self.config["block"]:
            raise SystemExit(
                f"--resume {path}: that run trains a {recipe.method_name(theirs)} model, this command a "
                f"{recipe.method_name(self.config['block'])} one. Pass {recipe.block_flags(theirs)} to continue it."
            )
        for key in ("crop_size", "iters", "global_batch", "lr"):
            if checkpoint["recipe"].get(key) != self.config[key]:
                runtime.say(f"WARNING: resuming with {key} = {self.config[key]}, the checkpoint has "
                            f"{checkpoint['recipe'].get(key)}")  # fmt: skip
        try:
            load_checkpoint(raw_model, path, checkpoint)
        except ValueError as error:
            raise SystemExit(f"--resume: {error}") from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_states(checkpoint.get("rng") or [], torch.device(self.config["device"]))
        runtime.say(f"resumed from {path} at iteration {checkpoint['iteration']}")
        self.start, self.last_path = checkpoint["iteration"], path
        self.iteration = self.saved_iteration = self.start
        self.best_miou = checkpoint.get("best_miou", -1.0)
        self.validation_pending = checkpoint.get("validation_pending", False)
        return self.start

    def loss_is_finite(self, loss, iteration):
        """Whether the loss is finite on every rank: one all-reduce that also averages the loss and
        agrees on stopping, so all ranks step, skip or stop together. A non-finite step is skipped,
        counted and logged; `max_nonfinite` in a row end the run, naming the last good checkpoint."""
        value = loss.item()
        flags = torch.tensor([value, not math.isfinite(value), self.stop.requested], device=loss.device)
        if self.world_size > 1:
            dist.all_reduce(flags)
        self.mean_loss, self.stop_requested = flags[0].item() / self.world_size, flags[2].item() > 0
        if flags[1].item() == 0:
            self.nonfinite_in_a_row = 0
            return True
        self.nonfinite_in_a_row += 1
        runtime.say(
            f"\niteration {iteration}: non-finite loss, step skipped ({self.nonfinite_in_a_row} in a row)"
        )
        self.log.write({"iteration": iteration, "event": "nonfinite_loss"})
        if self.nonfinite_in_a_row >= self.max_nonfinite:
            raise SystemExit(
                f"stopping: {self.nonfinite_in_a_row} non-finite losses in a row at iteration {iteration}. "
                f"Lower --lr (now {self.config['lr']}), try --precision fp32, or check the labels. "
                f"The last good checkpoint is {self.last_path or 'not written yet'}."
            )
        return False

    def log_step(self, iteration, finite, values):
        """The progress bar after `iteration` finished steps, and every log_interval-th a record of
        `values` (losses, lr, times) in log.jsonl."""
        self.iteration = iteration
        if self.bar is None:
            bar = tqdm(
                total=self.config["iters"], initial=self.start, disable=self.rank != 0, dynamic_ncols=True
            )
            self.bar = self.cleanup.enter_context(bar)
        if self.rank == 0 and finite:
            memory = runtime.peak_memory_gb(torch.device(self.config["device"]))
            self.bar.set_postfix(loss=f"{self.mean_loss:.3f}", lr=f"{values['lr']:.2e}",
                                 data=f"{values['data_time']:.2f}s", step=f"{values['step_time']:.2f}s",
                                 mem=f"{memory:.1f}G")  # fmt: skip
            if iteration % self.config["log_interval"] == 0 or iteration == self.config["iters"]:
                numbers = {
                    key: value.item() if torch.is_tensor(value) else value for key, value in values.items()
                }
                self.log.write(dict(iteration=iteration, loss=self.mean_loss, **numbers, memory_gb=memory))
        self.bar.update(1)

    def checkpoint(self, iteration, validation_pending=False):
        """iter_<N>.pth after `iteration` finished steps; validation_pending when a validation follows."""
        self.last_path = self.writer.save(iteration, self.best_miou, self.last_path, validation_pending)
        self.saved_iteration = iteration

    def checkpoint_and_stop(self, iteration):
        """A stop signal arrived: checkpoint and say how to continue."""
        self.checkpoint(iteration)
        runtime.say(f"\nstopped by a signal at iteration {iteration}; checkpoint {self.last_path}")
        runtime.say(f"continue with: {self.restart}")

    def keep_best(self, iteration, results, seconds):
        """After validating checkpoint `iteration`: log the scores; on a new best, write best.pth. The
        iteration's own checkpoint still records the previous best, so a crash before best.pth is
        complete leaves the old best.pth, and the resumed run validates this iteration again."""
        scores = {key: results[key] for key in ("mIoU", "mAcc", "aAcc", "mF1")}
        self.log.write(dict(iteration=iteration, **scores, val_loss=results["loss"], val_seconds=seconds))
        if results["mIoU"] > self.best_miou:
            self.writer.save(iteration, results["mIoU"], None, name="best.pth", validation=dict(
                validation_settings(self.config), iteration=iteration, mIoU=results["mIoU"]))  # fmt: skip
        self.best_miou = max(self.best_miou, results["mIoU"])
        self.validation_pending = False

    def finish(self, iteration):
        """Say where things are, if the schedule is done."""
        if iteration < self.config["iters"]:
            return
        runtime.say(f"\ndone: {iteration} iterations, best val mIoU {self.best_miou:.2f}; checkpoints and log in "
                    f"{self.work_dir}")  # fmt: skip
        if self.rank == 0:
            records, _ = read_log(self.work_dir / "log.jsonl")
            save_picture(pictures.log_picture(records, self.config["config_name"]), self.work_dir / "log.png")
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
LAST_CHECKPOINT = "last_checkpoint"  # names the newest iter_<N>.pth this work dir's run wrote


def claim_work_dir(work_dir):
    """Lock the work dir for this process's lifetime (the OS releases the lock on any exit, a crash
    included) and remove temporary files that a crashed run left. A second run is refused."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        lock = open(work_dir / "run.lock", "a+")  # held open, and locked, until the process ends
    except OSError as error:  # a file in the way, a read-only disk, no permission
        raise SystemExit(
            f"train.py: cannot use --work-dir {work_dir}: {error.strerror or error} ({error.filename}). "
            "Pass a --work-dir in a folder you can write to."
        ) from None
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
    found = [path for path in Path(work_dir).glob("iter_*.pth") if CHECKPOINT_NAME.fullmatch(path.name)]
    return sorted(found, key=checkpoint_number)


def checkpoint_number(path):
    return int(CHECKPOINT_NAME.fullmatch(Path(path).name).group(1))


def temporary_name(path, suffix=".tmp"):
    """A name beside `path` unique to this writer; with the default suffix, claim_work_dir's `.*.tmp`
    clean-up matches it."""
    return path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def replaced_atomically(path, suffix=".tmp"):
    """`with replaced_atomically(path) as temporary:` write the file to `temporary`; when the block
    ends, one rename puts it at `path`, so a crash leaves the old file or the new one, never half. If
    the block fails, the partial file is removed (nothing left to fill the disk)."""
    temporary = temporary_name(Path(path), suffix)
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text(path, text):
    """A small file written atomically."""
    with replaced_atomically(path) as temporary:
        temporary.write_text(text)


def save_picture(picture, path):
    """A PIL image written atomically, in the format its name's suffix says (.png, .jpg, ...)."""
    known = Image.registered_extensions()
    if path.suffix.lower() not in known:
        raise ValueError(
            f"{path}: Pillow writes no picture format named {path.suffix or '(no suffix)'}; name a .png file"
        )
    with replaced_atomically(path) as temporary:
        picture.save(temporary, format=known[path.suffix.lower()])


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


def find_resume_checkpoint(resume, work_dir):
    """--resume PATH, or for a bare --resume the newest checkpoint this work dir's run wrote: the one
    last_checkpoint names (a run resumed from an earlier iter_<N>.pth writes lower numbers than the
    abandoned ones beside them), else the highest iter_<N>.pth."""
    if resume is None:
        return None
    if resume != "latest":
        return resume
    pointer = Path(work_dir) / LAST_CHECKPOINT
    named = Path(work_dir) / pointer.read_text().strip() if pointer.is_file() else None
    if named is not None and CHECKPOINT_NAME.fullmatch(named.name) and named.is_file():
        return named
    found = checkpoints_in(work_dir)
    if not found:
        raise SystemExit(f"--resume: no iter_<N>.pth in {work_dir}; pass --resume PATH or start without it")
    return found[-1]


class NonFiniteWeights(RuntimeError):
    """The weights to be saved hold NaN or inf: the training diverged."""


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
        raise NonFiniteWeights(f"refusing to write {path}: non-finite values in {', '.join(bad[:5])}")
    with replaced_atomically(path) as temporary:
        torch.save(checkpoint, temporary)


class CheckpointWriter:
    """Writes iter_<N>.pth (and best.pth) on rank 0 after gathering every rank's random state; keeps
    the newest `keep` iter_<N>.pth. `meta` holds the classes and palette, as the official files do."""

    def __init__(self, *, work_dir, raw_model, optimizer, scaler, config, meta, keep, restart):
        self.work_dir, self.raw_model, self.optimizer, self.scaler = (
            Path(work_dir),
            raw_model,
            optimizer,
            scaler,
        )
        self.config, self.meta, self.keep, self.restart = config, meta, keep, restart
        self.rank = runtime.rank_and_world_size()[0]

    def save(self, iteration, best_miou, last_path, validation_pending=False, name=None, validation=None):
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
        if validation:  # best.pth: the settings and score of its validation, which evaluate.py compares with
            checkpoint["validation"] = validation
        try:
            save_checkpoint(path, checkpoint)
        except NonFiniteWeights as error:
            again = f"then continue from {last_path} with: {self.restart} {last_path}"
            raise SystemExit(
                f"{error}. Lower --lr or use --precision fp32, {again if last_path else 'then start again'}"
            ) from None
        except (OSError, RuntimeError) as error:
            if not disk_is_full(error, path, checkpoint):
                raise
            raise SystemExit(disk_full_message(path, checkpoint, last_path, self.restart)) from None
        if name is None:
            write_text(self.work_dir / LAST_CHECKPOINT, path.name)
            # Only earlier checkpoints of this run go: never the one just written, and never higher
            # numbers, which a run resumed from an earlier checkpoint left beside it.
            earlier = [old for old in checkpoints_in(self.work_dir) if checkpoint_number(old) < iteration]
            for old in earlier[: max(0, len(earlier) - (self.keep - 1))]:
                old.unlink()
        return path


# What best.pth records of the validation that scored it (validation_settings), in the names of
# evaluate.py's settings: evaluate.training_differences compares them with its own.
VALIDATION_KEYS = ("dataset", "data_root", "mode", "crop_size", "stride", "scale", "ratios", "flip", "precision",
                   "fold_batchnorm", "channels_last", "device")  # fmt: skip


def validation_settings(config):
    """The VALIDATION_KEYS of train.py's validation: single scale, no flip, the recipe's test protocol,
    the run's precision, layout and BatchNorm folding."""
    root = config["data_root"] or recipe.DATASETS[config["dataset"]]["root"]
    return dict(
        dataset=config["dataset"], data_root=os.path.abspath(root), mode=config["test_mode"],
        crop_size=list(config["test_crop"]), stride=list(config["test_stride"]), scale=list(config["scale"]),
        ratios=[1.0], flip=False, precision=config["precision"], fold_batchnorm=config["fold_batchnorm"],
        channels_last=config["channels_last"], device=torch.device(config["device"]).type,
    )  # fmt: skip


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


def checkpoint_bytes(checkpoint):
    """About the size of a checkpoint file: its weights and the optimizer's buffers."""
    tensors = [checkpoint["state_dict"].values()] + [
        value.values() for value in checkpoint["optimizer"]["state"].values()
    ]
    return sum(t.numel() * t.element_size() for group in tensors for t in group if torch.is_tensor(t))


def disk_is_full(error, path, checkpoint):
    """Whether a failed save ran out of space. torch.save reports ENOSPC as an OSError or, from its
    zip writer, as a RuntimeError without the errno ("unexpected pos ..."): then the free space says."""
    if getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(error):
        return True
    if not isinstance(error, RuntimeError):
        return False
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return False
    return free < checkpoint_bytes(checkpoint)


def disk_full_message(path, checkpoint, last_path, restart):
    needed, free = checkpoint_bytes(checkpoint), shutil.disk_usage(path.parent).free
    kept = (
        f"The previous checkpoint {last_path} is intact." if last_path else "No checkpoint was written yet."
    )
    return (
        f"train.py: the disk is full: writing {path} needs about {needed / 1e6:.0f} MB and {path.parent} has "
        f"{free / 1e6:.0f} MB free. The partial file was removed. {kept} Free some space (or pass --keep 1 "
        f"or another --work-dir), then continue with: {restart}"
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
    rng = checkpoint.get("rng") or []
    wrong = [
        f"{key} is {type(checkpoint[key]).__name__}, expected {kind.__name__}"
        for key, kind in (("state_dict", dict), ("optimizer", dict), ("scaler", dict), ("iteration", int),
                          ("recipe", dict), ("meta", dict), ("rng", list), ("best_miou", float))
        if key in checkpoint and not isinstance(checkpoint[key], kind)
    ]  # fmt: skip
    if isinstance(checkpoint["iteration"], int) and checkpoint["iteration"] < 0:
        wrong.append(f"iteration is {checkpoint['iteration']}")
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

    def __enter__(self):
        return self

    def __exit__(self, *exception):
        self.close()
