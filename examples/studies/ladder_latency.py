"""Latency of the grey 32-px student ladder on every latency backend, one thread: is it monotone in MACs?

Backs the README's ladder table and the quick grid's ladder (bench/grids/quick.yaml). Times each architecture as
the harness's latency pass does (bench.latency.measure_architecture: batch 1 median and IQR over 1 s of runs, batch
64 median over 0.5 s, after a warm-up), untrained weights (the dense arithmetic timed does not depend on them):

    taskset -c 1 env OMP_NUM_THREADS=1 python3 examples/studies/ladder_latency.py [--models a,b,...]
"""
import argparse

import torch

from bench.latency import BACKENDS, available_backends, measure_architecture
from bench.models import create_model, model_card

LADDER = ("mlp_30", "lenet5_quarter", "mlp_100", "lenet5_half", "lenet5", "resnet8_w4", "mlp_800", "mlp_1200",
          "lenet5_triple", "resnet8_w8", "resnet14_w8", "resnet8", "resnet20")

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--models", default=",".join(LADDER))
parser.add_argument("--threads", type=int, default=1)
args = parser.parse_args()
torch.set_num_threads(args.threads)
backends = available_backends()
print(f"backends: {', '.join(b.name for b in backends)} (missing: "
      f"{', '.join(f'{n}: {b.missing()}' for n, b in BACKENDS.items() if b.missing()) or 'none'}); "
      f"{args.threads} thread(s); ms per batch")
columns = [c for b in backends for c in b.columns]
print(f"{'model':<16} {'params':>10} {'MACs':>12}  " + "  ".join(f"{c:>18}" for c in columns))
rows = []
for name in args.models.split(","):
    card = model_card(name)
    figures = measure_architecture(create_model(name, 10, 1, 32), (1, 32, 32), args.threads, torch.device("cpu"),
                                   backends=backends)
    rows.append((card, figures))
    print(f"{name:<16} {card.params:>10,} {card.macs:>12,}  " + "  ".join(f"{figures[c]:>18.4f}" for c in columns),
          flush=True)
for backend in backends:
    by_macs = sorted(rows, key=lambda r: r[0].macs)
    breaks = [f"{b[0].name} ({b[0].macs:,} MACs) {b[1][backend.median]:.4f} ms < {a[0].name} ({a[0].macs:,} MACs) "
              f"{a[1][backend.median]:.4f} ms" for a, b in zip(by_macs, by_macs[1:]) if b[1][backend.median] < a[1][backend.median]]
    print(f"{backend.name}: batch-1 latency {'monotone in MACs' if not breaks else 'NOT monotone in MACs: ' + '; '.join(breaks)}")
