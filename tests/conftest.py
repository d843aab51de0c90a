import sys
from pathlib import Path

import torch
import torch.utils.serialization

# Tests import the top-level modules (model, data, train, evaluate, benchmark) from the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# Two cores: keep intra-op threads fixed so timings and results do not depend on the runner.
torch.set_num_threads(2)
# torch.load never checks the CRC-32 of a checkpoint's zip records (a flipped byte loads silently), and
# computing it is most of torch.save's time on these 380 MB files: the tests skip it. What our code
# writes and reads is otherwise the same.
torch.utils.serialization.config.save.compute_crc32 = False
