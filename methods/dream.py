"""Dream Distillation (``dream``): activation-cluster metadata, synthesised "dreams", KD on them.

Bhardwaj, Suda, Marculescu, "Dream Distillation: A Data-Independent Model Compression Framework",
ICML 2019 Joint Workshop on On-Device ML (arXiv 1905.07072); 88.5% on CIFAR-10 without training on
real images. No public implementation exists: this is a reference one, and every choice the paper
leaves open is a named config field below, with the choice made here and why.

1. Metadata, the only real-data touch (``data_access`` FEW, counted in ``real_samples_used``):
   ``m`` training images (paper: 10% of CIFAR-10; here ``metadata_fraction`` of the dataset's
   training split, or ``n_samples``) go through the teacher once; their penultimate activations
   (``teacher.forward_features``: the average-pool output of a ResNet/WRN, conv3's 120-d output of
   LeNet-5) are grouped, k-means-clustered per group, and each cluster keeps its centroid and its
   top-``components`` principal directions with their standard deviations. Grouping
   (``cluster_by``): by the *teacher's predicted class* (default: no labels are read), by the true
   label (reads the m labels; the paper's per-class metadata may well have used them), or one global
   clustering. The images are dropped after this step; only the metadata is used.
2. Targets: one per dream, ``t = c + noise_scale * sum_j eps_j * sigma_j * v_j`` with eps ~ N(0, 1),
   (v_j, sigma_j) the cluster's principal directions and standard deviations (the paper's "small
   noise along the principal directions"; sigma-scaling makes ``noise_scale=1`` the cluster's own
   spread). Dreams are spread evenly over the groups (classes), and within a group over its clusters
   in proportion to their sizes. Targets are clipped at 0 when every metadata activation is >= 0
   (post-ReLU features), since no input could reach a negative target.
3. Synthesis ("dreaming"): images start from N(0, 1) noise in the normalised input space and are
   optimised in batches with Adam (cosine-decayed lr) on
   ``||f_T(jitter(flip(x))) - t||^2 / mean ||t||^2 + tv_weight * TV(x) + l2_weight * mean(x^2)``
   and clipped to valid pixel values after each step. The paper generated its dreams with Lucid
   (feature visualisation: random transformations and regularisers, unspecified); the priors here
   are DeepInversion's (methods/image_priors.py). The matching term is divided by the batch's mean
   squared target norm, so it reads as a relative error (1 = as far as the zero vector) and the prior
   weights do not depend on the feature scale. Logged as ``match`` on the training curve.
4. Student: Hinton KD (methods/losses.py ``kd_loss``) on the dreams, the teacher queried on each
   batch (after the same jitter/flip as in synthesis), ``epochs`` passes over the dream set with the
   optimiser of bench/training.py.

Budget: the grid's ``budget`` scales the number of dreams (``ctx.scaled(n_images)``), and with it
the synthesis and KD iteration counts; the optimisation steps per dream (``synth_iters``) are not
scaled, because a half-optimised dream is a different method rather than a cheaper one.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from bench.config import ConfigError
from bench.method import DataAccess, Method, TeacherAccess, register
from bench.training import TrainConfig, Schedule, train
from methods.generator import save_image_grid
from methods.image_priors import clamp_to_bounds, l2_prior, pixel_bounds, random_flip, random_jitter, total_variation
from methods.losses import kd_loss

# ---------------------------------------------------------------------------------------------
# metadata: k-means + PCA in torch, on the device


def kmeans(x: torch.Tensor, k: int, iters: int = 30, generator: torch.Generator | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means with k-means++ seeding on the rows of ``x`` (N, D): ``(centroids (k', D), assignment (N,))``.

    ``k' = min(k, N)``. A fixed number of iterations (no convergence test, hence no host sync); a
    cluster that empties keeps its previous centroid. Seeding draws come from ``generator`` (CPU).
    """
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"kmeans expects a non-empty (N, D) matrix, got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    n = x.shape[0]
    k = min(k, n)
    x = x.float()
    first = int(torch.randint(n, (1,), generator=generator))
    centroids = x[first:first + 1]
    closest = ((x - centroids) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: next centroid drawn with probability proportional to d^2
        weights = closest.cpu() + 1e-12
        pick = int(torch.multinomial(weights, 1, generator=generator))
        centroids = torch.cat([centroids, x[pick:pick + 1]])
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1))
    assignment = torch.cdist(x, centroids).argmin(1)
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=k).to(x.dtype).unsqueeze(1)
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        assignment = torch.cdist(x, centroids).argmin(1)
    return centroids, assignment


def principal_directions(x: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``r`` principal directions of the rows of ``x`` (N, D) and their standard deviations.

    Returns ``(directions (r, D), stds (r,))``, zero-padded where fewer than ``r`` exist (N - 1 < r
    or D < r); one sample gives all zeros.
    """
    n, d = x.shape
    directions = x.new_zeros(r, d)
    stds = x.new_zeros(r)
    if n >= 2 and r > 0:
        centred = x - x.mean(0, keepdim=True)
        _, s, vh = torch.linalg.svd(centred, full_matrices=False)
        q = min(r, vh.shape[0], n - 1)
        directions[:q] = vh[:q]
        stds[:q] = s[:q] / math.sqrt(n - 1)
    return directions, stds


@dataclass
class ActivationMetadata:
    """What Dream Distillation keeps of the real data: per cluster, a centroid and its principal directions."""

    centroids: torch.Tensor  # (K, D)
    directions: torch.Tensor  # (K, r, D), rows orthonormal (zero rows where a cluster has fewer)
    stds: torch.Tensor  # (K, r): standard deviation of the cluster along each direction
    counts: torch.Tensor  # (K,): metadata samples in each cluster
    groups: torch.Tensor  # (K,): the class (predicted or true) of each cluster; all 0 for "global"
    nonnegative: bool  # every metadata activation was >= 0 (post-ReLU features)


def build_metadata(features: torch.Tensor, groups: torch.Tensor | None, k: int, r: int, *, kmeans_iters: int = 30,
                   generator: torch.Generator | None = None) -> ActivationMetadata:
    """k-means (``k`` per group) and per-cluster PCA (top ``r``) of ``features`` (N, D).

    ``groups`` (N,) int: cluster each group separately (classes); ``None``: one global clustering.
    Groups with no samples get no clusters.
    """
    features = features.float()
    if groups is None:
        groups = torch.zeros(features.shape[0], dtype=torch.long, device=features.device)
    cents, dirs, stds, counts, owners = [], [], [], [], []
    for g in torch.unique(groups).tolist():
        members = features[groups == g]
        c, assignment = kmeans(members, k, kmeans_iters, generator)
        for j in range(c.shape[0]):
            cluster = members[assignment == j]
            if cluster.shape[0] == 0:  # emptied during Lloyd iterations: no data behind it
                continue
            v, s = principal_directions(cluster, r)
            cents.append(cluster.mean(0))
            dirs.append(v)
            stds.append(s)
            counts.append(cluster.shape[0])
            owners.append(g)
    device = features.device
    return ActivationMetadata(torch.stack(cents), torch.stack(dirs), torch.stack(stds),
                              torch.tensor(counts, device=device), torch.tensor(owners, device=device),
                              bool((features >= 0).all()))


def _apportion(n: int, weights: list[float]) -> list[int]:
    """Split ``n`` into integer parts proportional to ``weights`` (largest remainder)."""
    total = sum(weights)
    exact = [n * w / total for w in weights]
    parts = [math.floor(e) for e in exact]
    for i in sorted(range(len(weights)), key=lambda i: parts[i] - exact[i])[: n - sum(parts)]:
        parts[i] += 1
    return parts


def sample_targets(meta: ActivationMetadata, n: int, noise_scale: float, generator: torch.Generator | None = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` target activations ``(n, D)`` and the cluster index of each ``(n,)``, in a random order.

    Even over groups, within a group proportional to cluster size; ``t = c + noise_scale * sum_j
    eps_j sigma_j v_j`` with eps ~ N(0, 1); clipped at 0 for non-negative (post-ReLU) features.
    """
    counts = meta.counts.tolist()
    owners = meta.groups.tolist()
    group_ids = sorted(set(owners))
    per_group = _apportion(n, [1.0] * len(group_ids))
    quota = [0] * len(counts)
    for g, share in zip(group_ids, per_group):
        members = [i for i, o in enumerate(owners) if o == g]
        for i, q in zip(members, _apportion(share, [counts[i] for i in members])):
            quota[i] = q
    which = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(quota))
    which = which[torch.randperm(n, generator=generator)].to(meta.centroids.device)
    eps = torch.randn(n, meta.stds.shape[1], generator=generator).to(meta.centroids.device)
    offsets = torch.einsum("nr,nrd->nd", eps * meta.stds[which], meta.directions[which])
    targets = meta.centroids[which] + noise_scale * offsets
    if meta.nonnegative:
        targets = targets.clamp(min=0)
    return targets, which


# ---------------------------------------------------------------------------------------------
# synthesis


def matching_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i ||f_i - t_i||^2 / mean_i ||t_i||^2``: the squared L2 matching error, relative to the targets' size."""
    return ((features.float() - targets) ** 2).sum(1).mean() / (targets ** 2).sum(1).mean().clamp(min=1e-12)


def synthesize_batch(teacher, target: torch.Tensor, input_shape: tuple[int, int, int], *, iters: int, lr: float,
                     tv_weight: float, l2_weight: float, jitter: int, flip: bool,
                     bounds: tuple[torch.Tensor, torch.Tensor] | None, generator: torch.Generator | None = None,
                     init: torch.Tensor | None = None, autocast: Callable | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Optimise one image per row of ``target`` so that ``teacher.forward_features(image)`` matches it.

    ``iters`` Adam steps with a cosine-decayed ``lr``; starting images are ``init`` or N(0, 1) noise.
    Returns ``(images (B, C, H, W), last losses {"match", "tv", "loss"})``."""
    device = target.device
    x = init.clone().to(device) if init is not None else torch.randn((target.shape[0], *input_shape),
                                                                     generator=generator).to(device)
    if bounds is not None:
        clamp_to_bounds(x, *bounds)
    x.requires_grad_(True)
    optimizer = torch.optim.Adam([x], lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iters)
    for _ in range(iters):
        view = random_jitter(x, jitter, generator)
        if flip:
            view = random_flip(view, generator)
        with autocast() if autocast is not None else contextlib.nullcontext():
            features = teacher.forward_features(view)
        match = matching_loss(features, target)
        tv = total_variation(x)
        loss = match + tv_weight * tv + l2_weight * l2_prior(x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if bounds is not None:
            clamp_to_bounds(x.data, *bounds)
    return x.detach(), {"match": match.detach(), "tv": tv.detach(), "loss": loss.detach()}


def synthesize(teacher, targets: torch.Tensor, input_shape: tuple[int, int, int], *, iters: int, batch_size: int,
               **options) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`synthesize_batch` over every row of ``targets`` in batches of ``batch_size``.

    Returns ``(dreams (N, C, H, W), final matching loss per batch (B,))``."""
    n = targets.shape[0]
    dreams = torch.empty((n, *input_shape), device=targets.device)
    finals = []
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        dreams[lo:hi], losses = synthesize_batch(teacher, targets[lo:hi], input_shape, iters=iters, **options)
        finals.append(losses["match"])
    return dreams, torch.stack(finals)


# ---------------------------------------------------------------------------------------------
# config and presets

# The paper fixes only "10% of the training set" for the metadata and Hinton KD for the student;
# everything else is a harness choice, chosen on Fashion-MNIST LeNet-5 -> LeNet-5-half (see the
# module docstring) and kept for the other grey 32-px datasets.
PRESETS = {
    "mnist": dict(),  # the Config defaults
    # CIFAR-like: the kd method's CIFAR optimiser (RepDistiller setting) for the student, DeepInversion's
    # 2000 steps per synthesised batch is cut to 500 (unverified as a paper value: the paper only says Lucid).
    "cifar": dict(optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, batch_size=128, epochs=100,
                  milestones=[50, 75], synth_iters=500, synth_batch=256, synth_lr=0.05, clusters=10,
                  components=16),
}
PRESET_FOR_DATASET = {"mnist": "mnist", "fashion_mnist": "mnist", "mnist_5k": "mnist", "digits": "mnist",
                      "cifar10": "cifar", "cifar100": "cifar", "svhn": "cifar"}


@dataclass
class DreamConfig(TrainConfig):
    """Student KD fields come from TrainConfig (optimizer, lr, batch_size, epochs over the dream set, ...)."""

    # ---- metadata (paper: k-means + principal directions of penultimate activations on 10% of CIFAR-10)
    metadata_fraction: float = 0.1  # paper: 10% of the training set
    n_samples: int = 0  # > 0: exactly this many metadata images (overrides metadata_fraction)
    cluster_by: Literal["predicted", "label", "global"] = "predicted"  # "label" reads the m labels
    clusters: int = 4  # k per class ("global": in all); not given in the paper
    components: int = 8  # principal directions kept per cluster; not given in the paper
    kmeans_iters: int = 30  # Lloyd iterations after k-means++ seeding
    # ---- targets
    noise_scale: float = 1.0  # eps ~ N(0, noise_scale^2) along each direction, in units of its std
    # ---- synthesis
    n_images: int = 50000  # dreams at budget 1 (the CIFAR-10 training-set size); scaled by the budget
    synth_iters: int = 100  # Adam steps per dream batch (not budget-scaled)
    synth_batch: int = 500  # dreams optimised together
    synth_lr: float = 0.1  # Adam lr on pixels (normalised space), cosine-decayed to 0 over synth_iters
    tv_weight: float = 0.01  # total variation (mean |neighbour difference|)
    l2_weight: float = 1e-4  # mean x^2 (pull toward the mean colour)
    jitter: int = 2  # random roll of up to +-jitter px per step (DeepInversion: 2 px at 32 px)
    flip: Literal["auto", "on", "off"] = "auto"  # random horizontal flips; auto: if the dataset's augmentation flips
    # ---- student: Hinton KD on the dreams (TrainConfig: Adam 1e-3, batch 256, epochs over the dream set)
    lr: float = 1e-3
    batch_size: int = 256
    epochs: int = 20
    temperature: float = 4.0  # Hinton T; not given in the paper (the kd method's T)
    kd_augment: bool = True  # the synthesis jitter/flip on KD batches too
    # ---- engineering
    log_every: int = 50  # training-curve points (each one syncs with the device)
    samples: int = 80  # dreams saved to samples.png (0: none)

    def validate(self) -> None:
        super().validate()
        if not 0.0 < self.metadata_fraction <= 1.0:
            raise ConfigError(f"metadata_fraction must be in (0, 1], got {self.metadata_fraction!r}")
        for name in ("clusters", "n_images", "synth_iters", "synth_batch", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("n_samples", "components", "kmeans_iters", "noise_scale", "tv_weight", "l2_weight", "jitter",
                     "samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if self.synth_lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"synth_lr and temperature must be positive, got {self.synth_lr!r}, {self.temperature!r}")


@register("dream")
class DreamDistillation(Method):
    """Dream Distillation (Bhardwaj et al. 2019): KD on images dreamt from activation-cluster metadata."""

    data_access = DataAccess.FEW
    teacher_access = TeacherAccess.GRADIENTS
    Config = DreamConfig
    presets = PRESETS
    preset_for_dataset = PRESET_FOR_DATASET

    def reads_labels(self) -> bool:
        """Only ``cluster_by="label"`` reads the labels of the metadata images."""
        return self.config.cluster_by == "label"

    def real_samples_limit(self, info) -> int:
        """m: ``n_samples`` if set, else ``metadata_fraction`` of the training split (at least 1)."""
        cfg = self.config
        return cfg.n_samples if cfg.n_samples > 0 else max(1, round(cfg.metadata_fraction * info.train_size))

    def metadata(self, teacher, ctx) -> ActivationMetadata:
        """The one real-data step: m images (labels only with ``cluster_by='label'``) -> cluster metadata."""
        cfg = self.config
        m = self.real_samples_limit(ctx.info)
        images, labels = ctx.few_samples(m, labels=cfg.cluster_by == "label")
        features, predicted = [], []
        with torch.no_grad():
            for start in range(0, m, 1024):
                with ctx.autocast():
                    f, logits = teacher.features_and_logits(ctx.prepare(images[start:start + 1024]))
                features.append(f.float())
                predicted.append(logits.argmax(1))
        groups = {"predicted": torch.cat(predicted), "label": labels, "global": None}[cfg.cluster_by]
        return build_metadata(torch.cat(features), groups, cfg.clusters, cfg.components,
                              kmeans_iters=cfg.kmeans_iters, generator=ctx.generator)

    def distill(self, teacher, student, ctx):
        cfg, info, device = self.config, ctx.info, ctx.device
        flip = cfg.flip == "on" or (cfg.flip == "auto" and "flip" in info.augment)

        meta = self.metadata(teacher, ctx)
        n = ctx.scaled(cfg.n_images)
        targets, which = sample_targets(meta, n, cfg.noise_scale, ctx.generator)

        dreams = torch.empty((n, *ctx.input_shape), device=device)
        ctx.track(dreams=dreams)
        bounds = pixel_bounds(info.mean, info.std, device)
        for b in ctx.steps(math.ceil(n / cfg.synth_batch), "dream synthesis", student=False, log_every=1):
            lo, hi = (b - 1) * cfg.synth_batch, min(n, b * cfg.synth_batch)  # one step: one batch of dreams
            dreams[lo:hi], losses = synthesize_batch(
                teacher, targets[lo:hi], ctx.input_shape, iters=cfg.synth_iters, lr=cfg.synth_lr,
                tv_weight=cfg.tv_weight, l2_weight=cfg.l2_weight, jitter=cfg.jitter, flip=flip, bounds=bounds,
                generator=ctx.generator, autocast=ctx.autocast)
            ctx.log(b, **losses)
        if cfg.samples:
            self._save_samples(dreams, meta.groups[which], ctx)

        per_epoch = math.ceil(n / cfg.batch_size)
        nominal = Schedule(total=cfg.epochs * per_epoch, iters_per_epoch=per_epoch,
                           milestones=tuple(m * per_epoch for m in cfg.milestones))
        plan = nominal.capped(ctx.plan_steps(nominal.total, queries_per_step=min(cfg.batch_size, n)))
        stream = ctx.batches(dreams, None, cfg.batch_size, prepare=False, drop_last=False)

        def step(it: int) -> dict[str, torch.Tensor]:
            x = next(stream)[0]
            if cfg.kd_augment:
                x = random_jitter(x, cfg.jitter, ctx.generator)
                if flip:
                    x = random_flip(x, ctx.generator)
            with ctx.autocast():
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(student(x).float(), t_logits.float(), cfg.temperature)
            return {"loss": loss}

        student.train()
        train(student.parameters(), step, cfg, plan, ctx=ctx, name="kd on dreams", log_every=cfg.log_every)
        return student

    def _save_samples(self, dreams: torch.Tensor, classes: torch.Tensor, ctx) -> None:
        """Up to ``samples`` dreams, an equal share per class (the cluster's), to ``out_dir/samples.png``."""
        groups = classes.cpu()
        ids = torch.unique(groups)
        per = max(1, self.config.samples // len(ids))
        picks = torch.cat([torch.nonzero(groups == g).flatten()[:per] for g in ids])[: self.config.samples]
        label = "predicted class" if self.config.cluster_by == "predicted" else self.config.cluster_by
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        save_image_grid(dreams[picks.to(dreams.device)], ctx.out_dir / "samples.png", ctx.info.mean, ctx.info.std,
                        titles=[f"c{int(groups[i])}" for i in picks], ncol=min(10, per) if len(ids) > 1 else 10,
                        title=f"Dream Distillation: {dreams.shape[0]} dreams ({ctx.info.name}; cluster's {label})")
