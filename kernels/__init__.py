"""Compute kernels, generic over the array module (numpy or cupy).

Installed as ``mtool.kernels``: a different PyPI project owns the top-level name ``kernels``.
"""
