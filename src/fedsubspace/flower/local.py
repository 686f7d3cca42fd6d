"""A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1, and ``flwr run``.

Everything runs insecure on loopback, with telemetry and update checks off, runtime dependency
installation off (the package is installed already) and a private ``FLWR_HOME``. Every process started
here gets its own session, and this process becomes the subreaper of whatever they start (Linux), so
processes orphaned by a dying SuperNode or SuperLink come back to it. :meth:`LocalFederation.stop` (also
on Ctrl-C, SIGTERM or failure, through the context manager) signals every process of the family, waits,
kills what is left, reaps them all and reports any that survived.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import tomli_w
import yaml

from fedsubspace.config import ExperimentConfig
from fedsubspace.errors import UserError
from fedsubspace.flower.settings import app_definition, check_federation
from fedsubspace.results import FLOWER, RunDirectory, Status, claim, read_summary, status

PR_SET_CHILD_SUBREAPER = 36
STOP_GRACE = 15.0  # seconds processes get to exit after SIGTERM before SIGKILL


def flower_bin(name: str) -> str:
    """A Flower command from this interpreter's environment (a virtualenv need not be on PATH)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found beside {sys.executable} or on PATH; is flwr installed?")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _become_subreaper() -> None:
    """Orphaned descendants are re-parented to this process (not init), which can then reap them."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


Identity = tuple[int, int]  # (pid, start time): a pid alone may be reused once its process is gone


def _processes() -> dict[int, tuple[int, int, str, int]]:
    """pid -> (parent pid, process group, state letter, start time) of every process (Linux /proc;
    elsewhere nothing, and only the process groups started here are signalled)."""
    table = {}
    proc = Path("/proc")
    for entry in proc.iterdir() if proc.is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the fields after "pid (comm) "
        table[int(entry.name)] = (int(fields[1]), int(fields[2]), fields[0], int(fields[19]))
    return table


class LocalFederation:
    """A SuperLink and ``num_nodes`` SuperNodes (node i holds partition i of ``num_nodes``), as a context
    manager. ``home`` is the private FLWR_HOME; the processes' output goes to ``home/logs``."""

    def __init__(self, num_nodes: int, home: Path, *, cwd: Path | None = None) -> None:
        self.num_nodes, self.home, self.cwd = num_nodes, home, cwd or Path.cwd()
        self.logs = home / "logs"
        self.port = 0
        self.nodes: dict[int, subprocess.Popen] = {}
        self.started: list[subprocess.Popen] = []
        self.seen: set[Identity] = set()  # every process of the family ever observed
        self.groups: set[int] = set()  # every process group of the family ever observed
        self.env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            # the SuperLink and SuperNodes start flower-superexec and the app processes by name
            "PATH": os.pathsep.join(
                [str(Path(flower_bin("flower-superlink")).parent), os.environ.get("PATH", "")]
            ),
        }

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        left = self.stop()
        if left:
            raise RuntimeError(f"Flower processes {left} survived SIGKILL")

    # --- processes ------------------------------------------------------------------------------

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        self.logs.mkdir(parents=True, exist_ok=True)
        with (self.logs / f"{name}.log").open("ab") as out:
            process = subprocess.Popen(
                args,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, out of reach of the terminal's Ctrl-C
            )
        self._adopt(process)
        self.groups.add(process.pid)
        return process

    def start(self) -> None:
        _become_subreaper()
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(  # the SuperLink connection `flwr run ... local` uses
            '[superlink]\ndefault = "local"\n\n[superlink.local]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        link = self._spawn(
            "superlink",
            [
                flower_bin("flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
            ],
        )
        self._wait_for_port(self.port, link, timeout=120.0)
        for node in range(self.num_nodes):
            self.start_node(node)

    def start_node(self, node: int) -> subprocess.Popen:
        """Start (or restart) the SuperNode holding partition ``node``."""
        self.nodes[node] = self._spawn(
            f"supernode-{node}",
            [
                flower_bin("flower-supernode"),
                "--insecure",
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(free_port()),
                "--node-config",
                f"partition-id={node} num-partitions={self.num_nodes}",
            ],
        )
        return self.nodes[node]

    def _wait_for_port(self, port: int, process: subprocess.Popen, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"flower-superlink exited at start:\n{self.log_tail('superlink')}")
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not listen on 127.0.0.1:{port} within {timeout:.0f}s")

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    # --- running an app -------------------------------------------------------------------------

    def run(self, app_dir: Path, run_config: Path, output: IO[str]) -> int:
        """``flwr run APP local --stream --run-config FILE``; its output is copied to ``output`` line by
        line. Returns its exit status."""
        process = subprocess.Popen(
            [flower_bin("flwr"), "run", str(app_dir), "local", "--stream", "--run-config", str(run_config)],
            cwd=self.cwd,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._adopt(process)
        assert process.stdout is not None
        for line in process.stdout:
            output.write(line)
            output.flush()
        return process.wait()

    # --- stopping -------------------------------------------------------------------------------

    def _adopt(self, process: subprocess.Popen) -> None:
        self.started.append(process)
        entry = _processes().get(process.pid)
        if entry is not None:
            self.seen.add((process.pid, entry[3]))

    def family(self) -> dict[int, str]:
        """Live and zombie members of the family (pid -> state letter): the processes started here and
        their descendants, remembered once seen, and orphans re-parented to this process from a group
        the family had."""
        table = _processes()
        members = {pid for pid, (_, _, _, start) in table.items() if (pid, start) in self.seen}
        grew = True
        while grew:
            more = {
                pid
                for pid, (ppid, pgid, _, _) in table.items()
                if pid not in members and (ppid in members or (ppid == os.getpid() and pgid in self.groups))
            }
            members |= more
            grew = bool(more)
        self.seen |= {(pid, table[pid][3]) for pid in members}
        self.groups |= {table[pid][1] for pid in members}
        return {pid: table[pid][2] for pid in members}

    def _reap(self, deadline: float) -> list[int]:
        """Wait until the family is gone, reaping those that are our children (zombies too: orphans
        come back here a moment after their parent died); the pids still running at ``deadline``."""
        while True:
            for process in self.started:
                process.poll()
            for pid in self.family():
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            family = self.family()
            alive = [pid for pid, state in family.items() if state != "Z"]
            if not family or time.monotonic() >= deadline:
                return alive
            time.sleep(0.2)

    def stop(self) -> list[int]:
        """Stop every process of the federation; returns the pids that could not be stopped (none)."""
        alive: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGKILL):
            # whole groups first, which also reaches processes started a moment ago; only groups whose
            # leader still runs: the number of a group that is gone may belong to another one by now
            for process in self.started:
                if process.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, sig)
            for pid in [pid for pid, state in self.family().items() if state != "Z"]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            alive = self._reap(deadline=time.monotonic() + STOP_GRACE)
            if not alive:
                break
        return alive


@contextlib.contextmanager
def sigterm_as_exit() -> Iterator[None]:
    """SIGTERM raises SystemExit while the federation runs, so that it is stopped on the way out (only
    the main thread can handle signals: elsewhere this does nothing)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class FlowerRunError(RuntimeError):
    """The Flower run ended without writing its summary (its log says why)."""


def run_local(
    config: ExperimentConfig,
    out: Path,
    *,
    nodes: int,
    overwrite: bool,
    min_replies: int,
    round_timeout: float,
    node_timeout: float,
    output: IO[str],
) -> dict[str, Any]:
    """Run ``config`` on a local federation of ``nodes`` SuperNodes (one per client) into ``out``, the
    results directory ``fedsubspace run`` writes. Returns the summary."""
    check_federation(min_replies, round_timeout, node_timeout)
    if nodes != config.num_clients:
        raise UserError(
            f"--nodes {nodes} but num_clients is {config.num_clients}: each SuperNode holds one client; "
            f"pass --nodes {config.num_clients} or --set num_clients={nodes}"
        )
    out = out.resolve()
    with claim(out):  # refuses a run that is held or already there before anything starts
        RunDirectory(out, overwrite=overwrite, runner=FLOWER)
    with tempfile.TemporaryDirectory(prefix="fedsubspace-flower-") as tmp:
        home = Path(tmp)
        app_dir = home / "fedsubspace"
        app_dir.mkdir()
        (app_dir / "pyproject.toml").write_text(tomli_w.dumps(app_definition()))
        config_file = home / "experiment.yaml"
        config_file.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        run_config = home / "run-config.toml"
        run_config.write_text(
            tomli_w.dumps(
                {
                    "config-file": str(config_file),
                    "out-dir": str(out),
                    "overwrite": overwrite,
                    "min-replies": min_replies,
                    "round-timeout": round_timeout,
                    "node-timeout": node_timeout,
                }
            )
        )
        with sigterm_as_exit(), LocalFederation(nodes, home) as federation:
            exit_status = federation.run(app_dir, run_config, output)
            if exit_status != 0 or status(out) is not Status.FINISHED:
                tails = "\n".join(
                    f"--- {name} (last lines)\n{federation.log_tail(name)}"
                    for name in ["superlink", *(f"supernode-{n}" for n in range(nodes))]
                )
                raise FlowerRunError(f"the Flower run failed (flwr run exit status {exit_status})\n{tails}")
    return read_summary(out)
