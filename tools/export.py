"""Export a GCNet checkpoint for deployment: one file that torch alone runs, without this repository.

    python tools/export.py work_dirs/gcnet_r50-d8_128x128_300it_toy/best.pth gcnet_toy.pt2

The file holds a torch.export program of the evaluation model in float32 with the ImageNet
normalisation built in: an RGB image batch (N, 3, H, W), float values 0..255, in; class logits
(N, classes, H, W) at the same size out. The batch size, height and width are dynamic (each between
the bounds printed). It also holds gcnet.json: the class names and colours, and the test scale,
align_corners and test mode (whole images, or windows of crop_size every stride) of the checkpoint's
recipe. After writing, the file is loaded back and its logits are compared with the model's at two
image sizes (--check-sizes); a difference stops with an error and the file is not written.

Load it elsewhere with torch only, through load_exported (copy the lines from ARCHIVE_FILES to load_exported,
with `import ast, io, json, re, torch`):

    extra = {"gcnet.json": ""}
    program = load_exported("gcnet_toy.pt2", extra_files=extra)
    logits = program.module()(image)          # image: (1, 3, H, W) float32 RGB 0..255
    classes = json.loads(extra["gcnet.json"])["classes"]

torch.export.load alone runs code that a .pt2 file can carry: it unpickles weights and constants marked
`use_pickle` (weights_only=False), and example inputs that its safe reader refuses; it evaluates the shape
expressions with sympy, which is Python's eval; .module() compiles the file's guard code. A file written by
this tool needs none of that, and load_exported refuses any file that asks for it before torch reads it.

evaluate.py's single-scale protocol around it: resize the image to fit the test scale, run, resize the
logits bilinearly back to the image's size, argmax. Sliding windows (the 769x769 rows) and ms+flip are
loops around the same program. ONNX (torch.onnx.export(..., dynamo=True)) and TensorRT start from it.
"""

import argparse
import ast
import io
import json
import re
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's files sit in the root
import data  # noqa: E402
import evaluate  # noqa: E402
import recipe  # noqa: E402
import runtime  # noqa: E402

# Bounds of the dynamic sizes (the largest side is the one the data and the flags allow). The network
# divides H and W by 8 (and rounds up) before the GC block.
MIN_SIDE, MAX_SIDE, MAX_BATCH = 32, recipe.MAX_SIZE, 64


class Segmenter(nn.Module):
    """The exported model: RGB 0..255 in, logits at the input size out (data.normalize, then GCNet)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, image):
        return self.net(data.normalize(image))


def export(segmenter, example_size):
    """torch.export of `segmenter` with the batch, height and width dynamic."""
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    height = torch.export.Dim("height", min=MIN_SIDE, max=MAX_SIDE)
    width = torch.export.Dim("width", min=MIN_SIDE, max=MAX_SIDE)
    example = torch.rand(2, 3, *example_size) * 255  # batch 2: a batch of 1 would be taken as fixed
    # torch 2.11's meta max_pool2d (div_rtn) tests a remainder in Python, which fixes the parity of the
    # stem's output and so of H and W; 2.13 computes floor division alone, as here (the file's check
    # below compares the reloaded logits with the model's either way).
    meta = torch._meta_registrations
    div_rtn, meta.div_rtn = meta.div_rtn, lambda x, y: x // y
    try:
        with torch.no_grad():
            shapes = ({0: batch, 2: height, 3: width},)
            return torch.export.export(segmenter, (example,), dynamic_shapes=shapes)
    finally:
        meta.div_rtn = div_rtn


# What a .pt2 of this tool holds, besides extra/ files: anything else (compiled AOTInductor libraries,
# pickled objects, legacy .pt weights) could run code when loaded.
ARCHIVE_FILES = re.compile(
    r"(archive_format|archive_version|byteorder|version|\.data/version|\.data/serialization_id|extra/.+|models/\w+\.json"
    r"|data/(weights|constants)/\w+_(weights|constants)_config\.json|data/weights/weight_\d+"
    r"|data/constants/tensor_\d+|data/sample_inputs/\w+\.pt)"
)
# The shape expressions torch writes are sympy's srepr, Mul(Integer(4), Symbol('s0', positive=True)):
# calls of these sympy classes (no Pow: 10**10**9 would take the memory) with integers, True/False and
# symbol names. Any other name could be one of Python's builtins (open, exec) to sympify's eval.
SYMPY_CALLS = {"Symbol", "Integer", "Add", "Mul", "FloorDiv", "IntTrueDiv", "Mod", "PythonMod"}
SYMPY_CALLS |= {"CeilToInt", "FloorToInt", "Max", "Min"}
# The guards torch writes (compiled into the module): arithmetic and comparisons of the input's sizes,
# such as ((1 + (((-1) + L['image'].size()[2]) // 8)) % 3) != 0.
GUARD_TOKENS = re.compile(r"\s+|L\['\w+'\]\.size\(\)\[\d\]|\d+|[-+*/%()<>=!]|and|or|not")


def archive_problems(path):
    """What in the .pt2 at `path` would make torch.export.load or .module() run code from the file, read
    without running any of it: a list of texts, empty for a file as this tool writes them."""
    archive = torch._C.PyTorchFileReader(str(path))
    names = archive.get_all_records()
    problems = [f"an unexpected file {name}" for name in names if not ARCHIVE_FILES.fullmatch(name)]
    for name in names:
        if name.endswith("_config.json"):
            for key, entry in json.loads(archive.get_record(name))["config"].items():
                if entry.get("use_pickle") is not False:
                    problems.append(f"{key} in {name} is stored as a pickle")
        elif name.startswith("models/"):
            program = json.loads(archive.get_record(name))
            guards = [code for code in program.get("guards_code", []) if "".join(GUARD_TOKENS.split(code))]
            problems += [f"{name} holds the guard code {code[:80]!r}" for code in guards]
            unusual = [text for text in expressions(program) if not is_shape_expression(text)]
            problems += [f"{name} holds the expression {text[:80]!r}" for text in unusual]
        elif name.startswith("data/sample_inputs/"):
            try:
                torch.load(io.BytesIO(archive.get_record(name)), weights_only=True)
            except Exception:  # anything the safe unpickler refuses; torch would then unpickle it fully
                problems.append(f"{name} holds more than tensors")
    return problems


def expressions(value, key=None):
    """Every string under an "expr_str" key of the program's JSON: torch hands them to sympy.sympify."""
    if isinstance(value, dict):
        return [text for name, item in value.items() for text in expressions(item, name)]
    if isinstance(value, list):
        return [text for item in value for text in expressions(item, key)]
    return [value] if key == "expr_str" and isinstance(value, str) else []


def is_shape_expression(text):
    """Whether `text` is only SYMPY_CALLS of integers, True/False, symbol names and keyword flags: read as
    Python's syntax, never run."""

    def plain(node):
        if isinstance(node, ast.Call):
            named = isinstance(node.func, ast.Name) and node.func.id in SYMPY_CALLS
            keywords = all(keyword.arg and plain(keyword.value) for keyword in node.keywords)
            return named and keywords and all(map(plain, node.args))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return plain(node.operand)
        value = getattr(node, "value", None)
        symbol = isinstance(value, str) and re.fullmatch(r"[a-z]+\d*", value)
        return isinstance(node, ast.Constant) and (type(value) in (int, bool) or bool(symbol))

    try:
        return plain(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # not Python, or nested past parsing
        return False


def load_exported(path, extra_files=None):
    """torch.export.load(path) once archive_problems finds nothing that could run code."""
    try:
        problems = archive_problems(path)
    except (RuntimeError, KeyError, AttributeError, TypeError, ValueError) as error:  # not such an archive
        said = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        raise ValueError(
            f"cannot read {path} as a .pt2 file of tools/export.py ({said}); export it again"
        ) from None
    if problems:
        raise ValueError(
            f"refusing to load {path}: {'; '.join(problems[:5])}. torch.export.load would run code from such a "
            "file; tools/export.py writes none of these. Export the checkpoint again, or load it with "
            "torch.export.load only if you trust where it comes from."
        )
    return torch.export.load(str(path), extra_files=extra_files)


def check(path, segmenter, sizes):
    """Load the written file back, as the README does, and compare its logits with the model's at each
    (H, W). Returns the loaded module, its gcnet.json and [(size, largest logit difference, share of
    pixels with the same class)]; raises if they differ."""
    extra = {"gcnet.json": ""}
    reloaded = load_exported(path, extra_files=extra).module()
    generator, found = torch.Generator().manual_seed(0), []
    for size in sizes:
        image = torch.rand(1, 3, *size, generator=generator) * 255
        with torch.no_grad():
            ours, theirs = segmenter(image), reloaded(image)
        if theirs.shape != ours.shape:
            raise SystemExit(
                f"export.py: the exported program gives logits {tuple(theirs.shape)} at {size}, the model "
                f"{tuple(ours.shape)}; nothing was written"
            )
        difference = (theirs - ours).abs().max().item()
        same = (theirs.argmax(1) == ours.argmax(1)).float().mean().item()
        found.append((size, difference, same))
        if not torch.allclose(theirs, ours, rtol=1e-4, atol=1e-4):
            raise SystemExit(
                f"export.py: the exported program's logits differ from the model's at {size[0]}x{size[1]}: "
                f"largest difference {difference:.3g}, {same:.4%} of the pixels get the same class. Nothing "
                "was written (a file already there is kept); please report this with your torch version."
            )
    return reloaded, json.loads(extra["gcnet.json"]), found


def main(argv=None):
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", help="ours (best.pth, iter_<N>.pth) or an official one: path or URL")
    parser.add_argument("out", type=runtime.writable_path("file"), help="the file to write, e.g. gcnet.pt2")
    parser.add_argument(
        "--check-sizes",
        type=runtime.size_flag("--check-sizes"),
        nargs=2,
        metavar="HxW",
        help="two image sizes to compare the reloaded file at (default: the recipe's crop and "
        "an odd size below it)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="unpickle the checkpoint fully: runs code in it"
    )
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.suffix != ".pt2":
        raise SystemExit(f"export.py: {out}: name the file .pt2, as torch.export.load expects")
    if out.exists() and not args.overwrite:
        raise SystemExit(f"export.py: {out} exists: pass another path, or --overwrite to replace it")
    for size in args.check_sizes or []:
        if not all(MIN_SIDE <= side <= MAX_SIDE for side in size):
            raise SystemExit(
                f"export.py: --check-sizes {size[0]}x{size[1]}: each side must be {MIN_SIDE}..{MAX_SIDE}"
            )
    flags = ["--device", "cpu", "--precision", "fp32"] + ["--trust-checkpoint"] * args.trust_checkpoint
    try:
        predictor = evaluate.Predictor(args.checkpoint, flags)  # the model as evaluate.py builds it, in fp32
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"export.py: {error}") from None
    if predictor.model.head_block["context"] == "nonlocal":
        raise SystemExit(
            f"export.py: {args.checkpoint} is a Non-local model: it attends in blocks whose number depends on "
            "the image size, which torch.export cannot keep dynamic. Export the GC (or FCN) model; the "
            "Non-local one is here for the paper's comparison (README)."
        )
    predictor.model.auxiliary_head = None  # it serves the training loss only: not in the file
    segmenter = Segmenter(predictor.model).eval()
    crop = tuple(predictor.settings["crop_size"])
    crop = tuple(min(max(side, MIN_SIDE), MAX_SIDE) for side in crop)  # a run may train below MIN_SIDE
    sizes = args.check_sizes or [crop, tuple(max(MIN_SIDE, side * 3 // 4) | 1 for side in crop)]
    start = time.perf_counter()
    program = export(segmenter, sizes[0])
    about = dict(
        classes=list(predictor.classes),
        palette=[list(colour) for colour in predictor.palette],
        scale=list(predictor.settings["scale"]),
        align_corners=bool(predictor.model.align_corners),
        # How the table tested it: whole images, or (the 769x769 rows) windows of crop_size every stride.
        **{key: predictor.settings[key] for key in ("mode", "crop_size", "stride")},
        input="RGB (N, 3, H, W) float32 0..255",
        output="logits (N, classes, H, W)",
        checkpoint=str(args.checkpoint),
        mean=list(data.MEAN),
        std=list(data.STD),
        torch=torch.__version__,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    with runtime.written_atomically(out, suffix=".pt2") as temporary:  # torch.export wants a .pt2 name
        torch.export.save(program, str(temporary), extra_files={"gcnet.json": json.dumps(about)})
        reloaded, about, found = check(temporary, segmenter, sizes)  # before it replaces a file at `out`
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - start:.0f} s: "
        f"{len(about['classes'])} classes; batch 1..{MAX_BATCH}, height and width {MIN_SIDE}..{MAX_SIDE}"
    )
    for (height, width), difference, same in found:
        print(
            f"reloaded and checked at {height}x{width}: largest logit difference {difference:.2g}, "
            f"{same:.2%} of the pixels the same class"
        )
    return dict(path=out, program=reloaded, about=about)


if __name__ == "__main__":
    main()
