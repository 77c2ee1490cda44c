"""Installed as ``pccl.algorithms``: collective schedules, executors and reduce kernels."""
