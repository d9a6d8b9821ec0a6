"""gpuconv.optim: Adam, AdamW and the schedules against PyTorch step by step; state dicts
resume bit for bit; frozen parameters are skipped; bad hyperparameters are named."""
import numpy as np
import pytest

from gpuconv import nn
from gpuconv.optim import SGD, Adam, AdamW
from gpuconv.optim.lr_scheduler import CosineAnnealingLR, StepLR

OPTIMISERS = [
    (Adam, dict(lr=0.01)),
    (Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)),
    (Adam, dict(lr=0.01, amsgrad=True)),
    (AdamW, dict(lr=0.01)),
    (AdamW, dict(lr=0.03, weight_decay=0.5, amsgrad=True)),
    (SGD, dict(lr=0.05, momentum=0.8, weight_decay=0.1)),
]


def trajectory(make, kwargs, grads, w0):
    p = nn.Parameter(w0.copy())
    opt = make([p], **kwargs)
    out = []
    for g in grads:
        p.grad[...] = g
        opt.step()
        out.append(p.data.copy())
    return out


@pytest.mark.parametrize("make,kwargs", OPTIMISERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimisers_match_torch_step_by_step(make, kwargs):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(7)
    grads = rng.standard_normal((6, 7)) * np.array([1, 1, 1, 1e-3, 1e3, 1, 0])  # scales, a 0
    ours = trajectory(make, kwargs, grads, w0)
    theirs = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    topt = getattr(torch.optim, make.__name__)([theirs], **kwargs)
    for step, (g, w) in enumerate(zip(grads, ours)):
        theirs.grad = torch.from_numpy(g.copy())
        topt.step()
        np.testing.assert_allclose(w, theirs.detach().numpy(), rtol=1e-13, atol=1e-15,
                                   err_msg=f"step {step + 1}")


@pytest.mark.parametrize("make,kwargs", OPTIMISERS[:5] + OPTIMISERS[5:])
def test_state_dict_resumes_bit_for_bit(make, kwargs):
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal((3, 2)).astype(np.float32)
    grads = rng.standard_normal((5, 3, 2)).astype(np.float32)
    straight = trajectory(make, kwargs, grads, w0)[-1]
    p = nn.Parameter(w0.copy())
    opt = make([p], **kwargs)
    for g in grads[:3]:
        p.grad[...] = g
        opt.step()
    saved_w, saved = p.data.copy(), opt.state_dict()
    for g in grads[3:]:  # state_dict holds copies: stepping on does not change it
        p.grad[...] = g
        opt.step()
    q = nn.Parameter(saved_w)
    other = make([q], lr=1.0)
    other.load_state_dict(saved)
    assert other.lr == kwargs["lr"]
    for g in grads[3:]:
        q.grad[...] = g
        other.step()
    np.testing.assert_array_equal(q.data, straight)
    assert q.data.dtype == np.float32


def test_load_state_dict_checks():
    p = nn.Parameter(np.zeros(3))
    opt = Adam([p])
    p.grad[...] = 1
    opt.step()
    sd = opt.state_dict()
    with pytest.raises(ValueError, match="for 1 parameters, this optimiser has 2"):
        Adam([nn.Parameter(np.zeros(3)), nn.Parameter(np.zeros(3))]).load_state_dict(sd)
    with pytest.raises(ValueError, match=r"has shape \(3,\), the parameter \(4,\)"):
        Adam([nn.Parameter(np.zeros(4))]).load_state_dict(sd)
    with pytest.raises(ValueError, match="unknown hyperparameters"):
        SGD([nn.Parameter(np.zeros(3))], lr=1).load_state_dict(sd)


def test_frozen_parameters_are_skipped():
    p, q = nn.Parameter(np.ones(2)), nn.Parameter(np.ones(2), grad=np.ones(2))
    p.requires_grad = False
    for make in (SGD, Adam, AdamW):
        opt = make([p, q], lr=0.1)
        opt.step()
        np.testing.assert_array_equal(p.data, 1)
    assert np.all(q.data < 1)


@pytest.mark.parametrize("make,kwargs,match", [
    (Adam, dict(lr=0), "lr must be > 0"),
    (Adam, dict(betas=(0.9, 1.0)), r"betas\[1\] must lie in \[0, 1\)"),
    (Adam, dict(betas=0.9), "betas must be a pair"),
    (Adam, dict(eps=-1), "eps"),
    (AdamW, dict(weight_decay=-0.1), "weight_decay"),
])
def test_bad_hyperparameters(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make([nn.Parameter(np.zeros(1))], **kwargs)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ours,theirs,kwargs", [
    (StepLR, "StepLR", dict(step_size=3)),
    (StepLR, "StepLR", dict(step_size=2, gamma=0.5)),
    (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=10)),
    (CosineAnnealingLR, "CosineAnnealingLR", dict(T_max=7, eta_min=0.001)),  # past T_max too
])
def test_schedules_match_torch_epoch_by_epoch(ours, theirs, kwargs):
    torch = pytest.importorskip("torch")
    p = nn.Parameter(np.zeros(1), grad=np.ones(1))
    opt = SGD([p], lr=0.1)
    sched = ours(opt, **kwargs)
    tp = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    topt = torch.optim.SGD([tp], lr=0.1)
    tsched = getattr(torch.optim.lr_scheduler, theirs)(topt, **kwargs)
    for epoch in range(25):
        assert opt.lr == topt.param_groups[0]["lr"], epoch  # the same floats
        assert sched.get_last_lr() == tsched.get_last_lr()
        tp.grad = torch.ones(1, dtype=torch.float64)
        opt.step()
        topt.step()
        sched.step()
        tsched.step()
        np.testing.assert_allclose(p.data, tp.detach().numpy(), rtol=1e-14)


def test_schedule_state_dict_resumes():
    opt = Adam([nn.Parameter(np.zeros(1))], lr=0.5)
    sched = CosineAnnealingLR(opt, T_max=9, eta_min=0.01)
    for _ in range(4):
        sched.step()
    saved = sched.state_dict()
    lrs = []
    for _ in range(3):
        sched.step()
        lrs.append(opt.lr)
    opt2 = Adam([nn.Parameter(np.zeros(1))], lr=0.5)
    sched2 = CosineAnnealingLR(opt2, T_max=9, eta_min=0.01)
    sched2.load_state_dict(saved)
    assert opt2.lr == saved["_last_lr"]
    again = []
    for _ in range(3):
        sched2.step()
        again.append(opt2.lr)
    assert again == lrs
    with pytest.raises(ValueError, match="T_max"):
        CosineAnnealingLR(opt, T_max=0)
    with pytest.raises(ValueError, match="step_size"):
        StepLR(opt, step_size=1.5)
    with pytest.raises(TypeError, match="not a gpuconv optimiser"):
        StepLR(object(), 2)


@pytest.mark.gpu
@pytest.mark.parametrize("make,kwargs", OPTIMISERS, ids=lambda v: getattr(v, "__name__", str(v)))
def test_optimisers_on_gpu_match_cpu(cp, make, kwargs):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(7)
    grads = rng.standard_normal((6, 7))
    cpu = trajectory(make, kwargs, grads, w0)[-1]
    p = nn.Parameter(cp.asarray(w0))
    opt = make([p], **kwargs)
    for g in grads:
        p.grad[...] = cp.asarray(g)
        opt.step()
    np.testing.assert_allclose(p.data.get(), cpu, rtol=1e-12, atol=1e-14)
    other = make([nn.Parameter(cp.asarray(w0))], **kwargs)
    other.load_state_dict(opt.state_dict())
    assert all(isinstance(v, cp.ndarray) for v in other.state[0].values() if hasattr(v, "shape"))
