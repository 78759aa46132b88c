"""The python tool's sandbox against real attacks: each test runs hostile code and checks, from
outside, that the attack failed (no connection arrived, no file appeared, no secret leaked, no
process survived) and that the model is told with an error result. "Kernel" variants switch the
audit hook off (`disable=("audit",)`) to check that the OS layers alone contain the attack; they
are skipped, with the reason, where this machine lacks the layer."""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mmopd.tools import ToolResult, call_tool, make_tool
from mmopd.tools.python import PythonTool, SandboxLimits, available_layers, run_python

if not sys.platform.startswith("linux"):
    pytest.skip("the sandbox is Linux-only", allow_module_level=True)

LAYERS = available_layers()
FAST = SandboxLimits(cpu_seconds=1, wall_seconds=2, memory_mb=256)
NO_HOOK = SandboxLimits(cpu_seconds=1, wall_seconds=2, memory_mb=256, disable=("audit",))


def needs(*layers: str):
    missing = [x for x in layers if x not in LAYERS]
    return pytest.mark.skipif(bool(missing), reason=f"sandbox layer(s) {missing} unavailable here")


def _procs_named(comm: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if Path(f"/proc/{d}/comm").read_text().strip() == comm:
                    out.append(int(d))
            except OSError:
                pass
    return out


# ----------------------------------------------------------------------------- ordinary code


def test_ordinary_code_works():
    res = run_python("import math\nprint(2**100)\nprint(math.factorial(20), math.pi)", FAST)
    assert res.ok, res
    assert res.stdout.split("\n")[:2] == [str(2**100), f"{math.factorial(20)} {math.pi}"]
    assert res.exit_code == 0 and not res.timed_out and res.message == ""


def test_stdin_and_scratch_files():
    code = ("import os, sys\ndata = sys.stdin.read()\nopen('a.txt', 'w').write(data.upper())\n"
            "print(open('a.txt').read(), os.getcwd())")
    res = run_python(code, FAST, stdin="hello\n")
    assert res.ok, res
    text, cwd = res.stdout.rsplit(" ", 1)
    assert text == "HELLO\n"
    assert not os.path.exists(cwd.strip()), "the scratch directory outlived the call"


def test_exception_is_an_error_with_a_clean_traceback():
    res = run_python("def f():\n    return 1 / 0\nf()", FAST)
    assert res.error == "exception" and res.exit_code == 1
    assert 'File "<code>", line 2, in f' in res.stderr and "ZeroDivisionError" in res.stderr
    assert "<sandbox>" not in res.stderr


def test_sys_exit_status():
    res = run_python("import sys; print('bye'); sys.exit(3)", FAST)
    assert (res.error, res.exit_code, res.stdout) == ("exit", 3, "bye\n")
    assert run_python("raise SystemExit(0)", FAST).ok


def test_unicode_garbage():
    res = run_python("print('h\\u00e9llo \\u2603 \\U0001F600 \\u202e\\u0000x')", FAST)
    assert res.ok and res.stdout == "h\u00e9llo \u2603 \U0001F600 \u202e\u0000x\n"
    res = run_python("import sys; sys.stdout.buffer.write(b'\\xff\\xfe\\x80ok')", FAST)
    assert res.ok and res.stdout.endswith("ok") and "\ufffd" in res.stdout
    for code in ["print('\ud800')",  # a lone surrogate in the source itself
                 "print('\\ud800')",  # ... printed at run time
                 "x = 1\x00",  # NUL byte
                 bytes(range(256)).decode("latin-1"),
                 "\ufeff\u200b = 3"]:
        res = run_python(code, FAST)
        assert res.error == "exception", (code, res)
        assert res.stderr  # the model sees why


# ----------------------------------------------------------------------------- network


def _listener() -> socket.socket:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.3)
    return srv


def _assert_no_connection(srv: socket.socket) -> None:
    with pytest.raises(TimeoutError):
        conn, _ = srv.accept()
        conn.close()


def test_socket_is_denied_and_no_connection_arrives():
    with _listener() as srv:
        port = srv.getsockname()[1]
        res = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}))\n"
                         "s.sendall(b'leak')", FAST)
        assert res.error == "denied" and res.message == "Error: network access is not allowed"
        _assert_no_connection(srv)
    res = call_tool(PythonTool(FAST), {"code": "import urllib.request\n"
                                       "urllib.request.urlopen('http://example.com')"})
    assert res.error and res.text.startswith("Error: network access is not allowed")


@pytest.mark.skipif(not ({"netns", "landlock-net"} & LAYERS), reason="no netns, no Landlock net")
def test_kernel_blocks_tcp_without_the_hook():
    with _listener() as srv:
        port = srv.getsockname()[1]
        res = run_python(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), "
                         "timeout=1)\ns.sendall(b'leak')\nprint('CONNECTED')", NO_HOOK)
        assert not res.ok and "CONNECTED" not in res.stdout
        assert "OSError" in res.stderr or "Error" in res.stderr
        _assert_no_connection(srv)


@needs("netns")
def test_kernel_blocks_udp_without_the_hook():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as rx:
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(0.3)
        port = rx.getsockname()[1]
        code = (f"import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                f"for _ in range(5):\n    s.sendto(b'leak', ('127.0.0.1', {port}))\n")
        res = run_python(code, NO_HOOK)
        assert not res.ok  # the namespace's loopback is down: "Network is unreachable"
        with pytest.raises(TimeoutError):
            rx.recv(16)


# ----------------------------------------------------------------------------- filesystem

_WRITE_ATTACKS = """
import os, shutil
victim, new = {victim!r}, {new!r}
attacks = {{
    "open_w": lambda: open(victim, "w").write("pwned"),
    "open_a": lambda: open(victim, "a").write("pwned"),
    "os_open": lambda: os.write(os.open(new, os.O_WRONLY | os.O_CREAT), b"pwned"),
    "create": lambda: open(new, "x").write("pwned"),
    "remove": lambda: os.remove(victim),
    "rename": lambda: os.rename(victim, "stolen"),
    "truncate": lambda: os.truncate(victim, 0),
    "chmod": lambda: os.chmod(victim, 0o777),
    "mkdir": lambda: os.mkdir(new + ".d"),
    "copy": lambda: shutil.copy("/etc/hostname" if os.path.exists("/etc/hostname") else
                                "/dev/null", new),
    "symlink": lambda: (os.symlink(new, "link"), open("link", "w").write("pwned")),
    "hardlink": lambda: (os.link(victim, "hard"), open("hard", "w").write("pwned")),
    "relative": lambda: open(os.path.relpath(new), "w").write("pwned"),
}}
for name, attack in attacks.items():
    try:
        attack()
        print("ESCAPED", name)
    except OSError as e:
        print("blocked", name, type(e).__name__)
"""


def _check_write_attacks(tmp_path: Path, limits: SandboxLimits) -> None:
    victim, new = tmp_path / "victim.txt", tmp_path / "new.txt"
    victim.write_text("original")
    victim.chmod(0o600)
    res = run_python(_WRITE_ATTACKS.format(victim=str(victim), new=str(new)), limits)
    assert res.ok, res
    assert "ESCAPED" not in res.stdout, res.stdout
    assert res.stdout.count("blocked") == 13
    assert victim.read_text() == "original" and victim.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_writing_outside_scratch_is_denied(tmp_path):
    target = tmp_path / "pwned.txt"
    res = run_python(f"open({str(target)!r}, 'w').write('pwned')", FAST)
    assert res.error == "denied"
    assert res.message == "Error: writing outside the scratch directory is not allowed"
    assert not target.exists()
    _check_write_attacks(tmp_path, FAST)


@needs("landlock")
def test_kernel_blocks_writes_without_the_hook(tmp_path):
    _check_write_attacks(tmp_path, NO_HOOK)


@needs("landlock")
def test_kernel_blocks_reading_private_files(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cr3t-file-content")
    for limits in (FAST, NO_HOOK):
        res = run_python(f"print(open({str(secret)!r}).read())", limits)
        assert res.error == "exception" and "PermissionError" in res.stderr
        assert "s3cr3t" not in res.stdout + res.stderr


@needs("mountns")
def test_scratch_is_a_bounded_tmpfs():
    code = ("n = 0\ntry:\n    while True:\n        open(f'f{n}', 'wb').write(b'x' * 2**20)\n"
            "        n += 1\nexcept OSError as e:\n    print(n, e.strerror)")
    res = run_python(code, SandboxLimits(cpu_seconds=2, wall_seconds=4, scratch_mb=4))
    assert res.ok and res.stdout.split(" ", 1)[1].strip() == "No space left on device"
    assert int(res.stdout.split()[0]) <= 4


# ----------------------------------------------------------------------------- secrets


@pytest.fixture
def secret_holder(monkeypatch):
    """A process with a secret in its initial environment (what /proc/<pid>/environ shows),
    and the same secret in this process's os.environ."""
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    monkeypatch.setenv("MMOPD_TEST_SECRET", secret)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              env={"MMOPD_TEST_SECRET": secret})
    try:
        # the attack would work without the sandbox (once the child has exec'd: before that
        # its environ reads empty)
        deadline = time.monotonic() + 10
        while (secret not in Path(f"/proc/{holder.pid}/environ").read_text()
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert secret in Path(f"/proc/{holder.pid}/environ").read_text()
        yield secret, holder.pid
    finally:
        holder.kill()
        holder.wait()


_ENV_ATTACK = """
import os, glob
print(dict(os.environ))
for path in [f"/proc/{pid}/environ" for pid in (os.getppid(), {pid}, {me})] + \\
        glob.glob("/proc/*/environ"):
    try:
        print(path, open(path, "rb").read())
    except OSError as e:
        print(path, "blocked", type(e).__name__)
for path in ["/proc/{pid}/cmdline", "/proc/{me}/cmdline"]:
    try:
        print(path, open(path, "rb").read())
    except OSError as e:
        print(path, "blocked", type(e).__name__)
"""


@pytest.mark.parametrize("limits", [FAST, NO_HOOK], ids=["hook", "kernel"])
def test_parent_env_secrets_do_not_leak(secret_holder, limits):
    secret, pid = secret_holder
    if limits is NO_HOOK and not ({"procfs", "landlock"} & LAYERS):
        pytest.skip("neither a private /proc nor Landlock's ptrace rule is available")
    res = run_python(_ENV_ATTACK.format(pid=pid, me=os.getpid()), limits)
    assert secret not in res.stdout + res.stderr
    assert "MMOPD_TEST_SECRET" not in res.stdout + res.stderr
    res = run_python(f"print(open('/proc/{pid}/environ').read())", limits)
    assert not res.ok and secret not in res.stdout + res.stderr


# ----------------------------------------------------------------------------- processes


def test_fork_bomb_is_denied():
    t0 = time.monotonic()
    res = run_python("import os\nwhile True:\n    os.fork()", FAST)
    assert res.error == "denied" and res.message == "Error: starting processes is not allowed"
    res = run_python("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])", FAST)
    assert res.error == "denied"
    assert time.monotonic() - t0 < 5


@pytest.mark.skipif(not ({"userns", "dropuid"} & LAYERS),  # never run a real bomb without it
                    reason="RLIMIT_NPROC is not enforced here (root without a fresh uid)")
def test_kernel_contains_a_fork_bomb_without_the_hook():
    t0 = time.monotonic()
    res = run_python("import os\nwhile True:\n    os.fork()", NO_HOOK)
    assert not res.ok and "BlockingIOError" in res.stderr  # fork: Resource temporarily unavail.
    assert time.monotonic() - t0 < 5
    assert run_python("print('still fine')", FAST).stdout == "still fine\n"


def test_background_processes_are_denied():
    for code in ["import subprocess; subprocess.Popen(['sleep', '100'])",
                 "import os; os.system('sleep 100 &')",
                 "import os\nif os.fork() == 0:\n    os.setsid()\n    import time; time.sleep(100)",
                 "import multiprocessing as m, time\nm.Process(target=time.sleep, args=(99,))"
                 ".start()",
                 "import os; os.posix_spawn('/bin/sleep', ['sleep', '100'], {})",
                 "import os; os.execv('/bin/sh', ['sh'])",
                 "import ctypes; ctypes.CDLL(None).fork()"]:
        res = run_python(code, FAST)
        assert res.error == "denied", (code, res)
        assert res.message.startswith("Error: ") and res.message.endswith("is not allowed")


_BACKGROUND = """
import ctypes, os, time
def hide():  # a name we can look for from outside
    ctypes.CDLL(None).prctl(15, {marker!r}.encode(), 0, 0, 0)
pid = os.fork()
if pid == 0:
    os.setsid()
    if os.fork() == 0:
        hide()
        time.sleep(60)
    os._exit(0)
os.waitpid(pid, 0)
if os.fork() == 0:
    hide()
    time.sleep(60)
time.sleep(0.5)
print("parent done")
"""


def _check_background(limits: SandboxLimits) -> None:
    marker = f"bg{uuid.uuid4().hex[:10]}"
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # prove the background processes existed while the call ran
        while not done.is_set() and not seen:
            seen.extend(_procs_named(marker))
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = run_python(_BACKGROUND.format(marker=marker), limits)
    finally:
        done.set()
        watcher.join()
    assert res.ok and res.stdout == "parent done\n", res
    assert seen, "the background processes never started"
    time.sleep(0.1)
    assert _procs_named(marker) == [], "a background process outlived the call"


@needs("pidns")
def test_kernel_kills_background_processes_with_pid_namespace():
    _check_background(NO_HOOK)


def test_subreaper_kills_background_processes_without_pid_namespace():
    _check_background(SandboxLimits(cpu_seconds=1, wall_seconds=2,
                                    disable=("audit", "pidns", "procfs")))


def test_signals_to_the_parent_are_denied():
    got: list[int] = []
    old = signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
    try:
        me = os.getpid()
        res = run_python(f"import os, signal\nos.kill({me}, signal.SIGUSR1)", FAST)
        assert res.error == "denied"
        assert res.message == "Error: sending signals to other processes is not allowed"
        if {"pidns", "landlock-scope"} & LAYERS:
            res = run_python(f"import os, signal\nos.kill({me}, signal.SIGUSR1)", NO_HOOK)
            assert not res.ok  # ESRCH in the PID namespace, EPERM from Landlock
        time.sleep(0.2)
        assert got == []
    finally:
        signal.signal(signal.SIGUSR1, old)


# ----------------------------------------------------------------------------- limits


@pytest.mark.parametrize("code", ["x = bytearray(10**10)",
                                  "a = []\nwhile True:\n    a.append(bytearray(10**7))"])
def test_memory_limit(code):
    res = run_python(code, FAST)
    assert res.error == "memory" and res.message == "Error: memory limit of 256 MB exceeded"
    assert res.duration < 5


def test_cpu_time_limit():
    t0 = time.monotonic()
    res = run_python("while True:\n    pass", FAST)
    assert res.error == "timeout" and res.timed_out
    assert res.message in ("Error: CPU time limit of 1 s exceeded",
                           "Error: time limit of 2 s exceeded")  # wall first on a loaded box
    assert time.monotonic() - t0 < 4


def test_wall_time_limit():
    t0 = time.monotonic()
    res = run_python("import time\nprint('started', flush=True)\ntime.sleep(100)",
                     SandboxLimits(cpu_seconds=1, wall_seconds=1))
    assert res.error == "timeout" and res.message == "Error: time limit of 1 s exceeded"
    assert res.stdout == "started\n"  # what it printed before is kept
    assert time.monotonic() - t0 < 3


def test_huge_output_is_cut():
    import tracemalloc

    limits = SandboxLimits(cpu_seconds=2, wall_seconds=3, max_output_chars=1000)
    tracemalloc.start()
    try:
        res = run_python("print('a' * 10**7)\nprint('THE END')", limits)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"the parent held {peak} bytes for 10 MB of output"
    assert res.ok and res.truncated
    assert len(res.stdout) < 1100 and res.stdout.startswith("a") and "THE END" in res.stdout
    res = run_python("while True:\n    print('y' * 10000)",
                     SandboxLimits(cpu_seconds=2, wall_seconds=3, max_file_mb=2,
                                   max_output_chars=1000))
    assert res.error == "output" and res.message == "Error: output limit of 2 MB exceeded " \
                                                    "(output cut)"
    assert len(res.stdout) < 1100 and len(res.stderr) < 1100


def test_concurrent_calls_from_threads():
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: run_python(f"print({i} * {i})", FAST), range(8)))
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(8)]


def test_limits_are_validated():
    with pytest.raises(ValueError, match="cpu_seconds"):
        SandboxLimits(cpu_seconds=0)
    with pytest.raises(ValueError, match="unknown layer"):
        SandboxLimits(disable=("seccomp",))


def test_layers_are_known_and_reported():
    assert {"audit", "subreaper"} <= LAYERS
    res = run_python("pass", FAST)
    assert set(res.layers) <= LAYERS and "audit" in res.layers
    assert "audit" not in run_python("pass", NO_HOOK).layers


def test_no_network_namespace_fails_closed(monkeypatch, tiny_overrides):
    """A machine where no network namespace can be made (Docker and Kubernetes deny user
    namespaces): the python tool refuses to be made, and a run whose env offers it stops before
    any model loads; the weaker mode runs only when asked for, by name."""
    import mmopd.rollout.agent_loop as agent_loop
    import mmopd.tools.sandbox as sandbox
    import mmopd.training.assemble as assemble
    from mmopd.config import TrainConfig, load_config
    from mmopd.tools import ToolSetupError
    from mmopd.tools.python import SandboxUnavailable
    from mmopd.training.loop import train

    weak = frozenset({"landlock", "landlock-net", "nocaps", "subreaper", "audit"} & LAYERS)
    monkeypatch.setattr(sandbox, "available_layers", lambda: weak)
    monkeypatch.delenv("MMOPD_SANDBOX_ALLOW_WEAK", raising=False)
    with pytest.raises(SandboxUnavailable, match="MMOPD_SANDBOX_ALLOW_WEAK=1"):
        PythonTool()
    assert isinstance(SandboxUnavailable("x"), ToolSetupError)
    assert run_python("print(1)", FAST).error == "setup"  # a direct call fails closed too
    loaded = []
    monkeypatch.setattr(assemble, "load_model", lambda *a, **k: loaded.append(1))
    # tools are built once per process: one this worker built earlier must not stand in
    monkeypatch.setattr(agent_loop, "_TOOL_CACHE", {})
    with pytest.raises(SandboxUnavailable, match="netns"):
        train(load_config(TrainConfig, None, [
            *tiny_overrides, "env.id=mmopd/ToolMath-v0",
            "env.kwargs={level: 1, tools: [python]}"]))
    assert not loaded
    res = call_tool(PythonTool(require=(), cpu_seconds=1, wall_seconds=2), {"code": "print(7)"})
    assert res == ToolResult("7\n")
    monkeypatch.setenv("MMOPD_SANDBOX_ALLOW_WEAK", "1")
    assert call_tool(PythonTool(cpu_seconds=1, wall_seconds=2),
                     {"code": "print(8)"}) == ToolResult("8\n")
    assert "netns" not in run_python("pass", FAST).layers


# ----------------------------------------------------------------------------- the tool


def test_tool_through_call_tool():
    t = make_tool("python", cpu_seconds=1, wall_seconds=2)
    assert isinstance(t, PythonTool) and t.name == "python"
    assert t.parameters["required"] == ["code"]
    ok = call_tool(t, {"code": "print(6 * 7)"})
    assert ok == ToolResult("42\n")
    res = call_tool(t, {"code": "while True: pass"})
    assert isinstance(res, ToolResult) and res.error
    assert res.text.startswith("Error: ") and "time limit" in res.text
    res = call_tool(t, {"code": "import os; os.fork()"})
    assert res.error and res.text.startswith("Error: starting processes is not allowed")
    res = call_tool(t, {"code": "1/0"})
    assert res.error and "ZeroDivisionError" in res.text
    assert call_tool(t, {"code": ""}).text == "(no output)"
    assert call_tool(t, {}).error  # schema validation, not an exception
    long = call_tool(t, {"code": "print('x' * 100000)\n1/0"})
    assert long.error and "ZeroDivisionError" in long.text  # the traceback survives the cut



# ----------------------------------------------------------------------------- as non-root

_HARNESS = """
import importlib.util, json, sys, types
root, programs = sys.argv[1], json.loads(sys.argv[2])
sys.modules["mmopd"] = pkg = types.ModuleType("mmopd")
pkg.__path__ = []
spec = importlib.util.spec_from_file_location(
    "mmopd.tools", f"{root}/tools/__init__.py", submodule_search_locations=[f"{root}/tools"])
sys.modules["mmopd.tools"] = mod = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mod)
from mmopd.tools.python import SandboxLimits, available_layers, run_python
layers = available_layers()
out = {"layers": sorted(layers)}
lim = SandboxLimits(cpu_seconds=1, wall_seconds=2, memory_mb=256, disable=("audit",))
for name, code in programs.items():
    if name == "bomb" and "userns" not in layers:
        continue  # without a user namespace RLIMIT_NPROC would count all of nobody's tasks
    r = run_python(code, lim)
    out[name] = [r.error, r.stdout, r.stderr]
print(json.dumps(out))
"""
NOBODY = 65534
SYSTEM_PYTHON = Path("/usr/bin/python3")
REPO = Path(__file__).resolve().parents[1]


def _reachable_by_others(path: Path) -> bool:
    parts = [path, *path.parents]
    return all(p.stat().st_mode & 0o001 for p in parts if p.is_dir()) and \
        all(p.stat().st_mode & 0o004 for p in (REPO / "tools").glob("*.py"))


def _system_python_ok() -> bool:
    try:
        out = subprocess.run([str(SYSTEM_PYTHON), "-c", "import sys; print(sys.version_info >= "
                              "(3, 10))"], capture_output=True, text=True, timeout=10).stdout
    except OSError:
        return False
    return out.strip() == "True"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch to an unprivileged user")
def test_unprivileged_user_is_contained_by_the_kernel(tmp_path):
    """The whole non-root path (user namespace, no fresh uid) as `nobody`, with the system
    Python, the audit hook off: the attack targets are nobody's own files and processes, so Unix
    permissions do not help and only the sandbox's layers stand in the way."""
    if not (_system_python_ok() and _reachable_by_others(REPO / "tools")):
        pytest.skip(f"{SYSTEM_PYTHON} (>= 3.10) or {REPO}/tools is not usable by nobody")
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="mmopd-nobody-"))
    holder = None
    try:
        os.chown(home, NOBODY, NOBODY)
        victim, new = home / "victim.txt", home / "new.txt"
        victim.write_text("original")
        os.chown(victim, NOBODY, NOBODY)
        victim.chmod(0o600)
        secret = f"s3cr3t-{uuid.uuid4().hex}"
        holder = subprocess.Popen([str(SYSTEM_PYTHON), "-c", "import time; time.sleep(60)"],
                                  env={"MMOPD_TEST_SECRET": secret}, user=NOBODY, group=NOBODY,
                                  extra_groups=[], cwd="/")
        marker = f"bg{uuid.uuid4().hex[:10]}"
        srv = _listener()
        port = srv.getsockname()[1]
        programs = {
            "bomb": "import os\nwhile True:\n    os.fork()",
            "write": _WRITE_ATTACKS.format(victim=str(victim), new=str(new)),
            "net": f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            "environ": f"print(open('/proc/{holder.pid}/environ').read())",
            "kill": f"import os, signal\nos.kill({holder.pid}, signal.SIGKILL)\nprint('sent')",
            "background": _BACKGROUND.format(marker=marker),
        }
        import json

        proc = subprocess.run([str(SYSTEM_PYTHON), "-I", "-c", _HARNESS, str(REPO),
                               json.dumps(programs)], capture_output=True, text=True, timeout=60,
                              user=NOBODY, group=NOBODY, extra_groups=[], cwd="/", env={})
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        layers = set(out["layers"])
        assert "dropuid" not in layers  # only root can switch to a fresh uid
        if "userns" in layers:
            assert out["bomb"][0] == "exception" and "BlockingIOError" in out["bomb"][2]
        if layers & {"landlock", "readonly"}:
            assert "ESCAPED" not in out["write"][1] and out["write"][1].count("blocked") == 13
            assert victim.read_text() == "original" and victim.stat().st_mode & 0o777 == 0o600
            assert sorted(p.name for p in home.iterdir()) == ["victim.txt"]
        if layers & {"netns", "landlock-net"}:
            assert out["net"][0] == "exception"
            _assert_no_connection(srv)
        if layers & {"procfs", "landlock"}:
            assert out["environ"][0] == "exception" and secret not in json.dumps(out)
        if layers & {"pidns", "landlock-scope"}:
            assert out["kill"][0] == "exception" and holder.poll() is None
        assert out["background"][1] == "parent done\n" and _procs_named(marker) == []
        srv.close()
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
        shutil.rmtree(home, ignore_errors=True)
