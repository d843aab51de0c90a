"""The paper's comparison in model.py: the GC block's pooling and fusion switches, the Non-local block and
the head without a block, each against a formula written independently, and the original's three layouts."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize

import checkpoints
import model
import pictures
import train
from model import ContextBlock, FCNHead, GCNet, NonLocal2d
from tools import export

FIXTURES = Path(__file__).parent / "fixtures"
# The original's Cityscapes 512x1024 40k files of the three models (mmsegmentation v0.5 model zoo).
OFFICIAL_NAMES = {
    "none": "fcn_r50-d8_512x1024_40k_cityscapes_20200604_192608-efe53f0d.pth",
    "nonlocal": "nonlocal_r50-d8_512x1024_40k_cityscapes_20200605_210748-c75e81e3.pth",
    "gc": "gcnet_r50-d8_512x1024_40k_cityscapes_20200618_074436-4b0fd17b.pth",
}


def randomized(module):
    """A small module with large random weights and BatchNorm statistics, in eval mode."""
    return randomize(module, scale=0.3).eval()


def conv1x1(x, conv):
    """A 1x1 conv written as a matrix product over the channels."""
    out = torch.einsum("nchw,oc->nohw", x, conv.weight[:, :, 0, 0])
    return out if conv.bias is None else out + conv.bias[None, :, None, None]


def batchnorm(x, bn):
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return (x - bn.running_mean[None, :, None, None]) * scale[None, :, None, None] + bn.bias[
        None, :, None, None
    ]


def bottleneck(context, convs):
    """Conv C->P, LayerNorm over the P values, ReLU, conv P->C on (N, C) context vectors."""
    first, norm, last = convs[0], convs[1], convs[3]
    hidden = context @ first.weight[:, :, 0, 0].T + first.bias
    mean, var = hidden.mean(1, keepdim=True), hidden.var(1, unbiased=False, keepdim=True)
    hidden = (hidden - mean) / torch.sqrt(var + 1e-5) * norm.weight.flatten() + norm.bias.flatten()
    return hidden.relu() @ last.weight[:, :, 0, 0].T + last.bias  # (N, C)


# ---- the Non-local block --------------------------------------------------------------------


def test_nonlocal_block_equals_the_formula_and_its_chunks_the_whole_matrix(monkeypatch):
    block = randomized(NonLocal2d(16))
    x = torch.randn(2, 16, 5, 7)
    theta, phi, g = (conv1x1(x, part.conv).flatten(2) for part in (block.theta, block.phi, block.g))
    # Embedded Gaussian: a[n, i, j] = softmax_j(theta_i . phi_j / sqrt(8)), then y_i = sum_j a_ij g_j.
    attention = (torch.einsum("nci,ncj->nij", theta, phi) / 8**0.5).softmax(dim=2)
    y = torch.einsum("nij,ncj->nci", attention, g).reshape(2, 8, 5, 7)
    expected = x + batchnorm(conv1x1(y, block.conv_out.conv), block.conv_out.bn)
    whole = block(x)  # with gradients: the whole 35 x 35 matrix at once, as the original
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    # Without gradients, in blocks of rows: 2 images x 35 positions x 3 rows = 210 entries at a time.
    monkeypatch.setattr(model, "ATTENTION_CHUNK", 210)
    shapes = []
    real = model.pairwise_attention
    monkeypatch.setattr(model, "pairwise_attention", lambda q, k: shapes.append(q.shape[:2]) or real(q, k))
    with torch.no_grad():
        chunked, centre = block(x, return_attention=True)
    assert shapes == [(2, 3)] * 11 + [(2, 2), (2, 1)]  # 11 blocks of 3 rows, 1 of 2, then the centre
    torch.testing.assert_close(chunked, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(centre[:, 0].flatten(1), attention[:, 2 * 7 + 3])  # row (2, 3): the centre
    maps = block.attention_maps(x, [0, 34])
    torch.testing.assert_close(maps.flatten(2), attention[:, [0, 34]])


def test_nonlocal_block_starts_as_the_identity_with_the_original_initialisation():
    torch.manual_seed(0)
    block = NonLocal2d(512).eval()
    x = torch.randn(1, 512, 4, 5)
    assert torch.equal(block(x), x)  # conv_out's BatchNorm starts at weight 0, bias 0 (zeros_init)
    for part in (block.g, block.theta, block.phi):
        assert abs(part.conv.weight.std().item() - 0.01) < 0.001 and not part.conv.bias.any()
    assert abs(block.conv_out.conv.weight.std().item() - (2 / 512) ** 0.5) < 0.01  # kaiming fan_out
    assert block.conv_out.conv.bias is None


def test_a_large_image_is_attended_in_chunks_without_the_whole_matrix(monkeypatch):
    # At 1/8 of 512x2048 the matrix has 16384 x 16384 entries: 1.1 GB in float32, in 8 blocks of 128 MB
    # (a whole Cityscapes image: 4.3 GB in 32).
    block = NonLocal2d(8).eval()
    with torch.no_grad():
        block.conv_out.bn.weight.fill_(1)  # not the identity, so the output depends on the attention
    largest = []
    real = model.pairwise_attention
    monkeypatch.setattr(
        model, "pairwise_attention", lambda q, k: largest.append(q.shape[1] * k.shape[2]) or real(q, k)
    )
    x = torch.randn(1, 8, 64, 256)
    with torch.no_grad():
        out = block(x)
    assert max(largest) == model.ATTENTION_CHUNK == 2**25 and len(largest) == 8
    assert out.shape == x.shape and torch.isfinite(out).all() and not torch.equal(out, x)


# ---- the GC block's switches ----------------------------------------------------------------


@pytest.mark.parametrize("pooling, fusion", [("att", "mul"), ("att", "both"), ("avg", "add")])
def test_gc_block_variants_equal_their_formulas(pooling, fusion):
    block = randomized(ContextBlock(32, pooling=pooling, fusion=fusion))
    x = torch.randn(2, 32, 6, 7)
    if pooling == "att":
        scores = torch.einsum("nchw,c->nhw", x, block.conv_mask.weight.flatten()) + block.conv_mask.bias
        weights = scores.flatten(1).softmax(1)
    else:
        weights = torch.full((2, 42), 1 / 42)
    context = torch.einsum("nci,ni->nc", x.flatten(2), weights)
    expected = x
    if fusion != "add":
        expected = expected * torch.sigmoid(bottleneck(context, block.channel_mul_conv))[:, :, None, None]
    if fusion != "mul":
        expected = expected + bottleneck(context, block.channel_add_conv)[:, :, None, None]
    out, attention = block(x, return_attention=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(attention.flatten(1), weights)
    assert hasattr(block, "conv_mask") == (pooling == "att")
    assert hasattr(block, "channel_add_conv") == (fusion != "mul")
    assert hasattr(block, "channel_mul_conv") == (fusion != "add")


def test_the_se_like_variant_is_squeeze_excitation_on_the_same_weights():
    block = randomized(ContextBlock(32, pooling="avg", fusion="mul"))
    x = torch.randn(2, 32, 6, 7)
    first, norm, last = block.channel_mul_conv[0], block.channel_mul_conv[1], block.channel_mul_conv[3]
    # Squeeze (global average), excite (FC, LayerNorm, ReLU, FC, sigmoid), scale each channel.
    squeezed = F.adaptive_avg_pool2d(x, 1).flatten(1)
    hidden = F.linear(squeezed, first.weight.flatten(1), first.bias)
    hidden = F.layer_norm(hidden, (8,), norm.weight.flatten(), norm.bias.flatten())
    gate = torch.sigmoid(F.linear(hidden.relu(), last.weight.flatten(1), last.bias))
    torch.testing.assert_close(block(x), x * gate[:, :, None, None], rtol=1e-5, atol=1e-5)
    # At initialisation the last conv is zero (the original's last_zero_init): the gate is 1/2.
    assert torch.equal(ContextBlock(32, pooling="avg", fusion="mul")(x), x * 0.5)


# ---- the heads ----------------------------------------------------------------------------


@pytest.mark.parametrize("context", ["none", "nonlocal"])
def test_the_fcn_and_nonlocal_heads_put_their_block_between_the_convs(context):
    head = randomized(FCNHead(3, in_channels=12, channels=8, context=context))
    features = torch.randn(2, 12, 5, 6)
    y = head.convs[0](features)
    y = head.nl_block(y) if context == "nonlocal" else y
    y = head.conv_cat(torch.cat([features, head.convs[1](y)], dim=1))
    expected = head.conv_seg(y)  # dropout is off in eval mode
    logits, attention = head(features, return_attention=True)
    torch.testing.assert_close(logits, expected)
    assert (attention is None) == (context == "none")


def read_sections(path):
    """The reference file's three decode-head key lists, by the block they belong to."""
    sections, kinds = {}, iter(["none", "nonlocal", "gc-avg-mul"])
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            current = sections.setdefault(
                next(kinds), dict(total=int(re.search(r"(\d+) keys", line)[1]), keys=[])
            )
        elif line.startswith("decode_head."):
            key, shape = re.fullmatch(r"(\S+) \[(.*)\]", line).groups()
            current["keys"].append((key, [int(v) for v in shape.split(",")] if shape else []))
    return sections


BLOCKS = {
    "none": dict(context="none"),
    "nonlocal": dict(context="nonlocal"),
    "gc-avg-mul": dict(pooling="avg", fusion="mul"),
}


def test_the_three_layouts_are_the_originals(full_depth):
    sections = read_sections(FIXTURES / "fcn_nonlocal_gc-variants_decode_head_keys.txt")
    for name, options in BLOCKS.items():
        with torch.device("meta"):  # shapes without memory or initialisation: a ResNet-50 in no time
            state = GCNet(19, **options).state_dict()
        decode = [(k, list(v.shape)) for k, v in state.items() if k.startswith("decode_head.")]
        assert decode == sections[name]["keys"] and len(state) == sections[name]["total"]  # entry for entry


def test_the_three_layouts_load_strictly_by_their_keys(tmp_path):
    nets = {}
    for name, options in BLOCKS.items():
        net = nets[name] = GCNet(19, **options).eval()
        randomize(net.decode_head, seed=len(nets))  # the heads are what differs
    x = torch.randn(1, 3, 33, 41)
    for context, name in (("none", "none"), ("nonlocal", "nonlocal")):
        path = tmp_path / OFFICIAL_NAMES[context]
        torch.save({"state_dict": nets[name].state_dict(), "meta": {}}, path)
        info = checkpoints.checkpoint_info(str(path))
        assert info["block"] == dict(context=context, pooling="att", fusion="add")
        assert info["config_name"] == OFFICIAL_NAMES[context][: OFFICIAL_NAMES[context].index("_2020")]
        assert info["dataset"] == "cityscapes" and info["row"]["block"]["context"] == context
        loaded = GCNet(19, **info["block"]).eval()
        assert checkpoints.load_checkpoint(loaded, str(path)) == "segmentor"
        with torch.no_grad():
            assert torch.equal(loaded(x), nets[name](x))
        with pytest.raises(ValueError, match=f"build it with --context {context}"):
            checkpoints.load_checkpoint(nets["gc-avg-mul"], str(path))  # another kind: refused, untouched
    # The NonLocal file fine-tunes into a 5-class model as a GCNet's does; it is not exported.
    target = GCNet(5, context="nonlocal")
    assert "19 classes there, 5 here" in train.load_for_fine_tuning(target, str(path), trust=False)
    key = "decode_head.nl_block.theta.conv.weight"
    assert torch.equal(target.state_dict()[key], nets["nonlocal"].state_dict()[key])
    with pytest.raises(SystemExit, match="is a Non-local model: it attends in blocks whose number depends"):
        export.main([str(path), str(tmp_path / "nonlocal.pt2")])
    variant = tmp_path / "ours.pth"
    torch.save({"state_dict": nets["gc-avg-mul"].state_dict()}, variant)
    info = checkpoints.checkpoint_info(str(variant))
    assert info["block"] == dict(context="gc", pooling="avg", fusion="mul")
    loaded = GCNet(19, **info["block"]).eval()
    assert checkpoints.load_checkpoint(loaded, str(variant)) == "segmentor"
    with torch.no_grad():
        assert torch.equal(loaded(x), nets["gc-avg-mul"](x))
    renamed = tmp_path / OFFICIAL_NAMES["nonlocal"].replace("20200605", "x")
    torch.save({"state_dict": nets["none"].state_dict()}, renamed)
    with pytest.raises(ValueError, match="its name says nonlocal R-50-D8 but its weights hold a fcn R-50-D8"):
        checkpoints.checkpoint_info(str(renamed))
    # The depth too; and the file's own name counts before its folder's.
    folder = tmp_path / OFFICIAL_NAMES["none"].removesuffix(".pth")
    folder.mkdir()
    deeper = folder / OFFICIAL_NAMES["nonlocal"].replace("r50", "r101")
    torch.save({"state_dict": nets["nonlocal"].state_dict()}, deeper)
    with pytest.raises(ValueError, match="says nonlocal R-101-D8 but its weights hold a nonlocal R-50-D8"):
        checkpoints.checkpoint_info(str(deeper))


def test_options_are_checked_and_the_pictures_name_each_blocks_map():
    with pytest.raises(ValueError, match="context must be one of gc, nonlocal, none, got 'se'"):
        GCNet(3, context="se")
    with pytest.raises(ValueError, match="pooling and fusion are the GC block's switches"):
        GCNet(3, context="nonlocal", fusion="mul")
    image = torch.randn(3, 40, 48)
    titles = {}
    for name, options in (
        ("nonlocal", dict(context="nonlocal")),
        ("avg", dict(pooling="avg")),
        ("none", dict(context="none")),
    ):
        net = GCNet(3, **options).eval()
        attention, titles[name] = pictures.attention_map(net, image, (40, 48))
        assert (attention is None) == (name == "none")
    assert titles == {
        "nonlocal": "NL attention of the centre position",
        "avg": "GC average pooling: the same weight everywhere",
        "none": None,
    }
