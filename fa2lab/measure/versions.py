"""The software a GPU figure depends on, beyond torch: triton and the NVIDIA driver."""

from __future__ import annotations

import importlib.metadata
import subprocess


def versions() -> dict:
    """triton's version (without importing it) and the NVIDIA driver's (nvidia-smi), '' when absent."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = ""
    driver = ""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0:
            driver = out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        pass
    return dict(triton=triton, driver=driver)
