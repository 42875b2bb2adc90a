"""Whether the CUDA extension fastprompt._C is built, and for what. Used by `fastprompt info` and the backends.

`cuda_info()` never raises: a missing or broken extension is reported, not thrown.
"""
from __future__ import annotations

import functools
import importlib
from typing import Any, Optional


@functools.lru_cache(maxsize=1)
def _load() -> tuple[Optional[Any], Optional[str]]:
    try:
        import torch  # noqa: F401  (loads libtorch/libc10, which the extension links against)

        module = importlib.import_module("fastprompt._C")
    except ImportError as exc:  # not built (CPU torch, no nvcc, FASTPROMPT_SKIP_CUDA_BUILD) or an ABI mismatch
        return None, f"fastprompt._C is not built or failed to import ({exc})"
    return module, None


def extension():
    """The fastprompt._C module, or None."""
    return _load()[0]


def extension_error() -> Optional[str]:
    """Why fastprompt._C is unavailable, or None when it imports."""
    return _load()[1]


def cuda_info() -> dict:
    """{'built': bool, 'archs': [80, 90], 'nvcc_version': '13.0.88', ..., 'error': str | None,
    'device_covered': bool | None} - the compile-time facts baked into the extension plus whether the current
    GPU (if any) can run its cubins."""
    module, error = _load()
    info: dict = {"built": module is not None, "error": error}
    if module is None:
        return info
    info.update(module.build_info())
    info["device_covered"] = None
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            info["device_capability"] = f"{major}.{minor}"
            info["device_covered"] = arch_covers(info["archs"], major, minor)
    except Exception as exc:  # a broken driver must not break `fastprompt info`
        info["device_error"] = str(exc)
    return info


def arch_covers(archs, major: int, minor: int) -> bool:
    """A cubin for sm_XY runs on sm_XZ with Z >= Y (same major); no PTX is embedded, so nothing else runs."""
    return any(a // 10 == major and a % 10 <= minor for a in archs)


def cuda_info_text() -> str:
    info = cuda_info()
    if not info["built"]:
        return f"CUDA kernels: not built - {info['error']}"
    archs = ", ".join(f"sm_{a}" for a in info["archs"])
    line = f"CUDA kernels: built for {archs} with nvcc {info['nvcc_version']}"
    if info.get("device_capability"):
        ok = "runs" if info["device_covered"] else "does NOT run (rebuild with TORCH_CUDA_ARCH_LIST)"
        line += f"; this GPU (sm_{info['device_capability'].replace('.', '')}) {ok}"
    return line
