"""Teacher recipe study: validation accuracy of the Fashion-MNIST LeNet-5 teachers against training epochs.

Backs the epochs of bench/teachers.py's Fashion-MNIST/MNIST recipe (chosen on the validation split):

    OMP_NUM_THREADS=1 python3 examples/studies/teacher_epochs.py [--cache-dir DIR]
"""
import argparse
import time

import torch

from bench.data import task_data
from bench.teachers import get_teacher, recipe_for

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--cache-dir", default=None, help="teacher cache (default: the harness's)")
parser.add_argument("--epochs", default="5,10,15,20")
args = parser.parse_args()
torch.set_num_threads(1)
data = task_data("fashion_mnist")
for arch in ("lenet5", "lenet5_bn"):
    for epochs in (int(e) for e in args.epochs.split(",")):
        started = time.time()
        teacher = get_teacher("fashion_mnist", arch, data, torch.device("cpu"), seed=0,
                              recipe=recipe_for("fashion_mnist", {"epochs": epochs}), cache_dir=args.cache_dir)
        print(f"{arch} {epochs:>2} epochs: val {teacher.meta.get('val_accuracy', float('nan')):.2f}% "
              f"test {teacher.accuracy:.2f}% ({time.time() - started:.0f} s)", flush=True)
