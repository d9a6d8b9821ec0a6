"""Where gpuconv.torch's per-call overhead goes, layer by layer (CPU, fprop).

    python bench/torch_bridge_overhead.py

Each candidate runs 20 calls per round, the candidates interleaved over 80 rounds, and the
fastest round is kept: on a shared machine the minimum is the figure least disturbed by other
load. Figures and their reading: bench/NOTES.md, "gpuconv.torch: the bridge's overhead".
"""
import time

import torch

import gpuconv
import gpuconv.torch as gt
from gpuconv.engines import numpy_engine
from gpuconv.torch import _ops

ARGS = ([1, 1], [0, 0], [1, 1], 1, False)  # stride, padding, dilation, groups, same
LAYERS = [("tiny: 1x1x8x8 * 1x1x3x3", (1, 1, 8, 8), (1, 1, 3, 3)),
          ("lenet5.conv2, N8: 8x6x14x14 * 16x6x5x5", (8, 6, 14, 14), (16, 6, 5, 5))]


def candidates(x_shape, w_shape):
    x, w = torch.randn(x_shape), torch.randn(w_shape)
    xn, wn = x.numpy(), w.numpy()
    p = gpuconv.ConvProblem.from_args(x_shape, w_shape)
    w_grad = w.clone().requires_grad_()

    def op_no_grad():
        with torch.no_grad():
            torch.ops.gpuconv.conv2d(x, w, None, *ARGS)
    kernel = getattr(_ops.conv2d, "_init_fn", None)  # the undecorated function (torch private)
    return [
        ("NumPy engine, ConvProblem prebuilt (`numpy` backend)",
         lambda: numpy_engine.conv_fprop(p, xn, wn)),
        ("gpuconv.conv2d on NumPy arrays (+ validation)", lambda: gpuconv.conv2d(xn, wn)),
    ] + ([("the op's kernel called directly (+ tensor checks, views)",
           lambda: kernel(x, w, None, *ARGS))] if kernel else []) + [
        ("torch.ops.gpuconv.conv2d, no_grad (`torch-bridge`)", op_no_grad),
        ("gpuconv.torch.conv2d, weight requires grad", lambda: gt.conv2d(x, w_grad)),
        ("torch.nn.functional.conv2d (PyTorch CPU)", lambda: torch.nn.functional.conv2d(x, w)),
    ]


def main(rounds=80, calls=20):
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, x_shape, w_shape in LAYERS:
        cands = candidates(x_shape, w_shape)
        best = {k: float("inf") for k, _ in cands}
        for _ in range(rounds):
            for k, f in cands:
                t0 = time.perf_counter()
                for _ in range(calls):
                    f()
                best[k] = min(best[k], (time.perf_counter() - t0) / calls)
        print(name)
        for k, v in best.items():
            print(f"  {k:58s} {v * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
