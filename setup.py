import re
from pathlib import Path

from setuptools import setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "promptkd" / "__init__.py").read_text()).group(1)

setup(
    name="promptkd",
    version=version,
    description="Fused knowledge-distillation losses for LLMs that never materialize logits, and PromptKD",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in kernels/ and install as promptkd.kernels.
    packages=["promptkd", "promptkd.kd", "promptkd.attention", "promptkd.hf", "promptkd.train", "promptkd.demo",
              "promptkd.kernels"],
    package_dir={"promptkd": "promptkd", "promptkd.kernels": "kernels"},
    # Any torch >= 2.5 (SDPA with enable_gqa) works: a CPU build (pip install torch==2.13.0) or the CUDA
    # build already on a GPU machine satisfy it, so installing promptkd never replaces or pulls a torch build.
    # The trainer adds tokenizers (the demo's BPE), PyYAML (configs), tqdm, rouge-score (evaluation) and
    # matplotlib (plots); TensorBoard logging switches on when the optional extra is installed.
    install_requires=["torch>=2.5", "triton>=3.6; platform_system == 'Linux'", "numpy", "transformers>=5.0",
                      "safetensors", "tokenizers", "pyyaml", "tqdm", "rouge-score", "matplotlib"],
    # The benchmarks need nothing beyond the package and the test extra (PEFT: the prompt-tuning baseline);
    # liger-kernel, if installed, adds a GPU baseline.
    extras_require={"test": ["pytest>=8", "pytest-xdist", "ruff", "peft>=0.17"], "tensorboard": ["tensorboard"]},
    package_data={"promptkd.train": ["configs/*.yaml"]},
    entry_points={"console_scripts": ["promptkd = promptkd.cli:main"]},
    license="Apache-2.0",
)
