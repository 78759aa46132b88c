"""What a sandboxed run may use and what it reports: the isolation layers, `SandboxLimits`
and `SandboxResult` (both importable from `mmopd.tools.sandbox` and `mmopd.tools.python`)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from .base import ToolSetupError

# Set to 1 to let the sandbox run without a network namespace where none can be made (Docker or
# Kubernetes denying user namespaces): the audit hook and, with Landlock ABI >= 4, the kernel
# still refuse TCP, but UDP and raw sockets are then stopped by the hook alone.
ALLOW_WEAK_ENV = "MMOPD_SANDBOX_ALLOW_WEAK"
NAMESPACE_LAYERS = ("userns", "netns", "pidns", "mountns")
LAYERS = (*NAMESPACE_LAYERS, "readonly", "procfs", "dropuid", "landlock", "nocaps", "subreaper",
          "audit")


@dataclass
class SandboxLimits:
    """Resource limits of one `run_python` call."""

    cpu_seconds: float = 5.0  # CPU time of the code's process (rounded up to whole seconds)
    wall_seconds: float = 10.0  # wall-clock time from the start of the code
    memory_mb: int = 512  # address space (RLIMIT_AS) of each process
    max_processes: int = 16  # tasks at once (processes and threads, the code's own included)
    max_output_chars: int = 4000  # stdout and stderr are each cut to about this, head and tail
    max_file_mb: int = 16  # largest file the code may write, stdout and stderr included
    scratch_mb: int = 64  # size of the scratch tmpfs (when the mountns layer is on)
    max_open_files: int = 64
    nice: int = 10  # the code yields the CPU to the training process
    disable: tuple[str, ...] = ()  # layers to leave off (tests use it to check one layer alone)
    # layers without which the sandbox refuses to run (fails closed); None: netns, the network
    # isolation, unless MMOPD_SANDBOX_ALLOW_WEAK=1 is set; () accepts whatever the machine has
    require: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "max_processes",
                     "max_output_chars", "max_file_mb", "scratch_mb", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")
        if self.max_processes < 3:
            raise ValueError(f"SandboxLimits.max_processes must be >= 3 (the sandbox itself "
                             f"uses 2), got {self.max_processes}")
        self.disable = tuple(self.disable)
        if self.require is None:
            self.require = () if os.environ.get(ALLOW_WEAK_ENV) == "1" else ("netns",)
        self.require = tuple(self.require)
        for name in ("disable", "require"):
            if bad := [x for x in getattr(self, name) if x not in LAYERS]:
                raise ValueError(f"SandboxLimits.{name} has unknown layer(s) {bad}; known: "
                                 f"{LAYERS}")


@dataclass
class SandboxResult:
    """What happened to one run of untrusted code."""

    stdout: str = ""  # decoded with replacement, cut to about max_output_chars (head and tail)
    stderr: str = ""
    exit_code: int | None = None  # None when the code did not exit by itself (signal, setup)
    signal: int | None = None  # the signal that ended the code's process
    timed_out: bool = False  # the CPU or wall-clock limit stopped it
    error: str | None = None  # None, "timeout", "memory", "output", "denied", "killed",
    #                           "exception", "exit" or "setup"
    message: str = ""  # one line for the model, "Error: ..."; empty when error is None
    duration: float = 0.0  # wall seconds of the whole call
    cpu_seconds: float = 0.0  # CPU time the code used
    truncated: bool = False  # stdout or stderr was cut
    layers: tuple[str, ...] = field(default_factory=tuple)  # isolation layers that were on
    failed_layer: str | None = None  # with error "setup": the layer or step that failed

    @property
    def ok(self) -> bool:
        return self.error is None


class SandboxUnavailable(ToolSetupError):
    """The sandbox cannot give the isolation it is required to: it fails closed."""


def check_required(limits: SandboxLimits, layers: Iterable[str]) -> None:
    """Raise SandboxUnavailable unless `layers` (what this machine gives) hold every layer
    `limits.require` names."""
    layers = set(layers)
    missing = [x for x in limits.require or () if x not in layers]
    if missing:
        raise SandboxUnavailable(
            f"the python sandbox cannot make the {', '.join(missing)} layer(s) here (layers "
            f"available: {', '.join(sorted(layers)) or 'none'}); without a network namespace "
            "model-written code could reach the network. In Docker or Kubernetes allow user "
            "namespaces (or run the container with CAP_SYS_ADMIN), or accept the weaker "
            f"isolation explicitly: {ALLOW_WEAK_ENV}=1 in the environment, or "
            "SandboxLimits(require=())")
