import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "promptkd" / "__init__.py").read_text()).group(1)



class NativeKernels(build_ext):
    """Builds the native CPU kernels (CMakeLists.txt) into promptkd/kernels/cpu/ (for an editable install, the
    source tree's promptkd/kernels/cpu/: kernels/cpu/ through the link). A failed build (no compiler, no cmake)
    warns and leaves the install working: promptkd then uses torch ops, and says so once at run time
    (``promptkd info``)."""

    def run(self):
        for ext in self.extensions:
            out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
            try:
                self._cmake(out_dir)
            except (OSError, subprocess.CalledProcessError) as e:
                print(f"promptkd: WARNING: the native CPU kernels were not built ({e}); promptkd will use "
                      "torch ops instead (slower). See `promptkd info`.", file=sys.stderr)

    def _cmake(self, out_dir: Path):
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("no cmake on PATH")
        build_dir = Path(self.build_temp).resolve() / "native"
        build_dir.mkdir(parents=True, exist_ok=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([cmake, "-S", str(here.resolve()), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                               f"-DPROMPTKD_NATIVE_DIR={out_dir}"])
        subprocess.check_call([cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)])


setup(
    name="promptkd",
    version=version,
    description="Fused knowledge-distillation losses for LLMs that never materialize logits, and PromptKD",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level kernels/ folder, which promptkd/kernels links to (a committed
    # symlink): promptkd.kernels is that folder, in a wheel, an editable install and the bare checkout alike.
    # kernels/ has no __init__.py on purpose: from the checkout root, where Python puts the working directory
    # first on sys.path, a regular package there would shadow the `kernels` distribution transformers imports;
    # a directory without one is at most a namespace portion, which loses to any installed regular package.
    # promptkd.kernels is therefore a namespace package (DESIGN.md, "How kernels/ is packaged").
    packages=[*find_packages(include=["promptkd", "promptkd.*"]), "promptkd.kernels"],
    # CMakeLists.txt builds kernels/cpu/*.cpp; the sources ship in the sdist (MANIFEST.in)
    # Any torch >= 2.5 (SDPA with enable_gqa) works: a CPU build (pip install torch==2.13.0) or the CUDA
    # build already on a GPU machine satisfy it, so installing promptkd never replaces or pulls a torch build.
    # The trainer adds tokenizers (the demo's BPE), PyYAML (configs), tqdm, rouge-score (evaluation) and
    # matplotlib (plots), requests (a served teacher's HTTP); TensorBoard logging switches on with the extra.
    install_requires=["torch>=2.5", "triton>=3.6; platform_system == 'Linux'", "numpy", "transformers>=5.0",
                      "safetensors", "tokenizers", "pyyaml", "tqdm", "rouge-score", "matplotlib", "requests"],
    # The benchmarks need nothing beyond the package and the test extra (PEFT: the prompt-tuning baseline);
    # liger-kernel, if installed, adds a GPU baseline.
    # gguf: models from .gguf files (transformers' GGUF loader needs gguf >= 0.10 and accelerate). accelerate
    # asks for torch>=2.0, which the torch promptkd requires already satisfies: it pulls no other torch build.
    # The test extra has both (accelerate through PEFT) so that CI runs the GGUF tests, and the documentation
    # site's builder (mkdocs-material, mkdocstrings) so that CI builds the site with --strict.
    extras_require={"test": ["pytest>=8", "pytest-xdist", "pytest-benchmark>=4", "ruff", "peft>=0.17", "gguf>=0.10.0",
                             "mkdocs>=1.6", "mkdocs-material>=9.5", "mkdocstrings[python]>=0.26"],
                    "gguf": ["gguf>=0.10.0", "accelerate"],
                    # promptkd.integrations.trl overrides an internal method of TRL's DistillationTrainer: pinned.
                    "trl": ["trl>=1.16.0,<1.17.0"],
                    "tensorboard": ["tensorboard"]},
    package_data={"promptkd.train": ["configs/*.yaml"]},
    # The native CPU kernels: a plain shared library built by CMake (no Python extension module), loaded
    # with ctypes from promptkd/kernels/cpu/ (promptkd/kd/native.py).
    ext_modules=[Extension("promptkd.kernels.cpu.libpromptkd_cpu", sources=[])],
    cmdclass={"build_ext": NativeKernels},
    entry_points={"console_scripts": ["promptkd = promptkd.cli:main"]},
    license="Apache-2.0",
)
