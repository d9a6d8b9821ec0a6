"""What a result file records about where it was measured: machine, device, driver, library
versions, the gpuconv commit and the date."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys


def _run(cmd, cwd=None):
    try:
        r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def git_commit():
    """HEAD of the checkout gpuconv is imported from (``+dirty`` if modified), else None."""
    here = os.path.dirname(os.path.abspath(__file__))
    sha = _run(["git", "rev-parse", "HEAD"], cwd=here)
    if sha is None:
        return None
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here)
    return sha + ("+dirty" if dirty else "")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info():
    """Name, driver, CUDA versions and L2 of the current GPU, or None where there is none."""
    info = {}
    try:
        import torch
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(name=p.name, sm_count=p.multi_processor_count,
                        memory_bytes=p.total_memory, capability=f"{p.major}.{p.minor}",
                        l2_bytes=getattr(p, "L2_cache_size", None))
    except Exception:
        pass
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            nm = props["name"]
            info.setdefault("name", nm.decode() if isinstance(nm, bytes) else nm)
            info.setdefault("l2_bytes", props.get("l2CacheSize"))
            info["cuda_driver_api"] = cupy.cuda.runtime.driverGetVersion()
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
    except Exception:
        pass
    if not info:
        return None
    smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    info["driver"] = smi.splitlines()[0] if smi else None
    return info


def versions():
    v = {"python": sys.version.split()[0]}
    import numpy
    v["numpy"] = numpy.__version__
    try:
        from .. import __version__
        v["gpuconv"] = __version__
    except ImportError:
        pass
    try:
        import torch
        v["torch"] = torch.__version__
        v["torch_cuda"] = torch.version.cuda
        v["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() \
            else None
    except Exception:
        pass
    try:
        import cupy
        v["cupy"] = cupy.__version__
    except Exception:
        pass
    try:
        import threadpoolctl
        v["blas"] = [{k: i.get(k) for k in ("internal_api", "version", "num_threads",
                                            "architecture")}
                     for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    except Exception:
        pass
    v["openblas_coretype"] = os.environ.get("OPENBLAS_CORETYPE")
    return v


def blas_kernels(v):
    """'openblas 0.3.31 Haswell kernels (OPENBLAS_CORETYPE=Haswell)', from versions()."""
    libs = v.get("blas") or []
    line = ", ".join(f"{b.get('internal_api')} {b.get('version')} {b.get('architecture')} "
                     "kernels" for b in libs) or "BLAS unknown"
    if v.get("openblas_coretype"):
        line += f" (OPENBLAS_CORETYPE={v['openblas_coretype']})"
    return line


def blas_line(v):
    """blas_kernels(v) for the headers, with a warning where the environment pins kernels below
    the CPU's."""
    from .._blas_kernels import note
    warn = note({"OPENBLAS_CORETYPE": v.get("openblas_coretype") or ""})
    return blas_kernels(v) + (f"\n  note: {warn}" if warn else "")


def load_average():
    """1-minute load average at the start of the run (other processes skew CPU timings)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def machine():
    return {"hostname": platform.node(), "platform": platform.platform(), "cpu": cpu_name(),
            "cpu_count": os.cpu_count(), "load_average_1min": load_average(),
            "gpu": gpu_info()}


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
