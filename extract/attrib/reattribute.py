"""``qcache attribute``: add attributions to a run that was extracted without them.

The run's arguments are read back from its manifest and the extraction is run again with attributions.
The stored run must be replaced (``replace=True``) the first time, because the store refuses to change
an existing run's identity; the activations are recomputed on the way, which costs one forward pass per
example against the ~(steps + 1) x layers forward-and-backward passes of the attributions themselves.
From then on the run carries its attribution settings and the same command resumes it unit by unit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace as dc_replace
from pathlib import Path
from typing import Any

from qcache.extract.attrib.attribution import IGConfig
from qcache.extract.inputs.datasets import DatasetRequest
from qcache.extract.inputs.prompting import Prompting
from qcache.extract.models.registry import ALIASES
from qcache.extract.run.runner import ExtractConfig, ExtractResult, run_extract
from qcache.store import RunKey, open_store
from qcache.store.errors import InvalidOption, RunMismatch


def dataset_request(spec: dict[str, Any]) -> DatasetRequest:
    """The ``DatasetRequest`` that produced a manifest's ``dataset`` entry."""
    source = str(spec.get("source", ""))
    common = dict(
        limit=spec.get("limit"), seed=int(spec.get("seed", 42)), split=str(spec.get("split", "all"))
    )
    if source.startswith("qcache/data/boolq-passages"):
        return DatasetRequest(name="boolq", with_passage=True, **common)
    if source.startswith("qcache/data/"):
        return DatasetRequest(name=str(spec["name"]), **common)
    return DatasetRequest(
        name=source,
        text_field=spec.get("text_field"),
        label_field=spec.get("label_field"),
        labels=tuple(spec["labels"]),
        template=spec.get("template"),
        **common,
    )


def config_from_manifest(store: Path, manifest: dict[str, Any], model: str | None = None) -> ExtractConfig:
    """Rebuild the extraction arguments of a stored run (its batching too: part of its identity)."""
    batching = manifest.get("batching") or {}
    name = model or manifest["model"]
    if model is None and name not in ALIASES:
        source = str(manifest["model_source"])
        if source.startswith("gguf:"):
            raise InvalidOption(
                f"run model {name!r} came from a local GGUF file; pass --model with its directory"
            )
        name = source
    prompting = manifest.get("prompting") or {}  # absent in runs stored before --chat-template
    return ExtractConfig(
        model=name,
        bits=16,  # unused: ``quant`` names the method
        quant=str(manifest["quant"]),
        store=store,
        dataset=dataset_request(manifest["dataset"]),
        layers=",".join(str(n) for n in manifest["layers"]),
        taps=tuple(manifest["taps"]),
        max_length=int(manifest["max_length"]),
        chunk_rows=int(manifest["chunk_rows"]),
        batching=str(batching.get("mode", "length-sorted")),
        batch_size=batching.get("batch_size"),
        label_scoring=str(manifest.get("label_scoring", "first-token")),
        prompting=Prompting(bool(prompting.get("chat_template")), prompting.get("system_prompt")),
    )


def attribute_run(
    store_path: Path,
    run: str,
    ig: IGConfig,
    *,
    replace: bool = False,
    model: str | None = None,
    log: Callable[[str], None] = print,
    **options: Any,
) -> ExtractResult:
    """Compute attributions for ``run`` (``DATASET/MODEL/QUANT``); ``options`` set device, batch size...

    An option given as ``None`` keeps the run's own value (the batch size: part of the run's identity).
    """
    options = {k: v for k, v in options.items() if v is not None}
    key = RunKey.parse(run)
    stored = open_store(store_path).run(key)
    cfg = dc_replace(
        config_from_manifest(Path(store_path), stored.manifest, model), attributions=ig, **options
    )
    has = stored.manifest.get("attributions")
    if not has and not replace:
        raise RunMismatch(
            f"run {key} has no attributions; pass --replace to re-extract it with attributions "
            "(activations are recomputed, the old run is deleted first)"
        )
    if has and replace:
        log(f"note: {key} already has attributions {has.get('method')}/{has.get('steps')} steps; replacing")
    return run_extract(dc_replace(cfg, overwrite=replace), log=log)
