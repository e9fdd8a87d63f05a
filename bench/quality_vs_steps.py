"""Sample quality per U-Net call: sampler x steps x dtype -> the `ddpm-eval score` figures, U-Net
calls per image and images/s at batch 32.

    python -m bench.quality_vs_steps --threads 1                      # every sampler at 10 15 25 50 100 steps, fp32
    python -m bench.quality_vs_steps --samplers ddim dpmpp_2m --steps 15 100 --dtypes float32 bfloat16 \\
        --out runs/quality.jsonl                                      # one part of a grid
    python -m bench.quality_vs_steps --out runs/quality.jsonl --table     # no runs: the table of the file

Every row scores n samples (the same seeds, so the same starting noise, in every row) with the
classifier of model.quality; the reference row is the mean over disjoint random sets of n real
test images, and its frechet_std the spread over those sets: the noise of every row's Frechet figure.
images/s are those of the scored sampling itself at --batch-size (after one warm-up call): on a
shared CPU they measure the neighbours too.
With --out, rows are appended to a JSON-lines file so a grid can run in parts (the reference
once per n), and the table printed covers every row in the file.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from model.threads import set_threads, sleep_idle_threads

sleep_idle_threads()  # before torch loads (model.threads)

import model  # noqa: E402
from model.data import dataset_path, load_mnist  # noqa: E402
from model.evaluate import sample_images  # noqa: E402
from model.precision import DTYPE_CHOICES, dtype_name  # noqa: E402
from model.quality import Scorer, load_or_train_scorer  # noqa: E402
from model.samplers import SAMPLERS  # noqa: E402

REFERENCE = "real test images"
COLUMNS = ("sampler", "steps", "dtype", "unet_calls", "images_per_s", "confident_share", "classes", "frechet",
           "frechet_std")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/ddpm-mnist.safetensors")
    p.add_argument("--samplers", nargs="+", default=sorted(SAMPLERS), choices=sorted(SAMPLERS))
    p.add_argument("--steps", nargs="+", type=int, default=[10, 15, 25, 50, 100])
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=DTYPE_CHOICES)
    p.add_argument("-n", "--num", type=int, default=256, help="images scored per row (and real test images)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM's noise scale")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default 0: one per core)")
    p.add_argument("--data-path", default=None, help="mnist.npz (default: ../shared/data, or $DDPM_DATA_DIR)")
    p.add_argument("--cache-dir", default=None, help="the classifier's cache (default: as ddpm-eval score)")
    p.add_argument("--out", default=None, metavar="JSONL", help="append the rows to this file; print all of its rows")
    p.add_argument("--table", action="store_true", help="run nothing: print the table of --out's rows")
    return p.parse_args()


def count_calls(module) -> list[int]:
    """A one-element counter of `module`'s forward calls, kept up to date by a hook."""
    counter = [0]
    module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    return counter


def sampled_row(ddpm: model.DDPM, scorer: Scorer, calls: list[int], sampler: str, steps: int,
                args: argparse.Namespace) -> dict:
    calls[0] = 0
    started = time.perf_counter()
    images = sample_images(ddpm, args.num, args.batch_size, sampler, steps, args.eta, args.seed, progress=False)
    seconds = time.perf_counter() - started
    calls_per_image = calls[0] // math.ceil(args.num / args.batch_size)  # each call runs a whole batch
    return {"sampler": sampler, "steps": steps, "dtype": dtype_name(ddpm.dtype), "unet_calls": calls_per_image,
            "images_per_s": args.num / seconds, **scorer.score(images), "batch_size": args.batch_size,
            "seed": args.seed, "weights": args.weights}


def read_rows(path: Path | None) -> list[dict]:
    if path is None or not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def record(row: dict, rows: list[dict], out: Path | None) -> None:
    """Keep the row, print it, and append it to --out at once: an interrupted grid keeps its finished rows."""
    rows.append(row)
    print(" ".join(f"{c}={row[c]}" for c in COLUMNS if c in row), flush=True)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as file:
            file.write(json.dumps(row) + "\n")


def table_cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict]) -> None:
    print("| " + " | ".join(COLUMNS) + " | n |")
    print("|" + "---|" * (len(COLUMNS) + 1))
    for row in rows:
        print("| " + " | ".join(table_cell(row.get(c)) for c in COLUMNS) + f" | {row['n']} |")


def main() -> None:
    args = parse_args()
    out = Path(args.out) if args.out else None
    earlier = read_rows(out)
    if args.table:
        return print_table(earlier)
    set_threads(args.threads)
    data_path = dataset_path("mnist", args.data_path)
    scorer = load_or_train_scorer(data_path, args.cache_dir, device=args.device,
                                  on_training=lambda path: print(f"training the score's classifier (cached as {path})"))
    print(f"classifier: test accuracy {scorer.info['test_accuracy']:.2%}; {args.threads or 'all'} torch threads")
    rows = []
    if not any(row["sampler"] == REFERENCE and row["n"] == args.num for row in earlier):
        record({"sampler": REFERENCE, **scorer.mean_score(load_mnist(data_path, "test"), args.num)}, rows, out)
    for dtype in args.dtypes:
        ddpm = model.load(args.weights, args.device, dtype=dtype)
        ddpm.sample(args.batch_size, steps=1)  # warm-up, not timed: the first calls pack weights and allocate
        calls = count_calls(ddpm.unet)
        for sampler in args.samplers:
            for steps in args.steps:
                record(sampled_row(ddpm, scorer, calls, sampler, steps, args), rows, out)
    print_table(earlier + rows)


if __name__ == "__main__":
    main()
