"""One extraction over several devices: a child ``qcache extract --shard i/n`` per GPU or CPU process.

The parent creates (or checks) the run once, without loading weights, so bad arguments fail once and
``--overwrite`` happens once; then it starts the children, shows one progress bar over the run's committed
units, and names the shards that failed. Under torchrun a plain ``qcache extract`` takes its shard from the
environment instead (``under_torchrun``).

>>> workers = plan_workers(gpus="0,1", node="1/2", visible=4, env={})  # node 1 of 2, two GPUs each
>>> [(w.shard, w.n_shards, w.env["CUDA_VISIBLE_DEVICES"]) for w in workers]
[(2, 4, '0'), (3, 4, '1')]
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from qcache.store import RunKey, RunSpec, RunWriter, open_store
from qcache.store.errors import BackendUnavailable, InvalidOption, QCacheError
from qcache.store.space import ensure_space

from .adapters import ModelTaps, parse_layers
from .attribution import Attributor
from .datasets import load_dataset
from .loading import LoadedModel, dequantized_checkpoint
from .quantization import quant_key
from .readout import Readout
from .registry import ModelSource, resolve_model
from .runner import ExtractConfig, _run_spec
from .tokenize import tokenize

GRACE_S = 10.0  # after SIGTERM, how long children get before SIGKILL
POLL_S = 0.5


class ShardFailed(QCacheError, RuntimeError):
    """A child extraction exited non-zero; the other shards' committed units are kept."""

    exit_code = 1


@dataclass(frozen=True)
class Worker:
    """One child process: its shard of the run, where it runs, and the environment it adds."""

    shard: int
    n_shards: int
    name: str  # "GPU 2", "process 1": how messages name it
    device: str  # the child's --device
    env: dict[str, str]  # added to the child's environment
    gpu: int | None = None  # the GPU's id as this (the parent) process numbers it


@dataclass(frozen=True)
class LaunchResult:
    key: RunKey
    units_done: int  # committed units of the whole run
    units_total: int
    tokens_written: int  # by this launch
    workers: int
    seconds: float


def plan_workers(
    *,
    gpus: str | None = None,
    processes: int | None = None,
    node: str | None = None,
    shard_given: bool = False,
    device: str = "auto",
    env: Mapping[str, str] | None = None,
    visible: int | None = None,
    cores: int | None = None,
) -> list[Worker]:
    """The children of this node, from ``--gpus 0,1`` or ``--processes N`` and ``--node K/M``.

    Node K of M with g children runs shards K*g .. K*g+g-1 of M*g; the launcher sets each child's shard
    and device, so ``--shard`` and a ``--device`` other than auto (or cpu, cuda to match) are refused. A
    GPU child sees only its GPU (CUDA_VISIBLE_DEVICES); each child gets cores/g CPU threads unless
    OMP_NUM_THREADS is set. ``visible`` (GPUs this process sees) defaults to torch's count.
    """
    env = os.environ if env is None else env
    what = "--gpus" if gpus is not None else "--processes"
    if gpus is not None and processes is not None:
        raise InvalidOption("--gpus and --processes cannot be combined: give one of them")
    if gpus is None and processes is None:
        raise InvalidOption("--node needs --gpus or --processes: it says which part of the shards they run")
    if shard_given:
        raise InvalidOption(
            f"--shard cannot be combined with {what}: the launcher gives each child its shard "
            "(use --node K/M for one node's part of a multi-node run)"
        )
    if device not in ("auto", "cuda" if gpus is not None else "cpu"):
        raise InvalidOption(
            f"--device {device} cannot be combined with {what}: the launcher gives each child its device"
        )
    if "RANK" in env and "WORLD_SIZE" in env:
        raise InvalidOption(
            f"{what} cannot run under torchrun, which already starts one process per device: "
            "run plain `qcache extract` under torchrun"
        )
    k, m = _fraction(node, "--node") if node is not None else (0, 1)
    ids = _gpu_ids(gpus, visible) if gpus is not None else None
    g = len(ids) if ids is not None else int(processes or 0)
    if g < 1:
        raise InvalidOption(f"--processes {processes} must be at least 1")
    threads = str(max(1, (cores or _cores()) // g))
    limits = {} if "OMP_NUM_THREADS" in env else {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    # ids count among the GPUs this process sees: map them through an inherited CUDA_VISIBLE_DEVICES
    seen = [d.strip() for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    out = []
    for j in range(g):
        shard = (k * g + j, m * g)
        if ids is None:
            out.append(Worker(*shard, f"process {j}", "cpu", dict(limits)))
        else:
            pinned = {**limits, "CUDA_VISIBLE_DEVICES": seen[ids[j]] if seen else str(ids[j])}
            out.append(Worker(*shard, f"GPU {ids[j]}", "cuda:0", pinned, ids[j]))
    return out


def _fraction(text: str, option: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``."""
    try:
        k, m = (int(x) for x in text.split("/"))
    except ValueError:
        raise InvalidOption(f"{option} {text!r} is not K/M, e.g. 0/4") from None
    if m < 1 or not 0 <= k < m:
        raise InvalidOption(f"{option} {text}: need 0 <= K < M")
    return k, m


def _gpu_ids(text: str, visible: int | None) -> list[int]:
    """``"0,2"`` or ``"all"`` -> GPU ids, checked against the GPUs torch sees."""
    ids: list[int] = []
    if text.strip() != "all":
        try:
            ids = [int(x) for x in text.split(",")]
        except ValueError:
            raise InvalidOption(
                f"--gpus {text!r} is not a comma list of GPU ids like 0,1,2,3, or all"
            ) from None
        twice = sorted({i for i in ids if ids.count(i) > 1})
        if twice:
            raise InvalidOption(f"--gpus {text}: GPU {twice[0]} is listed twice; each GPU runs one shard")
    visible = torch.cuda.device_count() if visible is None else visible
    if visible == 0:
        raise BackendUnavailable(
            f"--gpus {text}: no CUDA device is visible here; use --processes N to run N CPU processes"
        )
    bad = [i for i in ids if not 0 <= i < visible]
    if bad:
        raise InvalidOption(
            f"--gpus {text}: there is no GPU {bad[0]} here ({visible} visible: 0..{visible - 1})"
        )
    return ids or list(range(visible))


def under_torchrun(
    cfg: ExtractConfig,
    *,
    env: Mapping[str, str] | None = None,
    shard_given: bool = False,
    device_given: bool = False,
    log: Callable[[str], None] = print,
) -> ExtractConfig:
    """Under torchrun (RANK and WORLD_SIZE set) fill shard RANK/WORLD_SIZE on cuda:LOCAL_RANK (else cpu).

    An explicit ``--shard`` wins and turns this off; an explicit ``--device`` is kept.
    """
    env = os.environ if env is None else env
    if shard_given or "RANK" not in env or "WORLD_SIZE" not in env:
        return cfg
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise InvalidOption(
            f"RANK={env['RANK']!r} WORLD_SIZE={env['WORLD_SIZE']!r} are not integers"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise InvalidOption(f"RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    if cfg.overwrite and world > 1:
        raise InvalidOption(
            "--overwrite under torchrun would have every rank start the run over: delete the run's "
            "directory under STORE/runs/ first (with nothing writing it), then rerun without --overwrite"
        )
    device = cfg.device
    if not device_given and device == "auto":
        device = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    log(f"torchrun: rank {rank} of {world} fills --shard {rank}/{world} on {device}")
    return dataclasses.replace(cfg, shard=(rank, world), device=device)


def create_run(
    cfg: ExtractConfig,
    device: torch.device,
    log: Callable[[str], None] = print,
    *,
    part: tuple[int, int] = (0, 1),
) -> RunSpec:
    """Create ``cfg``'s run, or check an existing one matches, reading no weights (a meta-device model).

    The spec is built by the same ``_run_spec`` as the children's, from the same tokenizer and config, so
    their ``RunWriter.open`` finds an identical manifest and only resumes. ``part`` (node K of M) is what
    the disk check counts. ``device`` is only recorded in the manifest.
    """
    quant = quant_key(cfg.bits)
    source = resolve_model(cfg.model)
    store = open_store(cfg.store, create=True)
    data = load_dataset(cfg.dataset)
    loaded = _skeleton(source, quant, device)
    taps = ModelTaps(loaded.model)
    layers = parse_layers(cfg.layers, taps.n_layers)
    for n in layers:  # an impossible tap fails here once, not in every child
        for t in cfg.taps:
            taps.tap(n, t)
    tok = tokenize(loaded.tokenizer, data.prompts, cfg.max_length)
    if tok.n_truncated.any():
        log(
            f"warning: {int((tok.n_truncated > 0).sum())} of {len(data)} prompts were longer than "
            f"--max-length {cfg.max_length} and lost tokens from the front"
        )
    attributor = None
    if cfg.attributions is not None:
        cpu = torch.device("cpu")
        labels = Readout(loaded.tokenizer, data.labels, cpu).tokens
        attributor = Attributor(cfg.attributions, taps, layers, loaded.tokenizer, labels, cpu)
    spec = _run_spec(RunKey(data.name, source.key, quant), cfg, loaded, taps, layers, data, tok, attributor)
    if cfg.disk_check:  # as run_extract: before --overwrite deletes anything
        ensure_space(store, spec, shard=part, overwrite=cfg.overwrite)
    RunWriter.open(store, spec, overwrite=cfg.overwrite)
    return spec


def _skeleton(source: ModelSource, quant: str, device: torch.device) -> LoadedModel:
    """The model's modules on the meta device (no weights read) with its real tokenizer, as load_model's."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = str(dequantized_checkpoint(source)) if source.gguf_file else source.source
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise BackendUnavailable(
            f"cannot load model {source.description}: not in the local Hugging Face cache and the Hub "
            f"is not reachable ({str(exc).splitlines()[0][:160]}); download it first or pass a local "
            "directory"
        ) from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model, tokenizer, source, quant, device, getattr(config, "_commit_hash", None))


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

    gpu, g = workers[0].gpu, len(workers)
    device = torch.device("cpu") if gpu is None else torch.device("cuda", gpu)
    # node K of M runs shards K*g.. of M*g: about the units of shard K/M, which the disk check counts
    spec = create_run(cfg, device, say, part=(workers[0].shard // g, workers[0].n_shards // g))
    run = open_store(cfg.store).run(spec.key)
    layout = spec.layout
    units = {w.shard: set(layout.shard_units(w.shard, w.n_shards)) for w in workers}
    mine: set[int] = set().union(*units.values())
    rows = {u: layout.unit_rows(u)[1] - layout.unit_rows(u)[0] for u in mine}
    done_before = run.done_units() & mine
    todo = [w for w in workers if units[w.shard] - done_before]  # finished shards start no child
    base = [sys.executable, "-m", "qcache.cli", "extract", *child_args, "--store", str(cfg.store.resolve())]
    bar = tqdm(
        total=sum(rows.values()),
        initial=sum(rows[u] for u in done_before),
        unit="tok",
        unit_scale=True,
        disable=not cfg.progress,
        file=sys.stderr,
        desc=f"{spec.key} ({len(todo)} shard{'' if len(todo) == 1 else 's'})",
    )
    logs = Path(tempfile.mkdtemp(prefix="qcache-launch-"))
    failed: list[tuple[Worker, str]] = []
    try:
        with Children(todo, base, logs) as children:
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
        bar.close()
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
