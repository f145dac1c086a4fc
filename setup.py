"""Install the maestro package, its `maestro` console script, and the `kernels` and `shards` packages.

Version ranges here say what the code supports (torch 2.11 on GPU machines, 2.13 on CPU CI);
`constraints.txt` pins the exact set that the Makefile installs and CI tests.
"""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="maestro",
    version="0.1.0",
    description="Distributed pretraining of MAESTRO, the multimodal multitemporal Earth-observation MAE",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(
        include=["maestro", "maestro.*", "kernels", "kernels.*", "shards", "shards.*", "cluster", "cluster.*"]
    ),
    include_package_data=True,
    install_requires=[
        "torch>=2.11,<2.14",
        "deepspeed>=0.19.8,<0.20",
        "webdataset>=1.0.2,<1.1",
        "ray[train]>=2.60,<2.61",
        "s3fs[boto3]>=2026.9.0",
        "einops>=0.8",
        "tensorboard>=2.21",
        "triton>=3.5; platform_system=='Linux'",
        "pyyaml>=6",
        "numpy>=1.26",
        "h5py>=3.10",
        "tifffile>=2024.1",
        "safetensors>=0.4",
        "tqdm>=4.66",
    ],
    extras_require={
        "cuda": ["flash-attn>=2.6"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "moto[server]>=5.2.5", "ruff>=0.8"],
    },
    entry_points={"console_scripts": ["maestro = maestro.cli:main"]},
)
