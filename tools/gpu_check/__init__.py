"""The project's own instrument, for those who work on the project rather than with it.

- check_gpu.sh: a GPU machine checked in one go: versions, tests/test_cuda.py, the targets, the
  loader and a short train.py run with its projected wall time
- targets.py: benchmark.py's run, then its figures judged against the project's targets
- cudnn_fused.py: an inference candidate, cuDNN's fused conv + bias + ReLU
- synthetic_cityscapes.py: a stand-in for Cityscapes at its real layout and size, for timing
- loader_speed.py: train.py's loader in samples per second for several worker counts
- run_time.py: a whole run's wall time projected from a short run's log
"""
