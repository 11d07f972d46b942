"""Provenance attached to every output row: versions, device, CPU/GPU name, threads, command."""

from __future__ import annotations

import platform
import shlex
import sys
from functools import cache
from typing import TYPE_CHECKING

from .redact import redact

if TYPE_CHECKING:  # importing this module loads no PyTorch (a command's --help and usage errors stay fast)
    import torch


@cache
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device | str) -> str:
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def environment(device: torch.device | str, threads: int) -> dict[str, object]:
    """Columns appended to every table row."""
    import torch

    device = torch.device(device)
    return {
        "device": device.type,
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
        "threads": threads,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "command": command_line(),
    }


def command_line() -> str:
    """How this process was started, as a user would type it ("python -m study.depth ..."), passwords masked."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    prog = ["python", "-m", spec.name.removesuffix(".__main__")] if spec else ["python", sys.argv[0]]
    return redact(" ".join(shlex.quote(a) for a in [*prog, *sys.argv[1:]]))
