"""The loss curve of a training run: out/log.csv drawn into out/loss.png.

    python tools/plot.py [--log out/log.csv] [--png out/loss.png]

Needs matplotlib (pip install matplotlib; Colab has it), which nothing else here does.
"""
import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llama as L  # noqa: E402


def plot(args):
    try:
        from matplotlib.figure import Figure  # not pyplot: a notebook's own plotting is left alone
    except ImportError:
        raise ValueError("tools/plot.py needs matplotlib: pip install matplotlib") from None
    with open(args.log, newline="") as f:
        rows = [[float(value) for value in row] for row in list(csv.reader(f))[1:]]
        steps = [row[0] for row in rows]  # the columns: step, train_loss, val_loss, lr
        train_loss = [row[1] for row in rows]
        val_loss = [row[2] for row in rows]
    if not rows:
        raise ValueError(f"{args.log} has no rows yet: the run stopped before its first log line")
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    ax.plot(steps, train_loss, label="train (mean since the last point)")
    ax.plot(steps, val_loss, label="validation (fixed batches)")
    ax.axhline(L.ORIGINAL["val"]["loss"], color="gray", ls="--", label="original README, validation")
    ax.set(xlabel="step", ylabel="loss (nats per token)", title="llama.py on Tiny Shakespeare")
    ax.legend()
    L.atomic_write(args.png, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
    print(f"wrote {args.png}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="tools/plot.py", description=__doc__.split("\n\n")[0])
    parser.set_defaults(run=plot)
    parser.add_argument("--log", default=f"{L.OUT_DIR}/log.csv", help="(%(default)s)")
    parser.add_argument("--png", default=f"{L.OUT_DIR}/loss.png", help="(%(default)s)")
    return parser


if __name__ == "__main__":
    sys.exit(L.main(parser=build_parser()))
