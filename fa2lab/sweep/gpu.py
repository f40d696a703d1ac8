"""GPU sweeps: which specs need a CUDA device (the versions a GPU result depends on are
fa2lab.measure.versions).

A spec whose `resources` name a GPU (`resources: {GPU: 1}`, as experiments/gpu_kernels.yaml and
gpu_decode.yaml) needs a CUDA device. Run locally on a machine without one, `fa2lab sweep` skips
it and says why (`make run` does so on a CPU-only machine); on a Dask cluster the workers' devices
count, so nothing is skipped there.
"""

from __future__ import annotations


def needs_gpu(spec) -> bool:
    return any(name.lower() == "gpu" for name in spec.resources)


def skip_reason(spec) -> str | None:
    """Why `spec` cannot run on this machine, or None."""
    if not needs_gpu(spec):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    why = ("this torch is a CPU build" if torch.version.cuda is None
           else f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no CUDA device")
    return (f"the spec asks for resources {spec.resources} (a CUDA device) and {why} "
            f"(torch.cuda.is_available() is False); run it on a GPU machine, or on a Dask cluster of GPU "
            f"workers with --cluster")
