"""The project's own instrument: benchmark.py's figures against the project's targets, and the GPU
check. tools/__init__.py lists its files; nothing of the project imports them."""
