"""model.py: architecture, checkpoint layout, initialisation, the strict loader, precision and memory format."""

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model
from model import ContextBlock, GCNet

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def r50():
    torch.manual_seed(0)
    return GCNet(num_classes=19, depth=50).eval()


def read_manifest(path):
    entries = []
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = re.fullmatch(r"(\S+) \[(.*)\]", line).groups()
            entries.append((key, [int(v) for v in shape.split(",")] if shape else []))
    return entries


# ---- architecture ---------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [50, 101])
def test_state_dict_equals_official_manifest(depth, full_depth):
    expected = read_manifest(FIXTURES / f"gcnet_r{depth}-d8_19cls_state_dict.txt")
    with torch.device("meta"):
        actual = [(k, list(v.shape)) for k, v in GCNet(19, depth=depth).state_dict().items()]
    assert actual == expected  # keys, order and shapes, entry for entry
    assert len(actual) == {50: 366, 101: 672}[depth]


def test_parameter_counts_match_the_original(full_depth):
    with torch.device("meta"):  # the same modules and shapes, without memory or initialisation
        r50 = GCNet(num_classes=19, depth=50)
    assert model.count_parameters(r50) == 49_630_215
    assert model.count_parameters(r50.backbone) == 23_527_264
    assert model.count_parameters(r50.decode_head) == 23_738_260
    assert model.count_parameters(r50.auxiliary_head) == 2_364_691


def test_classifier_shapes_follow_class_count(full_depth):
    with torch.device("meta"):
        net = GCNet(num_classes=150)
    assert net.decode_head.conv_seg.weight.shape == (150, 512, 1, 1)
    assert net.auxiliary_head.conv_seg.weight.shape == (150, 256, 1, 1)


def test_dilation_and_stride_per_block(full_depth):
    with torch.device("meta"):
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


def test_eval_logits_are_upsampled_decode_logits_with_align_corners(randomize):
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


def test_initialisation_as_the_original(full_depth):
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


def test_bf16_autocast_forward_on_cpu_keeps_softmax_and_layernorm_in_fp32(randomize):
    net = randomize(GCNet(19)).eval()
    x = torch.randn(1, 3, 33, 41)  # small: without native bf16 the CPU emulates it, 4x slower than fp32
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


def test_channels_last_logits_equal_contiguous(randomize):
    net = randomize(GCNet(19)).eval()
    x = torch.randn(1, 3, 97, 113)
    with torch.no_grad():
        reference = net(x)
        net_cl = net.to(memory_format=torch.channels_last)
        logits = net_cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-4)


def test_activation_checkpointing_gives_the_same_gradients_and_statistics(randomize):
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


# ---- model.py on its own ----------------------------------------------------------------------


def test_model_py_copied_out_alone_runs_its_docstring_one_liner_and_its_main(tmp_path):
    # Copied out alone, as people do with an educational model file: the docstring's one-liner runs
    # there (at a smaller size, same code) and loads no other module of the project; so does the file.
    (tmp_path / "model.py").write_text(Path(model.__file__).read_text())
    line = next(line.strip() for line in model.__doc__.splitlines() if line.strip().startswith("python -c"))
    code = line.removeprefix("python -c ").strip('"').replace("512, 1024", "64, 96")
    code += "; import sys; print(sorted({'checkpoints', 'recipe', 'runtime', 'data', 'evaluate', 'train'} & set(sys.modules)))"
    code += "; import runpy; runpy.run_path('model.py', run_name='__main__')"  # then `python model.py`
    child = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert child.stdout.splitlines()[:2] == ["torch.Size([1, 19, 64, 96])", "[]"], child.stdout
    assert "49,630,215 parameters" in child.stdout and "sums to 1.000" in child.stdout


def test_the_strict_loader_takes_a_gcnet_or_an_imagenet_state_dict(randomize):
    source = randomize(GCNet(5), seed=8)
    target = GCNet(5)
    assert model.load_weights(target, source.state_dict()) == "segmentor"
    assert all(torch.equal(a, b) for a, b in zip(target.state_dict().values(), source.state_dict().values()))
    imagenet = {k.removeprefix("backbone."): v for k, v in randomize(GCNet(5), seed=9).state_dict().items()
                if k.startswith("backbone.") and not k.endswith("num_batches_tracked")}  # fmt: skip
    imagenet["fc.weight"] = torch.zeros(1000, 2048)
    head = target.decode_head.state_dict()
    assert model.load_weights(target, imagenet) == "imagenet"
    assert torch.equal(target.backbone.stem[0].weight, imagenet["stem.0.weight"])
    assert all(torch.equal(a, b) for a, b in zip(target.decode_head.state_dict().values(), head.values()))
    del imagenet["stem.0.weight"]
    with pytest.raises(RuntimeError, match="stem.0.weight"):  # strict: nothing missing
        model.load_weights(target, imagenet)
