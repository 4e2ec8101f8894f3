"""Child processes of a benchmark run: start pinned, wait until ready, read their cost."""

from __future__ import annotations

import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
SERVER_CPU = 0
LOAD_CPU = 1


class BenchError(Exception):
    """A benchmark step could not run; the message says which and why."""


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def pinnable(cpu: int) -> int:
    """``cpu`` when this machine can dedicate it, else -1 (run unpinned)."""
    return cpu if cores() > 1 and cpu in os.sched_getaffinity(0) else -1


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "hostname_hash": format(abs(hash(platform.node())) % 10**8, "08d"),
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and whether bridge/ or mappings/ had uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "bridge", "mappings"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "uncommitted": None}
    return {"commit": commit or None, "uncommitted": [line[3:] for line in dirty]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CpuSample:
    at: float
    cpu_seconds: float  # utime + stime of every thread of the process
    rss_bytes: int
    hwm_bytes: int
    main_thread_cpu_seconds: float  # the event loop's thread alone (the rest: store writer etc.)


def sample(pid: int) -> CpuSample:
    """CPU time and memory of ``pid`` from /proc (user + system, all threads)."""
    cpu = _stat_cpu(Path(f"/proc/{pid}/stat"))
    try:
        main = _stat_cpu(Path(f"/proc/{pid}/task/{pid}/stat"))
    except OSError:
        main = cpu
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) * 1024
    return CpuSample(time.monotonic(), cpu, rss, hwm, main)


def _stat_cpu(path: Path) -> float:
    stat = path.read_text()
    # Field 2 (comm) may contain spaces: split after its closing parenthesis.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def core_busy() -> dict[int, tuple[float, float]]:
    """Per core: (busy, total) jiffies since boot, from /proc/stat."""
    out: dict[int, tuple[float, float]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            v = [float(x) for x in values[:8]]
            idle = v[3] + v[4]  # idle + iowait
            out[int(name[3:])] = (sum(v) - idle, sum(v))
    return out


def busy_between(before: dict[int, tuple[float, float]], after: dict[int, tuple[float, float]]) -> dict[str, float]:
    """Fraction of each core that was busy (anyone's work) between two ``core_busy`` reads."""
    result = {}
    for core, (busy, total) in after.items():
        b0, t0 = before.get(core, (0.0, 0.0))
        if total > t0:
            result[f"cpu{core}"] = round((busy - b0) / (total - t0), 3)
    return result


def quiet_disk(work: Path) -> None:
    """Delete the stores of servers that have stopped, then flush what the kernel still
    holds dirty, so one run's writeback does not land in the next run's fsyncs.

    Every ingest run writes hundreds of MB; the kernel writes them back over the next
    seconds, and a commit's fsync (ext4's journal) can wait behind that. Both servers get
    the same quiet start."""
    for pattern in ("*.db", "*.db-wal", "*.db-shm"):
        for path in work.glob(pattern):
            path.unlink(missing_ok=True)
    os.sync()


def load_average() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


class Child:
    """A child process pinned to one core, its output captured to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        cpu: int,
        env: dict[str, str] | None = None,
        *,
        announces: bool = True,
    ):
        """``announces``: the child prints ``READY ...`` on stdout (read by ``ready_line``);
        otherwise its stdout goes to the log file with stderr."""
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("ab")
        self._drainer: threading.Thread | None = None
        pin = pinnable(cpu)

        def preexec() -> None:
            if pin >= 0:
                os.sched_setaffinity(0, {pin})

        self.proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE if announces else self._log,
            stderr=self._log,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            preexec_fn=preexec,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def ready_line(self, timeout: float = 30.0) -> list[str]:
        """Wait for the child's ``READY ...`` stdout line and return its words."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            words = line.decode().split()
            if words and words[0] == "READY":
                # Keep draining: a child blocked on a full stdout pipe stops serving.
                self._drainer = threading.Thread(target=self._drain, name=f"{self.name}-stdout", daemon=True)
                self._drainer.start()
                return words[1:]
        raise BenchError(f"{self.name} did not become ready; see {self.log_path}: {self.tail()}")

    def _drain(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            return
        try:
            for line in stdout:
                self._log.write(line)
        except (OSError, ValueError):  # closed at stop
            pass

    def tail(self, chars: int = 600) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._drainer is not None:
            self._drainer.join(5)  # the child is gone: its stdout reaches EOF
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def wait_http(url: str, timeout: float = 30.0, child: Child | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.proc.poll() is not None:
            raise BenchError(f"{child.name} exited with {child.proc.returncode}: {child.tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise BenchError(f"{url} did not answer 200 within {timeout}s" + (f": {child.tail()}" if child else ""))


def http_json(url: str, method: str = "GET", token: str | None = None, timeout: float = 10.0) -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return orjson.loads(resp.read())


def run_loadgen(port: int, *args: str, timeout: float = 600.0) -> dict[str, Any]:
    """One load generator run (a separate process pinned to the load core); its tally."""
    argv = [PYTHON, "-m", "bench.loadgen", "--port", str(port), "--cpu", str(pinnable(LOAD_CPU)), *args]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise BenchError(f"load generator failed ({' '.join(args)}): {done.stderr.decode(errors='replace')[-800:]}")
    result: dict[str, Any] = orjson.loads(done.stdout.splitlines()[-1])
    return result
