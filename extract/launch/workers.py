"""Who runs which shard where: the children of a launch, and a torchrun rank's shard.

``qcache extract --gpus``/``--processes`` (with ``--node K/M``) start one child per GPU or CPU process;
``plan_workers`` checks those options and gives each child its shard, device and environment. Under
torchrun a plain ``qcache extract`` takes its shard from the environment instead (``under_torchrun``).

>>> workers = plan_workers(gpus="0,1", node="1/2", visible=4, env={})  # node 1 of 2, two GPUs each
>>> [(w.shard, w.n_shards, w.env["CUDA_VISIBLE_DEVICES"]) for w in workers]
[(2, 4, '0'), (3, 4, '1')]
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from qcache.extract.run.runner import ExtractConfig
from qcache.store.errors import BackendUnavailable, InvalidOption


@dataclass(frozen=True)
class Worker:
    """One child process: its shard of the run, where it runs, and the environment it adds."""

    shard: int
    n_shards: int
    name: str  # "GPU 2", "process 1": how messages name it
    device: str  # the child's --device
    env: dict[str, str]  # added to the child's environment
    gpu: int | None = None  # the GPU's id as this (the parent) process numbers it


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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
