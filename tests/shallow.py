"""Run a script of the project (the first argument, then its own) with the tests' shallow ResNets, for the
tests that start train.py in processes of their own: `python tests/shallow.py train.py --iters 2 ...`."""

import runpy
import sys
from pathlib import Path

# One bottleneck per stage (two in R-101's layer3): the same code with a fifth of the layers.
SHALLOW = {50: (1, 1, 1, 1), 101: (1, 1, 2, 1)}

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import model

    model.STAGE_BLOCKS.update(SHALLOW)
    runpy.run_path(sys.argv.pop(1), run_name="__main__")  # sys.argv[0] becomes the script's path
