"""Jobs beside the project, run from the repository root. They import the project; nothing imports them.

- prepare_datasets.py: Cityscapes train ids and the VOC aug set from the downloads; any dataset's decoded copy
- convert_colour_labels.py: colour-coded label PNGs to class-index PNGs for --dataset folder
- plot_log.py: a run's losses, learning rate and mIoU drawn from its log
- export.py: a checkpoint as one torch.export file for deployment
- compare_context_blocks.py: the paper's comparison of no block, a Non-local block and a GC block
- opencv_pipelines.py: data.py's training and test pipelines written with OpenCV, as the original ran them
- gpu_check/, the project's own instrument: check_gpu.sh (a GPU machine checked in one go), targets.py
  (benchmark.py's figures judged against the targets), cudnn_fused.py (an inference candidate),
  synthetic_cityscapes.py, loader_speed.py and run_time.py (a stand-in dataset, the loader's samples/s,
  a run's projected time)
"""
