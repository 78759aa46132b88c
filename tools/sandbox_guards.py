"""The sandbox's in-child guards, shipped as source with the launcher (see
`mmopd.tools.sandbox_launcher`): Landlock (filesystem writes and reads), dropping every
capability, and the audit hook that denies what the kernel layers also stop, with clear messages.
Like the launcher's, these functions run only inside the sandbox's interpreter: they use the
standard library only and import what they need themselves."""

from __future__ import annotations

from typing import Any


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
