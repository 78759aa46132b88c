"""The built-in ``python`` tool: run untrusted, model-written Python in a sandboxed subprocess.

``run_python(code)`` never raises for anything the code does; it returns a `SandboxResult`, and
`PythonTool` turns that into a `ToolResult` with a short ``Error: ...`` line when a limit or a
denial stopped the code. Isolation is layered, kernel mechanisms first, each one probed once per
process (`available_layers`) and then required on every call (a layer that fails is a setup error,
never a silent downgrade):

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

Root on a Linux 6.x machine (our CI) gets every layer but userns; a non-root user with
unprivileged user namespaces gets every layer but dropuid (checked by a test that runs the
sandbox as ``nobody``). Degraded cases: a non-root user without user namespaces keeps only
landlock, nocaps, subreaper and audit, so nothing stops forking but the audit hook (RLIMIT_NPROC
would count every process of that user, the training job included, so it is not set), nothing
stops UDP but the hook, and the code may signal that user's processes unless Landlock's ABI is
>= 6. Root in a container without CAP_SYS_ADMIN falls back to a user namespace mapping root to
root: namespaces but no RLIMIT_NPROC and no dropuid. Without Landlock, reads are limited only by
Unix permissions (and dropuid). The audit hook is a second layer and for clear messages: Python
code with enough determination can get around it, the kernel layers it cannot.

How a call runs: the parent writes the code, stdin and a config into a fresh ``mmopd-py-*`` temp
dir and spawns ``python -I -S -c <launcher>`` (no ``preexec_fn``, so the spawn is a vfork: cheap
and safe from a large, threaded training process). That process (A) enters the namespaces, mounts
the tmpfs, sets the rlimits and forks B, which mounts /proc, switches to its fresh uid, drops
capabilities, applies Landlock, installs the audit hook and runs the code. A enforces the wall
clock, kills what is left and writes a status file the parent reads; the parent has its own
backstop timeout.
"""

from __future__ import annotations

import dataclasses
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
from dataclasses import dataclass, field
from typing import Any

from .base import MAX_TOOL_OUTPUT_CHARS, ToolResult, register_tool

log = logging.getLogger(__name__)

NAMESPACE_LAYERS = ("userns", "netns", "pidns", "mountns")
LAYERS = (*NAMESPACE_LAYERS, "readonly", "procfs", "dropuid", "landlock", "nocaps", "subreaper",
          "audit")
_PROBE_CODE = "import collections, decimal, fractions, json, math, random, re\nprint('ok')"
_SETUP_GRACE_S = 5.0  # the parent's backstop waits this much past the wall limit (setup, load)
_LAUNCHER_NAME = "<sandbox>"


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

    def __post_init__(self) -> None:
        for name in ("cpu_seconds", "wall_seconds", "memory_mb", "max_processes",
                     "max_output_chars", "max_file_mb", "scratch_mb", "max_open_files"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)}")
        if self.max_processes < 3:
            raise ValueError(f"SandboxLimits.max_processes must be >= 3 (the sandbox itself "
                             f"uses 2), got {self.max_processes}")
        self.disable = tuple(self.disable)
        if bad := [x for x in self.disable if x not in LAYERS]:
            raise ValueError(f"SandboxLimits.disable has unknown layer(s) {bad}; known: {LAYERS}")


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


@functools.lru_cache(maxsize=1)
def _launcher_source() -> str:
    import inspect

    # The child-side functions below, sent as source to `python -I -S -c`.
    funcs = (_c_main, _c_child, _c_landlock, _c_drop_caps, _c_audit, _c_run)
    body = "\n\n".join(inspect.getsource(f) for f in funcs)
    return ("from __future__ import annotations\nimport json, sys\n\n" + body
            + "\n\n_c_main(json.loads(sys.argv[2]))\n")


# Compiled under its own file name so that tracebacks can leave the launcher's frames out.
_BOOTSTRAP = f"import sys; exec(compile(sys.argv[1], {_LAUNCHER_NAME!r}, 'exec'))"


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
        argv = [_interpreter(), "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP,
                _launcher_source(), json.dumps(cfg)]
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


def _layers_for(limits: SandboxLimits) -> frozenset[str]:
    layers = _consistent(set(available_layers()) - set(limits.disable))
    return frozenset(x for x in layers if x in LAYERS)


def run_python(code: str, limits: SandboxLimits | None = None, stdin: str = "") -> SandboxResult:
    """Run `code` as a script in a fresh sandbox and report what happened. Never raises for
    anything the code does; safe to call from several threads at once."""
    limits = limits or SandboxLimits()
    try:
        layers = _layers_for(limits)
    except Exception as e:
        return SandboxResult(error="setup", message=f"Error: the sandbox is unavailable: {e}")
    return _run(code, limits, stdin, layers)


class PythonTool:
    """The ``python`` tool: runs the model's code with `run_python` under fixed limits."""

    name = "python"
    parameters: dict[str, Any] = {
        "type": "object",
        "properties": {"code": {"type": "string",
                                "description": "Python 3 source, run as a script"}},
        "required": ["code"],
    }

    def __init__(self, limits: SandboxLimits | None = None, **overrides: Any) -> None:
        self.limits = dataclasses.replace(limits or SandboxLimits(), **overrides)
        lim = self.limits
        self.description = (
            "Run Python 3 code and return what it prints (stdout, then stderr). Each call is a "
            "fresh interpreter with the standard library only, in an empty scratch directory, "
            f"without network access; limits: {_fmt_s(lim.cpu_seconds)} s CPU, "
            f"{_fmt_s(lim.wall_seconds)} s wall clock, {lim.memory_mb} MB memory. "
            "Use print() to see results.")

    def run(self, args: dict[str, Any]) -> ToolResult:
        res = run_python(args["code"], self.limits)
        out = res.stdout
        if res.stderr:
            out += ("" if not out or out.endswith("\n") else "\n") + res.stderr
        # Fit the text here, head and tail, rather than let call_tool cut off the traceback.
        budget = min(self.limits.max_output_chars, MAX_TOOL_OUTPUT_CHARS)
        text = _shorten(out, max(0, budget - len(res.message) - 64))  # 64: the cut marker
        if res.message:
            text = f"{res.message}\n{text}" if text else res.message
        return ToolResult(text or "(no output)", error=not res.ok)


register_tool("python", PythonTool)


# ----------------------------------------------------------------------------- child side
# Everything below runs inside the sandbox's interpreter, not in this process: _launcher_source
# sends these functions' source to `python -I -S -c`. They use the standard library only, import
# what they need themselves, and refer to nothing else in this module.


def _c_main(cfg: dict[str, Any]) -> None:
    """Process A: namespaces, mounts, rlimits; fork B (the code); time it; kill leftovers."""
    import ctypes
    import errno
    import json
    import os
    import re
    import resource
    import signal
    import sys
    import time

    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the forking thread may have blocked some
    layers = set(cfg["layers"])
    # Opened before the mounts: the file stays writable when the filesystem goes read-only.
    status_fd = os.open(cfg["status"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                        0o600)

    def report(**kw: Any) -> None:
        os.write(status_fd, json.dumps(kw).encode())

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                           ctypes.c_char_p]

    def check(ret: int, what: str) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(src: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        enc = [None if s is None else s.encode() for s in (src, target, fstype, data)]
        check(libc.mount(enc[0], enc[1], enc[2], flags, enc[3]), f"mount {target}")

    def write(path: str, data: str) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, data.encode())
        finally:
            os.close(fd)

    rdonly, nosuid, nodev, noexec, remount, bind, rec = 1, 2, 4, 8, 32, 4096, 16384
    keep = {"nosuid": nosuid, "nodev": nodev, "noexec": noexec, "noatime": 1024,
            "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24}

    def remount_all_readonly() -> None:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
        for line in lines:
            fields = line.split()
            target = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
            # Flags that a user namespace locked must be repeated, or the remount is refused.
            flags = bind | remount | rdonly | sum({keep.get(o, 0) for o in fields[5].split(",")})
            try:
                mount(None, target, None, flags)
            except OSError as e:
                if e.errno != errno.ENOENT:  # a mount point deleted since: nothing to protect
                    raise

    def expose(prefixes: list[str]) -> None:
        """Let the unprivileged uid reach the interpreter under e.g. /root (0700): a tmpfs over
        /root holding only the interpreter's prefix, bound from the real one."""
        covered: set[str] = set()
        for prefix in prefixes:
            parts = prefix.strip("/").split("/")
            hidden = next((d for d in ("/" + "/".join(parts[:i]) for i in range(1, len(parts)))
                           if not os.stat(d).st_mode & 0o001), None)
            if hidden is None:
                continue
            fd = os.open(prefix, os.O_PATH | os.O_CLOEXEC)
            try:
                if hidden not in covered:
                    mount("tmpfs", hidden, "tmpfs", nosuid | nodev, "size=64k,mode=0755")
                    covered.add(hidden)
                os.makedirs(prefix, 0o755, exist_ok=True)
                mount(f"/proc/self/fd/{fd}", prefix, None, bind | rec)
            finally:
                os.close(fd)
        for hidden in covered:
            mount(None, hidden, None, remount | rdonly | nosuid | nodev)

    step = "namespaces"
    try:
        with open(cfg["code"], "rb") as f:
            src = f.read()
        try:
            os.nice(cfg["nice"])
        except OSError:
            pass
        uid, gid = os.geteuid(), os.getegid()
        bits = {"userns": 0x10000000, "mountns": 0x00020000, "pidns": 0x20000000,
                "netns": 0x40000000 | 0x08000000 | 0x04000000}  # + IPC (SysV shm) and UTS
        flags = sum(bit for name, bit in bits.items() if name in layers)
        if flags:
            check(libc.unshare(ctypes.c_int(flags)), "unshare")
        if "userns" in layers:  # map only ourselves: allowed without privileges
            write("/proc/self/setgroups", "deny")
            write("/proc/self/uid_map", f"{uid} {uid} 1")
            write("/proc/self/gid_map", f"{gid} {gid} 1")
        if "mountns" in layers:
            mount(None, "/", None, rec | (1 << 18))  # MS_PRIVATE: nothing propagates out
        if "readonly" in layers:
            step = "readonly"
            remount_all_readonly()
        step = "dropuid" if "dropuid" in layers else "namespaces"
        if "dropuid" in layers:
            expose(cfg["prefixes"])
        if "mountns" in layers:
            step = "mountns"
            owner = f",uid={cfg['uid']},gid={cfg['uid']}" if "dropuid" in layers else ""
            mount("tmpfs", cfg["scratch"], "tmpfs", nosuid | nodev,
                  f"size={cfg['scratch_mb']}m,nr_inodes=16384,mode=0700{owner}")
        os.chdir(cfg["scratch"])  # into the tmpfs just mounted over it
        step = "rlimits"
        wanted = {resource.RLIMIT_CPU: cfg["cpu"], resource.RLIMIT_AS: cfg["as"],
                  resource.RLIMIT_FSIZE: cfg["fsize"], resource.RLIMIT_NOFILE: cfg["nofile"],
                  resource.RLIMIT_CORE: 0}
        if layers & {"userns", "dropuid"}:  # root is exempt; a shared uid would count others
            wanted[resource.RLIMIT_NPROC] = cfg["nproc"]  # (after unshare: per namespace)
        for res, value in wanted.items():
            hard = resource.getrlimit(res)[1]
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)
            resource.setrlimit(res, (value, value))  # soft == hard: the code cannot raise it
        step = "subreaper"
        if "subreaper" in layers:
            check(libc.prctl(ctypes.c_int(36), ctypes.c_ulong(1), ctypes.c_ulong(0),
                             ctypes.c_ulong(0), ctypes.c_ulong(0)), "PR_SET_CHILD_SUBREAPER")
        alive_r, alive_w = os.pipe()  # B's way to notice that A is gone
        setup_r, setup_w = os.pipe()  # B reports "ok" or the step that failed
        step = "fork"
        pid = os.fork()
    except OSError as e:
        report(setup_error=f"{step}: {e}", layer=step)
        sys.exit(1)
    if pid == 0:
        os.close(alive_w)
        os.close(setup_r)
        _c_child(cfg, src, alive_r, setup_w)  # never returns
    os.close(alive_r)
    os.close(setup_w)

    class WallTimeout(Exception):
        pass

    def on_alarm(signum: int, frame: Any) -> None:
        raise WallTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    t0 = time.monotonic()
    setup = b""
    wait = None
    timer_fired = False
    try:
        signal.setitimer(signal.ITIMER_REAL, cfg["wall"] + 1.0)  # + B's setup, usually ~ms
        try:
            setup = os.read(setup_r, 4096)
            if setup == b"ok":
                t0 = time.monotonic()
                signal.setitimer(signal.ITIMER_REAL, cfg["wall"])
                wait = os.wait4(pid, 0)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except WallTimeout:
        timer_fired = wait is None  # not when it fired just after wait4 returned
    if wait is None:
        os.kill(pid, signal.SIGKILL)  # pid 1 of the PID namespace: takes everything with it
        wait = os.wait4(pid, 0)
    _, wstatus, ru = wait
    if "pidns" not in layers:  # orphans were re-parented to us (subreaper): kill until none
        deadline = time.monotonic() + 2.0
        me = os.getpid()
        while time.monotonic() < deadline:
            try:
                with open(f"/proc/{me}/task/{me}/children") as f:
                    kids = [int(k) for k in f.read().split()]
            except OSError:
                kids = []
            for k in kids:
                try:
                    os.kill(k, signal.SIGKILL)
                except OSError:
                    pass
            try:
                while os.waitpid(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                break
            if not kids:
                time.sleep(0.005)
    if setup != b"ok":
        step, _, msg = setup.decode(errors="replace").partition("\t")
        report(setup_error=f"{step}: {msg or 'the sandboxed process died during setup'}",
               layer=step or "setup")
        sys.exit(1)
    report(wait_status=wstatus, cpu=ru.ru_utime + ru.ru_stime, wall=time.monotonic() - t0,
           timed_out=timer_fired)
    sys.exit(0)


def _c_child(cfg: dict[str, Any], src: bytes, alive_r: int, setup_w: int) -> None:
    """Process B (pid 1 of the PID namespace): /proc, uid, capabilities, Landlock; the code."""
    import ctypes
    import errno
    import os
    import resource
    import select
    import signal

    libc = ctypes.CDLL(None, use_errno=True)

    def prctl(option: int, arg: int = 0, ok_errnos: tuple[int, ...] = ()) -> None:
        r = libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0))
        if r != 0 and ctypes.get_errno() not in ok_errnos:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl({option}): {os.strerror(err)}")

    layers = set(cfg["layers"])
    step = "setup"
    try:
        if "procfs" in layers:
            step = "procfs"
            libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                   ctypes.c_ulong, ctypes.c_char_p]
            if libc.mount(b"proc", b"/proc", b"proc", 1 | 2 | 4 | 8, None) != 0:  # ro,nosuid..
                err = ctypes.get_errno()
                raise OSError(err, f"mount /proc: {os.strerror(err)}")
        if "nocaps" in layers:
            step = "nocaps"
            for cap in range(64):  # the bounding set, while we still hold CAP_SETPCAP
                try:
                    prctl(24, cap, ok_errnos=(errno.EINVAL,))  # PR_CAPBSET_DROP
                except PermissionError:
                    break  # no CAP_SETPCAP: no capabilities to lose; no_new_privs follows
        if "dropuid" in layers:
            step = "dropuid"
            os.setgroups([])
            os.setresgid(cfg["uid"], cfg["uid"], cfg["uid"])
            os.setresuid(cfg["uid"], cfg["uid"], cfg["uid"])  # clears every capability
        step = "setup"
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (after setresuid, which resets it)
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(1)  # A died before the death signal was armed
        prctl(38, 1)  # PR_SET_NO_NEW_PRIVS: no setuid binary can give anything back
        if "nocaps" in layers:
            step = "nocaps"
            _c_drop_caps(libc, prctl)
        if "landlock" in layers:
            step = "landlock"
            _c_landlock(libc, cfg)
    except OSError as e:
        os.write(setup_w, f"{step}\t{e}".encode())
        os._exit(1)
    os.write(setup_w, b"ok")
    os.close(setup_w)
    os.close(alive_r)
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    _c_run(cfg, src)


def _c_landlock(libc: Any, cfg: dict[str, Any]) -> None:
    """Landlock: writes only under scratch and /dev/null, reads only cfg['read_paths']; with
    newer ABIs no TCP and no signals/abstract sockets out of the sandbox."""
    import ctypes
    import os
    import stat

    class RulesetAttr(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64),
                    ("scoped", ctypes.c_uint64)]

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    libc.syscall.restype = ctypes.c_long

    def sc(*args: Any) -> int:
        r = libc.syscall(*args)
        if r < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return r

    long_ = ctypes.c_long
    abi = sc(long_(444), None, long_(0), long_(1))  # LANDLOCK_CREATE_RULESET_VERSION
    fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
    fs |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0) | (1 << 15 if abi >= 5 else 0)
    file_bits = 1 | 2 | 4 | 1 << 14 | 1 << 15  # execute, write, read, truncate, ioctl_dev
    read = 1 | 4 | 8  # execute, read_file, read_dir
    attr = RulesetAttr(fs, 0b11 if abi >= 4 else 0, 0b11 if abi >= 6 else 0)
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    rfd = sc(long_(444), ctypes.byref(attr), long_(size), long_(0))
    rules = [(p, read) for p in cfg["read_paths"]]
    rules += [(cfg["scratch"], fs), ("/dev/null", 2 | 4 | 1 << 14 | 1 << 15)]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue  # not on this system
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= file_bits
                rule = PathBeneath(access & fs, fd)
                sc(long_(445), long_(rfd), long_(1), ctypes.byref(rule), long_(0))
            finally:
                os.close(fd)
        sc(long_(446), long_(rfd), long_(0))
    finally:
        os.close(rfd)


def _c_drop_caps(libc: Any, prctl: Any) -> None:
    """Empty the ambient, effective, permitted and inheritable capability sets."""
    import ctypes
    import errno

    prctl(47, 4, ok_errnos=(errno.EINVAL,))  # PR_CAP_AMBIENT_CLEAR_ALL

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                    ("inheritable", ctypes.c_uint32)]

    data = (Data * 2)()
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, "capset failed")


def _c_audit(scratch: str) -> None:
    """The second layer, and clear messages: an audit hook that denies what the kernel layers
    also stop, raising PermissionError('[sandbox] ... is not allowed')."""
    import os
    import sys

    realpath, isabs, join, fsdecode = os.path.realpath, os.path.isabs, os.path.join, os.fsdecode
    getpid = os.getpid
    try:  # our pid as /proc names it (the host's, when /proc is not the PID namespace's own)
        own = {str(getpid()), os.readlink("/proc/self")}
    except OSError:
        own = {str(getpid())}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    processes = {"os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                 "subprocess.Popen", "pty.spawn", "os.startfile"}
    one_path = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
                "os.truncate", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                "shutil.rmtree"}
    with_dir_fd = {"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.utime",
                   "shutil.rmtree"}

    def deny(what: str) -> None:
        raise PermissionError(f"[sandbox] {what} is not allowed")

    def resolve(path: Any, dir_fd: Any = None) -> str | None:
        if path is None or isinstance(path, int):
            return None  # an open file descriptor: it was checked when it was opened
        p = fsdecode(path)
        if isinstance(dir_fd, int) and not isabs(p):
            p = join(os.readlink(f"/proc/self/fd/{dir_fd}"), p)
        return realpath(p)

    def check_write(path: Any, dir_fd: Any = None) -> None:
        p = resolve(path, dir_fd)
        if p is not None and not (p == scratch or p.startswith(scratch + "/")
                                  or p == "/dev/null"):
            deny("writing outside the scratch directory")

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if event == "open":
            path, mode, flags = args
            if (mode and any(c in mode for c in "wax+")) or (flags or 0) & write_flags:
                check_write(path)
            p = resolve(path)
            if p and p.startswith("/proc/"):
                pid = p.split("/")[2]
                if pid.isdigit() and pid not in own:
                    deny("reading another process's /proc entries")
        elif event.startswith("socket."):
            deny("network access")
        elif event in processes:
            deny("starting processes")
        elif event.startswith("ctypes."):
            deny("ctypes")
        elif event in one_path:
            check_write(args[0], args[-1] if event in with_dir_fd else None)
        elif event in ("os.rename", "os.link"):
            check_write(args[0], args[2])
            check_write(args[1], args[3])
        elif event == "os.symlink":
            check_write(args[1], args[2])
        elif event in ("shutil.copyfile", "shutil.copytree", "shutil.copymode",
                       "shutil.copystat", "shutil.move"):
            check_write(args[1])
        elif event == "sqlite3.connect" and args and fsdecode(args[0]) not in ("", ":memory:"):
            check_write(args[0])
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event != "signal.pthread_kill" and not (event == "os.kill"
                                                       and args[0] == getpid()):
                deny("sending signals to other processes")
        elif event in ("gc.get_objects", "gc.get_referrers"):
            deny("inspecting the interpreter's objects")

    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]
    sys.addaudithook(hook)


def _c_run(cfg: dict[str, Any], src: bytes) -> None:
    """Run the code as __main__; print its traceback without the launcher's frames; exit."""
    import builtins
    import linecache
    import sys
    import types

    if cfg["audit"]:
        _c_audit(cfg["scratch"])
    text = src.decode("utf-8", "replace")
    linecache.cache["<code>"] = (len(text), None, text.splitlines(True), "<code>")
    main = types.ModuleType("__main__")
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"] = main
    sys.argv = [""]
    try:
        exec(compile(src, "<code>", "exec", dont_inherit=True), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        import traceback

        te = traceback.TracebackException(type(e), e, e.__traceback__)
        for t in (te, te.__cause__, te.__context__):  # the launcher's frames, the hook's too
            if t is not None:
                t.stack = traceback.StackSummary.from_list(
                    [f for f in t.stack if f.filename != "<sandbox>"])
        sys.stderr.write("".join(te.format()))
        sys.exit(1)
    sys.exit(0)
