"""setuptools entry: the top-level ``kernels/`` folder installs as ``pyfused_po.kernels``."""
from setuptools import find_packages, setup

packages = find_packages(include=["pyfused_po", "pyfused_po.*"]) + ["pyfused_po.kernels"]

setup(
    packages=packages,
    package_dir={"pyfused_po.kernels": "kernels"},
)
