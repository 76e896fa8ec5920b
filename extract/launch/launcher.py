"""One extraction over several devices: a child ``qcache extract --shard i/n`` per GPU or CPU process.

The parent creates (or checks) the run once, without loading weights, so bad arguments fail once and
``--overwrite`` happens once; then it starts the children, shows one progress bar over the run's committed
units, and names the shards that failed. Which child runs which shard where is planned in workers.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from qcache.extract.launch.workers import Worker, plan_workers, under_torchrun
from qcache.extract.run.progress_bar import progress_bar
from qcache.extract.run.runner import ExtractConfig, ExtractResult, prepare_run, run_extract
from qcache.store import RunKey, RunSpec, open_store
from qcache.store.errors import InvalidOption, ShardFailed

GRACE_S = 10.0  # after SIGTERM, how long children get before SIGKILL
POLL_S = 0.5


@dataclass(frozen=True)
class LaunchResult:
    key: RunKey
    units_done: int  # committed units of the whole run
    units_total: int
    tokens_written: int  # by this launch
    workers: int
    seconds: float


def extract_run(
    cfg: ExtractConfig,
    *,
    gpus: str | None = None,
    processes: int | None = None,
    node: str | None = None,
    given: Collection[str] = (),
    child_args: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> ExtractResult | LaunchResult:
    """``qcache extract``: fill ``cfg``'s run in this process, or launch a child per device.

    With ``gpus``/``processes``/``node`` the launcher runs (``launch``); else this process fills its shard,
    taken from torchrun's environment when it runs under torchrun. ``given`` names the options given on
    the command line (an explicit ``--shard`` or ``--device`` wins over torchrun's and is refused by the
    launcher); ``child_args`` are the options every child repeats.
    """
    if gpus is None and processes is None and node is None:
        cfg = under_torchrun(cfg, shard_given="shard" in given, device_given="device" in given, log=log)
        return run_extract(cfg, log=log)
    workers = plan_workers(
        gpus=gpus, processes=processes, node=node, shard_given="shard" in given, device=cfg.device
    )
    return launch(cfg, workers, list(child_args), log=log)


def create_run(cfg: ExtractConfig, workers: list[Worker], log: Callable[[str], None] = print) -> RunSpec:
    """Create ``cfg``'s run, or check an existing one matches, reading no weights (a meta-device model).

    ``prepare_run`` builds the spec, as it does in every child, from the same tokenizer and config, so
    their ``RunWriter.open`` finds an identical run and only resumes.
    """
    gpu, g = workers[0].gpu, len(workers)
    device = torch.device("cpu") if gpu is None else torch.device("cuda", gpu)  # only recorded
    # node K of M runs shards K*g.. of M*g: about the units of shard K/M, which the disk check counts
    part = (workers[0].shard // g, workers[0].n_shards // g)
    parent = dataclasses.replace(cfg, device=str(device), shard=part)
    return prepare_run(parent, log, weights=False).spec


def launch(
    cfg: ExtractConfig,
    workers: list[Worker],
    child_args: list[str],
    log: Callable[[str], None] = print,
) -> LaunchResult:
    """Create the run, run one child ``qcache extract`` per worker, wait for all; raise if any failed.

    ``child_args`` are the extract options every child repeats (model, bits, dataset, ...); the launcher
    adds ``--store``, ``--shard``, ``--device`` and ``--quiet``. A failed child leaves the others running;
    Ctrl-C, SIGTERM or SIGHUP stop every child (committed units stay, and a rerun resumes).
    """
    if cfg.overwrite and workers[0].n_shards > len(workers):
        raise InvalidOption(
            "--overwrite with --node would have every node start the run over: delete the run's "
            "directory under STORE/runs/ first (with nothing writing it), then rerun without --overwrite"
        )
    start = time.monotonic()
    seen: set[str] = set()  # lines already shown: a warning every child repeats is shown once

    def say(msg: str) -> None:
        seen.add(msg)
        log(msg)

    spec = create_run(cfg, workers, say)
    run = open_store(cfg.store).run(spec.key)
    layout = spec.layout
    units = {w.shard: set(layout.shard_units(w.shard, w.n_shards)) for w in workers}
    mine: set[int] = set().union(*units.values())
    rows = {u: layout.unit_rows(u)[1] - layout.unit_rows(u)[0] for u in mine}
    done_before = run.done_units() & mine
    todo = [w for w in workers if units[w.shard] - done_before]  # finished shards start no child
    base = [sys.executable, "-m", "qcache.cli", "extract", *child_args, "--store", str(cfg.store.resolve())]
    logs = Path(tempfile.mkdtemp(prefix="qcache-launch-"))
    failed: list[tuple[Worker, str]] = []
    bar_options = dict(
        total=sum(rows.values()),
        initial=sum(rows[u] for u in done_before),
        unit="tok",
        unit_scale=True,
        disable=not cfg.progress,
        desc=f"{spec.key} ({len(todo)} shard{'' if len(todo) == 1 else 's'})",
    )
    try:
        # the bar exits first: on Ctrl-C it is frozen before the children are stopped, never redrawn
        with Children(todo, base, logs) as children, progress_bar(**bar_options) as bar:
            while True:
                finished = not children.running()  # before the last look, so it misses nothing
                for line in children.new_lines():
                    if line.startswith("warning:") and line not in seen:
                        seen.add(line)
                        bar.write(line, file=sys.stderr)
                for w, why in children.new_failures():
                    failed.append((w, why))
                    bar.write(f"shard {w.shard}/{w.n_shards} ({w.name}) failed: {why}", file=sys.stderr)
                if new := sum(rows[u] for u in run.done_units() & mine) - bar.n:
                    bar.update(new)
                if finished:
                    break
                time.sleep(POLL_S)
    finally:
        if not failed:
            shutil.rmtree(logs, ignore_errors=True)
    done = run.done_units()
    if failed:
        raise ShardFailed(_failure_message(failed, len(todo), len(done), layout.n_units, logs))
    return LaunchResult(
        key=spec.key,
        units_done=len(done),
        units_total=layout.n_units,
        tokens_written=sum(rows[u] for u in (done & mine) - done_before),
        workers=len(todo),
        seconds=time.monotonic() - start,
    )


def _failure_message(failed: list[tuple[Worker, str]], n: int, done: int, total: int, logs: Path) -> str:
    """One line: which shards failed and why, what is kept, where the output is, what to do."""
    names = ", ".join(f"{w.shard}/{w.n_shards} ({w.name})" for w, _ in failed)
    reasons = {why for _, why in failed}
    why = reasons.pop() if len(reasons) == 1 else "; ".join(f"{w.shard}/{w.n_shards}: {r}" for w, r in failed)
    return (
        f"{len(failed)} of {n} shards failed: {names}: {why}; {done}/{total} units are committed and kept "
        f"(children's output: {logs}); rerun the same command to resume"
    )


class Children:
    """Running child processes, their exits, and their stderr lines (read by one thread per child).

    A context manager: on leaving, by Ctrl-C, SIGTERM, SIGHUP or an error, it stops every child still running.
    """

    def __init__(self, workers: list[Worker], base: list[str], logs: Path) -> None:
        self.workers, self.base, self.logs = workers, base, logs
        self.lines: queue.Queue[tuple[int, str]] = queue.Queue()
        self.tails: dict[int, deque[str]] = {w.shard: deque(maxlen=20) for w in workers}
        self.procs: dict[int, subprocess.Popen[str]] = {}
        self.readers: dict[int, threading.Thread] = {}
        self.reported: set[int] = set()
        self._handlers: dict[int, Any] = {}

    def __enter__(self) -> Children:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGHUP):
                self._handlers[sig] = signal.signal(sig, _raise_interrupt)
        try:
            for w in self.workers:
                self._start(w)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        # a second Ctrl-C must not cut the stopping short and leave children behind
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if self._handlers else None
        try:
            self.stop()
        finally:
            for sig, handler in self._handlers.items():
                signal.signal(sig, handler)
            if previous is not None:
                signal.signal(signal.SIGINT, previous)

    def _start(self, w: Worker) -> None:
        argv = [*self.base, "--shard", f"{w.shard}/{w.n_shards}", "--device", w.device, "--quiet"]
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**os.environ, **w.env},
            start_new_session=True,  # the terminal's Ctrl-C reaches the parent only, which stops them
        )
        self.procs[w.shard] = proc
        log = self.logs / f"shard-{w.shard}-of-{w.n_shards}.log"
        reader = threading.Thread(target=self._pump, args=(w.shard, proc.stderr, log), daemon=True)
        reader.start()
        self.readers[w.shard] = reader

    def _pump(self, shard: int, stream: IO[str], log: Path) -> None:
        with open(log, "w") as out:
            for line in stream:
                out.write(line)
                self.lines.put((shard, line.rstrip("\n").rsplit("\r", 1)[-1].strip()))

    def running(self) -> bool:
        return any(self._alive(w.shard) for w in self.workers if w.shard in self.procs)

    def _alive(self, shard: int) -> bool:
        return self.procs[shard].poll() is None or self.readers[shard].is_alive()

    def new_lines(self) -> Iterator[str]:
        """Each child's stderr lines read since the last call."""
        while True:
            try:
                shard, line = self.lines.get_nowait()
            except queue.Empty:
                return
            if line and "%|" not in line:  # progress bars say nothing about why a child died
                self.tails[shard].append(line)
            yield line

    def new_failures(self) -> Iterator[tuple[Worker, str]]:
        """Children that exited non-zero since the last call, with why (after their last lines were read)."""
        for w in self.workers:
            if w.shard in self.reported or w.shard not in self.procs or self._alive(w.shard):
                continue
            self.reported.add(w.shard)
            code = self.procs[w.shard].returncode
            if code != 0:
                how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit {code}"
                tail = self.tails[w.shard]
                yield w, f"{how}: {tail[-1].removeprefix('error: ') if tail else 'no message'}"

    def stop(self) -> None:
        """SIGTERM every live child, then SIGKILL those still there after ``GRACE_S``."""
        live = [p for p in self.procs.values() if p.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + GRACE_S
        for p in live:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM/SIGHUP end the launcher like Ctrl-C: children stopped, units kept
