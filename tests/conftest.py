import sys
from pathlib import Path

import torch

# Tests import the top-level modules (model, data, train, evaluate, benchmark) from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Two cores: keep intra-op threads fixed so timings and results do not depend on the runner.
torch.set_num_threads(2)
