"""The extraction run: create or resume it (its spec from spec.py), then compute and commit its units durably.

A unit is ``chunk_rows`` consecutive rows of the token axis (store/layout.py), computed by units.py. Forward
passes of the next unit overlap with the compression and writing of the previous one on a background thread.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qcache.extract.arch.adapters import ModelTaps, parse_layers
from qcache.extract.attrib.attribution import Attributor, IGConfig
from qcache.extract.inputs.datasets import Dataset, DatasetRequest, load_dataset
from qcache.extract.inputs.prompting import Prompting, require_chat_template
from qcache.extract.inputs.tokenize import Tokenized, tokenize
from qcache.extract.models.loading import (
    LoadedModel,
    dequantized_path,
    load_model,
    load_tokenizer,
    pick_device,
)
from qcache.extract.models.registry import resolve_model
from qcache.extract.models.skeleton import load_skeleton
from qcache.extract.quant.method import NONE
from qcache.extract.quant.quantization import method_of
from qcache.extract.quant.registry import for_bits, parse_key, resolve
from qcache.extract.run.batch_size import batch_dependent, default_batch_size, device_type, with_batch_size
from qcache.extract.run.batching import Batching
from qcache.extract.run.progress_bar import progress_bar
from qcache.extract.run.readout import Readout
from qcache.extract.run.scoring import check_label_scoring, make_readout
from qcache.extract.run.spec import build_run_spec
from qcache.extract.run.units import IGState, compute_unit
from qcache.store import RunKey, RunSpec, RunWriter, open_store
from qcache.store.errors import InvalidOption
from qcache.store.space import ensure_space


@dataclass(frozen=True)
class ExtractConfig:
    """Everything ``qcache extract`` was asked to do."""

    model: str
    bits: int  # the paper's shorthand (32, 16, 8, 4); ignored when ``quant`` is given
    store: Path
    dataset: DatasetRequest = field(default_factory=DatasetRequest)
    layers: str = "paper"
    taps: tuple[str, ...] = ("act",)
    device: str = "auto"
    # None: resolved by prepare_run (with_batch_size): a resumed run's own, else the default of the
    # device and method (batch_size.default_batch_size: 16 on CPU, 64 on CUDA but 16 for LLM.int8, 32
    # with --batching authors)
    batch_size: int | None = None
    max_length: int = 512
    chunk_rows: int = 1024
    shard: tuple[int, int] = (0, 1)
    overwrite: bool = False
    progress: bool = True
    attributions: IGConfig | None = None  # also compute Integrated-Gradients attributions
    disk_check: bool = True  # refuse to start when the store's disk cannot hold the pending units
    batching: str = "length-sorted"  # or "authors": the authors' consecutive, left-padded batches
    label_scoring: str = "first-token"  # or "sequence": how label words are read (readout.py, scoring.py)
    prompting: Prompting = field(default_factory=Prompting)  # raw prompts, or the chat template's user turn
    writers: int | None = None  # units written at once while the next computes; None: WRITERS[device]
    # the run key of the quantization method (`qcache methods`); None: the paper's method of ``bits``.
    # Resolved on creation: always a canonical key afterwards.
    quant: str | None = None

    def __post_init__(self) -> None:
        method = resolve(self.quant, None) if self.quant is not None else for_bits(self.bits)
        object.__setattr__(self, "quant", method.key)
        if self.attributions is not None and not method.gradients:
            # refused before any weights are read: the gradients would be wrong, not just slow
            raise InvalidOption(
                f"--attributions with {method.key} is not supported: {method.no_backward}; extract "
                "without --attributions, or use a method with a backward pass (`qcache methods`)"
            )
        Batching(self.batching, self.batch_size)  # validates both
        if self.batching == "authors" and self.attributions is not None:
            raise InvalidOption(
                "--attributions with --batching authors is not supported: attributions assume right "
                "padding, and the authors attributed one example at a time; use --batching length-sorted"
            )
        if self.label_scoring == "sequence" and self.prompting.chat_template:
            # the continuation would start after the template's generation prompt, whose trailing newline
            # lm-eval moves into the continuation; qcache does not re-tokenize chat contexts that way yet
            raise InvalidOption(
                "--label-scoring sequence with --chat-template is not supported yet: use first-token "
                "scoring with the chat template, or sequence scoring on raw prompts"
            )

    @property
    def batches(self) -> Batching:
        """The batching mode and its batch size: ``batch_size``, else the device's and method's default
        (a stored run's own is adopted by ``with_batch_size``, before a run is built)."""
        size = self.batch_size
        if size is None:
            kind = parse_key(str(self.quant)).kind
            size = default_batch_size(self.batching, device_type(self.device), kind)
        return Batching(self.batching, size)


# Units being written while the next one computes. One writer thread commits ~0.06-0.09 GB/s of float16
# activations on the 2-core build machine (benchmarks/writer_rate.py; zarr + Blosc encoding, crc32,
# fsync), far below the >1 GB/s a GPU produces with --layers all, so a GPU run overlaps more units (each
# costs one unit's blocks of host memory). Units write disjoint chunk files, so order does not matter.
WRITERS = {"cpu": 1, "cuda": 3}


def writers_for(cfg: ExtractConfig, device: torch.device) -> int:
    """Units in flight: ``cfg.writers``, else the device type's default (``WRITERS``)."""
    n = cfg.writers if cfg.writers is not None else WRITERS.get(device.type, 1)
    return max(1, int(n))


@dataclass
class ExtractResult:
    key: RunKey
    units_done: int
    units_total: int
    tokens_written: int
    n_truncated: int
    n_nonfinite: int
    seconds: float


def run_extract(cfg: ExtractConfig, log: Callable[[str], None] = print) -> ExtractResult:
    """Fill (or resume) one run of the store; returns what was done, ``seconds`` being the whole call's
    wall time (tokenizing, loading the weights and filling), as the launcher's is."""
    start = dt.datetime.now()
    run = prepare_run(cfg, log)
    with run.writer.claim(*cfg.shard):
        result = fill_run(run.writer, cfg, run.loaded, run.taps, run.data, run.tok, log, run.attributor)
    return dataclasses.replace(result, seconds=(dt.datetime.now() - start).total_seconds())


@dataclass(frozen=True)
class PreparedRun:
    """A run created or reopened for writing, and what its spec was built from."""

    writer: RunWriter
    loaded: LoadedModel
    taps: ModelTaps
    data: Dataset
    tok: Tokenized
    attributor: Attributor | None

    @property
    def spec(self) -> RunSpec:
        return self.writer.spec


def prepare_run(
    cfg: ExtractConfig, log: Callable[[str], None] = print, *, weights: bool = True
) -> PreparedRun:
    """Build ``cfg``'s run spec, check the disk, then create the run or check the stored one matches.

    The one place a spec is built: every process writing a run (one, torchrun ranks, the launcher's parent
    and children) builds it here, so they agree on the manifest. ``weights=False`` builds the model on the
    meta device (nothing read; ``cfg.device`` is only recorded): the launcher's parent, which only creates
    the run, prepares it so. The disk check counts the units of ``cfg.shard``.

    The spec is first built from the model's config and tokenizer (a meta-device skeleton): a stored run
    is compared with it (``RunWriter.check``: ``RunMismatch`` names what differs) and said to be resumed,
    and the disk is checked, all before any weights are read. Logs "loading MODEL at QUANT on DEVICE ..."
    before the weights load; a shard with every unit done loads none (its ``loaded`` is the skeleton).
    """
    quant = str(cfg.quant)
    if weights:  # a method that cannot run here is refused before anything is read or created
        parse_key(quant).require(pick_device(cfg.device).type)
    source = resolve_model(cfg.model)
    data = load_dataset(cfg.dataset)
    # labels the scoring cannot read are refused from the tokenizer alone, before any weights are read
    # and before the store is touched
    tokenizer, same_files = load_tokenizer(source)
    ig_target = cfg.attributions.target if cfg.attributions is not None else None
    check_label_scoring(tokenizer, data.labels, cfg.label_scoring, ig_target)
    if cfg.prompting.chat_template:  # likewise a tokenizer without a chat template
        require_chat_template(tokenizer, cfg.model)
    if source.gguf_file and not same_files:  # the skeleton reads the float32 copy, made here once
        log(f"dequantizing {source.description} once into {dequantized_path(source)} ...")
    # The spec from the config and tokenizer alone (no weights read): an unsupported architecture or tap,
    # a mismatch with a stored run and a disk too small are all refused before the weights load
    key = RunKey(cfg.prompting.dataset_key(data.name), source.key, quant)
    cfg, _ = with_batch_size(cfg, key)  # before the spec: the batch size is part of the run's identity
    skeleton = _build(cfg, key, load_skeleton(source, quant, cfg.device), data, log, weights=False)
    store = open_store(cfg.store, create=True)
    todo = True  # whether this shard has units to compute
    if not cfg.overwrite and RunWriter.exists(store, key):
        done = RunWriter.check(store, skeleton.spec)
        log(f"resuming: {len(done)} of {skeleton.spec.layout.n_units} units done ({key})")
        todo = any(u not in done for u in skeleton.spec.layout.shard_units(*cfg.shard))
    if cfg.disk_check:  # before the run is created or resumed, so a refusal leaves the store as it was
        ensure_space(store, skeleton.spec, shard=cfg.shard, overwrite=cfg.overwrite)
    built = skeleton
    if weights and todo:  # a finished shard computes nothing: its weights are not loaded
        log(f"loading {cfg.model} at {quant} on {pick_device(cfg.device)} ...")
        grads, reuse = cfg.attributions is not None, tokenizer if same_files else None
        loaded = load_model(source, quant, device=cfg.device, for_gradients=grads, tokenizer=reuse)
        built = _build(cfg, key, loaded, data, log, weights=True, tok=skeleton.tok)
    writer = RunWriter.open(store, built.spec, overwrite=cfg.overwrite)
    return PreparedRun(writer, built.loaded, built.taps, data, built.tok, built.attributor)


@dataclass(frozen=True)
class _Built:
    """A run's spec and what it was built from (a loaded model, or its meta-device skeleton)."""

    spec: RunSpec
    loaded: LoadedModel
    taps: ModelTaps
    tok: Tokenized
    attributor: Attributor | None


def _build(
    cfg: ExtractConfig,
    key: RunKey,
    loaded: LoadedModel,
    data: Dataset,
    log: Callable[[str], None],
    *,
    weights: bool,
    tok: Tokenized | None = None,
) -> _Built:
    """The spec of ``cfg``'s run from ``loaded`` (its weights, or its skeleton: ``weights=False``).

    ``tok``: the prompts already tokenized by the same tokenizer files (the skeleton's), not redone and
    not warned about again; ``RunWriter.open`` compares the tokens with a stored run's either way.
    """
    taps = ModelTaps(loaded.model)  # with weights: the probe forward confirms the structure
    layers = _check_taps(taps, cfg)
    warn = tok is None
    if tok is None:
        tok = tokenize(loaded.tokenizer, data.prompts, cfg.max_length, cfg.prompting)
    if tok.n_truncated.any() and warn:
        where = "their user turn's front" if cfg.prompting.chat_template else "the front"
        log(
            f"warning: {int((tok.n_truncated > 0).sum())} of {len(data)} prompts were longer than "
            f"--max-length {cfg.max_length} and lost tokens from {where}"
        )
    attributor = None
    if cfg.attributions is not None:
        cpu = torch.device("cpu")
        labels = Readout(loaded.tokenizer, data.labels, cpu).tokens
        # without weights nothing is attributed: the CPU keeps the parent from sizing batches on a GPU
        where = loaded.device if weights else cpu
        fixed = batch_dependent(str(cfg.quant))  # LLM.int8: step batches of a fixed size on every device
        attributor = Attributor(
            cfg.attributions, taps, layers, loaded.tokenizer, labels, where, batch_dependent=fixed
        )
    spec = build_run_spec(key, cfg, loaded, taps, layers, data, tok, attributor)
    if weights:
        for line in unquantized_experts_notes(spec.manifest, loaded.quant, taps):
            log(line)
    return _Built(spec, loaded, taps, tok, attributor)


def unquantized_experts_notes(manifest: dict, quant: str, taps: ModelTaps) -> list[str]:
    """One note per experts module pattern whose 3-D weights a weight-quantizing method left in float."""
    method = method_of(quant)
    if method.kind == NONE:  # fp32 / fp16 / bf16: nothing is quantized
        return []
    notes = {}
    for n, entry in (manifest.get("moe") or {}).items():
        if entry["experts_quantized"]:
            continue
        info = taps.moe[int(n)]
        dtype = str(taps.experts_module(int(n)).down_proj.dtype).removeprefix("torch.")
        where = f"{taps.structure.layers_path}.*.{info.module}"
        notes[where] = (
            f"note: {method.library} quantizes Linear layers only: the 3-D expert weights of {where} stay "
            f"{dtype} in {quant} (manifest moe experts_quantized: false)"
        )
    return list(notes.values())


def _check_taps(taps: ModelTaps, cfg: ExtractConfig) -> list[int]:
    """The layers of ``cfg``; raises ``InvalidOption`` when one of ``cfg.taps`` is impossible at one."""
    layers = parse_layers(cfg.layers, taps.n_layers)
    for n in layers:  # an impossible tap fails here, before the store is touched
        for t in cfg.taps:
            taps.tap(n, t)
    moe = [n for n in layers if n in taps.moe]
    if cfg.attributions is not None and moe:
        raise InvalidOption(
            f"--attributions at mixture-of-experts layer(s) {moe} of {taps.structure.model_type!r} is not "
            "supported: Integrated Gradients per expert is not implemented in qcache; extract without "
            "--attributions"
        )
    return layers


def fill_run(
    writer: RunWriter,
    cfg: ExtractConfig,
    loaded: LoadedModel,
    taps: ModelTaps,
    data: Dataset,
    tok: Tokenized,
    log: Callable[[str], None],
    attributor: Attributor | None = None,
) -> ExtractResult:
    """Compute and commit the pending units of ``cfg.shard``, writing each while the next computes.

    The forward batches are those the run's spec records (its mode and batch size, resolved by
    ``prepare_run``), not ``cfg``'s: a resume without ``--batch-size`` keeps the stored run's.
    """
    spec = writer.spec
    layout = spec.layout
    recorded = spec.manifest["batching"]
    batches = Batching(recorded["mode"], int(recorded["batch_size"]))
    pending = writer.pending_units(*cfg.shard)
    readout = make_readout(
        cfg.label_scoring,
        loaded,
        data,
        tok,
        cfg.max_length,
        loaded.device,
        batch_size=batches.size,
        run=True,
    )
    points = [(n, t) for n in spec.manifest["layers"] for t in cfg.taps]
    n_tokens = sum(layout.unit_rows(u)[1] - layout.unit_rows(u)[0] for u in pending)
    start = dt.datetime.now()
    nonfinite = 0
    in_flight: deque[Future[None]] = deque()
    n_writers = writers_for(cfg, loaded.device)
    ig = IGState(attributor) if attributor is not None else None
    # On Ctrl-C the bar is frozen first (it exits first), then the units being written are committed
    with (
        ThreadPoolExecutor(max_workers=n_writers, thread_name_prefix="qcache-writer") as pool,
        progress_bar(
            total=n_tokens, unit="tok", unit_scale=True, disable=not cfg.progress, desc=f"{spec.key}"
        ) as bar,
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", message=".*MatMul8bitLt.*")
        for unit in pending:
            blocks, predictions, bad = compute_unit(
                unit, loaded, taps, points, readout, data, tok, layout, bar, batches, ig
            )
            nonfinite += bad
            while len(in_flight) >= n_writers:
                in_flight.popleft().result()  # at most n_writers units written while the next computes
            in_flight.append(pool.submit(writer.write_unit, unit, blocks, predictions))
        while in_flight:
            in_flight.popleft().result()
    if nonfinite:
        log(f"warning: {nonfinite} NaN/inf activation values were cached in {spec.key} (stored as they are)")
    return ExtractResult(
        key=spec.key,
        units_done=len(writer.progress.done_units()),
        units_total=layout.n_units,
        tokens_written=n_tokens,
        n_truncated=int((tok.n_truncated > 0).sum()),
        n_nonfinite=nonfinite,
        seconds=(dt.datetime.now() - start).total_seconds(),
    )
