"""tools/export.py: a checkpoint exported with torch.export, loaded back by torch alone."""

import io
import os
import re
import tempfile
from pathlib import Path

import pytest
import torch

import model
from model import GCNet
from tools import export


def test_the_export_reloaded_gives_the_models_logits_at_two_sizes(tmp_path, randomize, capsys, monkeypatch):
    net = randomize(GCNet(19).eval())
    real_export, programs = export.export, []
    monkeypatch.setattr(export, "export", lambda *args: programs.append(real_export(*args)) or programs[-1])
    # an official file's name: the tool reads the row (Cityscapes 512x1024) from it, as evaluate.py does
    source = tmp_path / "gcnet_r50-d8_512x1024_40k_cityscapes_20200618_074450-ef8f069b.pth"
    torch.save({"state_dict": net.state_dict(), "meta": {}}, source)
    exported = export.main([str(source), str(tmp_path / "gcnet.pt2"), "--check-sizes", "64x96", "77x130"])
    said = capsys.readouterr().out
    assert "reloaded and checked at 77x130: largest logit difference" in said and "19 classes" in said
    # Independently of the tool's own check: the program it loaded back from the file, as the README
    # does with torch alone, is the model with the normalisation in front, at sizes it was not traced
    # at, for a batch of 3 too.
    out, program, about = exported["path"], exported["program"], exported["about"]
    # It holds the inference weights in float32 (BatchNorm folded into the convs: a little fewer).
    weights = model.count_parameters(net) - model.count_parameters(net.auxiliary_head)
    assert (
        out.stat().st_size > 3.5 * weights
        and about["scale"] == [2048, 1024]
        and about["align_corners"] is False
        and (about["mode"], about["crop_size"], about["stride"]) == ("whole", [512, 1024], [342, 683])
    )
    assert len(about["classes"]) == 19
    mean, std = torch.tensor(about["mean"]).view(1, 3, 1, 1), torch.tensor(about["std"]).view(1, 3, 1, 1)
    for size in ((3, 3, 40, 56), (1, 3, 81, 33)):
        image = torch.rand(size) * 255
        with torch.no_grad():
            expected = net((image - mean) / std)
        assert torch.allclose(program(image), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="exists: pass another path, or --overwrite"):
        export.main([str(source), str(out)])
    # --overwrite with an export that fails its check: the good file stays, and no half one beside it.
    good = out.read_bytes()
    # The README's way to load it without this repository: those lines copied, with five imports.
    source_code = Path(export.__file__).read_text()
    copied = source_code[source_code.index("ARCHIVE_FILES = ") : source_code.index("def check(")]
    alone = {}
    exec("import ast, io, json, re, torch\n" + copied, alone)
    assert alone["archive_problems"](out) == []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(export, "export", lambda *args: programs[0])  # traced once is enough
        patch.setattr(export, "check", refuse_the_check)
        with pytest.raises(SystemExit, match="the logits differ"):
            export.main([str(source), str(out), "--overwrite", "--check-sizes", "64x96", "64x96"])
        # A run trained at a crop below the export's least side is traced at that side (before: torch's
        # ConstraintViolationError).
        traced, small = [], tmp_path / "small_crop" / "best.pth"
        patch.setattr(export, "export", lambda segmenter, size: traced.append(size) or programs[0])
        small.parent.mkdir()
        torch.save({"state_dict": net.state_dict(), "meta": {"config": "crop_size = (16, 24)"}}, small)
        with pytest.raises(SystemExit, match="the logits differ"):
            export.main([str(small), str(small.parent / "small.pt2")])
        assert traced == [(32, 32)]
    assert out.read_bytes() == good
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([source.name, out.name, "small_crop"])
    with pytest.raises(SystemExit, match="--check-sizes 16x16: each side must be 32..8192"):
        export.main([str(source), str(tmp_path / "small.pt2"), "--check-sizes", "16", "64"])
    with pytest.raises(SystemExit, match="name the file .pt2"):
        export.main([str(source), str(tmp_path / "gcnet.onnx")])
    # A place it cannot write is refused as the flags are parsed, not after the export's minutes.
    (tmp_path / "folder.pt2").mkdir()
    (tmp_path / "plain").write_text("")
    capsys.readouterr()
    for place, words in (
        ("plain/out.pt2", "plain is a file, not a folder"),
        ("folder.pt2", "is a directory"),
    ):
        with pytest.raises(SystemExit):
            export.main([str(source), str(tmp_path / place), "--overwrite"])
        assert words in capsys.readouterr().err
    (tmp_path / "page.pth").write_text("<html>Not found</html>")  # a bad checkpoint: words, no traceback
    with pytest.raises(SystemExit, match="export.py: cannot read checkpoint .*page.pth: it is a text file"):
        export.main([str(tmp_path / "page.pth"), str(tmp_path / "page.pt2")])


def refuse_the_check(*args):
    raise SystemExit("export.py: the logits differ")


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = Path(tempfile.gettempdir()) / f"gcnet-export-ran-code-{os.getpid()}"


def rewritten(source, target, change, extra=""):
    """A copy of the .pt2 `source` with its records passed through change(name, bytes) -> bytes, and a
    file named `extra` added."""
    reader, writer = torch._C.PyTorchFileReader(str(source)), torch._C.PyTorchFileWriter(str(target))
    for name in reader.get_all_records():
        if name not in (".data/version", ".data/serialization_id"):  # the writer adds its own
            record = change(name, reader.get_record(name))
            writer.write_record(name, record, len(record))
    if extra:
        writer.write_record(extra, b"\x7fELF", 4)
    writer.write_end_of_file()
    return target


def test_an_export_that_would_run_code_is_refused_before_torch_reads_it(tmp_path, monkeypatch):
    net = torch.nn.Conv2d(3, 2, 3, padding=1)
    height = torch.export.Dim("height", min=8, max=64)
    program = torch.export.export(net, (torch.rand(1, 3, 16, 16),), dynamic_shapes=({2: height},))
    good = tmp_path / "good.pt2"
    torch.export.save(program, str(good))
    assert torch.equal(
        export.load_exported(good).module()(torch.ones(1, 3, 20, 16)), net(torch.ones(1, 3, 20, 16))
    )
    evil = io.BytesIO()
    torch.save(RunsCode(), evil)
    monkeypatch.chdir(tmp_path)

    def pickled_weight(name, record):
        if name.endswith("weights_config.json"):
            return record.replace(b'"use_pickle": false', b'"use_pickle": true', 1)
        return evil.getvalue() if name == "data/weights/weight_0" else record

    def sympy_eval(name, record):
        attack = f"__import__('os').system('touch {MARKER}')".encode()
        return re.sub(rb"Symbol\('s\d+', positive=True, integer=True\)", attack, record, count=1)

    def builtins_through_sympy(name, record):  # passed the old check: capitalised names, quoted words
        attack = b"S('open')('ran', 'w')"  # a file 'ran' in the working directory
        return re.sub(rb"Symbol\('s\d+', positive=True, integer=True\)", attack, record, count=1)

    def guard_code(name, record):
        return record.replace(b'"guards_code": []', f"\"guards_code\": [\"open('{MARKER}', 'w')\"]".encode())

    tampered = {
        "pickled_weight": (
            pickled_weight,
            "weight in data/weights/model_weights_config.json is stored as a pickle",
        ),
        "pickled_inputs": (
            lambda name, r: evil.getvalue() if "sample_inputs" in name else r,
            "holds more than tensors",
        ),
        "sympy_eval": (sympy_eval, "holds the expression \"__import__('os')"),
        "builtins_through_sympy": (builtins_through_sympy, "holds the expression \"S('open')("),
        "guard_code": (guard_code, 'models/model.json holds the guard code "open('),
        "compiled": (lambda name, r: r, "an unexpected file data/aotinductor/model.so"),
    }
    for name, (change, words) in tampered.items():
        path = rewritten(
            good, tmp_path / f"{name}.pt2", change, extra="data/aotinductor/model.so" * (name == "compiled")
        )
        with pytest.raises(ValueError, match=f"refusing to load .*{name}.pt2: .*{re.escape(words)}"):
            export.load_exported(path)
        assert not MARKER.exists() and not (tmp_path / "ran").exists(), name
    # Damaged files are named in words, not torch's or json's tracebacks.
    (tmp_path / "text.pt2").write_text("not an archive")
    no_config = rewritten(
        good, tmp_path / "no_config.pt2", lambda n, r: b"{}" if n.endswith("_config.json") else r
    )
    for path in (tmp_path / "text.pt2", no_config):
        with pytest.raises(
            ValueError, match=rf"cannot read \S*{path.name} as a .pt2 file of tools/export.py \("
        ):
            export.load_exported(path)
