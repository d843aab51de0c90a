"""GCNet for semantic segmentation: a dilated ResNet-D8 with a Global Context block in its head.

GCNet (Cao et al., "Non-local Networks Meet Squeeze-Excitation Networks and Beyond", 2019) observes
that the attention maps of a non-local block are almost the same for every query position, so one
attention map per image is enough. Its Global Context (GC) block therefore does three cheap steps:

    1. context modelling: attention-pool all H*W positions into one C-vector (softmax over positions);
    2. transform:         a C -> C/4 -> C bottleneck with LayerNorm in the middle;
    3. fusion:            broadcast-add the transformed vector to every position.

This file builds the exact model of the official mmsegmentation GCNet checkpoints (R-50-D8 and
R-101-D8), module for module and name for name, so their state_dicts load with strict=True:

    GCNet
    +-- backbone          ResNetV1c (deep stem, dilated: output stride 8)
    +-- decode_head       FCNHead with the GC block: conv, ContextBlock, conv, concat, conv, classifier
    +-- auxiliary_head    FCNHead on layer3, used only for the training loss (weight 0.4)

It needs torch only. Comments name the original's files (mmsegmentation v0.5.0, mmcv v1.0.2) where a
detail matters. `python model.py` prints the parameter count and the output shapes, or:

    python -c "import torch, model; print(model.GCNet(19).eval()(torch.randn(1, 3, 512, 1024)).shape)"
"""

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

# Bottleneck blocks per stage (mmseg v0.5.0 mmseg/models/backbones/resnet.py).
STAGE_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


# -----------------------------------------------------------------------------------------------
# The Global Context block (mmcv v1.0.2 mmcv/cnn/bricks/context_block.py)


class ContextBlock(nn.Module):
    """Global Context block: out = x + T(pool(x)), with attention pooling and additive fusion.

    The paper's two switches: pooling 'att' (default) or 'avg' (the same weight everywhere), and fusion
    'add' (default), 'mul' (x times a sigmoid gate per channel) or 'both' (gate, then add), which build
    the original's channel_add_conv and channel_mul_conv. 'avg' with 'mul' is squeeze-excitation with a
    LayerNorm. For any (N, C, H, W) map; `forward(x, return_attention=True)` also returns the weights
    over the H*W positions, (N, 1, H, W).
    """

    def __init__(self, channels, ratio=1 / 4, pooling="att", fusion="add"):
        super().__init__()
        check_block("gc", pooling, fusion)  # below the line
        planes, self.pooling, self.fusion = int(channels * ratio), pooling, fusion
        if pooling == "att":  # Step 1, context modelling: one 1x1 conv scores every position.
            self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1)
        # Step 2, transform: a bottleneck per fusion (transform, below).
        if fusion in ("add", "both"):
            self.channel_add_conv = transform(channels, planes)
        if fusion in ("mul", "both"):
            self.channel_mul_conv = transform(channels, planes)
        if pooling == "att":  # initialised last, as the original's reset_parameters: its seeded draws
            nn.init.kaiming_normal_(self.conv_mask.weight, mode="fan_in", nonlinearity="relu")
            nn.init.zeros_(self.conv_mask.bias)

    def forward(self, x, return_attention=False):
        n, _, h, w = x.shape
        # Step 1: context modelling. The softmax runs in float32 even under autocast: it spans
        # H*W positions (32768 at 1024x2048) and bf16 would round most weights to nothing.
        if self.pooling == "att":
            scores = self.conv_mask(x).float()  # (N, 1, H, W)
            attention = scores.view(n, h * w).softmax(dim=1).view(n, 1, h, w)  # sums to 1 over H*W
        else:  # average pooling: every position weighs 1 / (H*W)
            attention = torch.full((n, 1, h, w), 1 / (h * w), device=x.device)
        # context[n, c] = sum_hw x[n, c, hw] * attention[n, hw]. Written as a broadcast product and a
        # sum so it works unchanged for channels_last inputs; accumulated in float32.
        context = (x * attention).sum(dim=(2, 3), keepdim=True).to(x.dtype)  # (N, C, 1, 1)
        # Step 2: transform (LayerNorm runs in float32 under autocast).
        # Step 3: fusion, broadcast over H and W: a gate per channel, then an addition.
        out = x
        if self.fusion in ("mul", "both"):
            out = out * torch.sigmoid(self.channel_mul_conv(context))
        if self.fusion in ("add", "both"):
            out = out + self.channel_add_conv(context)  # (N, C, H, W)
        return (out, attention) if return_attention else out


def transform(channels, planes):
    """Step 2's bottleneck C -> P -> C. The LayerNorm normalises jointly over the P x 1 x 1 context
    vector, which eases optimisation of the two-layer bottleneck (it runs in float32 even under
    autocast: LayerNormFP32, below the line). The last conv starts at zero: with 'add' the block is
    the identity at initialisation and can be inserted into a pretrained network without disturbing
    it ('mul' starts as x / 2)."""
    first, last = nn.Conv2d(channels, planes, kernel_size=1), nn.Conv2d(planes, channels, kernel_size=1)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(first, LayerNormFP32([planes, 1, 1]), nn.ReLU(inplace=True), last)


# -----------------------------------------------------------------------------------------------
# The heads (mmseg v0.5.0 mmseg/models/decode_heads/fcn_head.py, gc_head.py, nl_head.py)


class ConvBNReLU(nn.Sequential):
    """3x3 (or kxk) conv without bias, BatchNorm, ReLU; mmcv's ConvModule, with its names."""

    def __init__(self, in_channels, out_channels, kernel_size=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")


class FCNHead(nn.Module):
    """The original's FCNHead: 3x3 convs, then (concat_input) the backbone features concatenated and
    fused by a 3x3 conv, dropout, classifier. GCNet's decode head (GCHead) is the two-conv one with the
    GC block between its convs; context='nonlocal' puts a Non-local block there (the original's NLHead;
    NonLocal2d, below the line, for contrast) and 'none' nothing (the FCN baseline). The auxiliary
    head: one conv, no concat."""

    def __init__(
        self, num_classes, in_channels, channels, num_convs=2, concat_input=True, context="none", **gc
    ):
        super().__init__()
        # Registration order equals the official state_dict order: conv_seg, convs, conv_cat, the block.
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)
        self.dropout = nn.Dropout2d(0.1)  # drops whole channels
        sizes = [in_channels] + [channels] * (num_convs - 1)
        self.convs = nn.Sequential(*[ConvBNReLU(size, channels) for size in sizes])
        self.conv_cat = ConvBNReLU(in_channels + channels, channels) if concat_input else None
        self.context = context
        if context == "gc":
            self.gc_block = ContextBlock(channels, **gc)
        elif context == "nonlocal":
            self.nl_block = NonLocal2d(channels)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def forward(self, features, return_attention=False):
        y, attention = self.convs[0](features), None  # (N, channels, h, w): 512 decode, 256 auxiliary
        if self.context != "none":  # the block sits between the two convs
            block = self.gc_block if self.context == "gc" else self.nl_block
            y, attention = block(y, return_attention=True)
        y = self.convs[1:](y)
        if self.conv_cat is not None:  # backbone features first: (N, 2560, h, w)
            y = self.conv_cat(torch.cat([features, y], dim=1))
        logits = self.conv_seg(self.dropout(y))  # (N, num_classes, h, w)
        return (logits, attention) if return_attention else logits


# -----------------------------------------------------------------------------------------------
# The backbone: ResNetV1c with dilation, output stride 8 (mmseg v0.5.0 mmseg/models/backbones/resnet.py)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels, planes, stride=1, dilation=1, downsample=None):
        super().__init__()
        # 'pytorch' style: the stride sits on the 3x3 conv; padding equals dilation keeps the size.
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.checkpointing = False  # set by GCNet(activation_checkpointing=True)

    def forward(self, x):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint_block(self, x)
        return self.block(x)

    def block(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity  # in place: no new full-size tensor (autograd allows it: BN keeps its input)
        return self.relu(out)


def make_stage(in_channels, planes, blocks, stride, dilation):
    """One ResNet stage. Block 0 changes the channel count, so it always has a downsample branch
    (a 1x1 conv with the stage's stride, never dilated). With dilation d > 1, block 0 uses d // 2 ("contract
    dilation") and the others d, e.g. layer4: 2, 4, 4."""
    out_channels = planes * Bottleneck.expansion
    downsample = nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
    )
    first_dilation = dilation // 2 if dilation > 1 else 1
    layers = [Bottleneck(in_channels, planes, stride, first_dilation, downsample)]
    layers += [Bottleneck(out_channels, planes, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNetV1c(nn.Module):
    """ResNet with a deep 32-32-64 stem; strides (1, 2, 1, 1) and dilations (1, 1, 2, 4) make
    layer2..layer4 all run at 1/8 of the input, with the receptive field kept by dilation."""

    def __init__(self, depth=50):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"depth must be one of {sorted(STAGE_BLOCKS)}, got {depth}")

        def conv_bn_relu(cin, cout, stride):
            conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            return [conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        # Unnamed Sequential so the keys are stem.0 ... stem.7 (the ReLUs hold none), as in the checkpoints.
        self.stem = nn.Sequential(*conv_bn_relu(3, 32, 2), *conv_bn_relu(32, 32, 1), *conv_bn_relu(32, 64, 1))
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        blocks = STAGE_BLOCKS[depth]
        self.layer1 = make_stage(64, 64, blocks[0], stride=1, dilation=1)  # 1/4
        self.layer2 = make_stage(256, 128, blocks[1], stride=2, dilation=1)  # 1/8
        self.layer3 = make_stage(512, 256, blocks[2], stride=1, dilation=2)  # 1/8, dilated
        self.layer4 = make_stage(1024, 512, blocks[3], stride=1, dilation=4)  # 1/8, dilated
        init_from_scratch(self)  # below the line; the recipe loads ImageNet weights over it

    def forward(self, x):
        x = self.maxpool(self.stem(x))  # (N, 64, H/4, W/4)
        c1 = self.layer1(x)  # (N, 256, H/4, W/4)
        c2 = self.layer2(c1)  # (N, 512, H/8, W/8)
        c3 = self.layer3(c2)  # (N, 1024, H/8, W/8)
        c4 = self.layer4(c3)  # (N, 2048, H/8, W/8)
        return c1, c2, c3, c4


# -----------------------------------------------------------------------------------------------
# The whole model (mmseg v0.5.0 mmseg/models/segmentors/encoder_decoder.py)


class GCNet(nn.Module):
    """GCNet R-50-D8 / R-101-D8.

    eval:  model(x) -> logits (N, num_classes, H, W) at the input size;
           model(x, return_attention=True) -> (logits, attention (N, 1, H/8, W/8)); None without a block;
           model(x, upsample=False) -> the logits at 1/8, which model.upsample(logits, (H, W)) brings to
           the input size (evaluate.predict does so one image at a time, to hold less).
    train: model(x) -> (logits, aux_logits), both at the input size. The loss lives in train.py.
    align_corners=True belongs to the 769x769 models, False to all others (recipe.py). context 'nonlocal'
    and 'none' build the original's NonLocal and FCN models, the paper's comparison (README); pooling and
    fusion switch the GC block's (ContextBlock). activation_checkpointing=True recomputes each backbone
    Bottleneck in the backward pass (the original ResNet's with_cp): less memory, more time, same gradients.
    """

    def __init__(
        self,
        num_classes,
        depth=50,
        align_corners=False,
        activation_checkpointing=False,
        *,
        context="gc",
        pooling="att",
        fusion="add",
    ):
        super().__init__()
        self.num_classes, self.depth, self.align_corners = num_classes, depth, align_corners
        self.head_block = check_block(context, pooling, fusion)  # dict(context, pooling, fusion)
        gc = dict(pooling=pooling, fusion=fusion) if context == "gc" else {}
        self.backbone = ResNetV1c(depth)
        self.decode_head = FCNHead(num_classes, 2048, 512, context=context, **gc)  # conv, block, conv, concat
        self.auxiliary_head = FCNHead(num_classes, 1024, 256, num_convs=1, concat_input=False)
        for module in self.backbone.modules():
            if isinstance(module, Bottleneck):
                module.checkpointing = activation_checkpointing

    def upsample(self, logits, size):
        # Resize in float32: cheap at 1/8 resolution, and the full-size logits feed the loss and
        # the softmax, which want float32 anyway.
        return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, x, return_attention=False, upsample=True):
        size = x.shape[-2:]
        _, _, c3, c4 = self.backbone(x)
        logits, attention = self.decode_head(c4, return_attention=True)
        outputs = [self.upsample(logits, size) if upsample else logits]
        if self.training:  # the auxiliary head only serves the training loss
            outputs.append(self.upsample(self.auxiliary_head(c3), size))
        if return_attention:
            outputs.append(attention)
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


# Below this line: mechanics: the Non-local block and the checks of the head's options, LayerNorm in
# float32 under autocast, activation checkpointing, loading weights and the ImageNet backbone's keys, the
# initialisation from scratch, a quick look (python model.py). A first reading can stop here.


class NonLocal2d(nn.Module):
    """The Non-local block as the original's NonLocal model has it between its head's convs (mmcv v1.0.2
    mmcv/cnn/bricks/non_local.py, NonLocal2d: embedded Gaussian, reduction 2, use_scale, conv_out with
    BatchNorm). Every position i gets its own attention map over all positions j,

        a[i, j] = softmax_j(theta(x)_i . phi(x)_j / sqrt(C/2)),
        out_i = x_i + conv_out(sum_j a[i, j] g(x)_j),

    an (H*W) x (H*W) matrix where the GC block has one map of H*W: the paper found those maps nearly the
    same for every i. Without gradients the matrix is computed a block of rows at a time (at most
    ATTENTION_CHUNK entries, one row of each image at least), so a whole 1024x2048 image (32768 x 32768
    positions) fits; training forms it whole, as the original. return_attention gives the map of the
    centre position, (N, 1, H, W)."""

    def __init__(self, channels, reduction=2):
        super().__init__()
        inner = channels // reduction
        # mmcv's ConvModules without activation, in the order of the official checkpoints' keys (g, conv_out,
        # theta, phi; mmcv v1.0.2 registers conv_out last, which changes nothing but the seeded draws).
        self.g = conv1x1(channels, inner)
        self.conv_out = conv1x1(inner, channels, batchnorm=True)
        self.theta, self.phi = conv1x1(channels, inner), conv1x1(channels, inner)
        for conv in (self.g.conv, self.theta.conv, self.phi.conv):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.kaiming_normal_(self.conv_out.conv.weight, mode="fan_out", nonlinearity="relu")
        # conv_out's BatchNorm starts at zero (zeros_init), so the block starts as the identity.
        nn.init.zeros_(self.conv_out.bn.weight)
        nn.init.zeros_(self.conv_out.bn.bias)

    def forward(self, x, return_attention=False):
        n, _, h, w = x.shape
        query = self.theta(x).flatten(2).transpose(1, 2)  # (N, HW, C')
        key, value = self.phi(x).flatten(2), self.g(x).flatten(2).transpose(1, 2)  # (N, C', HW), (N, HW, C')
        rows = h * w if torch.is_grad_enabled() else max(1, ATTENTION_CHUNK // (n * h * w))
        parts = [
            pairwise_attention(query[:, i : i + rows], key).to(value.dtype) @ value
            for i in range(0, h * w, rows)
        ]
        y = torch.cat(parts, dim=1)  # (N, HW, C')
        out = x + self.conv_out(y.transpose(1, 2).reshape(n, -1, h, w))
        if not return_attention:
            return out
        centre = pairwise_attention(query[:, [(h // 2) * w + w // 2]], key)  # the row of the centre position
        return out, centre.view(n, 1, h, w)

    def attention_maps(self, x, positions):
        """The attention maps of the given query positions (flat indices into H*W): (N, len, H, W)."""
        n, _, h, w = x.shape
        query, key = self.theta(x).flatten(2).transpose(1, 2)[:, positions], self.phi(x).flatten(2)
        return pairwise_attention(query, key).view(n, len(positions), h, w)


# Entries of the Non-local attention matrix computed at once without gradients (128 MB in float32).
ATTENTION_CHUNK = 2**25


def pairwise_attention(query, key):
    """softmax over the positions of (query . key) / sqrt(C'), the softmax in float32 (over thousands of
    positions, as the GC block's; under autocast the product itself is bf16's); the division comes after
    the product, as in the original."""
    return (torch.matmul(query, key).float() / query.shape[-1] ** 0.5).softmax(dim=-1)


def conv1x1(in_channels, out_channels, batchnorm=False):
    """mmcv's ConvModule with a 1x1 conv and no activation: keys conv.* (with a bias unless BatchNorm
    follows) and bn.*."""
    layers = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, 1, bias=not batchnorm))
    if batchnorm:
        layers["bn"] = nn.BatchNorm2d(out_channels)
    return nn.Sequential(layers)


CONTEXTS = ("gc", "nonlocal", "none")  # the block between the decode head's convs
POOLINGS, FUSIONS = ("att", "avg"), ("add", "mul", "both")  # the GC block's switches


def check_block(context, pooling, fusion):
    for name, value, choices in (
        ("context", context, CONTEXTS),
        ("pooling", pooling, POOLINGS),
        ("fusion", fusion, FUSIONS),
    ):
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if context != "gc" and (pooling, fusion) != ("att", "add"):
        raise ValueError(
            f"pooling and fusion are the GC block's switches; context {context!r} has no GC block"
        )
    return dict(context=context, pooling=pooling, fusion=fusion)


class LayerNormFP32(nn.LayerNorm):
    """nn.LayerNorm computed in float32 whatever autocast does (CPU autocast would run it in bf16).
    It normalises a (N, P, 1, 1) context vector, so the cost is nil."""

    def forward(self, x):
        with torch.autocast(x.device.type, enabled=False):
            weight, bias = self.weight.float(), self.bias.float()
            out = F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps)
        # Under autocast the next conv casts as it needs; without it, keep the caller's dtype.
        return out if torch.is_autocast_enabled(x.device.type) else out.to(x.dtype)


def checkpoint_block(block, x):
    """block(x), keeping only x for the backward pass, which runs the block again to get the rest.
    The second run must not count as a second batch for BatchNorm, so its running statistics are
    put back as the first run left them."""
    runs = []

    def run(inputs):
        if not runs:  # the forward pass
            runs.append(1)
            return block.block(inputs)
        saved = [buffer.clone() for buffer in block.buffers()]
        out = block.block(inputs)  # the recomputation in the backward pass
        with torch.no_grad():
            for buffer, value in zip(block.buffers(), saved, strict=True):
                buffer.copy_(value)
        return out

    # No early stop: the recomputation must run to its end, where the statistics are put back.
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):
        return torch.utils.checkpoint.checkpoint(run, x, use_reentrant=False)


def load_weights(model, state_dict):
    """A whole GCNet's state_dict (keys 'backbone.*', ...) as in the official checkpoints, or an ImageNet
    ResNetV1c's (keys 'stem.*', ..., 'fc.*' dropped) into the backbone. Files: checkpoints.load_checkpoint."""
    if any(key.startswith("backbone.") for key in state_dict):
        model.load_state_dict(state_dict, strict=True)
        return "segmentor"
    model.backbone.load_state_dict(imagenet_backbone(model, state_dict), strict=True)
    return "imagenet"


def imagenet_backbone(model, state_dict):
    """An ImageNet ResNetV1c's state_dict as the backbone's: without the 'fc' classifier, and with the
    model's own BatchNorm counters (num_batches_tracked, which carry no information) where it has none."""
    counters = {k: v for k, v in model.backbone.state_dict().items() if k.endswith("num_batches_tracked")}
    return {**counters, **{k: v for k, v in state_dict.items() if not k.startswith("fc.")}}


def init_from_scratch(backbone):
    """ResNetV1c's initialisation, used only when training from scratch (the toy demo): Kaiming
    fan_out, BatchNorm 1/0, and the last BatchNorm of each residual branch at 0, so that every block
    starts as the identity (zero_init_residual)."""
    for module in backbone.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    for module in backbone.modules():
        if isinstance(module, Bottleneck):
            nn.init.zeros_(module.bn3.weight)


def count_parameters(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    net = GCNet(num_classes=19).eval()
    print(f"GCNet R-50-D8: {count_parameters(net):,} parameters")  # 49,630,215 as the original
    with torch.no_grad():
        out, att = net(torch.randn(1, 3, 97, 113), return_attention=True)
    print(f"logits {tuple(out.shape)}, attention {tuple(att.shape)}, sums to {att.sum().item():.3f}")
    assert math.isclose(att.sum().item(), 1.0, rel_tol=1e-4)
