"""checkpoints.py: reading files without running code, loading them into a GCNet with every key
problem in words, what a checkpoint says, downloads."""

import contextlib
import functools
import hashlib
import http.server
import os
import pickle
import re
import struct
import threading
import zipfile

import numpy as np
import pytest
import torch

import checkpoints
from model import GCNet

# ---- weight loading ------------------------------------------------------------------------


def refusing(*args, **kwargs):
    """A GCNet to load a bad file into, which must refuse it: its modules, keys and shapes, without
    memory or initialisation (the meta device)."""
    with torch.device("meta"):
        return GCNet(*args, **kwargs)


def official_checkpoint(net, classes=None):
    classes = classes or tuple(f"class{i}" for i in range(net.num_classes))
    meta = {"CLASSES": classes, "PALETTE": [[i, i, i] for i in range(len(classes))], "config": "x = 1"}
    return {"meta": meta, "state_dict": {k: v.clone() for k, v in net.state_dict().items()}}


def test_official_format_round_trip(tmp_path, randomize):
    source = randomize(GCNet(19), seed=3).eval()
    path = tmp_path / "gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth"
    torch.save(official_checkpoint(source), path)
    target = GCNet(19).eval()
    assert checkpoints.load_checkpoint(target, str(path)) == "segmentor"
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    info = checkpoints.checkpoint_info(str(path))
    assert info["depth"] == 50 and info["num_classes"] == 19 and info["dataset"] == "cityscapes"
    assert info["crop_size"] == (769, 769) and info["align_corners"] is True
    assert info["classes"][0] == "class0" and info["palette"][2] == [2, 2, 2]
    path.rename(path.with_name(path.name.replace("40k", "80k")))  # an 80k row's file: its own schedule
    info = checkpoints.checkpoint_info(str(path.with_name(path.name.replace("40k", "80k"))))
    assert info["row"]["iters"] == 80000 and info["row"]["config_name"] == info["config_name"]


def test_prefixes_of_ddp_and_compile_are_stripped(tmp_path, randomize):
    source = randomize(GCNet(5), seed=4)
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "iteration": 10}, tmp_path / "ours.pth")
    target = GCNet(5)
    checkpoints.load_checkpoint(target, tmp_path / "ours.pth")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_imagenet_backbone_loads_into_backbone_only(tmp_path, randomize):
    source = randomize(GCNet(19), seed=5)
    state = {
        k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")
    }
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save(state, tmp_path / "resnet50_v1c.pth")
    target = GCNet(19)
    head_before = target.decode_head.conv_cat.conv.weight.clone()
    assert checkpoints.load_checkpoint(target, tmp_path / "resnet50_v1c.pth") == "imagenet"
    torch.testing.assert_close(target.backbone.stem[0].weight, source.backbone.stem[0].weight)
    torch.testing.assert_close(
        target.backbone.layer4[-1].bn3.running_var, source.backbone.layer4[-1].bn3.running_var
    )
    assert torch.equal(target.decode_head.conv_cat.conv.weight, head_before)


def test_class_count_mismatch_is_said_in_words(tmp_path):
    torch.save(official_checkpoint(GCNet(19)), tmp_path / "city.pth")
    with pytest.raises(
        ValueError, match=r"checkpoint has 19 classes \(cityscapes\), model has 150 classes \(ade20k\)"
    ):
        checkpoints.load_checkpoint(refusing(150), tmp_path / "city.pth")


def test_a_classifier_of_another_rank_is_a_wrong_shape_not_another_class_count(tmp_path):
    checkpoint = official_checkpoint(GCNet(5))
    width = checkpoint["state_dict"]["decode_head.conv_seg.weight"].shape[1]  # 512 in the recipe
    checkpoint["state_dict"]["decode_head.conv_seg.weight"] = torch.zeros(5, width)
    torch.save(checkpoint, tmp_path / "flat.pth")
    with pytest.raises(
        ValueError, match=rf"conv_seg.weight: checkpoint \[5, {width}\], model \[5, {width}, 1, 1\]"
    ) as error:
        checkpoints.load_checkpoint(refusing(5), tmp_path / "flat.pth")
    assert "classes" not in str(error.value)  # before: "checkpoint has 5 classes, model has 5 classes"


def test_depth_mismatch_is_said_in_words(tmp_path):
    torch.save(official_checkpoint(GCNet(19, depth=50)), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"ResNet-50 .* model: 101") as error:
        checkpoints.load_checkpoint(refusing(19, depth=101), tmp_path / "r50.pth")
    assert "missing key(s)" in str(error.value)


def test_all_key_problems_are_listed_in_one_error(tmp_path):
    checkpoint = official_checkpoint(GCNet(19))
    state = checkpoint["state_dict"]
    del state["decode_head.gc_block.conv_mask.bias"]
    state["decode_head.extra.weight"] = torch.zeros(1)
    width = state["auxiliary_head.convs.0.conv.weight"].shape[0]  # 256 in the recipe
    state["auxiliary_head.convs.0.conv.weight"] = torch.zeros(width, 1024, 1, 1)
    torch.save(checkpoint, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as error:
        checkpoints.load_checkpoint(refusing(19), tmp_path / "broken.pth")
    message = str(error.value)
    assert "1 missing key(s)" in message and "decode_head.gc_block.conv_mask.bias" in message
    assert "1 unexpected key(s)" in message and "decode_head.extra.weight" in message
    assert (
        "1 wrong shape key(s)" in message
        and f"checkpoint [{width}, 1024, 1, 1], model [{width}, 1024, 3, 3]" in message
    )


def test_missing_file_and_foreign_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pth"):
        checkpoints.load_checkpoint(refusing(19), tmp_path / "nothing.pth")
    torch.save(
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "tv.pth"
    )
    with pytest.raises(ValueError, match="neither a GCNet checkpoint .* torchvision ResNet"):
        checkpoints.load_checkpoint(refusing(19), tmp_path / "tv.pth")
    torch.save({"state_dict": {1: torch.zeros(1)}}, tmp_path / "numbered.pth")  # before: an AttributeError
    for read in (checkpoints.checkpoint_info, lambda path: checkpoints.load_checkpoint(refusing(19), path)):
        with pytest.raises(ValueError, match=r"expected its tensors by name \(str keys\), got the key 1"):
            read(tmp_path / "numbered.pth")


def test_checkpoint_info_reads_our_recipe(tmp_path):
    recipe = {"dataset": "ade20k", "crop_size": [512, 512], "align_corners": False, "config_name": "x"}
    state = GCNet(150, depth=101).state_dict()
    torch.save({"state_dict": state, "recipe": recipe, "iteration": 3}, tmp_path / "best.pth")
    info = checkpoints.checkpoint_info(tmp_path / "best.pth")
    assert (info["depth"], info["num_classes"], info["dataset"]) == (101, 150, "ade20k")
    assert info["crop_size"] == (512, 512) and info["align_corners"] is False


# ---- loading runs no code, and says what is wrong with a bad file ---------------------------------


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file: what a hostile .pth does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("writer", ["pickle", "torch.save", "legacy torch.save"])
def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, monkeypatch, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    # Beside the hostile object, numpy values the loader allows: the message names only what it refuses.
    payload = {"state_dict": {"w": torch.zeros(1)}, "meta": [np.float64(1.0), np.ones(2), RunsCode(marker)]}
    if writer == "pickle":
        with open(path, "wb") as file:
            pickle.dump(payload, file)
    else:  # torch's zip format, and its legacy format: several pickles in a row, then the tensors
        torch.save(payload, path, _use_new_zipfile_serialization=writer == "torch.save")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for source in (str(path), path.as_uri()):  # a file and a URL
        with pytest.raises(ValueError, match="refusing to load .*evil.pth.*--trust-checkpoint") as error:
            checkpoints.read_checkpoint(source)
        assert "holds pickled Python objects, which could run code when loaded (posix.system)" in str(
            error.value
        )
        assert not marker.exists()
    with contextlib.suppress(ValueError):  # a bare pickle is no torch file: it runs, then fails
        checkpoints.read_checkpoint(str(path), trust=True)  # the documented opt-in does unpickle fully
    assert marker.exists()


def test_numpy_values_in_the_meta_of_official_checkpoints_load_without_trust(tmp_path):
    meta = {"seed": np.int64(3), "score": np.float64(0.5), "PALETTE": np.array([[1, 2, 3]], np.uint8)}
    torch.save({"meta": meta, "state_dict": {"w": torch.ones(2)}}, tmp_path / "official.pth")
    loaded = checkpoints.read_checkpoint(tmp_path / "official.pth")
    assert loaded["meta"]["seed"] == 3 and loaded["meta"]["PALETTE"].tolist() == [[1, 2, 3]]


def test_broken_files_get_one_clear_message(tmp_path, monkeypatch):
    good = tmp_path / "good.pth"
    torch.save({"state_dict": {"w": torch.zeros(1000)}}, good)
    cases = {
        "empty.pth": (b"", "empty \\(0 bytes\\)"),
        "text.pth": (b"<html><body>Not found</body></html>", "text file, not a PyTorch checkpoint"),
        "cut.pth": (good.read_bytes()[:600], "truncated or damaged"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"cannot read checkpoint .*{name}: .*{message}"):
            checkpoints.read_checkpoint(tmp_path / name)

    # A file this user may not read (as root the permission cannot be taken away: the open refuses).
    def refused(path, mode="r"):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(checkpoints, "open", refused, raising=False)
    with pytest.raises(
        ValueError, match=r"cannot read checkpoint \S*good\.pth: it cannot be read \(Permission denied\)"
    ):
        checkpoints.read_checkpoint(good)


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    checkpoint = official_checkpoint(GCNet(3))
    checkpoint["state_dict"]["decode_head.conv_seg.weight"][0, 0] = float("nan")
    checkpoint["state_dict"]["backbone.stem.0.weight"].fill_(float("inf"))
    torch.save(checkpoint, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="2 tensor\\(s\\) hold NaN.*backbone.stem.0.weight.*conv_seg.weight"):
        checkpoints.load_checkpoint(refusing(3), tmp_path / "nan.pth")


def test_fine_tuning_loads_all_but_the_classifiers_of_another_class_count(tmp_path, randomize):
    source = randomize(GCNet(19), seed=6)
    torch.save(official_checkpoint(source), tmp_path / "city.pth")
    target = GCNet(5)
    fresh = {key: target.state_dict()[key].clone() for key in checkpoints.CLASSIFIER_KEYS}
    assert (
        checkpoints.load_checkpoint(target, tmp_path / "city.pth", new_classes=True)
        == "segmentor, new classifiers"
    )
    for key, value in target.state_dict().items():
        expected = fresh[key] if key in fresh else source.state_dict()[key]
        assert torch.equal(value, expected), key


# ---- a small file cannot demand gigabytes, and downloads are what they say -------------------------


def text(value):
    return b"X" + struct.pack("<I", len(value)) + value.encode()  # a protocol 2 pickle's string


def numpy_array_checkpoint(path, count, dtype="O8", data=b"]"):
    """A 1 KB checkpoint whose meta is a numpy array of `count` elements as numpy pickles one (numpy
    allocates every element before it reads the values): an object array without the dtype state that
    would need ObjectDType, or one of 0-byte strings, what hostile files do to pass an allow-list."""
    dtype = b"cnumpy\ndtype\n(" + text(dtype) + b"\x89\x88tR"  # numpy.dtype('O8', False, True)
    code = b"c_codecs\nencode\n(" + text("b") + text("latin1") + b"tR"  # b'b', as protocol 2 writes bytes
    empty = b"cnumpy._core.multiarray\n_reconstruct\n(cnumpy\nndarray\n(K\x00t" + code + b"tR"
    state = b"(K\x01(\x8a\x08" + count.to_bytes(8, "little") + b"t" + dtype + b"\x89" + data + b"tb"
    write_pickle(path, b"\x80\x02}" + text("meta") + empty + state + b"s" + text("state_dict") + b"}s.")


def write_pickle(path, pickled):
    """`pickled` as the data.pkl of a torch.save archive."""
    writer = torch._C.PyTorchFileWriter(str(path))
    for name, record in (("data.pkl", pickled), (".format_version", b"1"), ("byteorder", b"little")):
        writer.write_record(name, record, len(record))
    writer.write_end_of_file()


class Rebuilt:
    """Pickled as a call of `function` with `arguments`, as a crafted file would hold it."""

    def __init__(self, function, *arguments):
        self.call = function, arguments

    def __reduce__(self):
        return self.call


def test_small_files_that_ask_for_gigabytes_are_refused_before_anything_is_allocated(tmp_path):
    numpy_array_checkpoint(tmp_path / "object_array.pth", 10**8)  # before: 800 MB, then a segfault
    no_bytes = b"c_codecs\nencode\n(" + text("") + text("latin1") + b"tR"
    numpy_array_checkpoint(tmp_path / "empty_strings.pth", 10**12, "S0", no_bytes)  # 0 bytes of data each
    # Tensor classes called with a number make the tensor from it (torch.save never writes them).
    legacy = b"ctorch\nFloatTensor\n(\x8a\x08" + (2**28).to_bytes(8, "little") + b"tR"
    write_pickle(
        tmp_path / "tensor_class.pth", b"\x80\x02}" + text("state_dict") + b"}" + text("w") + legacy + b"ss."
    )
    # An old-format file with a zip archive after it: torch reads it as the old format it starts as.
    torch.save({"meta": bytearray(16)}, tmp_path / "polyglot.pth", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "polyglot.pth", "a") as archive:
        archive.writestr("x.txt", "a zip archive at the end")
    expanded = torch.zeros(1).expand(10**9)  # 4 bytes in the file, 10^9 elements to the NaN check
    torch.save({"state_dict": {"w": expanded}}, tmp_path / "stride_0.pth")
    classifier = {"decode_head.conv_seg.weight": torch.zeros(1, 1, 1, 1).expand(4_000_000, 512, 1, 1)}
    torch.save({"state_dict": classifier}, tmp_path / "classes_expanded.pth")
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meta": bytearray(16)}, tmp_path / "bytearray.pth")
    # torch's own rebuild in another dtype: a 1-element tensor viewed as 10^9, made whole in float64.
    rebuilt = Rebuilt(
        torch._utils._rebuild_device_tensor_from_cpu_tensor, expanded, torch.float64, "cpu", False
    )
    torch.save({"state_dict": {"w": rebuilt}}, tmp_path / "rebuilt.pth")
    torch.save({"state_dict": {}, "meta": Rebuilt(torch.storage.TypedStorage, 10**9)}, tmp_path / "typed.pth")
    refusals = {
        "object_array.pth": "a numpy dtype 'O8'",
        "stride_0.pth": "a tensor of shape [1000000000] is not stored in the file as a plain array",
        "classes_expanded.pth": "a tensor of shape [4000000, 512, 1, 1] is not stored",
        "bytearray.pth": "bytearray, which can ask for any amount of memory",
        "empty_strings.pth": "a numpy dtype 'S0'",
        "tensor_class.pth": "it builds torch.FloatTensor, which can ask for any amount of memory",
        "polyglot.pth": "bytearray, which can ask for any amount of memory",
        "rebuilt.pth": "torch._utils._rebuild_device_tensor_from_cpu_tensor, which can ask",
        "typed.pth": "torch.storage.TypedStorage, which can ask for any amount of memory",
    }
    for name, words in refusals.items():
        assert (tmp_path / name).stat().st_size < 5000, name
        with pytest.raises(ValueError, match=f"refusing to load .*{name}: .*{re.escape(words)}"):
            checkpoints.read_checkpoint(tmp_path / name)
    # No element at all, so no tensor check can see it: 4 million classes would build an 8 GB classifier.
    net = GCNet(3).state_dict()
    torch.save({"state_dict": {**net, "decode_head.conv_seg.weight": torch.zeros(4_000_000, 0, 1, 1)}},
               tmp_path / "classes_empty.pth")  # fmt: skip
    with pytest.raises(ValueError, match="conv_seg.weight has 4000000 classes; .* at most 255"):
        checkpoints.checkpoint_info(tmp_path / "classes_empty.pth")
    with pytest.raises(ValueError, match="conv_seg.weight has 4000000 classes"):
        checkpoints.load_checkpoint(GCNet(3), tmp_path / "classes_empty.pth")
    # Class names that share one list many times over: small in the file, 10^8 names when printed.
    shared = [[["abcdefgh"] * 1000] * 1000] * 100
    torch.save({"state_dict": net, "meta": {"CLASSES": shared}}, tmp_path / "shared_lists.pth")
    with pytest.raises(ValueError, match="meta CLASSES is not a list of at most 255 class names"):
        checkpoints.checkpoint_info(tmp_path / "shared_lists.pth")
    torch.save({"state_dict": net, "meta": {"PALETTE": [1, 2, 3]}}, tmp_path / "flat_palette.pth")
    with pytest.raises(ValueError, match="meta PALETTE is not a list of at most 255 colours R G B"):
        checkpoints.checkpoint_info(tmp_path / "flat_palette.pth")
    # What official files hold still loads: numpy scalars and arrays, views that share a storage.
    shared = torch.arange(12.0).view(3, 4)
    meta = {"seed": np.int64(3), "PALETTE": np.array([[1, 2, 3]], np.uint8), "names": np.array(["a", "bc"])}
    torch.save(
        {"state_dict": {"a": shared, "b": shared.t(), "c": shared[1:]}, "meta": meta}, tmp_path / "ok.pth"
    )
    loaded = checkpoints.read_checkpoint(tmp_path / "ok.pth")
    assert loaded["meta"]["names"].tolist() == ["a", "bc"] and torch.equal(
        loaded["state_dict"]["b"], shared.t()
    )


class Files(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass


@pytest.fixture
def web_server(tmp_path):
    """An HTTP server on this machine serving tmp_path/www: the download path without the internet."""
    (tmp_path / "www").mkdir()
    handler = functools.partial(Files, directory=str(tmp_path / "www"))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    # Polled every 0.05 s, not 0.5: shutdown() waits for the next poll.
    thread = threading.Thread(target=server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
    thread.start()
    yield tmp_path / "www", f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_downloads_are_cached_by_their_whole_url_checked_by_their_hash_and_never_unzipped(
    tmp_path, monkeypatch, web_server
):
    www, url = web_server
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for folder, value in (("a", 1.0), ("b", 2.0)):  # two repositories' model.pth
        (www / folder).mkdir()
        torch.save({"state_dict": {"w": torch.full((2,), value)}}, www / folder / "model.pth")
    for _ in range(2):  # downloaded, then from the cache: never the other URL's file
        for folder, value in (("a", 1.0), ("b", 2.0)):
            for source in (f"{url}/{folder}/model.pth", (www / folder / "model.pth").as_uri()):
                assert checkpoints.read_checkpoint(source)["state_dict"]["w"][0] == value, source
    # file:// URLs are read where they point, and put nothing in the cache
    assert len(list((tmp_path / "hub" / "checkpoints").iterdir())) == 2
    # A name with a hash is the file with that hash: cached under its name, where torch.hub looks.
    content = (www / "a" / "model.pth").read_bytes()
    digest = hashlib.sha256(content).hexdigest()
    (www / f"gcnet-{digest[:8]}.pth").write_bytes(content)
    (www / "gcnet-00000000.pth").write_bytes(content)
    assert checkpoints.read_checkpoint(f"{url}/gcnet-{digest[:8]}.pth")["state_dict"]["w"][0] == 1.0
    assert (tmp_path / "hub" / "checkpoints" / f"gcnet-{digest[:8]}.pth").read_bytes() == content
    # A date is not told from a hash: the words say how to use such a file.
    promise = "is not the file its name promises: its SHA-256 does not begin with 00000000, .* no hash"
    with pytest.raises(
        ValueError, match=promise + r" \(a date, say\), pass the path \S*gcnet-00000000.pth instead"
    ):
        checkpoints.read_checkpoint(f"{url}/gcnet-00000000.pth")
    # A one-member zip is not unzipped into the cache, where it would replace the ImageNet backbone.
    with zipfile.ZipFile(www / "evil.pth", "w") as archive:
        archive.writestr("resnet50_v1c-2cccc1ad.pth", content)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        checkpoints.read_checkpoint(f"{url}/evil.pth")
    assert not (tmp_path / "hub" / "checkpoints" / "resnet50_v1c-2cccc1ad.pth").exists()
