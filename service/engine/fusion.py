"""Batch norm folded into the convolution before it, for serving on a CPU.

In eval mode a BatchNorm2d that directly follows a Conv2d is an affine map per output channel, so
it can be folded into that convolution's weights and bias (`torch.nn.utils.fusion.fuse_conv_bn_eval`):
one operator fewer per pair, the same function up to float rounding (~1e-6 on the logits). Only
pairs whose data flow is known are folded: neighbours in an `nn.Sequential`, and the conv/bn
pairs of torchvision's ResNet blocks (exact type, so a subclass with its own forward is left
alone). Anything else (pre-activation blocks, where BN comes before its conv) stays as it was.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.resnet import BasicBlock, Bottleneck

_BLOCK_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    BasicBlock: (("conv1", "bn1"), ("conv2", "bn2")),
    Bottleneck: (("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3")),
}


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.running_mean is not None
        and bn.running_var is not None
        and conv.out_channels == bn.num_features
        and not conv.training
        and not bn.training
    )


def fold_batchnorm(model: nn.Module) -> int:
    """Fold, in place, every eval-mode BatchNorm2d that directly follows a Conv2d into it (the
    BatchNorm becomes an `nn.Identity`); returns how many were folded."""
    folded = 0
    for module in list(model.modules()):
        if isinstance(module, nn.Sequential):
            for i in range(len(module) - 1):
                if _foldable(module[i], module[i + 1]):
                    module[i] = fuse_conv_bn_eval(module[i], module[i + 1])
                    module[i + 1] = nn.Identity()
                    folded += 1
        for c, b in _BLOCK_PAIRS.get(type(module), ()):
            conv, bn = getattr(module, c), getattr(module, b)
            if _foldable(conv, bn):
                setattr(module, c, fuse_conv_bn_eval(conv, bn))
                setattr(module, b, nn.Identity())
                folded += 1
    return folded
