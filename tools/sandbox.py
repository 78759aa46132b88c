"""Run untrusted, model-written Python in a sandboxed subprocess: the parent-side API.

``run_python(code)`` never raises for anything the code does; it returns a `SandboxResult`, and
`PythonTool` (``mmopd.tools.python``) turns that into a `ToolResult` with a short
``Error: ...`` line when a limit or a denial stopped the code. Isolation is layered, kernel
mechanisms first, each one probed once per process (`available_layers`) and then required on
every call (a layer that fails is a setup error, never a silent downgrade):

========= ============================================================== ======================
layer     what it does                                                   needs
========= ============================================================== ======================
(always)  fresh scratch dir as cwd/HOME/TMPDIR, deleted afterwards;      Linux
          ``python -I -S -B`` with a 5-variable environment; rlimits
          CPU, AS, FSIZE, NOFILE, CORE=0; own session; wall-clock timer;
          stdout/stderr go to files capped by RLIMIT_FSIZE and are read
          back bounded; the process group is SIGKILLed after every call;
          no_new_privs; nice 10
userns    new user namespace mapping only our own uid, which lets a      unprivileged userns
          non-root user create the namespaces below; RLIMIT_NPROC then   (not used as root)
          counts only the sandbox's tasks
netns     new network namespace (nothing but a downed loopback), and     userns or root
          new IPC and UTS namespaces (no SysV shared memory of the host)
pidns     the code is pid 1 of a new PID namespace: every process it     userns or root
          starts dies with it (setsid and double forks included)
mountns   private mount namespace; scratch is a tmpfs of ``scratch_mb``  userns or root
readonly  every mount remounted read-only (chmod, utime, xattrs too)     mountns
procfs    a fresh read-only /proc showing only the sandbox's processes   pidns + mountns
dropuid   the code runs as a fresh unused uid (2e9 + random), so         root
          RLIMIT_NPROC applies (root is exempt), Unix permissions
          protect root's files and processes, and sandboxes cannot
          touch each other; an interpreter under e.g. /root (0700) is
          reached through a tmpfs over /root that holds only it
landlock  writes only in scratch and /dev/null; reads only the           Landlock, Linux 5.13+
          interpreter, /usr, /lib*, a few /etc files; ABI >= 4: no TCP
          bind/connect; ABI >= 6: no signals or abstract unix sockets
          out of the sandbox; no ptrace or /proc/<pid>/environ of others
nocaps    empty capability sets (bounding and ambient included)          -
subreaper the launcher adopts orphans and SIGKILLs them (for no pidns)   Linux 3.4+
audit     a ``sys.addaudithook`` prelude denies sockets, processes,      -
          ctypes, writes outside scratch, signals and other processes'
          /proc entries, raising PermissionError("[sandbox] ...")
========= ============================================================== ======================

Root on a Linux 6.x machine (a typical CI runner) gets every layer but userns; a non-root user with
unprivileged user namespaces gets every layer but dropuid (checked by a test that runs the
sandbox as ``nobody``). Without a network namespace (Docker and Kubernetes deny user namespaces)
it fails closed (``SandboxUnavailable`` when the tool is made); the weaker modes run only when
asked for (``MMOPD_SANDBOX_ALLOW_WEAK=1``, ``require=()``). Degraded cases: a non-root user
without user namespaces keeps only landlock, nocaps, subreaper and audit, so nothing stops
forking but the audit hook (RLIMIT_NPROC would count every process of that user, the training
job included, so it is not set), nothing stops UDP but the hook, and the code may signal that
user's processes unless Landlock's ABI is >= 6. Root in a container without CAP_SYS_ADMIN
falls back to a user namespace mapping root to root: namespaces but no RLIMIT_NPROC and no
dropuid. Without Landlock, reads are limited only by Unix permissions (and dropuid). The audit
hook is a second layer and for clear messages: Python code with enough determination can get
around it, the kernel layers it cannot.

How a call runs: the parent writes the code, stdin and a config into a fresh ``mmopd-py-*`` temp
dir and spawns ``python -I -S -c <launcher>`` (no ``preexec_fn``, so the spawn is a vfork: cheap
and safe from a large, threaded training process). That process (A) enters the namespaces, mounts
the tmpfs, sets the rlimits and forks B, which mounts /proc, switches to its fresh uid, drops
capabilities, applies Landlock, installs the audit hook and runs the code. A enforces the wall
clock, kills what is left and writes a status file the parent reads; the parent has its own
backstop timeout.

This module is the parent: layer probe, spawning and classifying (limits and result are in
`sandbox_limits`). The code of A and B is in `mmopd.tools.sandbox_launcher` (with its guards in
`sandbox_guards`), which ships it to the child as source text.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from .sandbox_launcher import BOOTSTRAP, launcher_source
from .sandbox_limits import (
    LAYERS,
    SandboxLimits,
    SandboxResult,
    check_required,
)

log = logging.getLogger(__name__)

_PROBE_CODE = "import collections, decimal, fractions, json, math, random, re\nprint('ok')"
_SETUP_GRACE_S = 5.0  # the parent's backstop waits this much past the wall limit (setup, load)


# ----------------------------------------------------------------------------- parent side


def _interpreter() -> str:
    # The base interpreter, not the venv's: with -S the venv adds nothing, and Landlock then only
    # has to let the code read one prefix.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


@functools.lru_cache(maxsize=1)
def _prefixes() -> tuple[str, ...]:
    """The directories the interpreter runs from (its standard library included)."""
    exe = _interpreter()
    dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    dirs.add(os.path.dirname(os.path.dirname(exe)))
    return tuple(sorted(d for d in dirs if not any(d.startswith(o + "/") for o in dirs)))


@functools.lru_cache(maxsize=1)
def _read_paths() -> tuple[str, ...]:
    """What the code may read under Landlock: the interpreter, system libraries, a few /etc
    files the standard library opens. Not /home, /root, /work, /tmp or /proc of the host."""
    system = ["/usr", "/lib", "/lib64", "/lib32", "/libx32", "/bin", "/sys/devices/system/cpu",
              "/dev/urandom", "/dev/random", "/dev/zero"]
    etc = ["ld.so.cache", "localtime", "timezone", "passwd", "group", "nsswitch.conf", "hosts",
           "os-release", "mime.types"]
    return _prefixes() + tuple(system + [f"/etc/{f}" for f in etc])


def _fresh_uid() -> int:
    """An unused uid for one call (as root): RLIMIT_NPROC then counts only this sandbox, and
    sandboxes cannot signal or ptrace each other."""
    import pwd
    import random

    while True:
        uid = random.SystemRandom().randrange(2_000_000_000, 2_100_000_000)
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid


def _shorten(text: str, limit: int) -> str:
    """Keep the head and the tail (where tracebacks and final answers are)."""
    if len(text) <= limit:
        return text
    head = limit // 2
    tail = text[len(text) - (limit - head):]  # not text[-n:], which is everything for n == 0
    return f"{text[:head]}\n... [{len(text) - limit} characters cut] ...\n{tail}"


def _read_capped(path: str, limit: int) -> tuple[str, int, bool]:
    """The file's text cut to about `limit` characters, its size in bytes, and whether it was
    cut. Reads at most ~8 bytes per kept character, however large the file is."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            if size <= 4 * limit:
                text = f.read().decode("utf-8", "replace")
                return _shorten(text, limit), size, len(text) > limit
            half = 4 * (limit // 2 + 1)
            head = f.read(half).decode("utf-8", "replace")[: limit // 2]
            f.seek(size - half)
            tail = f.read(half).decode("utf-8", "replace")
            tail = tail[len(tail) - (limit - limit // 2):]
    except OSError:
        return "", 0, False
    return f"{head}\n... [output cut: {size} bytes in total] ...\n{tail}", size, True


def _wait_exited(pid: int, timeout: float) -> bool:
    """Wait until `pid` exits, without reaping it: while it is a zombie its process-group id
    cannot be reused, so the killpg that follows cannot hit a stranger's group."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return bool(poller.poll(max(0, int(timeout * 1000))))
        finally:
            os.close(fd)
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _private(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)


def _fmt_s(x: float) -> str:
    return f"{x:g}"


def _run(code: str, limits: SandboxLimits, stdin: str, layers: frozenset[str]) -> SandboxResult:
    """One sandboxed run with exactly these layers (any that fails is a setup error)."""
    t0 = time.monotonic()
    base = os.path.realpath(tempfile.mkdtemp(prefix="mmopd-py-"))  # the hook compares paths
    try:
        os.chmod(base, 0o711)  # a dropped uid must reach scratch/ through it; files stay 0600
        scratch = os.path.join(base, "scratch")
        os.mkdir(scratch, 0o700)
        uid = _fresh_uid() if "dropuid" in layers else os.geteuid()
        if "dropuid" in layers and "mountns" not in layers:
            os.chown(scratch, uid, uid)
        paths = {k: os.path.join(base, k) for k in ("code", "stdin", "stdout", "stderr", "status")}
        for key, text in (("code", code), ("stdin", stdin)):  # lone surrogates: SyntaxError
            with open(os.open(paths[key], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(text.encode("utf-8", "surrogatepass"))
        read_paths = list(_read_paths()) + (["/proc"] if "procfs" in layers else [])
        cfg = {**{k: v for k, v in paths.items() if k in ("code", "status")}, "scratch": scratch,
               "layers": sorted(layers), "audit": "audit" in layers, "read_paths": read_paths,
               "uid": uid, "prefixes": list(_prefixes()),
               "cpu": max(1, int(-(-limits.cpu_seconds // 1))), "wall": limits.wall_seconds,
               "as": limits.memory_mb << 20, "fsize": limits.max_file_mb << 20,
               "nproc": limits.max_processes, "nofile": limits.max_open_files,
               "scratch_mb": limits.scratch_mb, "nice": limits.nice}
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch,
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        argv = [_interpreter(), "-I", "-S", "-B", "-X", "utf8", "-c", BOOTSTRAP,
                launcher_source(), json.dumps(cfg)]
        with open(paths["stdin"], "rb") as fin, open(_private(paths["stdout"]), "wb") as fout, \
                open(_private(paths["stderr"]), "wb") as ferr:
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=env,
                                    cwd=scratch, close_fds=True, start_new_session=True)
        backstop_hit = False
        try:
            backstop_hit = not _wait_exited(proc.pid, limits.wall_seconds + _SETUP_GRACE_S)
        finally:
            try:  # whatever is left in the group (A is a zombie or alive, so the id is ours)
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait()
        try:
            with open(paths["status"]) as f:
                status = json.load(f)
        except (OSError, ValueError):
            status = {}
        limit = limits.max_output_chars
        out, out_size, out_cut = _read_capped(paths["stdout"], limit)
        err, err_size, err_cut = _read_capped(paths["stderr"], limit)
        res = SandboxResult(stdout=out, stderr=err, duration=time.monotonic() - t0,
                            truncated=out_cut or err_cut, layers=tuple(sorted(layers)),
                            cpu_seconds=status.get("cpu", 0.0))
        fsize_hit = max(out_size, err_size) >= limits.max_file_mb << 20
        _classify(res, status, proc.returncode, backstop_hit, fsize_hit, limits)
        return res
    except Exception as e:  # a sandbox failure is the model's observation, not a crashed rollout
        return SandboxResult(error="setup", message=f"Error: the sandbox failed: "
                             f"{type(e).__name__}: {e}", duration=time.monotonic() - t0,
                             layers=tuple(sorted(layers)))
    finally:
        shutil.rmtree(base, ignore_errors=True)


_DENIED = re.compile(r"PermissionError: \[sandbox\] ([^\n]*)")


def _classify(res: SandboxResult, status: dict[str, Any], launcher_rc: int | None,
              backstop_hit: bool, fsize_hit: bool, limits: SandboxLimits) -> None:
    """Fill exit_code/signal/error/message from the launcher's status file."""
    if status.get("setup_error"):
        res.error, res.message = "setup", f"Error: the sandbox could not be set up: " \
                                          f"{status['setup_error']}"
        res.failed_layer = status.get("layer")
        return
    if "wait_status" not in status:  # the launcher itself died or hit the parent's backstop
        res.timed_out = backstop_hit
        res.error = "timeout" if backstop_hit else "killed"
        res.message = (f"Error: time limit of {_fmt_s(limits.wall_seconds)} s exceeded"
                       if backstop_hit else f"Error: the sandbox was killed (status {launcher_rc})")
        return
    code = os.waitstatus_to_exitcode(status["wait_status"])
    res.exit_code, res.signal = (code, None) if code >= 0 else (None, -code)
    denied = _DENIED.findall(res.stderr)
    last = res.stderr.rstrip().rsplit("\n", 1)[-1]
    if status.get("timed_out"):
        res.timed_out, res.error = True, "timeout"
        res.message = f"Error: time limit of {_fmt_s(limits.wall_seconds)} s exceeded"
    elif res.signal in (signal.SIGKILL, signal.SIGXCPU) and \
            res.cpu_seconds >= max(1, -(-limits.cpu_seconds // 1)) - 0.1:
        res.timed_out, res.error = True, "timeout"
        res.message = f"Error: CPU time limit of {_fmt_s(limits.cpu_seconds)} s exceeded"
    elif code == 0:
        return
    elif denied:
        res.error, res.message = "denied", f"Error: {denied[-1]}"
    elif last.startswith("MemoryError"):
        res.error = "memory"
        res.message = f"Error: memory limit of {limits.memory_mb} MB exceeded"
    elif fsize_hit:
        res.error = "output"
        res.message = f"Error: output limit of {limits.max_file_mb} MB exceeded (output cut)"
    elif res.signal is not None:
        res.error = "killed"
        res.message = f"Error: the code was killed by {signal.Signals(res.signal).name}"
    elif code == 1 and res.stderr:
        res.error = "exception"  # the traceback in stderr says it all
    else:
        res.error, res.message = "exit", f"Error: the code exited with status {code}"


_PROBE_LOCK = threading.Lock()
_AVAILABLE: frozenset[str] | None = None


def available_layers() -> frozenset[str]:
    """The isolation layers that work on this machine, probed once per process by running an
    empty program under successively weaker sets. Also holds informational ``landlock-net`` /
    ``landlock-scope`` when the Landlock ABI covers TCP and signals."""
    global _AVAILABLE
    with _PROBE_LOCK:
        if _AVAILABLE is not None:
            return _AVAILABLE
        root = os.geteuid() == 0
        others = {"readonly", "procfs", "landlock", "nocaps", "subreaper", "audit"}
        others |= {"dropuid"} if root else set()
        full = {"mountns", "pidns", "netns"}
        # As root the namespaces need no user namespace, and one mapping root to root would
        # keep root's exemption from RLIMIT_NPROC; a fresh uid (dropuid) does better.
        ns_candidates = ([full] if root else []) + [full | {"userns"}, {"userns", "netns"},
                                                    {"netns"}, set()]
        last = ""
        for ns in ns_candidates:
            extra = set(others)
            while True:
                layers = _consistent(ns | extra)
                res = _run(_PROBE_CODE, SandboxLimits(), "", frozenset(layers))
                if res.ok and res.stdout == "ok\n":
                    abi = _probe_landlock_abi(layers)
                    if abi >= 4:
                        layers.add("landlock-net")
                    if abi >= 6:
                        layers.add("landlock-scope")
                    _AVAILABLE = frozenset(layers)
                    lvl = logging.INFO if {"netns", "pidns", "landlock"} <= layers else \
                        logging.WARNING
                    log.log(lvl, "python sandbox layers: %s", ", ".join(sorted(layers)))
                    return _AVAILABLE
                last = res.message or res.stderr.strip()[-300:]
                log.debug("python sandbox probe %s: %s", sorted(layers), last)
                # Code that fails without a setup error (the standard library unreadable, say)
                # is put down to the layers that restrict it most, one at a time.
                failed = res.failed_layer if res.error == "setup" else next(
                    (x for x in ("dropuid", "landlock", "readonly", "procfs") if x in extra), None)
                if failed in extra:
                    extra.discard(failed)
                    continue
                break  # a namespace (or the launcher itself) failed: try the next set
        raise RuntimeError(f"no sandbox configuration works on this machine ({last})")


def _probe_landlock_abi(layers: set[str]) -> int:
    if "landlock" not in layers:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    return max(0, libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


def _consistent(layers: set[str]) -> set[str]:
    """Drop the layers whose prerequisites are missing."""
    layers = set(layers)
    if not {"mountns", "pidns"} <= layers:
        layers.discard("procfs")
    if "mountns" not in layers:
        layers.discard("readonly")
    if "landlock" not in layers:
        layers -= {"landlock-net", "landlock-scope"}
    return layers


def check_isolation(limits: SandboxLimits) -> frozenset[str]:
    """The layers a run under `limits` gets; SandboxUnavailable where a required one is missing."""
    layers = _consistent(set(available_layers()) - set(limits.disable))
    check_required(limits, layers)
    return frozenset(x for x in layers if x in LAYERS)


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a script in a fresh sandbox and report what happened. Never raises for
    anything the code does; safe to call from several threads at once."""
    limits = limits or SandboxLimits()
    try:
        layers = check_isolation(limits)
    except Exception as e:
        return SandboxResult(error="setup", message=f"Error: the sandbox is unavailable: {e}")
    return _run(code, limits, stdin, layers)
