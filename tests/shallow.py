"""The tests' small GCNets, and a way to run a script of the project (the first argument, then its own)
with them, for the tests that start train.py in processes of their own:
`python tests/shallow.py train.py --iters 2 ...`."""

import runpy
import sys
from pathlib import Path

# One bottleneck per stage (two in R-101's layer3): the same code with a fifth of the layers.
SHALLOW = {50: (1, 1, 1, 1), 101: (1, 1, 2, 1)}
# The recipe's heads (512 and 256 channels) an eighth as wide: at full width they were three quarters
# of a shallow model's computation. The backbone's 2048 and 1024 channels that feed them stay, and so
# do the tests' own small heads.
HEAD_NARROWING = 8


def make_small(model):
    """Make every GCNet that `model` builds from now on shallow and narrow-headed. Returns what undoes it."""
    real_blocks, real_init = dict(model.STAGE_BLOCKS), model.FCNHead.__init__

    def narrow_init(head, num_classes, in_channels, channels, *args, **kwargs):
        channels = channels // HEAD_NARROWING if channels >= 256 else channels
        real_init(head, num_classes, in_channels, channels, *args, **kwargs)

    model.STAGE_BLOCKS.update(SHALLOW)
    model.FCNHead.__init__ = narrow_init
    return real_blocks, real_init


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import model

    make_small(model)
    runpy.run_path(sys.argv.pop(1), run_name="__main__")  # sys.argv[0] becomes the script's path
