from pathlib import Path

from setuptools import find_packages, setup

_version = {}
exec(Path("flexlora/version.py").read_text(), _version)

setup(
    name="flexlora",
    version=_version["__version__"],
    description="Dynamic-rank LoRA fine-tuning (FlexLoRA) over preallocated max-rank buffers, "
    "with fused Triton kernels and entropy-guided rank allocation.",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["flexlora", "flexlora.*"]),
    install_requires=[
        # CPU machines pin torch==2.13.0 in the install command (README); GPU users bring their own.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        # oldest tested: 4.57.6 (flexlora loads models with dtype=, new in 4.56)
        "transformers>=4.57",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
        "matplotlib",
    ],
    extras_require={
        # `flexlora train --method lora|adalora` (PEFT baselines through the same loop)
        # export_peft's rank_pattern keys need PEFT's matching since 0.15 (docs/adapters.md)
        "peft": ["peft>=0.15"],
        # `flexlora train --model smollm2` reads a GGUF file (fetched into the cache if missing)
        "llm": ["gguf>=0.10", "accelerate>=0.30"],
        "test": [
            "pytest>=7",
            "pytest-benchmark>=4",
            "hypothesis>=6",
            "peft>=0.15",
            "accelerate>=0.30",
        ],
    },
    entry_points={"console_scripts": ["flexlora=flexlora.cli:main"]},
)
