"""Scripts beside the project: dataset preparation, label conversion, the OpenCV pipelines benchmark.py compares."""
