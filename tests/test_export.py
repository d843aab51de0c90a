"""tools/export.py: a checkpoint exported with torch.export, loaded back by torch alone."""

import pytest
import torch

from model import GCNet
from tools import export


def test_the_export_reloaded_gives_the_models_logits_at_two_sizes(tmp_path, randomize, capsys):
    net = randomize(GCNet(19).eval())
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
    assert out.stat().st_size > 150e6 and about["scale"] == [2048, 1024] and about["align_corners"] is False
    assert len(about["classes"]) == 19
    mean, std = torch.tensor(about["mean"]).view(1, 3, 1, 1), torch.tensor(about["std"]).view(1, 3, 1, 1)
    for size in ((3, 3, 40, 56), (1, 3, 81, 33)):
        image = torch.rand(size) * 255
        with torch.no_grad():
            expected = net((image - mean) / std)
        assert torch.allclose(program(image), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match="exists: pass another path, or --overwrite"):
        export.main([str(source), str(out)])
    with pytest.raises(SystemExit, match="--check-sizes 16x16: each side must be 32..8192"):
        export.main([str(source), str(tmp_path / "small.pt2"), "--check-sizes", "16", "64"])
    with pytest.raises(SystemExit, match="name the file .pt2"):
        export.main([str(source), str(tmp_path / "gcnet.onnx")])
