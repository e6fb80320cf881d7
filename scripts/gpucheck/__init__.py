"""The sections of scripts/gpu_check.py, one module per kind of question."""
