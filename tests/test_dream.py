"""Dream Distillation (methods/dream.py): metadata access, k-means/PCA, targets, synthesis, a short run."""
import json

import pytest
import torch

from bench.transforms import to_float
from bench.method import CountingTeacher, DataAccess, DistillContext, get_method
from bench.metrics import evaluate_accuracy
from bench.models import create_model
from methods.dream import (ActivationMetadata, build_metadata, kmeans, matching_loss, principal_directions,
                           sample_targets, synthesize)
from tests.helpers import run_distill
from methods.image_priors import pixel_bounds

CPU = torch.device("cpu")


class RecordingContext(DistillContext):
    """A real context that also records every ``few_samples`` request."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.requests: list[tuple[int, bool]] = []

    def few_samples(self, n, *, labels=False):
        self.requests.append((n, labels))
        return super().few_samples(n, labels=labels)


def _dream(overrides):
    cls = get_method("dream")
    return cls(cls.resolve_config("digits", overrides=overrides)[1])


def _context(method, data, tmp_path, budget=1.0, cls=DistillContext):
    m = method.real_samples_limit(data.info)
    return cls(info=data.info, data_access=type(method).data_access, device=CPU, budget=budget, seed=0,
               out_dir=tmp_path, few=(data.train_x[:m], data.train_y[:m] if method.reads_labels() else None))


# ---------------------------------------------------------------------------------------------
# metadata: the only real-data touch


def test_metadata_touches_exactly_m_samples_and_no_labels(digits, teacher, tmp_path):
    method = _dream({"clusters": 2, "components": 4, "kmeans_iters": 3})
    m = method.real_samples_limit(digits.info)
    assert get_method("dream").data_access is DataAccess.FEW
    assert m == round(0.1 * digits.info.train_size) == 115  # the paper's 10% of the training split (1150 images)
    ctx = _context(method, digits, tmp_path, cls=RecordingContext)
    counted = CountingTeacher(teacher.model)
    meta = method.metadata(counted, ctx)
    assert ctx.requests == [(m, False)]  # cluster_by="predicted": the labels are never asked for
    assert ctx.real_samples_used == m
    assert counted.queries == m  # each metadata image through the teacher once
    assert int(meta.counts.sum()) == m
    assert meta.centroids.shape[1] == 120 and meta.directions.shape[1:] == (4, 120)  # LeNet-5's conv3 feature
    assert meta.nonnegative  # post-ReLU features
    # the groups are the teacher's predicted classes on those m images
    images, _ = ctx.few_samples(m)
    with torch.no_grad():
        predicted = teacher.model(to_float(images, digits.info)).argmax(1)
    assert set(meta.groups.tolist()) == set(predicted.tolist())


def test_metadata_reads_labels_only_when_clustering_by_label_and_honours_n_samples(digits, teacher, tmp_path):
    method = _dream({"cluster_by": "label", "n_samples": 50, "clusters": 1, "components": 2,
                     "kmeans_iters": 1})
    assert method.real_samples_limit(digits.info) == 50
    ctx = _context(method, digits, tmp_path, cls=RecordingContext)
    meta = method.metadata(CountingTeacher(teacher.model), ctx)
    assert ctx.requests == [(50, True)] and ctx.real_samples_used == 50
    _, labels = ctx.few_samples(50, labels=True)
    assert sorted(meta.groups.tolist()) == sorted(set(labels.tolist()))  # one cluster per class present
    assert meta.counts.tolist() == torch.bincount(labels)[meta.groups].tolist()


# ---------------------------------------------------------------------------------------------
# k-means and principal directions on synthetic data


def _blobs(generator):
    centres = torch.tensor([[0.0, 0.0, 0.0, 0.0], [10.0, 0.0, 0.0, 0.0], [0.0, -10.0, 5.0, 0.0]])
    labels = torch.arange(3).repeat_interleave(40)
    x = centres[labels] + 0.3 * torch.randn(120, 4, generator=generator)
    return x, labels, centres


def test_kmeans_recovers_well_separated_clusters():
    generator = torch.Generator().manual_seed(0)
    x, labels, centres = _blobs(generator)
    centroids, assignment = kmeans(x, 3, iters=20, generator=generator)
    assert centroids.shape == (3, 4) and assignment.shape == (120,)
    # each blob is exactly one cluster, and that cluster's centroid is the blob's mean
    for blob in range(3):
        found = assignment[labels == blob].unique()
        assert found.numel() == 1
        assert torch.allclose(centroids[found[0]], x[labels == blob].mean(0), atol=1e-5)
        assert torch.allclose(centroids[found[0]], centres[blob], atol=0.2)
    assert assignment.unique().numel() == 3
    # k larger than the number of points: one cluster per point
    few, _ = kmeans(x[:2], 5, generator=generator)
    assert few.shape == (2, 4)
    with pytest.raises(ValueError, match=r"non-empty \(N, D\) matrix, got shape \(0, 4\)"):
        kmeans(x[:0], 2)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        kmeans(x, 0)


def test_principal_directions_find_the_spread_and_its_size():
    generator = torch.Generator().manual_seed(1)
    u = torch.tensor([3.0, 4.0, 0.0, 0.0, 0.0]) / 5  # main direction, std 3
    v = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.0]) / 2 ** 0.5  # second direction, std 0.5
    a, b = torch.randn(2000, 1, generator=generator), torch.randn(2000, 1, generator=generator)
    x = 7.0 + 3.0 * a * u + 0.5 * b * v + 0.01 * torch.randn(2000, 5, generator=generator)
    directions, stds = principal_directions(x, 3)
    assert directions.shape == (3, 5) and stds.shape == (3,)
    assert abs(float(directions[0] @ u)) > 0.999 and abs(float(directions[1] @ v)) > 0.999
    assert stds[0].item() == pytest.approx(3.0, rel=0.08) and stds[1].item() == pytest.approx(0.5, rel=0.08)
    assert stds[2].item() < 0.02
    assert torch.allclose(directions @ directions.T, torch.eye(3), atol=1e-5)  # orthonormal rows
    # fewer samples than directions: zero padding; one sample: all zeros
    d3, s3 = principal_directions(x[:3], 4)
    assert (s3[2:] == 0).all() and (d3[2:] == 0).all() and (s3[:2] > 0).all()
    d1, s1 = principal_directions(x[:1], 2)
    assert (d1 == 0).all() and (s1 == 0).all()


def test_build_metadata_per_group():
    generator = torch.Generator().manual_seed(2)
    x, labels, _ = _blobs(generator)
    groups = torch.tensor([0] * 80 + [1] * 40)  # blobs 0 and 1 in group 0, blob 2 in group 1
    meta = build_metadata(x, groups, k=2, r=2, kmeans_iters=10, generator=generator)
    assert sorted(meta.groups.tolist()) == [0, 0, 1, 1]
    assert int(meta.counts.sum()) == 120
    assert int(meta.counts[meta.groups == 0].sum()) == 80 and int(meta.counts[meta.groups == 1].sum()) == 40
    assert not meta.nonnegative  # the blobs have negative coordinates
    assert meta.directions.shape == (4, 2, 4) and meta.stds.shape == (4, 2)


# ---------------------------------------------------------------------------------------------
# targets


def _toy_metadata(nonnegative=False):
    d = 6
    centroids = torch.tensor([[1.0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0]]) * 5
    directions = torch.zeros(3, 2, d)
    directions[:, 0, 3] = 1.0
    directions[:, 1, 4] = 1.0
    stds = torch.tensor([[2.0, 1.0], [2.0, 1.0], [2.0, 0.0]])
    return ActivationMetadata(centroids, directions, stds, counts=torch.tensor([30, 10, 20]),
                              groups=torch.tensor([0, 0, 1]), nonnegative=nonnegative)


def test_sample_targets_counts_even_over_groups_proportional_within():
    meta = _toy_metadata()
    generator = torch.Generator().manual_seed(0)
    targets, which = sample_targets(meta, 80, 1.0, generator)
    assert targets.shape == (80, 6) and which.shape == (80,)
    # 40 per group; group 0's 40 split 30:10 like its clusters' sizes
    assert torch.bincount(which, minlength=3).tolist() == [30, 10, 40]
    assert which[:40].unique().numel() > 1  # shuffled, not in cluster order
    # odd totals still sum to n
    _, which7 = sample_targets(meta, 7, 1.0, generator)
    counts7 = torch.bincount(which7, minlength=3).tolist()
    assert sum(counts7) == 7 and counts7[2] in (3, 4) and counts7[0] > counts7[1]
    # noise lies only along each cluster's principal directions (coordinates 3 and 4), scaled by its std
    offsets = targets - meta.centroids[which]
    assert torch.equal(offsets[:, :3], torch.zeros(80, 3)) and torch.equal(offsets[:, 5], torch.zeros(80))
    assert offsets[:, 3].std().item() == pytest.approx(2.0, rel=0.35)
    assert (offsets[which == 2, 4] == 0).all()  # zero std along that direction: no noise
    # noise_scale 0: the centroids themselves
    exact, which0 = sample_targets(meta, 12, 0.0, generator)
    assert torch.equal(exact, meta.centroids[which0])


def test_sample_targets_clip_at_zero_for_post_relu_features():
    targets, _ = sample_targets(_toy_metadata(nonnegative=True), 200, 3.0, torch.Generator().manual_seed(0))
    assert (targets >= 0).all() and (targets[:, 3] == 0).any()


# ---------------------------------------------------------------------------------------------
# synthesis


def test_synthesize_lowers_the_matching_loss(digits, teacher):
    with torch.no_grad():
        targets = teacher.model.forward_features(to_float(digits.train_x[:12], digits.info))
        noise = torch.randn((12, 1, 32, 32), generator=torch.Generator().manual_seed(1))
        start = matching_loss(teacher.model.forward_features(noise), targets)  # where synthesis starts from
    counted = CountingTeacher(teacher.model)
    low, high = pixel_bounds(digits.info.mean, digits.info.std)
    dreams, finals = synthesize(counted, targets, (1, 32, 32), iters=25, batch_size=8, lr=0.1, tv_weight=0.01,
                                l2_weight=1e-4, jitter=2, flip=False, bounds=(low, high),
                                generator=torch.Generator().manual_seed(0))
    assert dreams.shape == (12, 1, 32, 32) and finals.shape == (2,)  # batches of 8 and 4
    assert counted.queries == 25 * 8 + 25 * 4
    assert (finals < 0.5 * start).all(), (start, finals)
    assert (dreams >= low - 1e-6).all() and (dreams <= high + 1e-6).all()  # valid pixels


# ---------------------------------------------------------------------------------------------
# end to end


@pytest.mark.slow
def test_short_dream_run_on_digits_improves_the_student(digits, teacher, tmp_path):
    # 128 dreams (one synthesis batch of 30 steps), then 12 KD epochs of 8 batches of 16: seconds on a CPU.
    # (Fewer Lloyd iterations than the default 30: each is a few tiny ops that crawl on a loaded 2-core box.)
    method = _dream({"n_images": 128, "synth_iters": 30, "synth_batch": 128, "batch_size": 16, "epochs": 12,
                     "kmeans_iters": 10, "samples": 20, "log_every": 10})
    torch.manual_seed(0)
    student = create_model("lenet5_half", 10, 1, 32)
    before = evaluate_accuracy(student, digits.test_x, digits.test_y, lambda xb: to_float(xb, digits.info))
    outcome = run_distill(method, teacher.model, student, digits, tmp_path)
    after = evaluate_accuracy(outcome.student, digits.test_x, digits.test_y, lambda xb: to_float(xb, digits.info))
    assert after >= before + 30, (before, after)
    m = method.real_samples_limit(digits.info)
    assert outcome.real_samples_used == m
    # metadata (m) + synthesis (128 dreams x 30 steps) + KD (12 epochs x 8 batches of 16)
    assert outcome.teacher_queries == m + 128 * 30 + 12 * 128
    curve = [json.loads(line) for line in (tmp_path / "curve.jsonl").read_text().splitlines()]
    assert [row["step"] for row in curve if "match" in row] == [1]  # one synthesis batch
    assert (tmp_path / "samples.png").stat().st_size > 0
