"""Integrity checks of a store: every committed chunk decodes and matches its checksum.

Checks per run: the manifest parses and its fingerprint matches the run's creation record; token index and
example arrays agree with the layout; every committed unit's rows decode, hold finite-or-recorded values
and match the crc32 recorded at commit; its predictions part reads. A damaged unit is named with its run,
array and rows; ``repair=True`` withdraws its marker so the same ``qcache extract`` recomputes just that part.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

import numpy as np
import zarr

from .bookkeeping import CREATED
from .location import read_parquet, zarr_location
from .manifest import SCHEMA_VERSION, fingerprint
from .reader import Run
from .store import Store


@dataclass
class Problem:
    run: str
    where: str
    what: str
    unit: int | None = None


@dataclass
class VerifyReport:
    runs_checked: int = 0
    units_checked: int = 0
    problems: list[Problem] = field(default_factory=list)
    repaired: list[tuple[str, int]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(store: Store, *, repair: bool = False) -> VerifyReport:
    report = VerifyReport()
    for key in store.runs():
        run = store.run(key)
        report.runs_checked += 1
        bad_units = _verify_run(run, report)
        if repair:
            for unit in sorted(bad_units):
                run.progress.clear(unit)
                report.repaired.append((str(key), unit))
    return report


def _verify_run(run: Run, report: VerifyReport) -> set[int]:
    name = str(run.key)
    try:
        manifest = run.manifest
        created = json.loads((run.files / CREATED).read_text())
    except (OSError, ValueError, KeyError) as exc:
        report.problems.append(Problem(name, "manifest", f"unreadable ({exc})"))
        return set()
    if manifest.get("schema", 0) > SCHEMA_VERSION:
        report.problems.append(
            Problem(name, "manifest", f"schema {manifest['schema']} is newer than this qcache")
        )
        return set()
    if fingerprint(manifest) != manifest.get("fingerprint") or created.get("fingerprint") != manifest.get(
        "fingerprint"
    ):
        report.problems.append(Problem(name, "manifest", "fingerprint does not match its contents"))
    layout = run.layout
    tokens = zarr.open_array(store=zarr_location(run.dir / "tokens/example_id"), mode="r", zarr_format=3)
    expected_example, _ = layout.token_index()
    if tokens.shape != (layout.n_tokens,) or not np.array_equal(tokens[:], expected_example):
        report.problems.append(
            Problem(name, "tokens/example_id", "token index disagrees with example lengths")
        )
    if layout.n_tokens != manifest.get("n_tokens", layout.n_tokens):
        report.problems.append(Problem(name, "examples", "token count differs from the manifest"))
    bad: set[int] = set()
    for unit in sorted(run.done_units()):
        report.units_checked += 1
        bad |= _verify_unit(run, unit, report)
    return bad


def _verify_unit(run: Run, unit: int, report: VerifyReport) -> set[int]:
    name = str(run.key)
    r0, r1 = run.layout.unit_rows(unit)
    try:
        record = run.progress.record(unit)
    except (OSError, ValueError) as exc:
        report.problems.append(Problem(name, "_progress", f"marker unreadable ({exc})", unit))
        return {unit}
    failed = False
    for path, crc in record.get("crc32", {}).items():
        try:
            arr = zarr.open_array(store=zarr_location(run.dir / path), mode="r", zarr_format=3)
            block = np.ascontiguousarray(arr[r0:r1])
        except Exception as exc:  # any decode failure names the chunk
            report.problems.append(Problem(name, f"{path} rows {r0}:{r1}", f"does not decode ({exc})", unit))
            failed = True
            continue
        if zlib.crc32(block.tobytes()) != crc:
            report.problems.append(Problem(name, f"{path} rows {r0}:{r1}", "checksum mismatch", unit))
            failed = True
    try:
        part = read_parquet(run.files / "_predictions" / f"u{unit:07d}.parquet")
        if part.num_rows != record.get("n_predictions", part.num_rows):
            raise ValueError("row count differs from the commit record")
    except Exception as exc:
        report.problems.append(
            Problem(name, f"_predictions/u{unit:07d}.parquet", f"unreadable ({exc})", unit)
        )
        failed = True
    return {unit} if failed else set()
