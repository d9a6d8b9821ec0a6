"""The CUDA engine's "auto" choice: first generation unless the second is switched on."""
import numpy as np

from gpuconv import config
from gpuconv.engines import cuda_engine
from gpuconv.problem import ConvProblem

P = ConvProblem.from_args((2, 8, 9, 9), (8, 8, 3, 3), padding=1)


def test_auto_is_im2col_gemm_while_second_generation_is_off(monkeypatch):
    monkeypatch.delenv("GPUCONV_SECOND_GEN", raising=False)
    config.set_second_generation(None)
    for op in ("fprop", "dgrad", "wgrad"):
        assert cuda_engine.select(op, P, np.float32)[0] == "im2col_gemm"


def test_auto_asks_the_autotuner_once_second_generation_is_on(monkeypatch):
    from gpuconv import autotune
    asked = []

    def fake_policy(op, p, dtype, layout="nchw"):
        asked.append((op, p, np.dtype(dtype)))
        assert layout == "nchw"   # the op's memory format reaches the autotuner
        return "igemm_simt_64x64"

    monkeypatch.setattr(autotune, "gpu_policy", fake_policy)
    monkeypatch.setenv("GPUCONV_SECOND_GEN", "1")
    config.set_second_generation(None)
    name, fn = cuda_engine.select("fprop", P, np.float32)
    assert name == "igemm_simt_64x64" and fn is cuda_engine.ALGORITHMS["fprop"][name]
    assert asked == [("fprop", P, np.dtype(np.float32))]
    config.set_second_generation(False)  # the explicit switch wins over the environment
    assert cuda_engine.select("fprop", P, np.float32)[0] == "im2col_gemm"
    config.set_second_generation(None)


def test_every_op_has_the_first_generation_and_the_second_registered():
    for op, algos in cuda_engine.ALGORITHMS.items():
        assert "im2col_gemm" in algos
        assert any(name.startswith("igemm_") for name in algos), op
