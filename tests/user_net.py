"""A segmentation net written the way users write them (tests): 1 input channel, 3 classes, BatchNorm, stride-2 convs,
residual adds, bilinear upsampling.  Not sfedge code: the tests load it as `tests/user_net.py:make_net`."""
import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin != cout or stride != 1) else nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.skip(x))


class ResSegNet(nn.Module):
    def __init__(self, in_ch=1, classes=3, width=16):
        super().__init__()
        self.stem = Block(in_ch, width)
        self.down1 = Block(width, 2 * width, stride=2)
        self.down2 = Block(2 * width, 4 * width, stride=2)
        self.up1 = Block(6 * width, 2 * width)
        self.up0 = Block(3 * width, width)
        self.head = nn.Conv2d(width, classes, 1)

    def forward(self, x):
        s0 = self.stem(x)
        s1 = self.down1(s0)
        s2 = self.down2(s1)
        u1 = F.interpolate(s2, scale_factor=2, mode="bilinear", align_corners=False)
        u1 = self.up1(torch.cat([u1, s1], 1))
        u0 = F.interpolate(u1, scale_factor=2, mode="bilinear", align_corners=False)
        return self.head(self.up0(torch.cat([u0, s0], 1)))


def make_net(classes: int = 3, width: int = 16):
    return ResSegNet(1, classes, width)


class WithDeterminant(nn.Module):
    """Like users sometimes write: an op (torch.linalg.det) ONNX Runtime runs and litert-torch cannot lower."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        y = F.relu(self.conv(x))
        scale = torch.linalg.det(y[:, :2, :2, :2]).view(-1, 1, 1, 1)
        return self.head(y) + 0.0 * scale


def make_det_net():
    return WithDeterminant()

