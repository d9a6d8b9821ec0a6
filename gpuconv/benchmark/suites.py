"""Which layers a run measures: the suites of ``layers.csv``, globs over layer names, and
ad-hoc shapes.

``layers.csv`` (package data, a copy of the project's shared list) holds one row per distinct
convolution of LeNet-5, AlexNet, VGG-16, ResNet-50 (v1.5) and a few edge cases, batch left out;
``count_in_net`` says how often the shape occurs in its network, for whole-network totals.
Every size is derived by :class:`gpuconv.ConvProblem` / :class:`gpuconv.PoolProblem`; nothing
here re-derives an output size.
"""
from __future__ import annotations

import csv
import fnmatch
import io
from dataclasses import dataclass, replace
from importlib import resources

from ..problem import ConvProblem, PoolProblem

NETWORK_SUITES = ("lenet5", "alexnet", "vgg16", "r50", "edge")

# Issue 2's speed target for the NumPy engine: on 2 cores, float32, batch 8, the geometric mean
# of numpy / torch-cpu time over these layers must be <= 1.5 (issue 11: 1.2) for each of fprop,
# dgrad and wgrad.
CPU_TARGET_LAYERS = ("lenet5.conv1", "alexnet.conv2", "vgg16.conv3_1", "r50.l1.3x3_64",
                     "r50.l2.ds1x1s2", "r50.stem7x7s2", "edge.dw3x3_c144")

# suite -> (backend, reference backend, largest allowed geometric mean of backend/reference,
# on medians and on minimum times). Issue 2 set 1.5; issue 11 tightened it to 1.2.
SUITE_TARGETS = {"cpu-target": ("numpy", "torch-cpu", 1.2)}

# Networks that pool 3x3/2 after their convolutions; the others pool 2x2/2.
_POOL3_SUITES = ("alexnet", "r50")


@dataclass(frozen=True)
class Layer:
    """One row of layers.csv (or an ad-hoc --shape); ``batch`` is set only by --shape."""

    suite: str
    name: str
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int = 1
    pad: int = 0
    dilation: int = 1
    groups: int = 1
    count_in_net: int = 1
    batch: int | None = None

    def problem(self, batch: int) -> ConvProblem:
        n = self.batch or batch
        return ConvProblem.from_args((n, self.C, self.H, self.W),
                                     (self.K, self.C // self.groups, self.R, self.S),
                                     self.stride, self.pad, self.dilation, self.groups)

    def pool_problem(self, batch: int) -> PoolProblem:
        """Max-pooling of the layer's input: 3x3/2 in AlexNet and ResNet-50, else 2x2/2."""
        k = 3 if self.name.split(".")[0] in _POOL3_SUITES else 2
        k = min(k, self.H, self.W)
        return PoolProblem.from_args((self.batch or batch, self.C, self.H, self.W), k, 2)


_INT_FIELDS = ("C", "H", "W", "K", "R", "S", "stride", "pad", "dilation", "groups",
               "count_in_net")


def load_layers() -> list[Layer]:
    """Every row of the packaged layers.csv, in file order."""
    text = resources.files("gpuconv.benchmark").joinpath("layers.csv").read_text("utf-8")
    rows = csv.DictReader(io.StringIO(text))
    return [Layer(suite=r["suite"], name=r["layer"], **{f: int(r[f]) for f in _INT_FIELDS})
            for r in rows]


def suite_names() -> list[str]:
    return list(NETWORK_SUITES) + ["cpu-target", "all"]


def suite_layers(name: str, layers: list[Layer] | None = None) -> list[Layer]:
    """The layers of one suite; cpu-target re-labels its layers as its own, each counted once."""
    layers = load_layers() if layers is None else layers
    if name == "all":
        return list(layers)
    if name == "cpu-target":
        by_name = {l.name: l for l in layers}
        return [replace(by_name[n], suite="cpu-target", count_in_net=1)
                for n in CPU_TARGET_LAYERS]
    found = [l for l in layers if l.suite == name]
    if not found:
        raise ValueError(f"unknown suite {name!r}; choose from {', '.join(suite_names())}")
    return found


def parse_shape(spec: str) -> Layer:
    """``N,C,H,W,K,R,S[,stride,pad,dilation,groups]`` -> an ad-hoc Layer (validated)."""
    try:
        v = [int(t) for t in spec.replace("x", ",").split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--shape wants integers N,C,H,W,K,R,S[,stride,pad,dilation,groups], "
                         f"got {spec!r}") from None
    if not 7 <= len(v) <= 11:
        raise ValueError(f"--shape wants 7 to 11 integers N,C,H,W,K,R,S[,stride,pad,dilation,"
                         f"groups], got {len(v)} in {spec!r}")
    n, c, h, w, k, r, s = v[:7]
    extra = v[7:] + [1, 0, 1, 1][len(v) - 7:]
    stride, pad, dil, groups = extra
    layer = Layer("adhoc", f"shape:{spec}", c, h, w, k, r, s, stride, pad, dil, groups, 1, n)
    layer.problem(n)  # raises ValueError with ConvProblem's message if the shape is invalid
    return layer


def select(suites=(), layer_globs=(), shapes=()) -> list[Layer]:
    """Layers chosen by suite names, name globs (matched over all rows) and ad-hoc shapes.

    Nothing chosen at all means the lenet5 suite (fast everywhere). Duplicates are dropped.
    """
    layers = load_layers()
    chosen: list[Layer] = []
    for s in suites:
        chosen += suite_layers(s, layers)
    for g in layer_globs:
        hit = [l for l in layers if fnmatch.fnmatchcase(l.name, g) or l.name == g]
        if not hit:
            raise ValueError(f"--layer {g!r} matches no layer; `gpuconv-bench --list` shows them")
        chosen += hit
    chosen += [parse_shape(s) for s in shapes]
    if not (suites or layer_globs or shapes):
        chosen = suite_layers("lenet5", layers)
    seen, out = set(), []
    for l in chosen:
        key = (l.suite, l.name)
        if key not in seen:
            seen.add(key)
            out.append(l)
    return out
