"""The sandbox's launcher: the code that runs inside the sandboxed interpreter, shipped as text.

`mmopd.tools.sandbox` spawns ``python -I -S ... -c BOOTSTRAP <launcher_source()> <config>``. The
``_c_*`` functions below are never called in the parent: `launcher_source` sends their source
(``inspect.getsource``) to that interpreter, where ``_c_main`` is process A (namespaces, mounts,
rlimits, the wall clock) and ``_c_child`` is process B (/proc, uid, capabilities, Landlock, the
audit hook, then the code). A helper they need must be a ``_c_*`` function added to
`launcher_source`'s list; module-level names here do not exist in the child.
"""

from __future__ import annotations

import functools
from typing import Any

# In the child these are defined beside the launcher's own functions (launcher_source sends both)
from .sandbox_guards import _c_audit, _c_drop_caps, _c_landlock

LAUNCHER_NAME = "<sandbox>"  # the launcher's file name in tracebacks (_c_run drops it)


@functools.lru_cache(maxsize=1)
def launcher_source() -> str:
    import inspect

    # The child-side functions (here and in sandbox_guards), sent as source to `python -I -S -c`.
    funcs = (_c_main, _c_child, _c_landlock, _c_drop_caps, _c_audit, _c_run)
    body = "\n\n".join(inspect.getsource(f) for f in funcs)
    return ("from __future__ import annotations\nimport json, sys\n\n" + body
            + "\n\n_c_main(json.loads(sys.argv[2]))\n")


# Compiled under its own file name so that tracebacks can leave the launcher's frames out.
BOOTSTRAP = f"import sys; exec(compile(sys.argv[1], {LAUNCHER_NAME!r}, 'exec'))"


# ----------------------------------------------------------------------------- child side
# Everything below runs inside the sandbox's interpreter, not in this process: launcher_source
# sends these functions' source to `python -I -S -c`. They use the standard library only, import
# what they need themselves, and refer to nothing else in this module but each other.


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
