"""Make a "user's own" teacher and image folder to try `bench distill` with (README: Distil your own network).

Writes ``--out/data/{train,test}/<class>/*.png`` from the official Fashion-MNIST files (installed by
setup.sh) and trains a small timm CNN on them *outside* dfkd-bench, the way a user would, saving its
plain state dict to ``--out/teacher.pth``:

    python3 examples/own_teacher.py --out /tmp/own --per-class 300 --epochs 6

Then follow the README (the image size and normalisation below are what this script trains with).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench._vision import import_timm
from bench.data import load_dataset

SIZE, MEAN, STD = 48, 0.5, 0.5  # the teacher's input: 48 px, (x - 0.5) / 0.5


def write_folder(out: Path, per_class: int) -> None:
    data = load_dataset("fashion_mnist")
    for split, x, y, n in (("train", data.train_x, data.train_y, per_class), ("test", data.test_x, data.test_y, per_class // 3)):
        for label in range(10):
            folder = out / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, idx in enumerate(torch.nonzero(y == label).flatten()[:n].tolist()):
                Image.fromarray(x[idx, 0].numpy()).save(folder / f"{i:05d}.png")


def load_folder(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for label, class_dir in enumerate(sorted(p for p in folder.iterdir() if p.is_dir())):
        for path in sorted(class_dir.glob("*.png")):
            with Image.open(path) as img:
                images.append(np.asarray(img.convert("L").resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32))
            labels.append(label)
    x = torch.from_numpy(np.stack(images))[:, None] / 255.0
    return (x - MEAN) / STD, torch.tensor(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--per-class", type=int, default=300, help="training images per class (test: a third)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--model", default="test_resnet", help="a timm model name")
    args = parser.parse_args()
    started = time.time()
    write_folder(args.out / "data", args.per_class)
    x, y = load_folder(args.out / "data" / "train")
    xt, yt = load_folder(args.out / "data" / "test")
    torch.manual_seed(0)
    model = import_timm().create_model(args.model, num_classes=10, in_chans=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            acc = (model(xt).argmax(1) == yt).float().mean().item() * 100
        print(f"epoch {epoch + 1}: test accuracy {acc:.2f}%", flush=True)
    torch.save(model.state_dict(), args.out / "teacher.pth")  # a plain state dict: what dfkd-bench loads
    print(f"wrote {args.out / 'data'} and {args.out / 'teacher.pth'} (timm:{args.model}, {SIZE} px, mean {MEAN}, "
          f"std {STD}) in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
