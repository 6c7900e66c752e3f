"""Run untrusted generated Python (HumanEval programs) in a locked-down subprocess.

Layers, each covering what the others may miss:

* a fresh temporary working directory, a minimal environment, ``python -I``;
* no network: a new network namespace via ``unshare --net`` when the kernel lets
  us (probed once), and in any case an audit hook that refuses socket creation;
* an audit hook that refuses process creation (fork bombs, ``subprocess``),
  signals to other processes, ``ctypes`` library loading, destructive file
  operations and opening files for writing outside the working directory;
* resource limits: address space, CPU seconds, open files, file size, no core;
* a wall-clock timeout, after which the whole process group is SIGKILLed.

A program passes only if it runs to the end: the runner writes a per-run nonce after
the program returns, so ``sys.exit(0)`` / ``os._exit(0)`` midway count as failures.
Audit hooks are a guard against accidents in model-written code, not a security
boundary against code written to escape.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TIMEOUT_S = 3.0  # HF evaluate's code_eval default, used by the harness
DEFAULT_MEMORY_BYTES = 1 << 30
OUTPUT_TAIL_BYTES = 2000

_BLOCKED_EVENTS = (
    "os.system", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.exec",
    "subprocess.Popen", "os.kill", "os.killpg", "signal.pthread_kill",
    "socket.__new__", "socket.connect", "socket.bind", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "ctypes.dlopen",
    "os.remove", "os.rmdir", "os.rename", "shutil.rmtree", "os.chmod", "os.chown",
    "os.truncate", "os.link", "os.symlink",
)

# Runs in the child: set limits, install the audit hook, exec the program.
_RUNNER = r"""
import json, os, resource, sys

def _main():
    cfg = json.loads(sys.stdin.readline())
    for name, value in cfg["limits"].items():
        try:
            resource.setrlimit(getattr(resource, name), (value, value))
        except (ValueError, OSError):
            pass
    workdir = os.path.realpath(cfg["workdir"]) + os.sep
    blocked = frozenset(cfg["blocked"])
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def audit(event, args):
        if event in blocked:
            raise PermissionError("sandbox: %s is not allowed" % event)
        if event == "open":
            path, mode, flags = args
            if isinstance(path, int):
                return
            writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writes and not os.path.realpath(os.fsdecode(path)).startswith(workdir):
                raise PermissionError("sandbox: writing outside the work dir")

    sys.addaudithook(audit)
    sys.stdin.close()
    with open("program.py", encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    with open(".done", "w") as f:
        f.write(cfg["nonce"])

_main()
"""


@dataclass(frozen=True)
class SandboxResult:
    passed: bool
    status: str  # "passed", "failed" or "timeout"
    returncode: int | None
    output: str  # tail of the program's stdout+stderr, for debugging


@functools.lru_cache(maxsize=1)
def _net_isolation_prefix() -> tuple[str, ...]:
    """The unshare invocation that works here (root or user namespaces), or ()."""
    for prefix in (("unshare", "--net", "--"), ("unshare", "--user", "--map-root-user", "--net", "--")):
        try:
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0:
            return prefix
    return ()


def run_program(
    source: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
) -> SandboxResult:
    """Execute ``source`` as ``__main__`` in the sandbox; pass means it ran to the end."""
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="kvlab-sandbox-", ignore_cleanup_errors=True) as tmp:
        workdir = Path(tmp)
        (workdir / "program.py").write_text(source, encoding="utf-8")
        config = {
            "nonce": nonce,
            "workdir": str(workdir),
            "blocked": list(_BLOCKED_EVENTS),
            "limits": {
                "RLIMIT_AS": memory_bytes,
                "RLIMIT_CPU": int(timeout_s) + 1,
                "RLIMIT_NOFILE": 64,
                "RLIMIT_FSIZE": 16 << 20,
                "RLIMIT_CORE": 0,
            },
        }
        env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "TMPDIR": str(workdir),
               "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0"}
        command = [*_net_isolation_prefix(), sys.executable, "-I", "-B", "-c", _RUNNER]
        with open(workdir / ".output", "wb") as out:
            proc = subprocess.Popen(
                command, cwd=workdir, env=env, stdin=subprocess.PIPE, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
            try:
                proc.stdin.write((json.dumps(config) + "\n").encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            try:
                returncode: int | None = proc.wait(timeout=timeout_s)
                timed_out = False
            except subprocess.TimeoutExpired:
                returncode, timed_out = None, True
            finally:
                _kill_group(proc)
        output = _tail(workdir / ".output")
        done = workdir / ".done"
        finished = done.is_file() and done.read_text(errors="replace") == nonce
    if timed_out:
        return SandboxResult(False, "timeout", None, output)
    passed = returncode == 0 and finished
    return SandboxResult(passed, "passed" if passed else "failed", returncode, output)


def _kill_group(proc: subprocess.Popen) -> None:
    # Also reaps anything the program left behind in its session.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _tail(path: Path) -> str:
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - OUTPUT_TAIL_BYTES))
        return f.read().decode("utf-8", errors="replace")
