"""The self-contained demo (``promptkd demo``): the bundled task family (tasks), a byte-level BPE
tokenizer trained on it (tokenizer), and the end-to-end run (run)."""

from .run import METHODS, DemoSettings, prepare, run_demo

__all__ = ["METHODS", "DemoSettings", "prepare", "run_demo"]
