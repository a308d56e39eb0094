"""The compute device, chosen once: an enum whose `xp` is the array module (numpy or cupy).

The GPU is probed lazily: importing mtool never initialises CUDA."""

from __future__ import annotations

import enum
import functools

from mtool.errors import ConfigError


class Device(enum.Enum):
    CPU = "cpu"
    GPU = "gpu"

    @property
    def xp(self):
        if self is Device.GPU:
            import cupy

            return cupy
        import numpy

        return numpy


@functools.lru_cache(maxsize=1)
def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def choose(name: str) -> Device:
    """auto: the GPU when one is usable, else the CPU; gpu without one is a configuration error."""
    if name == "cpu":
        return Device.CPU
    if name == "gpu":
        if not gpu_available():
            raise ConfigError("--device gpu but no usable CUDA GPU (cupy missing or no device)",
                              hint="install the gpu extra on a GPU machine, or use --device cpu")
        return Device.GPU
    return Device.GPU if gpu_available() else Device.CPU


def to_host(array):
    """A NumPy array from a NumPy or CuPy one (the one place data leaves the device)."""
    return array.get() if hasattr(array, "get") else array
