"""An inference candidate for CUDA: each convolution that a ReLU follows as one cuDNN call with its bias,
its ReLU and (in a Bottleneck) the residual.

PyTorch runs a cuDNN convolution with a bias as the convolution, then the bias added in a separate
broadcast pass (aten _convolution); after evaluate.fold_batchnorm every convolution has a bias, and that
pass and the ReLU after it each read and write every feature map (on an H200 a quarter of the default
inference went to one broadcast add kernel, most likely this one). targets.py times the candidate on
CUDA, tests/test_cuda.py checks it against the folded model. evaluate.py does not use it: it would move
into the project if it proves faster.
"""

import copy

import torch
from torch import nn

from model import Bottleneck


class FusedConvReLU(nn.Module):
    """ReLU(conv(x) + bias [+ residual]) as one cuDNN call (CUDA tensors only)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x, residual=None):
        # Under autocast these ops are not cast for us: cast input, weights and residual as autocast would.
        on = torch.is_autocast_enabled(x.device.type)
        dtype = torch.get_autocast_dtype(x.device.type) if on else x.dtype
        conv, x = self.conv, x.to(dtype)
        weight, bias = conv.weight.to(dtype), None if conv.bias is None else conv.bias.to(dtype)
        settings = (conv.stride, conv.padding, conv.dilation, conv.groups)
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, *settings)
        return torch.cudnn_convolution_add_relu(x, weight, residual.to(dtype), 1.0, bias, *settings)


class FusedBottleneck(nn.Module):
    """A folded Bottleneck as three fused calls: conv1 and conv2 with their ReLUs, conv3 with the
    residual and the last ReLU."""

    def __init__(self, block):
        super().__init__()
        if not all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in (1, 2, 3)):
            raise ValueError(
                "FusedBottleneck takes a Bottleneck whose BatchNorms are folded (evaluate.fold_batchnorm)"
            )
        self.conv1, self.conv2, self.conv3 = (FusedConvReLU(getattr(block, f"conv{i}")) for i in (1, 2, 3))
        self.downsample = block.downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        return self.conv3(self.conv2(self.conv1(x)), residual=identity)


def fuse_conv_relu(folded):
    """A copy of a model from evaluate.fold_batchnorm with every convolution that a ReLU follows (the
    stem, the Bottlenecks, the heads' ConvModules) run as a FusedConvReLU."""
    fused = copy.deepcopy(folded).eval()
    for module in list(fused.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = [name for name, _ in module.named_children()]
        for name in names:
            if isinstance(getattr(module, name), Bottleneck):
                setattr(module, name, FusedBottleneck(getattr(module, name)))
        for conv_name, between, relu in zip(names, names[1:], names[2:]):  # conv, folded BatchNorm, ReLU
            layers = [getattr(module, name) for name in (conv_name, between, relu)]
            # The stem's first conv stays: 3 input channels, where cuDNN's fused kernels want multiples of 8.
            pattern = [type(layer) for layer in layers] == [nn.Conv2d, nn.Identity, nn.ReLU]
            if pattern and layers[0].in_channels % 8 == 0:
                setattr(module, conv_name, FusedConvReLU(layers[0]))
                setattr(module, relu, nn.Identity())
    return fused
