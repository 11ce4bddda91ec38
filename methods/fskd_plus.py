"""FSKD with the harness's extensions (``fskd_plus``): Q's on hidden Linear layers and the classifier, and a ridge.

Not the published method (that is ``fskd``, methods/fskd.py): the same closed-form 1x1 block fitting
and exact merge (Li et al., CVPR 2020, arXiv 1812.01839), with three changes of the harness's:

- ``fit_linear``: hidden Linear layers (LeNet-5's fc1) are blocks too, fitted as 1x1 blocks on N rows;
- ``fit_classifier``: the classifier's output (the logits, never pruned) gets a K x K Q fitted against
  the teacher's logits and merged into the classifier;
- ``ridge``: a regularising relative ridge, since a block with few rows per unknown (LeNet-5's conv3 and
  fc1 see one row per sample) overfits the n samples in plain least squares.

The defaults below were chosen on the *validation* split (examples/studies/fskd_samples.yaml; see the
README's "defaults and the studies behind them").
"""
from __future__ import annotations

from dataclasses import dataclass

from bench.method import register
from methods.fskd import FSKD, FSKDConfig


@dataclass
class FSKDPlusConfig(FSKDConfig):
    ridge: float = 1e-2  # relative ridge (harness choice, validation study examples/studies/fskd_samples.yaml)
    fit_linear: bool = True  # hidden Linear layers as 1x1 blocks (harness extension)
    fit_classifier: bool = True  # a K x K Q on the logits, merged into the classifier (harness extension)


@register("fskd_plus")
class FSKDPlus(FSKD):
    """FSKD + the harness's extensions: Q's on hidden Linear layers and on the classifier, a regularising ridge."""

    Config = FSKDPlusConfig
