"""Scripts beside the project: dataset preparation, label conversion, the OpenCV pipelines of benchmark.py."""
