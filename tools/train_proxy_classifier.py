"""Train the proxy classifier whose features give the offline proxy FID; writes the shipped weights.

The shipped file ``duodiff_fast/assets/proxy_classifier.safetensors`` was produced by exactly:

    python tools/train_proxy_classifier.py --out duodiff_fast/assets/proxy_classifier.safetensors

(all other options at their defaults, 2 CPU threads, torch 2.13 CPU). Training data is a stream
of fresh ``Shapes`` images (``seed=--train-seed``; every step renders new items, so there is
nothing to overfit and no augmentation); the test accuracy is measured on ``--test-n`` images of
another seed and written, with the dataset spec, image size and feature dimension, into the file's
metadata. The loss is cross-entropy plus ``--aux-weight`` times the MSE of an auxiliary head that
predicts the 4x4 downsampled image (see ``ProxyClassifier``: it keeps colour in the features).
Numbers can differ in the last bits across torch versions and thread counts.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from duodiff_fast.data import Shapes  # noqa: E402
from duodiff_fast.proxy import DEFAULT_WEIGHTS, ProxyClassifier  # noqa: E402


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 2% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * t)))


@torch.no_grad()
def accuracy(model: ProxyClassifier, ds: Shapes, batch_size: int = 500) -> float:
    x, y = ds.batch(range(len(ds)))
    return float((model.predict(x, batch_size) == y).float().mean())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=DEFAULT_WEIGHTS)
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=96)
    p.add_argument("--lr", type=float, default=4e-3)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--aux-weight", type=float, default=4.0,
                   help="weight of the auxiliary low-resolution image regression "
                        "(keeps colour in the features)")
    p.add_argument("--train-seed", type=int, default=1001)
    p.add_argument("--test-seed", type=int, default=1002)
    p.add_argument("--test-n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0, help="torch seed (initialisation)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train = Shapes(n=args.steps * args.batch_size, img_size=args.img_size, seed=args.train_seed,
                   num_classes=args.num_classes)
    test = Shapes(n=args.test_n, img_size=args.img_size, seed=args.test_seed, num_classes=args.num_classes)
    model = ProxyClassifier(num_classes=args.num_classes, img_size=args.img_size)
    # channels_last is about 20% faster for these small convs on CPU; the saved weights are the same.
    model = model.to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    t0, ema = time.time(), None
    for step in range(args.steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        x, y = train.batch(range(step * args.batch_size, (step + 1) * args.batch_size))
        logits, aux, target = model.training_outputs(x.contiguous(memory_format=torch.channels_last))
        ce, mse = F.cross_entropy(logits, y), F.mse_loss(aux, target)
        loss = ce + args.aux_weight * mse
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        cur = torch.stack([ce, mse]).detach()
        ema = cur if ema is None else 0.95 * ema + 0.05 * cur
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  ce {ema[0]:.4f}  aux mse {ema[1]:.4f}  "
                  f"lr {opt.param_groups[0]['lr']:.2e}  "
                  f"{time.time() - t0:.0f}s", flush=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    acc = accuracy(model, test)
    with torch.no_grad():
        _, aux, target = model.training_outputs(test.batch(range(len(test)))[0])
        aux_mse = float(F.mse_loss(aux, target))
    print(f"test accuracy on Shapes(n={args.test_n}, seed={args.test_seed}): {acc:.4f}; "
          f"aux {model.aux_size}x{model.aux_size} image mse {aux_mse:.4f}")
    meta = dict(dataset=f"shapes:{args.img_size}", train_seed=args.train_seed,
                train_images=args.steps * args.batch_size, test_seed=args.test_seed, test_n=args.test_n,
                test_accuracy=f"{acc:.4f}", test_aux_mse=f"{aux_mse:.5f}", aux_weight=args.aux_weight,
                torch=torch.__version__,
                command="python tools/train_proxy_classifier.py " + " ".join(argv or sys.argv[1:]))
    model.save(args.out, meta)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
