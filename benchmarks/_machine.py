"""The machine a benchmark ran on, in one line, for its JSON and Markdown."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC ..."), or what `platform` knows where /proc is missing."""
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    except OSError:
        names = []
    return names[0].strip() if names else (platform.processor() or "unknown CPU")


def describe(threads: int | None = None) -> str:
    """"x86_64 AMD EPYC, 2 cores, torch 2.13.0+cpu[, N torch thread(s)], no GPU" (or the GPU)."""
    import torch

    gpu = (f"CUDA {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU")
    used = f", {threads} torch thread(s)" if threads else ""
    return (f"{platform.machine()} {cpu_name()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}{used}, {gpu}")
