"""A converted model under DistributedDataParallel: 2 CPU processes, gloo, loopback only.

Each rank trains on its half of the batch with the mean loss; DDP averages the gradients, which
is the gradient of the mean loss over the whole batch, so after the same SGD steps the
parameters must equal those of one process trained on the whole batch. (No BatchNorm: its batch
statistics would differ between a half and the whole batch.)
"""
import datetime
import os
import socket

import pytest

torch = pytest.importorskip("torch", reason="gpuconv.torch needs PyTorch (pip install torch)")

import gpuconv.torch as gt  # noqa: E402

WORLD, STEPS, BATCH = 2, 3, 8


def _model():
    torch.manual_seed(0)
    nn = torch.nn
    return gt.convert(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=2, padding="valid", bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 2 * 2, 4))).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return (torch.randn(STEPS, BATCH, 3, 12, 12, generator=g, dtype=torch.float64),
            torch.randint(0, 4, (STEPS, BATCH), generator=g))


def _train(model, xs, ys):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _worker(rank, port, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    torch.set_num_threads(1)
    # a bounded timeout: a lost peer fails the test instead of hanging CI (gloo's default: 30 min)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=60))
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(_model())
        xs, ys = _data()
        half = BATCH // WORLD
        _train(ddp, xs[:, rank * half:(rank + 1) * half], ys[:, rank * half:(rank + 1) * half])
        if rank == 0:
            torch.save(ddp.module.state_dict(), out_path)
    finally:
        torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or
                    not torch.distributed.is_gloo_available(),
                    reason="this PyTorch has no gloo backend")
def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "ddp.pt"
    torch.multiprocessing.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD)
    model = _model()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model, *_data())
    ddp_state = torch.load(out)
    assert ddp_state.keys() == model.state_dict().keys()
    for name, p in model.state_dict().items():
        assert not torch.equal(p, initial[name]), f"{name} did not train"
        torch.testing.assert_close(ddp_state[name], p, rtol=1e-12, atol=1e-12, msg=name)
