"""Versions of what made an output, for run records, head manifests and reports; and the cores
this process may use (``usable_cores``).

Read from package metadata (importlib.metadata), never by importing the package: asking for
torch's version costs no torch import, so torch-free paths stay torch-free.
"""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__

#: Keys a caller may ask for → the distribution whose version they report.
DISTRIBUTIONS = {
    "torch": "torch", "torchvision": "torchvision", "timm": "timm", "h5py": "h5py",
    "pillow": "pillow", "numpy": "numpy", "scipy": "scipy", "joblib": "joblib",
    "scikit-learn": "scikit-learn", "sklearn": "scikit-learn", "skops": "skops",
    "onnx": "onnx", "onnxruntime": "onnxruntime", "skl2onnx": "skl2onnx",
    "openvino": "openvino", "ray": "ray", "fastapi": "fastapi", "uvicorn": "uvicorn", "starlette": "starlette",
    "cleanlab": "cleanlab", "umap-learn": "umap-learn",
}
#: What every record names: embedpipe, Python and numpy.
ALWAYS = ("numpy",)


def version_of(key: str) -> str | None:
    """The installed version of ``key`` (a key of DISTRIBUTIONS or a distribution name), or
    None when it is not installed."""
    try:
        return metadata.version(DISTRIBUTIONS.get(key, key))
    except metadata.PackageNotFoundError:
        return None


def versions(*extras: str) -> dict[str, str]:
    """``{"embedpipe": ..., "python": ..., "numpy": ..., <each of extras>: ...}``: the versions
    of embedpipe, Python, numpy and each installed package of ``extras`` (keys as given, e.g.
    ``"torch"``, ``"scikit-learn"``; packages that are not installed are left out)."""
    out = {"embedpipe": __version__, "python": platform.python_version()}
    for key in (*ALWAYS, *extras):
        v = version_of(key)
        if v is not None:
            out[key] = v
    return out


#: The packages whose versions decide extracted features (recorded in every extract run).
EXTRACT = ("torch", "timm", "h5py", "pillow")
#: The packages whose versions decide a fitted head.
HEADS = ("scikit-learn", "skops")


def usable_cores() -> int:
    """The CPU cores this process may use, at least 1: the fewest of the CPUs in the machine
    (``os.cpu_count``), its affinity mask (``taskset``, a container's cpuset) and a CPU
    bandwidth quota of the cgroup a container sees as its own (cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` under /sys/fs/cgroup: ``docker --cpus N``), a
    fractional quota rounded up (``--cpus 1.5``: 2), and ``LOKY_MAX_CPU_COUNT`` where set.

    This is joblib's own count (its vendored loky's ``cpu_count``: what ``n_jobs=-1`` uses in
    joblib and scikit-learn, so ``cv --jobs -1`` and auto's workers count alike). Not seen: the
    quota of a nested cgroup that is not mounted as the root of /sys/fs/cgroup (a systemd
    unit's ``CPUQuota=`` on a host without cgroup namespaces): cap it with
    ``LOKY_MAX_CPU_COUNT`` there. joblib is imported here, not at module import: scikit-learn
    imports it anyway, and extract imports it only when it starts loader workers."""
    from joblib.externals.loky import cpu_count

    return max(1, int(cpu_count()))
