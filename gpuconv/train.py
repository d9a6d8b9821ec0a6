"""``gpuconv-train``: trains a LeNet-style ConvNet on handwritten digits with gpuconv's layers.

The network (for an H x W input, k = 3 on images up to 16 pixels, else 5; 'same' padding)::

    conv(1 -> 16, k) -> act -> maxpool 2 -> conv(16 -> 32, k) -> act -> maxpool 2
        -> flatten -> linear(32 * H/4 * W/4 -> 64) -> act -> linear(64 -> classes)

trained with SGD + momentum on softmax cross-entropy, the learning rate decaying along a cosine. The default data set is scikit-learn's
8x8 digits with a fixed 20% test split; ``--mnist DIR`` reads MNIST IDX files instead. Per epoch
it prints loss and accuracies; the last line gives the test accuracy and the wall time.
Same ``--seed`` => same initial weights, same batch order, same losses.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np

from . import data as D
from . import nn
from .device import parse_device, require_cuda, to_device
from .optim import SGD
from .problem import PoolProblem

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh,
               "sigmoid": nn.Sigmoid, "elu": nn.ELU}


def build_lenet(image_shape, classes, activation="relu", dtype=np.float32, rng=None,
                channels=(16, 32), hidden=64):
    """The LeNet-style network above for images of `image_shape` (C, H, W)."""
    act = ACTIVATIONS[activation]
    rng = np.random.default_rng(rng)
    c, h, w = image_shape
    k = 3 if max(h, w) <= 16 else 5
    layers = []
    for c_out in channels:
        layers += [nn.Conv2d(c, c_out, k, padding="same", dtype=dtype, rng=rng), act(),
                   nn.MaxPool2d(2)]
        pool = PoolProblem.from_args((1, c_out, h, w), 2)  # the one place pooling sizes live
        c, h, w = c_out, pool.P, pool.Q
    layers += [nn.Flatten(), nn.Linear(c * h * w, hidden, dtype=dtype, rng=rng), act(),
               nn.Linear(hidden, classes, dtype=dtype, rng=rng)]
    return nn.Sequential(*layers)


class ProgressBar:
    """A one-line progress bar on `stream` (stderr), redrawn in place with '\\r'.

    Where the stream is not a terminal (a log file, a pipe, CI) it draws nothing: carriage
    returns would fill the log with hundreds of partial lines.
    """

    def __init__(self, total, label="", stream=None, enabled=True, width=30):
        self.total, self.label, self.width = total, label, width
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = enabled and callable(isatty) and isatty()
        self._last = 0.0

    def update(self, done, info=""):
        if not self.enabled:
            return
        now = time.perf_counter()
        if done < self.total and now - self._last < 0.1:  # redraw at most 10 times a second
            return
        self._last = now
        filled = self.width * done // max(self.total, 1)
        bar = "#" * filled + "." * (self.width - filled)
        self.stream.write(f"\r{self.label} [{bar}] {done}/{self.total} {info}")
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.stream.write("\r\033[K")  # clear the line for the epoch summary
            self.stream.flush()


def accuracy(model, x, y, device, batch_size=512):
    """Fraction of `x` that `model` (switched to eval mode) classifies as `y`."""
    model.eval()
    correct = 0
    for idx in D.minibatches(len(y), batch_size):
        logits = model(to_device(x[idx], device))
        correct += int((to_device(logits.argmax(axis=1), "cpu") == y[idx]).sum())
    model.train()
    return correct / len(y)


def train(split, epochs=30, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-4,
          activation="relu", seed=0, device="cpu", dtype=np.float32, quiet=False, out=None,
          progress_stream=None, schedule="cosine"):
    """Trains the LeNet on `split`; returns (model, history) with one dict per epoch."""
    out = sys.stdout if out is None else out
    init_seed, order_seed = np.random.SeedSequence(seed).spawn(2)
    model = build_lenet(split.x_train.shape[1:], split.classes, activation, dtype,
                        np.random.default_rng(init_seed)).to(device)
    order_rng = np.random.default_rng(order_seed)
    loss_fn = nn.CrossEntropyLoss()
    opt = SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    # the data in the model's precision (the layers reject mixed dtypes instead of promoting)
    x_train, x_test = split.x_train.astype(dtype), split.x_test.astype(dtype)
    history = []
    n = len(split.y_train)
    n_batches = -(-n // batch_size)
    for epoch in range(1, epochs + 1):
        if schedule == "cosine":
            # cosine decay from lr to lr/100 over the run: large steps explore early, small
            # steps at the end stop the test accuracy from jumping between epochs
            opt.lr = lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs)))
        t0 = time.perf_counter()
        bar = ProgressBar(n_batches, f"epoch {epoch}/{epochs}", progress_stream, not quiet)
        loss_sum = correct = 0.0
        for b, idx in enumerate(D.minibatches(n, batch_size, order_rng), 1):
            x = to_device(x_train[idx], device)
            y = to_device(split.y_train[idx], device)
            logits = model(x)
            loss = loss_fn(logits, y)
            opt.zero_grad()
            model.backward(loss_fn.backward())
            opt.step()
            loss_sum += float(loss) * len(idx)
            correct += int((logits.argmax(axis=1) == y).sum())
            bar.update(b, f"loss {loss_sum / min(b * batch_size, n):.4f}")
        bar.close()
        rec = {"epoch": epoch, "loss": loss_sum / n, "train_acc": correct / n,
               "test_acc": accuracy(model, x_test, split.y_test, device),
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        if not quiet:
            print(f"epoch {epoch:3d}/{epochs}  loss {rec['loss']:.4f}  train acc "
                  f"{100 * rec['train_acc']:6.2f}%  test acc {100 * rec['test_acc']:6.2f}%  "
                  f"({rec['seconds']:.2f} s)", file=out, flush=True)
    return model, history


def _parser():
    p = argparse.ArgumentParser(
        prog="gpuconv-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Train a LeNet-style ConvNet on handwritten digits with gpuconv's layers "
                    "(default data: scikit-learn's 8x8 digits, a fixed 20% test split).")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=32, help="images per SGD step")
    p.add_argument("--lr", type=float, default=0.05, help="(initial) learning rate")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=1e-4, help="L2 penalty added to grads")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine",
                   help="learning-rate schedule: cosine decay to lr/100, or constant")
    p.add_argument("--activation", choices=sorted(ACTIVATIONS), default="relu",
                   help="activation after each conv and the hidden linear layer")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initial weights and the batch order (not the test split)")
    p.add_argument("--mnist", metavar="DIR",
                   help="train on MNIST IDX files in DIR (train-images-idx3-ubyte[.gz], ...)")
    p.add_argument("--save", metavar="PATH", help="write the trained parameters to PATH (.npz)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                   help="precision of parameters and data")
    p.add_argument("--quiet", action="store_true", help="print only the final line")
    return p


def main(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    try:
        kind, index = parse_device(args.device)
    except ValueError as e:
        parser.error(str(e))

    def fail(message):
        print(f"gpuconv-train: error: {message}", file=sys.stderr)
        return 1

    if kind == "cuda":
        try:
            require_cuda(index)
        except RuntimeError as e:
            return fail(str(e))
    try:
        split = D.load_mnist(args.mnist) if args.mnist else D.load_digits()
    except (ImportError, OSError, ValueError) as e:
        return fail(str(e))
    split = D.standardize(split)
    if not args.quiet:
        print(f"{split.name}: {len(split.y_train)} training and {len(split.y_test)} test "
              f"images of {split.x_train.shape[2]}x{split.x_train.shape[3]}, {split.classes} "
              f"classes; device {args.device}, {args.dtype}", flush=True)
    t0 = time.perf_counter()
    try:
        model, history = train(split, args.epochs, args.batch_size, args.lr, args.momentum,
                               args.weight_decay, args.activation, args.seed, args.device,
                               np.dtype(args.dtype), args.quiet, schedule=args.schedule)
    except ValueError as e:  # e.g. a negative --lr, rejected by SGD with its own message
        return fail(str(e))
    seconds = time.perf_counter() - t0
    if args.save:
        nn.save(model, args.save)
    acc = history[-1]["test_acc"]
    n_test = len(split.y_test)
    print(f"test accuracy {100 * acc:.2f}% ({round(acc * n_test)}/{n_test}) after "
          f"{args.epochs} epochs in {seconds:.1f} s" +
          (f"; parameters saved to {args.save}" if args.save else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
