"""Test-session settings: one intra-op thread. The suite's models are small, and on a 2-core machine two
OpenMP threads ran small training loops 5-12x slower than one (see fxslim/demo.py)."""

import torch

torch.set_num_threads(1)
