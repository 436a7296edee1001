"""The out-of-memory guard: refuse, before anything is written, a merge whose largest tensor cannot
fit in the compute device's free memory.

A merge holds one tensor set at a time, so what it needs beyond the process itself is about the
largest tensor's element count times a per-method working-set factor. The factors are measured:
the anonymous (non-reclaimable) peak of each method in benchmarks/RESULTS.md (run G: the synthetic
qwen2.5-1.5b family, largest tensor 233,373,696 elements), divided by that element count and
rounded up. Inputs are memory-mapped on the CPU (file-backed, reclaimable: not counted); on CUDA
they are copied to the device, so their bytes are added. The table lives here, keyed by method
name, rather than in the method registry (scf/methods/registry.py), so that adding a method needs
no measurement; a method missing from it gets `DEFAULT_FACTOR`, the largest measured.
"""

from __future__ import annotations

import torch

from scf.errors import ScfError
from scf.io import human_bytes

# bytes of working memory per element of the largest tensor (run G, peak anon / 233.4M elements)
WORKING_BYTES_PER_ELEMENT: dict[str, float] = {
    "scf_rkl": 7.0,  # 1.63 GB anon
    "scf_kl": 7.0,  # 1.57 GB
    "linear": 2.8,  # 0.64 GB
    "task_arithmetic": 2.8,  # 0.65 GB
    "ties": 7.0,  # 1.62 GB
    "dare_linear": 4.9,  # 1.12 GB
    "dare_ties": 4.9,  # 1.13 GB
    "sce": 7.1,  # 1.64 GB
}
DEFAULT_FACTOR = 8.0


def available_bytes(device: torch.device) -> int:
    """Memory free for the merge on ``device``: ``psutil``'s available memory for the CPU (free plus
    reclaimable cache), ``torch.cuda.mem_get_info`` for a GPU.

    Args:
        device: the compute device.

    Returns:
        Bytes available.
    """
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def check_working_memory(method: str, name: str, numel: int, input_bytes_per_element: int,
                         device: torch.device) -> None:
    """Refuse a merge whose largest tensor needs more working memory than ``device`` has free.

    Args:
        method: the method's name (picks its factor).
        name: the largest tensor's name, for the message.
        numel: its element count.
        input_bytes_per_element: the bytes of one element summed over the inputs as they are moved
            to the device (counted on CUDA only: on the CPU the inputs are memory-mapped).
        device: the compute device.

    Raises:
        ScfError: with the tensor, the estimate, the factor and the free memory.
    """
    factor = WORKING_BYTES_PER_ELEMENT.get(method, DEFAULT_FACTOR)
    per_element = factor + (input_bytes_per_element if device.type == "cuda" else 0)
    needed = int(numel * per_element)
    free = available_bytes(device)
    if needed > free:
        raise ScfError(
            f"not enough memory on {device} for tensor {name!r} ({numel:,} elements): method {method!r} "
            f"needs about {human_bytes(needed)} for it ({per_element:g} bytes per element, measured), and "
            f"{human_bytes(free)} is available; free memory or use a device with more")
