"""Checkpoint files: read without running code, checked, loaded into a GCNet with every key problem
said in words (load_checkpoint), and described (checkpoint_info: the model, data and row of the table
a file belongs to). train.py, evaluate.py and the tools call these; nothing here is part of the recipe.

A file is loaded with torch's weights_only unpickler: tensors, plain containers and numpy values;
anything else is refused unless the user opts in with --trust-checkpoint. A file of a few KB never
makes the project allocate gigabytes.
"""

import hashlib
import http.client
import io
import math
import os
import pickle
import pickletools
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import torch

import data
import model
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
    if (
        plain is None
        or dtype.hasobject
        or dtype.fields
        or dtype.subdtype
        or not 0 < dtype.itemsize <= 1 << 16
    ):
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy dtype {dtype!r} (objects, records or huge items)")
    if (dtype.flags, dtype.itemsize, dtype.alignment) != (plain.flags, plain.itemsize, plain.alignment):
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy dtype with a doctored state")
    return dtype


def numpy_dtype(spec, align=False, copy=True):
    """Stands in for numpy.dtype, which numpy pickles call as dtype('f8', False, True)."""
    if not (isinstance(spec, str) and re.fullmatch(r"[<>|=]?[biufcSU][1-9]\d{0,5}", spec)):
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy dtype {spec!r}")
    return checked_dtype(np.dtype(spec, bool(align), bool(copy)))


class CheckedArray(np.ndarray):
    """Stands in for numpy.ndarray, which a numpy pickle only hands to _reconstruct, never calls: the
    arrays of a checkpoint's meta, whose state is checked before numpy allocates anything."""

    def __new__(cls, *args, **kwargs):
        raise pickle.UnpicklingError(f"{UNSAFE}: numpy.ndarray called directly")

    def __setstate__(self, state):
        _, shape, dtype, fortran, raw = state if isinstance(state, tuple) and len(state) == 5 else [None] * 5
        raw = raw.encode("latin1") if isinstance(raw, str) else raw  # as numpy reads Python 2 pickles
        sizes_ok = isinstance(shape, tuple) and all(type(size) is int and size >= 0 for size in shape)
        sizes_ok = sizes_ok and math.prod(shape) <= MAX_META_ARRAY_BYTES  # items of 0 bytes are refused too
        nbytes = math.prod(shape) * checked_dtype(dtype).itemsize if sizes_ok else -1
        if not (0 <= nbytes <= MAX_META_ARRAY_BYTES and isinstance(raw, bytes) and len(raw) == nbytes):
            raise pickle.UnpicklingError(f"{UNSAFE}: a numpy array whose size is not its data's")
        np.ndarray.__setstate__(self, (1, shape, dtype, bool(fortran), raw))


def numpy_reconstruct(subtype, shape, typecode):
    """Stands in for numpy's _reconstruct: numpy pickles an empty array, then sets its state."""
    if subtype is not CheckedArray or tuple(shape) != (0,) or typecode not in (b"b", "b"):
        raise pickle.UnpicklingError(f"{UNSAFE}: numpy _reconstruct{(shape, typecode)}")
    return np.ndarray((0,), np.uint8).view(CheckedArray)


def numpy_scalar(dtype, data=None):
    """Stands in for numpy's scalar(dtype, bytes)."""
    if not isinstance(data, bytes) or len(data) != checked_dtype(dtype).itemsize:
        raise pickle.UnpicklingError(f"{UNSAFE}: a numpy scalar whose size is not its data's")
    return np_multiarray.scalar(dtype, data)


NUMPY_SAFE_GLOBALS = (
    [(numpy_dtype, "numpy.dtype"), (CheckedArray, "numpy.ndarray")]
    + [
        (function, f"numpy.{core}.multiarray.{name}")
        for core in ("core", "_core")
        for function, name in ((numpy_reconstruct, "_reconstruct"), (numpy_scalar, "scalar"))
    ]
    + list({type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDGSU"} - {np.dtype})  # a dtype's state
)
# torch's weights_only unpickler allows bytearray, the tensor classes (torch.Tensor, torch.FloatTensor,
# torch.cuda.HalfTensor...) and the storages, and each makes its whole size from one number in the
# file: bytearray(10**9) or torch.FloatTensor(2**28) allocates a gigabyte. So do its rebuilds of a
# tensor in another dtype, from a 1-element tensor viewed as 10^9. torch.save writes none of them for
# CPU or CUDA tensors (the rebuilds are for XLA-like devices).
REFUSED_GLOBALS = re.compile(
    r"(builtins|__builtin__)\.bytearray|torch\.((cuda\.)?(sparse\.)?\w*Tensor|(storage\.)?(Untyped|Typed)"
    r"Storage|_utils\._rebuild_device_tensor_from_\w+)"
)
# What else torch's weights_only unpickler allows besides torch's own names (protocol 2 pickles bytes
# through _codecs.encode): named in no refusal.
HARMLESS_GLOBALS = {"collections.OrderedDict", "_codecs.encode"} | {
    entry[1] if isinstance(entry, tuple) else f"{entry.__module__}.{entry.__qualname__}"
    for entry in NUMPY_SAFE_GLOBALS
}
HARMLESS_GLOBALS |= {
    f"{module}.{name}" for module in ("builtins", "__builtin__") for name in ("set", "frozenset", "complex")
}


def read_checkpoint(path_or_url, trust=False):
    """Load a checkpoint file or URL (local_copy) onto the CPU without running code from it: torch's
    weights_only unpickler, allowing tensors, plain Python containers and NUMPY_SAFE_GLOBALS, and no
    value that asks for more memory than the file holds (REFUSED_GLOBALS, check_tensors).
    trust=True unpickles fully (any code in the file runs) and says so."""
    source = str(path_or_url)
    local = local_copy(source)
    if trust:
        print(f"WARNING: --trust-checkpoint: unpickling {source} fully; code in it can run.", file=sys.stderr)
    try:
        found = set() if trust else globals_in(local)
    except OSError as error:  # no permission to read it, say
        raise ValueError(f"cannot read checkpoint {source}: it cannot be read ({error.strerror})") from None
    builds = sorted(filter(REFUSED_GLOBALS.fullmatch, found))
    if builds:
        raise ValueError(
            f"refusing to load {source}: it builds {', '.join(builds)}, which can ask for any amount of memory"
        )
    try:
        with torch.serialization.safe_globals(NUMPY_SAFE_GLOBALS):
            checkpoint = torch.load(local, map_location="cpu", weights_only=not trust)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"checkpoint not found: {source}. Pass the path of a .pth file (ours or an official one "
            "from the results table) or its download URL."
        ) from None
    except Exception as error:
        refused = [line for line in str(error).splitlines() if UNSAFE in line]
        if refused:
            raise ValueError(
                f"refusing to load {source}: it holds {refused[0].split(UNSAFE + ': ')[-1]}, a value that "
                "could take far more memory than the file has bytes"
            ) from None
        code = sorted(name for name in found - HARMLESS_GLOBALS if not name.startswith("torch."))
        if code:
            raise ValueError(
                f"refusing to load {source}: besides weights it holds pickled Python objects, which could "
                f"run code when loaded ({', '.join(code)}). If you trust where the file comes from, "
                "--trust-checkpoint loads it with full unpickling, which runs whatever code the file contains."
            ) from None
        raise ValueError(f"cannot read checkpoint {source}: {describe_unreadable(local)}") from error
    if not trust:
        check_tensors(checkpoint, source)
    return checkpoint


def check_tensors(checkpoint, source):
    """Refuse tensors that are small in the file and huge in use: more elements than their storage
    holds (a 1-element storage viewed with stride 0 as 10^9 elements, which the NaN check would
    expand), or not plain dense CPU tensors. torch.load itself refuses elements beyond the storage, and
    a storage larger than its record in the file. Only shapes are read."""
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
        elif torch.is_tensor(value) and not (
            type(value) in (torch.Tensor, torch.nn.Parameter)
            and value.layout == torch.strided
            and value.device.type == "cpu"
            and value.numel() * value.element_size() <= value.untyped_storage().nbytes()
        ):
            raise ValueError(
                f"refusing to load {source}: a tensor of shape {list(value.shape)} is not stored in the "
                "file as a plain array of its elements (a small file that would take much more memory)"
            )


def globals_in(path):
    """The names of the globals the pickles of a checkpoint use, read without unpickling (none for a
    damaged file: torch.load says what is wrong)."""
    if not os.path.isfile(path):
        return set()
    with open(path, "rb") as file:  # a zip archive as torch.load tells one: by its first bytes, not its end
        if file.read(4) != b"PK\x03\x04":
            file.seek(0)
            return pickle_globals(file)
    try:  # torch's own zip reader: torch.save may leave the CRC-32s out, which zipfile insists on
        archive = torch._C.PyTorchFileReader(str(path))
    except RuntimeError:
        return set()
    pickles = [name for name in archive.get_all_records() if name.endswith("data.pkl")]
    return set().union(*(pickle_globals(io.BytesIO(archive.get_record(name))) for name in pickles))


def local_copy(source):
    """The local path of a checkpoint: an http(s) URL is downloaded once into torch.hub's cache (never
    unzipped). A name that carries the first digits of the file's SHA-256, as the official files do
    (...-4b0fd17b.pth), is checked against them and cached under that name, where torch.hub looks; any
    other URL under a name made from the whole URL, so that two URLs never share a file."""
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
            f"{digits.group(1)}, as a name ending in -<hex digits> says (the official files' do). Delete it to "
            f"download it again; if those digits are no hash (a date, say), pass the path {cached} instead of the URL."
        )
    return str(cached)


class DownloadFailed(ValueError):
    """A URL that could not be fetched; the message names it and the ways around it."""


def download(url, path):
    """Fetch `url` into `path` with a progress bar (torch.hub writes a temporary file and renames it);
    a failure is said in a few lines, with the ways around it."""
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
    unnamed = [key for key in state_dict if not isinstance(key, str)]
    if unnamed:
        raise ValueError(f"expected its tensors by name (str keys), got the key {unnamed[0]!r}")
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
    theirs, ours = (keys.get("decode_head.conv_seg.weight") for keys in (state_dict, expected))
    if theirs is not None and ours is not None and theirs.shape[:1] != ours.shape[:1]:
        lines.append(
            f"checkpoint has {describe_classes(theirs.shape[0])}, model has {describe_classes(ours.shape[0])}; "
            "build the model with the checkpoint's class count or evaluate on the matching dataset"
        )
    if isinstance(module, model.GCNet) and any(k.startswith("decode_head.") for k in state_dict):
        theirs = block_of_state_dict(state_dict)
        if theirs != module.head_block:
            lines.append(
                f"checkpoint is a {recipe.method_name(theirs)} model, the model built here a "
                f"{recipe.method_name(module.head_block)} one: build it with {recipe.block_flags(theirs)}"
            )
    n_blocks, depth = depth_of(state_dict)
    if n_blocks and isinstance(module, model.GCNet) and depth != module.depth:
        lines.append(
            f"checkpoint is a ResNet-{depth or 'unknown'} ({n_blocks} layer3 blocks), model: {module.depth}"
        )
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            shown = keys[:20] + ([f"... and {len(keys) - 20} more"] if len(keys) > 20 else [])
            lines.append(f"{len(keys)} {title} key(s):\n    " + "\n    ".join(shown))
    raise ValueError("\n".join(lines))


def depth_of(state_dict):
    """The number of layer3 blocks of a ResNet's weights, and its depth by model.STAGE_BLOCKS (None if
    no depth has that many)."""
    n_blocks = sum(1 for k in state_dict if re.fullmatch(r"(backbone\.)?layer3\.\d+\.conv1\.weight", k))
    return n_blocks, {blocks[2]: depth for depth, blocks in model.STAGE_BLOCKS.items()}.get(n_blocks)


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
    runtime.say(
        f"no --checkpoint: evaluating {found[-1]}, the newest of {len(found)} {CHECKPOINT_PATTERN}; "
        "pass --checkpoint PATH for another"
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
    check_class_count(state_dict, path_or_url)
    depth = depth_of(state_dict)[1] if any(k.startswith("backbone.") for k in state_dict) else None
    if "decode_head.conv_seg.weight" not in state_dict or depth is None:
        raise ValueError(
            f"{path_or_url} is not a checkpoint of GCNet or of the FCN and NonLocal models beside it: it has "
            "no decode_head.conv_seg or backbone.layer3 keys"
        )
    unknown = "dataset align_corners crop_size classes palette config_name recipe row validation".split()
    num_classes = int(state_dict["decode_head.conv_seg.weight"].shape[0])
    info = dict(depth=depth, block=block_of_state_dict(state_dict), num_classes=num_classes)
    info.update(dict.fromkeys(unknown))
    meta, ours = checkpoint.get("meta") or {}, checkpoint.get("recipe")
    for key, value in (("meta", meta), ("recipe", ours)):
        if not isinstance(value, (dict, type(None))):
            raise ValueError(
                f"{path_or_url}: its '{key}' is a {type(value).__name__}, expected a dict: the file is damaged "
                "or was written by another program"
            )
    iters = None  # the schedule an official file's name gives (its 80k rows), else the row's default
    if isinstance(checkpoint.get("validation"), dict):  # best.pth: the score of training's validation
        info["validation"] = checkpoint["validation"]
    if ours:
        info["recipe"] = ours
        for key in ("dataset", "align_corners", "config_name"):
            info[key] = ours.get(key)
        info["crop_size"] = tuple(ours["crop_size"]) if ours.get("crop_size") else None
    else:  # an official one: the row is named in the file name (or the meta's exp_name)
        exp_name, config_text = (
            meta.get(key) if isinstance(meta.get(key), str) else "" for key in ("exp_name", "config")
        )
        # The meta's name first, then the file's own, then its folders'.
        row = recipe.row_of_config_name(f"{exp_name} {os.path.basename(str(path_or_url))} {path_or_url}")
        if row is not None:
            named = (recipe.method_name(row["block"]), row["depth"])
            if named != (recipe.method_name(info["block"]), info["depth"]):
                raise ValueError(
                    f"{path_or_url}: its name says {named[0]} R-{named[1]}-D8 but its weights hold a "
                    f"{recipe.method_name(info['block'])} R-{info['depth']}-D8 model: the file was renamed or "
                    "is damaged"
                )
            info.update(config_name=row["config_name"], dataset=row["dataset"], crop_size=row["crop_size"])
            iters = row["iters"]
        crop_match = re.search(r"crop_size\s*=\s*\((\d+),\s*(\d+)\)", config_text)
        if crop_match and info["crop_size"] is None:
            info["crop_size"] = (int(crop_match.group(1)), int(crop_match.group(2)))
        if info["dataset"] is None:
            dataset_types = {"Cityscapes": "cityscapes", "ADE20KDataset": "ade20k", "PascalVOC": "voc12aug"}
            found = (dataset for type_name, dataset in dataset_types.items() if type_name in config_text)
            info["dataset"] = next(found, recipe.DATASET_OF_NUM_CLASSES.get(info["num_classes"]))
        if "align_corners=True" in config_text.replace(" ", ""):
            info["align_corners"] = True
        elif info["crop_size"] is not None:
            info["align_corners"] = recipe.is_769_crop(info["crop_size"])
    if info["dataset"] in recipe.DATASETS:
        # Ours record their recipe; older ones lack some keys (the test scale): the row fills them.
        row = recipe.row(info["dataset"], info["crop_size"], info["depth"], iters, info["block"])
        info["row"] = {**row, **(ours or {}), "block": info["block"]}
    info["classes"] = meta_list(meta, "CLASSES", "class names", is_name, path_or_url)
    palette = meta_list(meta, "PALETTE", "colours R G B", is_colour, path_or_url)
    info["palette"] = palette and [[int(v) for v in colour] for colour in palette]
    return info


def is_name(value):
    return isinstance(value, str) and len(value) <= 1000


def is_colour(value):
    three = isinstance(value, (list, tuple)) and len(value) == 3
    return three and all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in value)


def meta_list(meta, key, what, is_item, path_or_url):
    """meta[key] as a list of at most MAX_CLASSES items that pass is_item, or None. Anything else (such
    as lists that share one list many times over, to grow a thousandfold when printed) is refused."""
    value = meta.get(key)
    value = value.tolist() if isinstance(value, np.ndarray) else value
    if value is None:
        return None
    if not (isinstance(value, (list, tuple)) and len(value) <= MAX_CLASSES and all(map(is_item, value))):
        raise ValueError(
            f"{path_or_url}: its meta {key} is not a list of at most {MAX_CLASSES} {what}: the file is "
            "damaged or was written by another program"
        )
    return list(value)


# What best.pth records of the validation that scored it (validation_settings), in the names of
# evaluate.py's settings: evaluate.training_differences compares them with its own.
VALIDATION_KEYS = tuple(
    "dataset data_root mode crop_size stride scale ratios flip precision fold_batchnorm channels_last device".split()
)


def validation_settings(config):
    """The VALIDATION_KEYS of train.py's validation: single scale, no flip, the recipe's test protocol,
    the run's precision, layout and BatchNorm folding."""
    return dict(
        dataset=config["dataset"],
        data_root=os.path.abspath(data.data_root(config["dataset"], config["data_root"])),
        mode=config["test_mode"],
        crop_size=list(config["test_crop"]),
        stride=list(config["test_stride"]),
        scale=list(config["scale"]),
        ratios=[1.0],
        flip=False,
        precision=config["precision"],
        fold_batchnorm=config["fold_batchnorm"],
        channels_last=config["channels_last"],
        device=torch.device(config["device"]).type,
    )
