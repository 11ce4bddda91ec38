"""Unpaired image translation as a second task kind: CycleGAN generators compressed by co-evolution.

"Co-Evolutionary Compression for Unpaired Image Translation", Shu, Wang, Jia, Han, Chen, Xu, Tian, Xu,
ICCV 2019 (arXiv 1907.10804); official code huawei-noah/Efficient-Computing, Pruning/GAN-Pruning. See
docs/translation.md for the task, the scores and every deviation from the paper.
"""
