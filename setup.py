"""Package list only; everything else is in pyproject.toml.

``ep`` and its subpackages are found under ep/; ``ep.cuda_src`` is the top-level cuda_src/ directory,
mapped by ``package-dir`` in pyproject.toml so the kernel sources install as ep/cuda_src/.
"""
from setuptools import find_packages, setup

setup(packages=find_packages(include=["ep", "ep.*"]) + ["ep.cuda_src", "ep.cuda_src.common"])
