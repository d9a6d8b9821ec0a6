"""What the network learned, as PNGs (``gpuconv-train --viz DIR``; needs matplotlib, the
``plot`` extra).

- ``filters.png``: the first convolution's kernels, each scaled to its own [min, max] -- on
  images, edge and blob detectors, as Hubel and Wiesel found in the cat's visual cortex;
- ``features_<k>_<layer>.png``: the output of each convolution layer for the first few test
  images (one row per image, the input first, then the first channels);
- ``top_patches.png``: for the first units of the second convolution layer, the nine test
  image patches (their receptive fields) that excite the unit most (Zeiler & Fergus 2014);
- ``curves.png``: training loss and train/test accuracy per epoch;
- ``confusion.png``: the confusion matrix on the test set.

Each figure has a fixed size in pixels (``FIGSIZES`` x ``DPI``). Drawn with matplotlib's
object API (no pyplot, no display needed).
"""
from __future__ import annotations

import math
import os
import re

import numpy as np

from . import nn
from .device import device_of, to_device

__all__ = ["write_all", "plot_filters", "plot_feature_maps", "plot_top_patches",
           "plot_curves", "plot_confusion", "receptive_field", "FIGSIZES", "DPI"]

DPI = 100
FIGSIZES = {"filters": (6.0, 6.0), "features": (9.0, 3.6), "top_patches": (7.2, 6.4),
            "curves": (9.0, 3.6), "confusion": (5.6, 5.0)}
N_IMAGES = 3      # test images whose feature maps are drawn
N_CHANNELS = 8    # channels drawn per feature-map row
N_UNITS = 8       # second-layer units whose top patches are drawn
N_TOP = 9
GAP_COLOUR = (0.25, 0.45, 0.8)  # between tiles


def _figure(kind):
    from matplotlib.figure import Figure
    return Figure(figsize=FIGSIZES[kind], dpi=DPI)


def _save(fig, path):
    fig.savefig(path, dpi=DPI)
    return path


def _unit(a):
    """`a` scaled to [0, 1] (a constant array to 0.5)."""
    lo, hi = float(a.min()), float(a.max())
    return np.full(a.shape, 0.5) if hi == lo else (a - lo) / (hi - lo)


def _mosaic(tiles, rows, cols):
    """Tiles (each (h, w) or (h, w, 3), values in [0, 1], None for an empty cell) on a grid
    with one-pixel gaps in GAP_COLOUR (no gray value, so tiles stay apart): one image for one
    imshow, since a figure of hundreds of small axes takes seconds to draw."""
    shapes = [t.shape for t in tiles if t is not None]
    h = max(s[0] for s in shapes)
    w = max(s[1] for s in shapes)
    extra = shapes[0][2:]
    out = np.full((rows * (h + 1) - 1, cols * (w + 1) - 1) + extra, np.nan)
    if extra:
        out[...] = GAP_COLOUR
    for i, t in enumerate(tiles):
        if t is not None:
            r, c = divmod(i, cols)
            out[r * (h + 1):r * (h + 1) + t.shape[0], c * (w + 1):c * (w + 1) + t.shape[1]] = t
    return out


def _show(fig, a, rect=(0.02, 0.02, 0.96, 0.86)):
    import matplotlib
    ax = fig.add_axes(rect)
    cmap = matplotlib.colormaps["gray"].with_extremes(bad=GAP_COLOUR)
    ax.imshow(a, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def _convs(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def _host(a):
    return to_device(a, "cpu").astype(np.float64)


# ---------------------------------------------------------------------------------------------
def plot_filters(model, path):
    """The first Conv2d's kernels as a grid of tiles, each normalised to [0, 1]."""
    convs = _convs(model)
    if not convs:
        raise ValueError("the model has no Conv2d layer")
    name, conv = convs[0]
    w = _host(conv.weight.data)  # (K, C, R, S)
    k = w.shape[0]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    fig = _figure("filters")
    fig.suptitle(f"{name}: {k} filters {w.shape[2]}x{w.shape[3]} (each scaled to its range)")
    # RGB for three input channels, else the mean over the input channels
    tiles = [_unit(np.moveaxis(f, 0, -1) if w.shape[1] == 3 else f.mean(axis=0)) for f in w]
    _show(fig, _mosaic(tiles, rows, cols))
    return _save(fig, path)


def plot_feature_maps(model, images, out_dir):
    """For every Conv2d: one PNG, a row per image (the input, then the first channels of the
    layer's output, each scaled to its range). Returns the paths."""
    params = model.parameters()
    x = to_device(images.astype(params[0].dtype), device_of(params[0].data))
    records = nn.record_outputs(model, x, lambda n, m: isinstance(m, nn.Conv2d))
    paths = []
    for i, r in enumerate(records, 1):
        y = _host(r["output"])
        n_ch = min(N_CHANNELS, y.shape[1])
        fig = _figure("features")
        fig.suptitle(f"{r['name']}: output {tuple(y.shape[1:])}; the input, then the first "
                     f"{n_ch} channels")
        tiles = []
        for row in range(len(images)):
            tiles.append(_unit(images[row].astype(np.float64).mean(axis=0)))
            tiles += [_unit(y[row, c]) for c in range(n_ch)]
        _show(fig, _mosaic(tiles, len(images), n_ch + 1))
        safe = re.sub(r"[^A-Za-z0-9_]+", "_", r["name"])
        paths.append(_save(fig, os.path.join(out_dir, f"features_{i}_{safe}.png")))
    return paths


_NEUTRAL = (nn._Activation, nn.BatchNorm2d, nn.Dropout, nn.Identity, nn.Maxout)


def receptive_field(model, layer_name):
    """(size_h, size_w, jump_h, jump_w, start_h, start_w) of the units of `layer_name` in
    the input, composing the layers that run before it in a chain: unit (p, q) sees input
    rows ``start_h + p*jump_h - (size_h - 1)/2 ...`` (start is the first unit's centre).
    None where a layer of unknown geometry comes first."""
    size, jump, start = [1, 1], [1, 1], [0.0, 0.0]
    for name, m in model.named_modules():
        if m._children:
            continue
        if isinstance(m, nn.Conv2d):
            k, s = m.kernel_size, m.stride
            d = (m.dilation, m.dilation) if isinstance(m.dilation, int) else m.dilation
            s = (s, s) if isinstance(s, int) else s
            if isinstance(m.padding, str):
                pad = [0, 0] if m.padding == "valid" else [d[a] * (k[a] - 1) / 2 for a in (0, 1)]
            else:
                pad = (m.padding, m.padding) if isinstance(m.padding, int) else m.padding
            k = [d[a] * (k[a] - 1) + 1 for a in (0, 1)]
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            a = m.args
            pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
            k = list(pair(a["kernel_size"]))
            s = pair(a["stride"] if a["stride"] is not None else a["kernel_size"])
            pad = pair(a["padding"])
            if "dilation" in a:
                dl = pair(a["dilation"])
                k = [dl[i] * (k[i] - 1) + 1 for i in (0, 1)]
        elif isinstance(m, _NEUTRAL):
            continue
        else:
            return None
        for ax in (0, 1):
            start[ax] += ((k[ax] - 1) / 2 - pad[ax]) * jump[ax]
            size[ax] += (k[ax] - 1) * jump[ax]
            jump[ax] *= s[ax]
        if name == layer_name:
            return (size[0], size[1], jump[0], jump[1], start[0], start[1])
    return None


def plot_top_patches(model, images, path, batch_size=256):
    """For the first N_UNITS channels of the second Conv2d: the N_TOP image patches that give
    the channel's largest activation (Zeiler & Fergus 2014), cut out at the unit's receptive
    field (zero outside the image)."""
    convs = _convs(model)
    name = convs[1][0] if len(convs) > 1 else convs[0][0]
    rf = receptive_field(model, name)
    params = model.parameters()
    acts = []
    for lo in range(0, len(images), batch_size):
        x = to_device(images[lo:lo + batch_size].astype(params[0].dtype),
                      device_of(params[0].data))
        rec = nn.record_outputs(model, x, lambda n, m: n == name)
        acts.append(_host(rec[0]["output"]))
    acts = np.concatenate(acts)  # (N, K, P, Q)
    n_units = min(N_UNITS, acts.shape[1])
    H, W = images.shape[2:]
    fig = _figure("top_patches")
    fig.suptitle(f"{name}: the {N_TOP} test patches that excite units 0-{n_units - 1} most "
                 "(a row per unit)")
    lo, hi = float(images.min()), float(images.max())
    tiles = []
    for u in range(n_units):
        a = acts[:, u]
        top = np.argsort(a.ravel(), kind="stable")[::-1][:N_TOP]
        for j, flat in enumerate(top):
            n, p, q = np.unravel_index(flat, a.shape)
            if rf is None:
                patch = images[n, 0].astype(np.float64)
            else:
                sh, sw, jh, jw, h0, w0 = rf
                top_h = int(round(h0 + p * jh - (sh - 1) / 2))
                top_w = int(round(w0 + q * jw - (sw - 1) / 2))
                padded = np.zeros((int(sh), int(sw)))
                src = images[n, 0].astype(np.float64)
                hs, ws = max(top_h, 0), max(top_w, 0)
                he, we = min(top_h + int(sh), H), min(top_w + int(sw), W)
                if he > hs and we > ws:
                    padded[hs - top_h:he - top_h, ws - top_w:we - top_w] = src[hs:he, ws:we]
                patch = padded
            tiles.append((patch - lo) / (hi - lo or 1.0))  # one scale: patches compare
    _show(fig, _mosaic(tiles, n_units, N_TOP))
    return _save(fig, path)


def plot_curves(history, path):
    """Loss (left) and train/test accuracy (right) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig = _figure("curves")
    ax = fig.add_subplot(1, 2, 1)
    ax.plot(epochs, [h["loss"] for h in history], "o-", color="tab:red")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax = fig.add_subplot(1, 2, 2)
    ax.plot(epochs, [100 * h["train_acc"] for h in history], "o-", label="train")
    ax.plot(epochs, [100 * h["test_acc"] for h in history], "s-", label="test")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def confusion_matrix(y_true, y_pred, classes):
    m = np.zeros((classes, classes), np.int64)
    np.add.at(m, (y_true, y_pred), 1)
    return m


def plot_confusion(y_true, y_pred, classes, path):
    """Rows: true class, columns: predicted; each cell's count written in it."""
    m = confusion_matrix(y_true, y_pred, classes)
    fig = _figure("confusion")
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(m, cmap="Blues")
    for i in range(classes):
        for j in range(classes):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_xticks(range(classes))
    ax.set_yticks(range(classes))
    acc = np.trace(m) / max(m.sum(), 1)
    ax.set_title(f"test confusion matrix ({100 * acc:.2f}% correct)")
    return _save(fig, path)


def write_all(model, split, history, out_dir, y_pred):
    """Every figure above for a trained `model` on `split`, `y_pred` its test-set
    predictions; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    x_test = split.x_test
    paths = [plot_filters(model, os.path.join(out_dir, "filters.png"))]
    paths += plot_feature_maps(model, x_test[:N_IMAGES], out_dir)
    paths.append(plot_top_patches(model, x_test, os.path.join(out_dir, "top_patches.png")))
    paths.append(plot_curves(history, os.path.join(out_dir, "curves.png")))
    paths.append(plot_confusion(split.y_test, y_pred, split.classes,
                                os.path.join(out_dir, "confusion.png")))
    return paths
