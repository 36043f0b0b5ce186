"""``pfc-fast demo``: neural-collapse metrics of every layer of a small residual MLP trained on
scikit-learn's digits (1,797 8x8 images, shipped inside scikit-learn: no download), printed per
epoch. It shows the front door, :func:`pfc_fast.nc_metrics`, on real data in a few seconds.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from ..metrics import nc_metrics
from .data import digits_pixels
from .flags import positive_float, positive_int, seed


class ResidualMLP(torch.nn.Module):
    """``x_{l+1} = x_l + W2 relu(W1 x_l)``: width-preserving blocks, as in the paper's transparent model."""

    def __init__(self, dim: int, width: int, depth: int, classes: int) -> None:
        super().__init__()
        self.stem = torch.nn.Linear(dim, width)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, width))
            for _ in range(depth))
        self.fc = torch.nn.Linear(width, classes)

    def layers(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The stem's output and every block's, in forward order."""
        h = self.stem(x)
        out = [h]
        for block in self.blocks:
            h = h + block(h)
            out.append(h)
        return out


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The flags of ``pfc-fast demo``."""
    parser.add_argument("--epochs", type=positive_int, default=60)
    parser.add_argument("--every", type=positive_int, default=10, help="measure every this many epochs")
    parser.add_argument("--width", type=positive_int, default=64)
    parser.add_argument("--depth", type=positive_int, default=4)
    parser.add_argument("--lr", type=positive_float, default=0.05)
    parser.add_argument("--seed", type=seed, default=0)
    return parser


def run(args: argparse.Namespace) -> int:
    """Train and measure as ``args`` say; prints one line per measured epoch. Returns 0, or 1 where
    the training diverges (a non-finite loss)."""
    torch.manual_seed(args.seed)
    pixels, digit_labels = digits_pixels()
    feats = torch.tensor(pixels, dtype=torch.float32) / 16.0
    labels = torch.tensor(digit_labels, dtype=torch.long)
    model = ResidualMLP(feats.shape[1], args.width, args.depth, 10)
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
        if not torch.isfinite(loss):
            print(f"pfc-fast demo: training diverged in epoch {epoch} (the loss is {float(loss)}); lower --lr "
                  f"(it is {args.lr})", file=sys.stderr)
            return 1
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
    return 0
