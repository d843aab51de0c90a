"""model.py: architecture, checkpoint layout, initialisation, loading, precision and memory format."""

import contextlib
import math
import os
import pickle
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoints
import model as gcnet
import runtime
from model import ContextBlock, GCNet

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return GCNet(num_classes=19, depth=50).eval()


def randomize(net, seed=0):
    """Give every parameter and BN statistic a non-trivial value, as a trained checkpoint has."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.dtype.is_floating_point:
                noise = torch.randn(tensor.shape, generator=generator) * 0.05
                tensor.copy_(noise.abs() + 0.5 if "running_var" in name else noise)
    return net


def read_manifest(path):
    entries = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = re.fullmatch(r"(\S+) \[(.*)\]", line).groups()
            entries.append((key, [int(v) for v in shape.split(",")] if shape else []))
    return entries


# ---- architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [50, 101])
def test_state_dict_equals_official_manifest(depth):
    expected = read_manifest(FIXTURES / f"gcnet_r{depth}-d8_19cls_state_dict.txt")
    actual = [(k, list(v.shape)) for k, v in GCNet(19, depth=depth).state_dict().items()]
    assert actual == expected  # keys, order and shapes, entry for entry
    assert len(actual) == {50: 366, 101: 672}[depth]


def test_parameter_counts_match_the_original(r50):
    assert gcnet.count_parameters(r50) == 49_630_215
    assert gcnet.count_parameters(r50.backbone) == 23_527_264
    assert gcnet.count_parameters(r50.decode_head) == 23_738_260
    assert gcnet.count_parameters(r50.auxiliary_head) == 2_364_691


def test_classifier_shapes_follow_class_count():
    net = GCNet(num_classes=150)
    assert net.decode_head.conv_seg.weight.shape == (150, 512, 1, 1)
    assert net.auxiliary_head.conv_seg.weight.shape == (150, 256, 1, 1)


def test_dilation_and_stride_per_block():
    backbone = GCNet(19, depth=101).backbone
    assert [b.conv2.dilation[0] for b in backbone.layer3] == [1] + [2] * 22
    assert [b.conv2.dilation[0] for b in backbone.layer4] == [2, 4, 4]
    assert [b.conv2.padding[0] for b in backbone.layer4] == [2, 4, 4]
    assert backbone.layer2[0].conv2.stride == (2, 2) and backbone.layer2[0].conv1.stride == (1, 1)
    assert backbone.layer2[0].downsample[0].stride == (2, 2)
    assert all(layer[0].downsample[0].dilation == (1, 1) for layer in (backbone.layer3, backbone.layer4))


@pytest.mark.parametrize("size", [(97, 113), (64, 64), (65, 129)])
def test_output_sizes_and_stride_8(r50, size):
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        c1, c2, c3, c4 = r50.backbone(x)
        logits = r50(x)
    eighth = [math.ceil(math.ceil(math.ceil(s / 2) / 2) / 2) for s in size]  # stem, maxpool, layer2
    assert c3.shape == (1, 1024, *eighth) and c4.shape == (1, 2048, *eighth)
    assert c1.shape[1] == 256 and c2.shape[1] == 512
    assert logits.shape == (1, 19, *size)


def test_train_mode_returns_logits_and_aux_at_input_size():
    net = GCNet(num_classes=5).train()
    logits, aux = net(torch.randn(2, 3, 65, 81))
    assert logits.shape == aux.shape == (2, 5, 65, 81)


def test_eval_logits_are_upsampled_decode_logits_with_align_corners():
    torch.manual_seed(1)
    for align_corners in (False, True):
        net = randomize(GCNet(7, align_corners=align_corners)).eval()
        x = torch.randn(1, 3, 97, 97)
        with torch.no_grad():
            low = net.decode_head(net.backbone(x)[3])
            expected = F.interpolate(low, size=(97, 97), mode="bilinear", align_corners=align_corners)
            torch.testing.assert_close(net(x), expected)


def test_gc_block_sits_between_the_two_convs_and_concat_puts_backbone_first(r50):
    order = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, name=name: order.append(name))
        for name, m in r50.decode_head.named_children()
        if name in ("gc_block", "conv_cat")
    ] + [
        r50.decode_head.convs[i].register_forward_hook(lambda *a, i=i: order.append(f"convs.{i}"))
        for i in (0, 1)
    ]
    captured = {}
    hooks.append(r50.decode_head.conv_cat.register_forward_pre_hook(lambda m, inp: captured.update(x=inp[0])))
    with torch.no_grad():
        feats = r50.backbone(torch.randn(1, 3, 64, 64))[3]
        r50.decode_head(feats)
    for h in hooks:
        h.remove()
    assert order == ["convs.0", "gc_block", "convs.1", "conv_cat"]
    torch.testing.assert_close(captured["x"][:, :2048], feats)


# ---- the GC block --------------------------------------------------------------------------


def test_context_block_equals_the_formula_written_with_einsum():
    torch.manual_seed(0)
    block = ContextBlock(32, ratio=1 / 4).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)
    x = torch.randn(2, 32, 7, 9)
    out, attention = block(x, return_attention=True)
    # Direct formula: softmax over positions, weighted sum, bottleneck with LayerNorm, broadcast add.
    w_k, b_k = block.conv_mask.weight.view(32), block.conv_mask.bias
    scores = torch.einsum("nchw,c->nhw", x, w_k) + b_k
    weights = scores.flatten(1).softmax(1).view(2, 7, 9)
    context = torch.einsum("nchw,nhw->nc", x, weights)
    conv1, norm, conv2 = block.channel_add_conv[0], block.channel_add_conv[1], block.channel_add_conv[3]
    hidden = context @ conv1.weight.view(8, 32).T + conv1.bias  # (N, P)
    mean, var = hidden.mean(1, keepdim=True), hidden.var(1, unbiased=False, keepdim=True)
    hidden = (hidden - mean) / torch.sqrt(var + 1e-5) * norm.weight.view(8) + norm.bias.view(8)
    delta = hidden.relu() @ conv2.weight.view(32, 8).T + conv2.bias  # (N, C)
    torch.testing.assert_close(out, x + delta[:, :, None, None], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.squeeze(1), weights)
    torch.testing.assert_close(attention.sum(dim=(2, 3)), torch.ones(2, 1))


def test_context_block_is_identity_at_init():
    block = ContextBlock(64)
    x = torch.randn(2, 64, 5, 6)
    assert torch.equal(block(x), x)


def test_initialisation_as_the_original():
    torch.manual_seed(0)
    net = GCNet(num_classes=150)
    head = net.decode_head
    for seg in (head.conv_seg, net.auxiliary_head.conv_seg):
        assert abs(seg.weight.std().item() - 0.01) < 0.001 and seg.bias.abs().max() == 0
    assert head.gc_block.channel_add_conv[3].weight.abs().max() == 0
    assert head.gc_block.channel_add_conv[3].bias.abs().max() == 0
    # kaiming normal: std = sqrt(2 / fan); conv_mask uses fan_in (512), ConvModules fan_out.
    assert abs(head.gc_block.conv_mask.weight.std().item() - math.sqrt(2 / 512)) < 0.01
    conv = head.conv_cat.conv
    assert abs(conv.weight.std().item() - math.sqrt(2 / (512 * 9))) < 0.001
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(bn.bias.abs().max() == 0 for bn in bns)
    assert head.conv_cat.bn.weight.min() == 1 and net.backbone.layer1[0].bn1.weight.min() == 1
    assert net.backbone.layer1[0].bn3.weight.abs().max() == 0  # zero_init_residual, from scratch only
    layer_norm = head.gc_block.channel_add_conv[1]
    assert layer_norm.weight.shape == (128, 1, 1) and layer_norm.weight.min() == 1


# ---- precision and memory format ------------------------------------------------------------


def test_bf16_autocast_forward_on_cpu_keeps_softmax_and_layernorm_in_fp32(r50):
    net = randomize(GCNet(19)).eval()
    x = torch.randn(1, 3, 97, 113)
    dtypes = {}
    hook = net.decode_head.gc_block.channel_add_conv[1].register_forward_hook(
        lambda m, inp, out: dtypes.update(layer_norm=out.dtype)
    )
    with torch.no_grad():
        reference = net(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, attention = net(x, return_attention=True)
    hook.remove()
    assert dtypes["layer_norm"] == torch.float32 and attention.dtype == torch.float32
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    relative_error = (logits - reference).norm() / reference.norm()
    assert relative_error < 0.05, relative_error


def test_channels_last_logits_equal_contiguous():
    net = randomize(GCNet(19)).eval()
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        reference = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        logits = net_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_folded_batchnorm_gives_the_same_logits_without_batchnorm():
    net = randomize(GCNet(19), seed=5).eval()
    folded = runtime.fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == 59  # the original untouched
    conv = folded.backbone.layer1[0].conv1
    bn = net.backbone.layer1[0].bn1
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(conv.weight, net.backbone.layer1[0].conv1.weight * scale[:, None, None, None])
    torch.testing.assert_close(conv.bias, bn.bias - bn.running_mean * scale)
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        reference, logits = net(x), folded(x)
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)
    assert folded.num_classes == 19 and folded.depth == 50 and not folded.training


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_takes_effect_with_glibc():
    # In a child process: the setting lasts for the whole process, and this one runs other tests.
    code = "import runtime; print(runtime.keep_freed_memory())"
    child = subprocess.run([sys.executable, "-c", code], cwd=Path(gcnet.__file__).parent, capture_output=True)
    assert child.returncode == 0 and child.stdout.decode().strip() == "True", child.stderr.decode()


# ---- weight loading ------------------------------------------------------------------------


def official_checkpoint(net, classes=None):
    classes = classes or tuple(f"class{i}" for i in range(net.num_classes))
    meta = {"CLASSES": classes, "PALETTE": [[i, i, i] for i in range(len(classes))], "config": "x = 1"}
    return {"meta": meta, "state_dict": {k: v.clone() for k, v in net.state_dict().items()}}


def test_official_format_round_trip(tmp_path):
    source = randomize(GCNet(19), seed=3).eval()
    path = tmp_path / "gcnet_r50-d8_769x769_40k_cityscapes_20200618_182814-a26f4471.pth"
    torch.save(official_checkpoint(source), path)
    target = GCNet(19).eval()
    assert gcnet.load_weights(target, str(path)) == "segmentor"
    x = torch.randn(1, 3, 65, 65)
    with torch.no_grad():
        assert torch.equal(target(x), source(x))
    info = checkpoints.checkpoint_info(str(path))
    assert info["depth"] == 50 and info["num_classes"] == 19 and info["dataset"] == "cityscapes"
    assert info["crop_size"] == (769, 769) and info["align_corners"] is True
    assert info["classes"][0] == "class0" and info["palette"][2] == [2, 2, 2]


def test_prefixes_of_ddp_and_compile_are_stripped(tmp_path):
    source = randomize(GCNet(5), seed=4)
    state = {f"module._orig_mod.{k}": v for k, v in source.state_dict().items()}
    torch.save({"state_dict": state, "iteration": 10}, tmp_path / "ours.pth")
    target = GCNet(5)
    gcnet.load_weights(target, tmp_path / "ours.pth")
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))


def test_imagenet_backbone_loads_into_backbone_only(tmp_path):
    source = randomize(GCNet(19), seed=5)
    state = {
        k.removeprefix("backbone."): v for k, v in source.state_dict().items() if k.startswith("backbone.")
    }
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    torch.save(state, tmp_path / "resnet50_v1c.pth")
    target = GCNet(19)
    head_before = target.decode_head.conv_cat.conv.weight.clone()
    assert gcnet.load_weights(target, tmp_path / "resnet50_v1c.pth") == "imagenet"
    torch.testing.assert_close(target.backbone.stem[0].weight, source.backbone.stem[0].weight)
    torch.testing.assert_close(
        target.backbone.layer4[2].bn3.running_var, source.backbone.layer4[2].bn3.running_var
    )
    assert torch.equal(target.decode_head.conv_cat.conv.weight, head_before)


def test_class_count_mismatch_is_said_in_words(tmp_path):
    torch.save(official_checkpoint(GCNet(19)), tmp_path / "city.pth")
    with pytest.raises(
        ValueError, match=r"checkpoint has 19 classes \(cityscapes\), model has 150 classes \(ade20k\)"
    ):
        gcnet.load_weights(GCNet(150), tmp_path / "city.pth")


def test_depth_mismatch_is_said_in_words(tmp_path):
    torch.save(official_checkpoint(GCNet(19, depth=50)), tmp_path / "r50.pth")
    with pytest.raises(ValueError, match=r"ResNet-50 .* model: 101") as error:
        gcnet.load_weights(GCNet(19, depth=101), tmp_path / "r50.pth")
    assert "missing key(s)" in str(error.value)


def test_all_key_problems_are_listed_in_one_error(tmp_path):
    checkpoint = official_checkpoint(GCNet(19))
    state = checkpoint["state_dict"]
    del state["decode_head.gc_block.conv_mask.bias"]
    state["decode_head.extra.weight"] = torch.zeros(1)
    state["auxiliary_head.convs.0.conv.weight"] = torch.zeros(256, 1024, 1, 1)
    torch.save(checkpoint, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as error:
        gcnet.load_weights(GCNet(19), tmp_path / "broken.pth")
    message = str(error.value)
    assert "1 missing key(s)" in message and "decode_head.gc_block.conv_mask.bias" in message
    assert "1 unexpected key(s)" in message and "decode_head.extra.weight" in message
    assert (
        "1 wrong shape key(s)" in message
        and "checkpoint [256, 1024, 1, 1], model [256, 1024, 3, 3]" in message
    )


def test_missing_file_and_foreign_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pth"):
        gcnet.load_weights(GCNet(19), tmp_path / "nothing.pth")
    torch.save(
        {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(1000, 2048)}, tmp_path / "tv.pth"
    )
    with pytest.raises(ValueError, match="neither a GCNet checkpoint .* torchvision ResNet"):
        gcnet.load_weights(GCNet(19), tmp_path / "tv.pth")


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


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_hostile_checkpoint_is_refused_and_runs_nothing(tmp_path, monkeypatch, writer):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pth"
    payload = {"state_dict": {"w": torch.zeros(1)}, "meta": RunsCode(marker)}
    if writer == "pickle":
        with open(path, "wb") as file:
            pickle.dump(payload, file)
    else:
        torch.save(payload, path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    for source in (str(path), path.as_uri()):  # a file and a URL (through torch.hub's cache)
        with pytest.raises(ValueError, match="refusing to load .*evil.pth.*--trust-checkpoint"):
            gcnet.read_checkpoint(source)
        assert not marker.exists()
    with contextlib.suppress(ValueError):  # a bare pickle is no torch file: it runs, then fails
        gcnet.read_checkpoint(str(path), trust=True)  # the documented opt-in does unpickle fully
    assert marker.exists()


def test_numpy_values_in_the_meta_of_official_checkpoints_load_without_trust(tmp_path):
    meta = {"seed": np.int64(3), "score": np.float64(0.5), "PALETTE": np.array([[1, 2, 3]], np.uint8)}
    torch.save({"meta": meta, "state_dict": {"w": torch.ones(2)}}, tmp_path / "official.pth")
    loaded = gcnet.read_checkpoint(tmp_path / "official.pth")
    assert loaded["meta"]["seed"] == 3 and loaded["meta"]["PALETTE"].tolist() == [[1, 2, 3]]


def test_broken_files_get_one_clear_message(tmp_path):
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
            gcnet.read_checkpoint(tmp_path / name)


def test_non_finite_weights_are_refused_naming_the_tensors(tmp_path):
    checkpoint = official_checkpoint(GCNet(3))
    checkpoint["state_dict"]["decode_head.conv_seg.weight"][0, 0] = float("nan")
    checkpoint["state_dict"]["backbone.stem.0.weight"].fill_(float("inf"))
    torch.save(checkpoint, tmp_path / "nan.pth")
    with pytest.raises(ValueError, match="2 tensor\\(s\\) hold NaN.*backbone.stem.0.weight.*conv_seg.weight"):
        gcnet.load_weights(GCNet(3), tmp_path / "nan.pth")


def test_fine_tuning_loads_all_but_the_classifiers_of_another_class_count(tmp_path):
    source = randomize(GCNet(19), seed=6)
    torch.save(official_checkpoint(source), tmp_path / "city.pth")
    target = GCNet(5)
    fresh = {key: target.state_dict()[key].clone() for key in gcnet.CLASSIFIER_KEYS}
    assert gcnet.load_weights(target, tmp_path / "city.pth", new_classes=True) == "segmentor, new classifiers"
    for key, value in target.state_dict().items():
        expected = fresh[key] if key in fresh else source.state_dict()[key]
        assert torch.equal(value, expected), key


def test_activation_checkpointing_gives_the_same_gradients_and_statistics():
    plain = randomize(GCNet(3), seed=7).train()
    recomputing = GCNet(3, activation_checkpointing=True).train()
    recomputing.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 33, 33)
    for net in (plain, recomputing):
        torch.manual_seed(0)  # the same dropout masks
        logits, aux_logits = net(x)
        (logits.square().mean() + 0.4 * aux_logits.square().mean()).backward()
    for (name, a), b in zip(plain.named_parameters(), recomputing.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), recomputing.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # BatchNorm counted the batch once, not twice
