"""gpuconv.models: ResNet-18 against a PyTorch twin with the same names (forward, input
gradient, every parameter gradient, running statistics), and the LeNet-5-style network."""
import numpy as np
import pytest

import gpuconv as gc
from gpuconv import models, nn


def torch_resnet18(torch, num_classes, in_channels, small_input, width):
    """torchvision's ResNet-18 layout written out in torch.nn (torchvision is not a
    dependency): the same module names, so state dicts load strictly both ways."""
    tnn = torch.nn

    class Block(tnn.Module):
        def __init__(self, c_in, planes, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or c_in != planes:
                self.downsample = tnn.Sequential(tnn.Conv2d(c_in, planes, 1, stride, bias=False),
                                                 tnn.BatchNorm2d(planes))

        def forward(self, x):
            y = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
            return torch.relu(y + (x if self.downsample is None else self.downsample(x)))

    w = width
    k, s = (3, 1) if small_input else (7, 2)
    net = tnn.Sequential()
    net.add_module("conv1", tnn.Conv2d(in_channels, w, k, s, k // 2, bias=False))
    net.add_module("bn1", tnn.BatchNorm2d(w))
    net.add_module("relu", tnn.ReLU())
    net.add_module("maxpool", tnn.Identity() if small_input else tnn.MaxPool2d(3, 2, 1))
    c = w
    for i, planes in enumerate((w, 2 * w, 4 * w, 8 * w), start=1):
        net.add_module(f"layer{i}", tnn.Sequential(Block(c, planes, 1 if i == 1 else 2),
                                                   Block(planes, planes, 1)))
        c = planes
    net.add_module("avgpool", tnn.AdaptiveAvgPool2d(1))
    net.add_module("flatten", tnn.Flatten())
    net.add_module("fc", tnn.Linear(c, num_classes))
    return net


@pytest.mark.parametrize("small_input,shape", [(True, (3, 1, 8, 8)), (False, (2, 3, 20, 20))])
def test_resnet18_matches_torch(small_input, shape):
    torch = pytest.importorskip("torch")
    ours = models.resnet18(7, shape[1], small_input=small_input, width=4, dtype=np.float64,
                           rng=0)
    theirs = torch_resnet18(torch, 7, shape[1], small_input, 4).double()
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(1)
    for step in range(2):  # two steps: the running statistics move on in step
        x = rng.standard_normal(shape)
        xt = torch.from_numpy(x.copy()).requires_grad_()
        yt = theirs(xt)
        y = ours(x)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-9, atol=1e-11)
        g = rng.standard_normal(y.shape)
        yt.backward(torch.from_numpy(g))
        np.testing.assert_allclose(ours.backward(g), xt.grad.numpy(), rtol=1e-8, atol=1e-11)
        tp = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            np.testing.assert_allclose(p.grad, tp[name].grad.numpy(), rtol=1e-8, atol=1e-10,
                                       err_msg=name)
        ours.zero_grad()
        theirs.zero_grad()
    tsd = theirs.state_dict()
    for name, v in ours.state_dict().items():
        np.testing.assert_allclose(v, tsd[name].numpy(), rtol=1e-10, atol=1e-12, err_msg=name)
    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape)
    np.testing.assert_allclose(ours(x), theirs(torch.from_numpy(x)).detach().numpy(),
                               rtol=1e-9, atol=1e-11)


def test_resnet18_size_init_and_blocks():
    net = models.resnet18()  # the paper's: 3 -> 1000 classes, width 64
    assert sum(p.data.size for p in net.parameters()) == 11_689_512  # torchvision's count
    w = net.layer1[0].conv1.weight.data
    assert abs(w.std() / np.sqrt(2 / (64 * 9)) - 1) < 0.02  # kaiming normal, fan_out
    assert net.layer2[0].downsample is not None and net.layer2[1].downsample is None
    assert net.layer1[0].downsample is None
    rows = nn.summary(models.resnet18(10, 1, small_input=True, width=2), (1, 1, 8, 8),
                      file=open("/dev/null", "w"))
    assert rows[-1]["output_shape"] == (1, 10)
    assert [r["output_shape"][2:] for r in rows if r["name"].endswith("0.conv1")] == \
        [(8, 8), (4, 4), (2, 2), (1, 1)]


def test_resnet_block_used_twice_in_a_forward_is_caught():
    block = models.BasicBlock(2, 2, dtype=np.float64, rng=0)
    net = nn.Sequential(block, block)
    net(np.random.default_rng(0).standard_normal((2, 2, 4, 4)))
    with pytest.raises(RuntimeError, match="one instance per place"):
        net.backward(np.ones((2, 2, 4, 4)))


def test_lenet5_shapes_and_activation():
    net = models.lenet5(10, 1, 8, activation="tanh", rng=0)
    assert isinstance(net[1], nn.Tanh)
    x = np.zeros((2, 1, 8, 8), np.float32)
    assert net(x).shape == (2, 10)
    assert models.lenet5(5, 3, (28, 20), rng=0)(np.zeros((1, 3, 28, 20), np.float32)).shape \
        == (1, 5)
    with pytest.raises(ValueError, match="activation must be one of"):
        models.lenet5(activation="swish")
    assert gc.models is models
