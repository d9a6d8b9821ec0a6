"""gpuconv.viz and gpuconv-train --viz: every PNG is written, has its size and is not blank;
the receptive fields used for the top patches are the exact support of the gradient."""
import os
import sys

import numpy as np
import pytest

from gpuconv import models, nn, train as T
from gpuconv import viz

from .test_data import write_fake_mnist
from .test_train import stripes_split


def check_png(path, kind):
    image = pytest.importorskip("matplotlib.image")
    assert os.path.isfile(path), path
    a = image.imread(path)
    w, h = viz.FIGSIZES[kind]
    assert a.shape[:2] == (round(h * viz.DPI), round(w * viz.DPI)), path
    rgb = a[..., :3].reshape(-1, 3)
    # not blank: many distinct colours and real contrast, not one flat background
    codes = np.round(rgb * 255).astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    assert len(np.unique(codes)) > 20, path
    assert rgb.std() > 0.05 and (rgb.min(axis=1) < 0.3).mean() > 0.01, path


@pytest.mark.parametrize("model", ["lenet5", "resnet18"])
def test_write_all_writes_every_figure(tmp_path, model):
    pytest.importorskip("matplotlib", reason="--viz needs the plot extra (matplotlib)")
    split = stripes_split(64, 32)
    net, hist = T.train(split, epochs=2, quiet=True, model=model, width=2)
    y_pred = T.predict(net, split.x_test, "cpu")
    paths = viz.write_all(net, split, hist, str(tmp_path), y_pred)
    n_convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    names = sorted(os.path.basename(p) for p in paths)
    assert len(paths) == 4 + n_convs and sorted(os.listdir(tmp_path)) == names
    kinds = {"filters.png": "filters", "top_patches.png": "top_patches",
             "curves.png": "curves", "confusion.png": "confusion"}
    for p in paths:
        check_png(p, kinds.get(os.path.basename(p), "features"))


def test_confusion_matrix_counts():
    m = viz.confusion_matrix(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    np.testing.assert_array_equal(m, [[1, 0, 0], [0, 1, 1], [0, 0, 1]])


@pytest.mark.parametrize("make,layer", [
    (lambda: models.lenet5(10, 1, 12, rng=0, dtype=np.float64), "3"),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, dtype=np.float64, rng=0), nn.ReLU(),
                           nn.MaxPool2d(3, 1, 1), nn.Conv2d(2, 2, (3, 2), dilation=2,
                                                            dtype=np.float64, rng=1)), "3"),
])
def test_receptive_field_is_the_gradient_support(make, layer):
    net = make()
    size_h, size_w, jh, jw, h0, w0 = viz.receptive_field(net, layer)
    sub = net[:int(layer) + 1]
    x = np.random.default_rng(0).standard_normal((1, 1, 12, 12))
    y = sub(x)
    p, q = y.shape[2] // 2, y.shape[3] // 2
    g = np.zeros(y.shape)
    g[0, 0, p, q] = 1
    rows, cols = np.nonzero(sub.backward(g)[0, 0])
    top, left = h0 + p * jh - (size_h - 1) / 2, w0 + q * jw - (size_w - 1) / 2
    assert rows.min() >= max(top, 0) and rows.max() <= min(top + size_h - 1, 11)
    assert cols.min() >= max(left, 0) and cols.max() <= min(left + size_w - 1, 11)
    # and it is tight: the support reaches the box edges that lie inside the image
    assert rows.min() == max(top, 0) or rows.max() == min(top + size_h - 1, 11)


def test_cli_viz(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--viz needs the plot extra (matplotlib)")
    d = tmp_path / "mnist"
    d.mkdir()
    write_fake_mnist(d, n_train=20, n_test=12, size=8)
    out_dir = tmp_path / "figs" / "new"  # created on demand
    assert T.main(["--mnist", str(d), "--epochs", "1", "--viz", str(out_dir), "--quiet"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"6 figures in {out_dir}")
    check_png(str(out_dir / "filters.png"), "filters")


def test_cli_viz_without_matplotlib_says_so_before_training(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit) as e:
        T.main(["--viz", "figs", "--epochs", "1"])
    out, err = capsys.readouterr()
    assert e.value.code == 2 and out == ""
    assert err.strip() == ("gpuconv-train: error: --viz needs matplotlib: pip install "
                           "gpuconv[plot] (see --help)")
