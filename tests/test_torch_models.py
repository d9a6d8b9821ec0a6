"""gpuconv.torch's modules and convert() in whole models: ResNet-18-style training equality,
state_dict compatibility, torch.compile and torch.export, and the README's example."""
import os
import re
import time
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="gpuconv.torch needs PyTorch (pip install torch)")

import gpuconv.torch as gt  # noqa: E402

from .test_models import torch_resnet18  # noqa: E402  (the one torch ResNet-18 of the tests)
from .test_torch_ops import DEVICES, exact_torch_reference  # noqa: E402,F401 (autouse fixture)

nn = torch.nn
README = Path(__file__).resolve().parents[1] / "README.md"


def _small_cnn():
    """A converted-model-sized CNN with a residual connection, bias and max-pooling."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(3, 8, 3, padding=1)
            self.c2 = nn.Conv2d(8, 8, 3, padding="same", groups=2)
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
            self.c3 = nn.Conv2d(8, 16, 3, stride=2, dilation=1)
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            y = torch.relu(self.c1(x))
            y = self.pool(torch.relu(self.c2(y)) + y)
            y = torch.relu(self.c3(y))
            return self.fc(y.mean((2, 3)))
    return Net()


def _grads(model, x, labels):
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, labels).backward()
    # (a compiled model names its parameters "_orig_mod.<name>")
    return out, {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


# ---------------------------------------------------------------------------------------------
# a ResNet-18-style model, converted: the same outputs and parameter gradients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,tol,layout", [(torch.float64, 1e-10, "contiguous"),
                                              (torch.float32, 2e-4, "contiguous"),
                                              (torch.float64, 1e-10, "channels_last")])
def test_resnet18_converted_trains_like_the_original(dtype, tol, layout, device):
    torch.manual_seed(0)
    # ResNet-18's layout (7x7/2 stem, 3x3/2 max-pool, 4 stages x 2 basic blocks, average pool,
    # linear) at 1/8 of its widths, so that it runs in a CPU test
    ref = torch_resnet18(torch, 10, 3, small_input=False, width=8).to(device, dtype)
    model = gt.convert(ref)
    assert sum(isinstance(m, gt.Conv2d) for m in model.modules()) == 20
    assert sum(isinstance(m, gt.MaxPool2d) for m in model.modules()) == 1
    assert not any(isinstance(m, (gt.Conv2d, gt.MaxPool2d)) for m in ref.modules())
    x = torch.randn(3, 3, 33, 30, dtype=dtype, device=device)
    labels = torch.randint(0, 10, (3,), device=device)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
        ref, model = (m.to(memory_format=torch.channels_last) for m in (ref, model))
    out_ref, g_ref = _grads(ref, x, labels)
    out, g = _grads(model, x, labels)
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    assert g.keys() == g_ref.keys() and len(g) == 62
    for name in g:
        scale = g_ref[name].abs().max().item() + 1e-30  # gradients differ in scale by layer
        torch.testing.assert_close(g[name] / scale, g_ref[name] / scale, rtol=tol, atol=tol,
                                   msg=f"gradient of {name}")
    for (n, b), (_, b_ref) in zip(model.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=tol, atol=tol, msg=f"buffer {n}")


# ---------------------------------------------------------------------------------------------
# modules and convert
# ---------------------------------------------------------------------------------------------
def test_modules_keep_torch_constructor_and_state_dict():
    torch.manual_seed(1)
    kw = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, bias=True)
    ours, theirs = gt.Conv2d(4, 6, (3, 2), **kw), nn.Conv2d(4, 6, (3, 2), **kw)
    assert isinstance(ours, nn.Conv2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())  # both ways
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 9, 8)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    pool, tpool = gt.MaxPool2d(3, 2, 1, 2, True, True), nn.MaxPool2d(3, 2, 1, 2, True, True)
    y, idx = pool(x)
    y_ref, idx_ref = tpool(x)
    assert torch.equal(y, y_ref) and torch.equal(idx, idx_ref)
    assert "gpuconv.Conv2d(4, 6" in repr(ours)


def test_conv2d_rejects_padding_modes_it_cannot_serve():
    for mode in ("reflect", "replicate", "circular"):
        with pytest.raises(ValueError, match=f"padding_mode='zeros' only, got '{mode}'"):
            gt.Conv2d(3, 4, 3, padding=1, padding_mode=mode)


class _Custom(nn.Conv2d):
    """A user's subclass: its forward may differ, so convert leaves it alone."""


def test_convert_nested_inplace_and_one_warning():
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
                      nn.MaxPool2d(2)),
        _Custom(4, 4, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = gt.convert(model)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "left 2 module(s)" in msg and "1.1 (padding_mode='reflect')" in msg
    assert "2 (_Custom, a subclass" in msg
    assert type(model[0]) is nn.Conv2d and type(model[1][2]) is nn.MaxPool2d  # untouched
    assert type(new[0]) is gt.Conv2d and type(new[1][2]) is gt.MaxPool2d
    assert type(new[1][1]) is nn.Conv2d
    for k, v in new.state_dict().items():
        if k in before:
            assert torch.equal(v, before[k])
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(new(x), model(x), rtol=1e-5, atol=1e-5)

    # inplace: the same module objects and Parameter objects (an optimizer keeps working)
    conv = nn.Conv2d(3, 4, 3)
    weight = conv.weight
    seq = nn.Sequential(conv, conv)  # a shared module is converted once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gt.convert(seq, inplace=True) is seq
    assert seq[0] is conv and type(conv) is gt.Conv2d and conv.weight is weight
    assert type(gt.convert(nn.MaxPool2d(2))) is gt.MaxPool2d  # the model itself
    with pytest.raises(TypeError, match="torch.nn.Module"):
        gt.convert(conv.weight)


# ---------------------------------------------------------------------------------------------
# torch.compile and torch.export see the ops through their fake kernels
# ---------------------------------------------------------------------------------------------
def _compile_check(backend, device="cpu"):
    torch.manual_seed(3)
    model = gt.convert(_small_cnn()).to(device)
    x = torch.randn(3, 3, 13, 11, device=device)
    labels = torch.randint(0, 5, (3,), device=device)
    out_eager, g_eager = _grads(model, x, labels)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    t0 = time.perf_counter()
    out, g = _grads(compiled, x, labels)
    seconds = time.perf_counter() - t0
    torch.testing.assert_close(out, out_eager, rtol=1e-5, atol=1e-5)
    for name in g_eager:
        torch.testing.assert_close(g[name], g_eager[name], rtol=1e-4, atol=1e-5)
    return seconds


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_aot_eager(device):
    """The whole forward and backward traced in one graph (no graph break at gpuconv's ops)."""
    _compile_check("aot_eager", device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.skipif(os.environ.get("GPUCONV_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ for ~30 s on a 2-core CPU (measured); "
                           "GPUCONV_TEST_INDUCTOR=1 runs it")
def test_torch_compile_fullgraph_inductor(device):
    """The default backend: inductor generates code (C++ on the CPU) for the rest of the model
    around gpuconv's ops, which it calls as extern kernels."""
    seconds = _compile_check("inductor", device)
    print(f"inductor compile + first run: {seconds:.1f} s")


def test_torch_export_graph_calls_gpuconv_ops_with_a_dynamic_batch():
    """The fake kernels carry a symbolic batch through (the other sizes are specialised)."""
    model = gt.convert(_small_cnn()).eval()
    ep = torch.export.export(model, (torch.randn(2, 3, 13, 11),),
                             dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"gpuconv.conv2d.default", "gpuconv.max_pool2d.default"} <= targets
    x = torch.randn(5, 3, 13, 11)
    torch.testing.assert_close(ep.module()(x), model(x))


# ---------------------------------------------------------------------------------------------
# the README's example
# ---------------------------------------------------------------------------------------------
def test_readme_inside_pytorch_example_runs():
    text = README.read_text(encoding="utf-8")
    section = text.split("## Inside PyTorch models", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert isinstance(scope["model"][0], gt.Conv2d) and scope["loss"].item() > 0
