"""Start, watch and stop the pilot's processes (SuperLink, SuperNodes, `flwr` commands): reused by tests and benchmarks.

Every process is started in its own session (a Ctrl-C in the terminal reaches
the ``fedcl`` command only, which then stops its processes in order) with its
output read by a thread: each line is kept in memory with the time it arrived,
written to a log file with that time in front, and optionally echoed.
:class:`ProcessGroup` stops everything it started when its ``with`` block
ends, however it ends.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from types import FrameType, TracebackType
from typing import TextIO

import psutil

from fedcl.pilot.errors import PilotError

STOP_TIMEOUT = 15.0  # seconds a process gets to stop after SIGTERM before SIGKILL (Flower stops in 1-3 s)


class ProcessFailed(RuntimeError):
    """A watched process exited, printed a failure line, or did not print what was awaited in time."""


class ManagedProcess:
    """A started process whose output lines are recorded (with arrival times) and can be awaited."""

    def __init__(
        self,
        name: str,
        popen: subprocess.Popen[str],
        log_path: Path | None,
        echo: TextIO | None,
    ) -> None:
        self.name = name
        self.popen = popen
        self.log_path = log_path
        self.echo = echo
        self.started_at = time.time()
        self.records: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._pump, name=f"output of {name}", daemon=True)
        self.reader.start()

    def _pump(self) -> None:
        log = self.log_path.open("a", encoding="utf-8") if self.log_path else None
        try:
            for raw in self.popen.stdout or []:
                line = raw.rstrip("\n")
                now = time.time()
                if log:
                    log.write(f"{datetime.fromtimestamp(now).isoformat(timespec='milliseconds')} {line}\n")
                    log.flush()
                if self.echo:
                    self.echo.write(f"[{self.name}] {line}\n")
                    self.echo.flush()
                with self.changed:  # recorded last: whoever waits for this line finds it logged and echoed
                    self.records.append((now, line))
                    self.changed.notify_all()
        finally:
            if log:
                log.close()
            with self.changed:
                self.changed.notify_all()

    @property
    def pid(self) -> int:
        """The process id."""
        return self.popen.pid

    def running(self) -> bool:
        """Whether the process has not exited yet."""
        return self.popen.poll() is None

    def lines(self) -> list[str]:
        """Every output line so far."""
        with self.changed:
            return [line for _, line in self.records]

    def timed_lines(self) -> list[tuple[float, str]]:
        """Every output line so far with the wall-clock time (``time.time()``) it was read."""
        with self.changed:
            return list(self.records)

    def tail(self, count: int = 20) -> str:
        """The last ``count`` output lines, for an error message that explains itself."""
        return "\n".join(self.lines()[-count:])

    def wait_for(
        self,
        pattern: str,
        timeout: float,
        fail_patterns: Sequence[str] = (),
        start: int = 0,
    ) -> str:
        """Wait until an output line (from line ``start`` on) matches ``pattern``; return that line.

        Raises :class:`ProcessFailed` (with the output's tail) if a line
        matching one of ``fail_patterns`` comes first, the process exits
        first, or ``timeout`` seconds pass.
        """
        wanted = re.compile(pattern)
        failures = [re.compile(text) for text in fail_patterns]
        deadline = time.monotonic() + timeout
        seen = start
        with self.changed:
            while True:
                for _, line in self.records[seen:]:
                    if wanted.search(line):
                        return line
                    if any(failure.search(line) for failure in failures):
                        raise ProcessFailed(f"{self.name} reported: {line.strip()}\n{self.tail()}")
                seen = len(self.records)
                exited = self.popen.poll() is not None and not self.reader.is_alive()
                if exited:
                    raise ProcessFailed(
                        f"{self.name} exited (code {self.popen.returncode}) before printing {pattern!r}:\n{self.tail()}"
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise ProcessFailed(f"{self.name}: no {pattern!r} within {timeout:.0f} s:\n{self.tail()}")
                self.changed.wait(min(remaining, 0.5))

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the process to exit (``subprocess.TimeoutExpired`` after ``timeout``); return its exit code."""
        code = self.popen.wait(timeout)
        self.reader.join(timeout=5)
        return code

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Stop the process and every process it started (see :func:`stop_tree`); return its exit code."""
        stop_tree(self.popen, timeout)
        self.reader.join(timeout=5)
        return self.popen.returncode


def stop_tree(popen: subprocess.Popen[str], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the process, wait up to ``timeout`` s, then SIGKILL; the same for every descendant still alive.

    Descendants are listed before the first signal: Flower starts its
    SuperExec in a session of its own, and an app process may outlive its
    parent, so they are found by ancestry, not by process group.
    """
    if popen.poll() is not None:
        return
    try:
        descendants = psutil.Process(popen.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    popen.send_signal(signal.SIGTERM)
    try:
        popen.wait(timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()
    alive = [child for child in descendants if child.is_running()]
    for child in alive:
        try:
            child.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(alive, timeout=min(timeout, 5.0))
    for child in alive:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


def start_process(
    name: str,
    command: Sequence[str],
    env: Mapping[str, str],
    log_path: Path | None = None,
    echo: TextIO | None = None,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``command`` in its own session with stdout and stderr merged and recorded (see :class:`ManagedProcess`).

    ``log_path`` (appended to, each line prefixed with its arrival time) and
    ``echo`` (a stream that gets each line prefixed with ``[name]``) are optional.
    """
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
    popen = subprocess.Popen(
        list(command),
        env=dict(env),
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
    )
    return ManagedProcess(name, popen, log_path, echo)


class ProcessGroup:
    """The processes one command or test started; all of them are stopped when the block ends (see stop_all).

    Use as ``with ProcessGroup() as group: group.start(...)``. Stopping also
    happens on Ctrl-C and on errors; :meth:`stop_all` may be called earlier.
    """

    def __init__(self) -> None:
        self.processes: list[ManagedProcess] = []

    def start(
        self,
        name: str,
        command: Sequence[str],
        env: Mapping[str, str],
        log_path: Path | None = None,
        echo: TextIO | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """Start a process (see :func:`start_process`) and keep it to stop later."""
        process = start_process(name, command, env, log_path=log_path, echo=echo, cwd=cwd)
        self.processes.append(process)
        return process

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every process still running: all but the first one together, then the first one.

        The first process is what the others connect to (the SuperLink);
        SuperNodes each take seconds to deregister, so they stop in parallel.
        """
        later = [
            threading.Thread(target=process.stop, args=(timeout,), name=f"stop {process.name}")
            for process in self.processes[1:]
        ]
        for thread in later:
            thread.start()
        for thread in later:
            thread.join()
        if self.processes:
            self.processes[0].stop(timeout)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()


def run_command(
    command: Sequence[str], env: Mapping[str, str], timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a short command (a ``flwr`` call) to its end and return its output; :class:`PilotError` on timeout."""
    try:
        return subprocess.run(
            list(command),
            env=dict(env),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as err:
        raise PilotError(f"`{' '.join(command[:3])} ...` did not finish within {timeout:.0f} s") from err


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Whether a TCP connection to ``host:port`` is accepted now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.5) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


class StopOnSignals:
    """Turn SIGINT, SIGTERM and SIGHUP into ``KeyboardInterrupt`` while active, so ``with`` blocks stop their processes.

    A ``kill`` of the ``fedcl`` command would otherwise end it without
    stopping what it started. SIGINT is handled even where the shell started
    the command with it ignored (a background job); SIGHUP only where it is
    not ignored (``nohup`` keeps its meaning). Only in the main thread
    (signal handlers can only be set there).
    """

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}

    def _raise(self, signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> StopOnSignals:
        if threading.current_thread() is not threading.main_thread():
            return self
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            current = signal.getsignal(signum)
            if signum == signal.SIGHUP and current == signal.SIG_IGN:
                continue
            self.previous[signum] = signal.signal(signum, self._raise)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self.previous.clear()
