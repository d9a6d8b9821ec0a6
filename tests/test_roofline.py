"""The datasheet roofline table: devices are matched by the name the driver reports."""
import pytest

from gpuconv.benchmark import roofline


@pytest.mark.parametrize("name", ["NVIDIA H200", "NVIDIA H200 141GB HBM3e"])
def test_h200_is_the_h100s_compute_with_hbm3e(name):
    r = roofline.gpu_from_table(name)
    h100 = roofline.gpu_from_table("NVIDIA H100 80GB HBM3")
    assert r is not None and "H200" in r.source and "H100" in h100.source
    # the same GH100 compute as the H100 SXM: FP32 66.9, TF32 494.7, FP16/BF16 989.4 (dense)
    assert r.flops == h100.flops
    assert r.flops["fp32"] == pytest.approx(66.9e12)
    assert r.flops["tf32"] == pytest.approx(494.7e12)
    assert r.flops[r.unit("float16")] == r.flops[r.unit("bfloat16")] == pytest.approx(989.4e12)
    # 141 GB of HBM3e at 4.8 TB/s (the H100 SXM: 80 GB at 3.35 TB/s), 50 MB of L2 on both
    assert r.bandwidth == pytest.approx(4.8e12) and h100.bandwidth == pytest.approx(3.35e12)
    assert r.memory_bytes == 141 * 10**9 and r.l2_bytes == 50 << 20 == h100.l2_bytes
    doc = r.to_json()
    assert doc["memory_bytes"] == 141 * 10**9 and doc["l2_bytes"] == 50 << 20
    # a memory-bound problem's floor is 3.35 / 4.8 of the H100's
    assert r.floor_s(1, 4.8e12, "float32") == pytest.approx(1.0)


def test_unknown_device_has_no_table_entry():
    assert roofline.gpu_from_table("Some Future GPU") is None
