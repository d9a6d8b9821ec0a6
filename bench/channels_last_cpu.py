"""NumPy engine, channels_last: the NHWC-native ops against converting (channels_last input
made NCHW-contiguous, the NCHW op, the result made channels_last again). Float32, min of 7
interleaved runs after a warm-up, ms. Usage: python bench/channels_last_cpu.py"""
import time

import numpy as np

import gpuconv as gc
from gpuconv._arrays import to_format

CASES = [("r50 3x3 56x56 b8", (8, 64, 56, 56), (64, 64, 3, 3), dict(padding=1)),
         ("r50 1x1 56x56 b8", (8, 256, 56, 56), (64, 256, 1, 1), {}),
         ("vgg conv3 3x3 b4", (4, 128, 56, 56), (256, 128, 3, 3), dict(padding=1)),
         ("3x3 s2 56->28 b8", (8, 128, 56, 56), (128, 128, 3, 3), dict(stride=2, padding=1)),
         ("dw 3x3 144ch b8", (8, 144, 56, 56), (144, 1, 3, 3), dict(padding=1, groups=144)),
         ("lenet c1 b64", (64, 1, 28, 28), (6, 1, 5, 5), {})]


def pair(native, convert, n=7):
    native(), convert()
    a, b = [], []
    for _ in range(n):
        t = time.perf_counter(); native(); a.append(time.perf_counter() - t)
        t = time.perf_counter(); convert(); b.append(time.perf_counter() - t)
    return min(a) * 1e3, min(b) * 1e3


def nchw(a):
    return np.ascontiguousarray(a)


def main():
    rng = np.random.default_rng(0)
    print(f"{'layer':18s} {'op':6s} {'native':>8s} {'convert':>8s}")
    for name, xs, ws, kw in CASES:
        x = to_format(rng.standard_normal(xs, dtype=np.float32), "nhwc")
        w = rng.standard_normal(ws, dtype=np.float32)
        dy = to_format(rng.standard_normal(gc.conv2d(x, w, **kw).shape, dtype=np.float32),
                       "nhwc")
        ops = [("fprop", lambda: gc.conv2d(x, w, **kw),
                lambda: to_format(gc.conv2d(nchw(x), w, **kw), "nhwc")),
               ("dgrad", lambda: gc.conv2d_grad_input(xs, w, dy, **kw),
                lambda: to_format(gc.conv2d_grad_input(xs, w, nchw(dy), **kw), "nhwc")),
               ("wgrad", lambda: gc.conv2d_grad_weight(x, ws, dy, **kw),
                lambda: gc.conv2d_grad_weight(nchw(x), ws, nchw(dy), **kw))]
        for op, nat, conv in ops:
            a, b = pair(nat, conv)
            print(f"{name:18s} {op:6s} {a:8.1f} {b:8.1f}", flush=True)
    x = to_format(rng.standard_normal((8, 64, 112, 112), dtype=np.float32), "nhwc")
    for name, nat, conv in (("maxpool 2x2 b8", lambda: gc.max_pool2d(x, 2),
                             lambda: to_format(gc.max_pool2d(nchw(x), 2), "nhwc")),
                            ("relu b8 64x112^2", lambda: gc.relu(x),
                             lambda: to_format(gc.relu(nchw(x)), "nhwc"))):
        a, b = pair(nat, conv)
        print(f"{name:18s} {'fprop':6s} {a:8.1f} {b:8.1f}", flush=True)


if __name__ == "__main__":
    main()
