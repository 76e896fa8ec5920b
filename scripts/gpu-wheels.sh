#!/usr/bin/env bash
# Download, here, exactly what a bare GPU node (docs/gpu.md) lacks to run qcache's extraction, into the
# ignored folder .whl/ beside this repository's files, and check that both together fit the 64 MiB that
# may travel to the node.
#
#   bash scripts/gpu-wheels.sh            # then: scripts/gpu-check.sh on the node, with .whl carried
#
# The node has Python 3.12, torch, transformers, accelerate, numpy, pyarrow, numba, click, tqdm, fsspec,
# pyyaml, toolz, cloudpickle, matplotlib, pandas, safetensors, tokenizers and pytest. It lacks the packages
# below (pinned to the versions this repository is tested with). Left out on purpose: duckdb (SQL only;
# extraction never imports it), gguf (only for GGUF checkpoints), datasets (only for hf: datasets).
# Also written: the SmolLM2 tokenizer (gzipped), for token counts of the 7B-shaped benchmarks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=$((64 * 1024 * 1024))
WHEELS=(
  bitsandbytes==0.50.2  # LLM.int8 and NF4 (about 43 MB: CUDA kernels for every architecture)
  captum==0.9.0         # Integrated Gradients
  zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0  # the store's arrays
  dask==2026.7.1 partd==1.4.2 locket==1.0.0  # qcache.store imports its reader (dask arrays)
)
rm -rf .whl && mkdir -p .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
  manylinux2014_x86_64 manylinux1_x86_64; do platforms+=(--platform "$p"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
# The tokenizer travels gzipped (3.5 MB -> ~1 MB); gpu-check.sh unpacks it.
"$PY" - <<'PY'
import gzip, shutil, tempfile
from pathlib import Path
from transformers import AutoTokenizer
from qcache.extract.models.loading import checkpoint_path
from qcache.extract.models.registry import resolve_model

tok = AutoTokenizer.from_pretrained(checkpoint_path(resolve_model("smollm2-135m")))
with tempfile.TemporaryDirectory() as tmp:
    tok.save_pretrained(tmp)
    out = Path(".whl/smollm2-tokenizer")
    out.mkdir()
    for f in Path(tmp).iterdir():
        with f.open("rb") as src, gzip.open(out / (f.name + ".gz"), "wb", compresslevel=9) as dst:
            shutil.copyfileobj(src, dst)
PY
wheels=$(du -cb .whl/*.whl .whl/smollm2-tokenizer/* | tail -1 | cut -f1)
repo=$( (git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null || true) \
  | awk '$2 == "total" {s += $1} END {print s + 0}')
total=$((wheels + repo))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
ls -l .whl/*.whl | awk '{printf "  %10d  %s\n", $5, $9}'
echo "wheels + tokenizer: $(mib "$wheels"); repository (tracked and untracked-not-ignored): $(mib "$repo")"
echo "together: $(mib "$total") of $(mib $LIMIT)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "error: .whl/ and the repository exceed 64 MiB together; remove untracked files or wheels" >&2
  exit 1
fi
