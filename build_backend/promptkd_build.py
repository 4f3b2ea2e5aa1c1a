"""promptkd's PEP 517 build backend: setuptools', asking for cmake from PyPI only where none is installed.

The native CPU kernels (CMakeLists.txt) need cmake and a C++ compiler at install time; neither needs
torch, so the build environment never holds a torch build. Without a compiler the install still
succeeds (setup.py warns) and promptkd falls back to torch ops.
"""

from __future__ import annotations

import shutil

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F401,F403  (the rest of the backend interface)


def _cmake() -> list[str]:
    return [] if shutil.which("cmake") else ["cmake>=3.18"]


def get_requires_for_build_wheel(config_settings=None):
    return _setuptools.get_requires_for_build_wheel(config_settings) + _cmake()


def get_requires_for_build_editable(config_settings=None):
    return _setuptools.get_requires_for_build_editable(config_settings) + _cmake()
