"""What ``--label-scoring sequence`` costs against ``first-token``: extraction seconds per 100 examples.

Three runs over the same BoolQ prompts on one loaded model: BoolQ's ``False,True`` read by first token,
the same by sequence (one-token continuations: no extra forward), and ``1,5,10`` by sequence (SmolLM2:
multi-token continuations, one extra forward per example). The ``1,5,10`` prompts are BoolQ's written
to a local CSV with an arbitrary gold label. Model loading and tokenization are outside the timings.

    python benchmarks/label_scoring.py [--bits 32] [--limit 100] [--layers paper]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
from pathlib import Path

from qcache.extract.inputs.datasets import DatasetRequest, load_dataset
from qcache.extract.run.runner import ExtractConfig, fill_run, prepare_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--layers", default="paper")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    boolq = DatasetRequest(name="boolq", limit=args.limit)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ratings.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            w.writerows((p, "1") for p in load_dataset(boolq).prompts)
        digits = DatasetRequest(name=str(path), labels=("1", "5", "10"))
        cases = [("False,True", "first-token", boolq), ("False,True", "sequence", boolq)]
        cases.append(("1,5,10", "sequence", digits))
        for i, (labels, scoring, request) in enumerate(cases):
            cfg = ExtractConfig(
                model=args.model,
                bits=args.bits,
                store=Path(tmp) / f"s{i}",
                dataset=request,
                layers=args.layers,
                device=args.device,
                progress=False,
                label_scoring=scoring,
            )
            run = prepare_run(cfg, log=lambda _: None)
            res = fill_run(run.writer, cfg, run.loaded, run.taps, run.data, run.tok, print)
            per100 = res.seconds * 100 / len(run.data)
            print(f"{labels:<11} {scoring:<12} {per100:7.1f} s per 100 examples ({len(run.data)} examples)")


if __name__ == "__main__":
    main()
