"""What machine a measurement ran on, read from the system (never typed in by hand).

Benchmarks and demos put :func:`machine_info` in their reports, and the kernel choice of
:mod:`exitwise.backbones.kernels` keys its cached measurements by :func:`machine_key`, so a
measurement made on one CPU is never reused on another.
"""

from __future__ import annotations

import os
import platform
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, ``sysctl`` on macOS, else
    ``platform.processor()``); ``"unknown"`` when none of them says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    if platform.system() == "Darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"],
                                 capture_output=True, text=True, timeout=5, check=False)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU model, logical cores, torch's intra-op threads, OS, Python and torch versions, and
    the GPU's name when one is visible."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_key() -> str:
    """One string that changes whenever a kernel timing could: CPU model, torch version and
    the number of intra-op threads."""
    return f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
