"""The ``pfc-fast`` command line.

``pfc-fast train``: train a ResNet and measure PFC at every layer, every epoch
(:mod:`pfc_fast.train`). ``pfc-fast report RUN_DIR``: figures and summary of a run
(:mod:`pfc_fast.report`).

The benchmarks are not part of the installed package: ``python -m benchmarks`` in the repository
root runs them.

``pfc-fast demo``: neural-collapse metrics of every layer of a small residual MLP trained on
scikit-learn's digits (1,797 8x8 images, shipped inside scikit-learn: no download), printed per
epoch. It shows the front door, :func:`pfc_fast.nc_metrics`, on real data in a few seconds.
"""
import argparse
import sys
import time

import torch

from . import report, train
from .data import digits_pixels
from .metrics import nc_metrics


def _digits():
    pixels, labels = digits_pixels()
    return torch.tensor(pixels, dtype=torch.float32) / 16.0, torch.tensor(labels, dtype=torch.long)


class _ResidualMLP(torch.nn.Module):
    """x_{l+1} = x_l + W2 relu(W1 x_l): width-preserving blocks, as in the paper's transparent model."""

    def __init__(self, dim, width, depth, classes):
        super().__init__()
        self.stem = torch.nn.Linear(dim, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
            for _ in range(depth))
        self.fc = torch.nn.Linear(width, classes)

    def layers(self, x):
        h = self.stem(x)
        out = [h]
        for block in self.blocks:
            h = h + block(h)
            out.append(h)
        return out


def demo(args):
    torch.manual_seed(args.seed)
    feats, labels = _digits()
    model = _ResidualMLP(feats.shape[1], args.width, args.depth, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    print(f"digits: {len(labels)} samples, D = {feats.shape[1]}; residual MLP width {args.width}, "
          f"{args.depth} blocks; NC1 of each layer (stem, block 1, ...) per epoch")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(labels))
        for batch in order.split(128):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model.fc(model.layers(feats[batch])[-1]), labels[batch])
            loss.backward()
            optimizer.step()
        if epoch % args.every == 0 or epoch == args.epochs:
            with torch.no_grad():
                layers = model.layers(feats)
                predictions = model.fc(layers[-1]).argmax(1)
                metrics = [nc_metrics(h, labels, predictions=predictions) for h in layers]
            accuracy = float((predictions == labels).float().mean())
            nc1 = " ".join(f"{m.nc1:9.3e}" for m in metrics)
            print(f"epoch {epoch:3d}  acc {accuracy:.3f}  nc1 [{nc1}]  nc4(last) {metrics[-1].nc4:.3f}")
    raw = nc_metrics(feats, labels)
    print(f"input pixels: nc1 {raw.nc1:.3e}; done in {time.perf_counter() - start:.1f} s")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pfc-fast", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo_parser = commands.add_parser("demo", help="NC metrics of every layer of a small network on digits")
    demo_parser.add_argument("--epochs", type=int, default=60)
    demo_parser.add_argument("--every", type=int, default=10, help="measure every this many epochs")
    demo_parser.add_argument("--width", type=int, default=64)
    demo_parser.add_argument("--depth", type=int, default=4)
    demo_parser.add_argument("--lr", type=float, default=0.05)
    demo_parser.add_argument("--seed", type=int, default=0)
    demo_parser.set_defaults(run=demo)
    train_parser = train.add_arguments(commands.add_parser(
        "train", help="train a ResNet, measure PFC of every layer every epoch",
        description=train.__doc__.split("\n\n")[0]))
    train_parser.set_defaults(run=lambda args: train.run_cli(args, train_parser))
    report_parser = report.add_arguments(commands.add_parser(
        "report", help="figures and summary of a pfc-fast train run", description=report.__doc__.split("\n\n")[0]))
    report_parser.set_defaults(run=lambda args: report.run_cli(args, report_parser))
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
