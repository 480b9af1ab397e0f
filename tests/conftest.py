import sys
from pathlib import Path

# Test helpers (tiny_models, ...) live beside the tests.
sys.path.insert(0, str(Path(__file__).parent))

import torch

# Tiny test models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP
# spin-waiting made a 20-step tiny Trainer run take 29 s instead of 1.5 s.
torch.set_num_threads(1)
