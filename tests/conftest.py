import gc
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import shallow
import torch
import torch.utils.serialization

import data
import model

# Tests import the top-level modules (model, data, train, evaluate, benchmark) from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Two cores: keep intra-op threads fixed so timings and results do not depend on the runner.
torch.set_num_threads(2)
# torch.load never checks the CRC-32 of a checkpoint's zip records (a flipped byte loads silently), and
# computing it is most of torch.save's time on these 380 MB files: the tests skip it. What our code
# writes and reads is otherwise the same.
torch.utils.serialization.config.save.compute_crc32 = False
# The runs here write R-50 checkpoints of 380 MB each, and on disk the suite spent about 20 s waiting
# for the kernel's writeback. Where /dev/shm (memory) has room, the tests' temporary folders go there,
# and pyproject.toml has pytest remove the folder of each test that passes.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) and shutil.disk_usage("/dev/shm").free > 8e9:
    tempfile.tempdir = "/dev/shm"


# Most tests need a GCNet, not a ResNet's depth or the head's width: they build one with a bottleneck or
# two per stage and heads an eighth as wide (tests/shallow.py; the tests that start train.py in a process
# of its own run it through tests/shallow.py too). Those that need the real model (the official keys and
# shapes, the parameter counts) ask for the fixture full_depth.
REAL_DEPTHS, REAL_HEAD_INIT = shallow.make_small(model)


@pytest.fixture
def full_depth(monkeypatch):
    """ResNet-50 and -101 with their real numbers of blocks and their heads' real widths, for this test only."""
    for depth, blocks in REAL_DEPTHS.items():
        monkeypatch.setitem(model.STAGE_BLOCKS, depth, blocks)
    monkeypatch.setattr(model.FCNHead, "__init__", REAL_HEAD_INIT)


def randomize(net, seed=0, scale=0.05):
    """Give every parameter and BN statistic a non-trivial value, as a trained checkpoint has (noise of
    std `scale`; running variances 0.5 and above)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.dtype.is_floating_point:
                noise = torch.randn(tensor.shape, generator=generator) * scale
                tensor.copy_(noise.abs() + 0.5 if "running_var" in name else noise)
    return net


@pytest.fixture(name="randomize")
def randomize_fixture():
    """randomize(net, seed=0) for the tests that ask for it."""
    return randomize


def pytest_collection_finish(session):
    # gc.collect scans every object alive, and after collection that is all of pytest, torch and the test
    # modules: about 0.2 s a call, which benchmark.py makes before each measured peak. Freezing what
    # exists now leaves the collections to what the tests make.
    gc.freeze()


@pytest.fixture(scope="session")
def toy_written(tmp_path_factory):
    """The toy dataset as data.py writes it on first use, once per session (a second or two), alone in
    its folder. Read it only: toy_copy gives each test a copy of its own."""
    written = tmp_path_factory.mktemp("toy") / "toy"
    data.build_dataset("toy", str(written), "train")
    return written


@pytest.fixture(scope="session")
def toy_copy(toy_written):
    """toy_copy(folder, val_images): the toy dataset at folder/toy, its val split cut to the first
    `val_images` images (validation is the slow part of a short run)."""

    def copy(folder, val_images):
        root = Path(folder) / "toy"
        shutil.copytree(toy_written, root)
        for image in sorted((root / "leftImg8bit" / "val").rglob("*.png"))[val_images:]:
            image.unlink()
            Path(str(image).replace("leftImg8bit", "gtFine").replace(".png", "_labelTrainIds.png")).unlink()
        return root

    return copy
