"""Translation quality scores, computed with a classifier of the target domain.

The paper scores Cityscapes translations with the FCN score (a segmentation network trained on real
photos, applied to the translated images). Here both domains are digits with the same ten classes, so a
classifier trained on the target domain plays that part:

- **class preservation**: translate a test image of one domain and ask the other domain's classifier for its
  class; the accuracy against the source image's label, in each direction;
- **Frechet distance**: FID's construction (Heusel et al., NeurIPS 2017) with the target classifier's
  penultimate features (LeNet-5's 120-d ``forward_features``) in place of Inception's pool features, between
  the translated test images and the real test images of the target domain;
- **cycle L1**: mean absolute error of ``G_BA(G_AB(a))`` against ``a`` (and B->A->B), pixels in [-1, 1].

The classifiers (LeNet-5, bench.models) are trained by the harness on each domain's training split in the
generators' [-1, 1] pixel space and cached under a key covering their code, settings and data, like teachers.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from bench.data import fingerprint, task_data
from bench.models import create_model
from bench.provenance import modules_hash
from bench.translation.cyclegan import Generator, to_unit


@dataclass
class ClassifierConfig:
    arch: str = "lenet5"  # a bench.models name (harness choice: LeNet-5, the DAFL teacher)
    steps: int = 1500  # Adam steps (harness choice)
    batch_size: int = 64
    lr: float = 1e-3

    def validate(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"classifier: steps and batch_size must be >= 1 and lr > 0, got {self.steps}, "
                             f"{self.batch_size}, {self.lr}")


def classifier_key(dataset: str, config: ClassifierConfig, data_fingerprint: str, seed: int) -> str:
    blob = json.dumps({"dataset": dataset, "config": asdict(config), "data": data_fingerprint, "seed": seed,
                       "code": modules_hash(["bench.translation.scores", "bench.models"])}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, config: ClassifierConfig, seed: int) -> torch.nn.Module:
    """A classifier of one domain trained on its uint8 training images (seeded)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = create_model(config.arch, 10, 1, 32)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    x = to_unit(train_x)
    model.train()
    for _ in range(config.steps):
        i = torch.randint(0, x.shape[0], (config.batch_size,), generator=gen)
        loss = F.cross_entropy(model(x[i]), train_y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x_unit: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    correct = sum(int((model(x_unit[i:i + batch]).argmax(1) == y[i:i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def get_classifier(dataset: str, config: ClassifierConfig, cache_dir: Path, data_root, seed: int = 0
                   ) -> tuple[torch.nn.Module, float]:
    """The cached classifier of ``dataset`` (trained on first use) and its accuracy on the dataset's test split."""
    data = task_data(dataset, data_root, "cpu")
    key = classifier_key(dataset, config, fingerprint(data), seed)
    folder = Path(cache_dir) / "translation" / "classifiers"
    path = folder / f"{dataset}-{config.arch}-{key}.pt"
    model = create_model(config.arch, 10, 1, 32)
    if path.is_file():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
    else:
        model = train_classifier(data.train_x, data.train_y, config, seed)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
    return model, accuracy(model, to_unit(data.test_x), data.test_y)


@torch.no_grad()
def _features(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    return torch.cat([model.forward_features(x[i:i + batch]) for i in range(0, x.shape[0], batch)]).double().numpy()


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two feature sets (rows: samples)."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    with warnings.catch_warnings():  # dead ReLU features make the product singular; handled below
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # the FID reference implementation's fallback for a singular product
            offset = np.eye(s1.shape[0]) * 1e-6
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@torch.no_grad()
def translate(g: Generator, x_unit: torch.Tensor, batch: int = 256) -> torch.Tensor:
    g.eval()
    return torch.cat([g(x_unit[i:i + batch]) for i in range(0, x_unit.shape[0], batch)])


@torch.no_grad()
def score_pair(g_ab: Generator, g_ba: Generator, a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
               clf_a: torch.nn.Module, clf_b: torch.nn.Module) -> dict[str, float]:
    """The scores of a generator pair on test images ``a = (uint8 images, labels)`` of A and ``b`` of B."""
    xa, ya = to_unit(a[0]), a[1]
    xb, yb = to_unit(b[0]), b[1]
    fake_b, fake_a = translate(g_ab, xa), translate(g_ba, xb)
    cycle_a, cycle_b = translate(g_ba, fake_b), translate(g_ab, fake_a)
    return {
        "class_pres_ab": accuracy(clf_b, fake_b, ya), "class_pres_ba": accuracy(clf_a, fake_a, yb),
        "frechet_ab": frechet_distance(_features(clf_b, fake_b), _features(clf_b, xb)),
        "frechet_ba": frechet_distance(_features(clf_a, fake_a), _features(clf_a, xa)),
        "cycle_l1_a": float((cycle_a - xa).abs().mean()), "cycle_l1_b": float((cycle_b - xb).abs().mean()),
    }
