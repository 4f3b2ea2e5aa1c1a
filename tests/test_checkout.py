"""A clone is a working directory: from the checkout root, where Python puts the working directory first on
``sys.path`` (``python -c``, ``python -m``, ``python - <<EOF``, a notebook started there), the checkout's
``kernels/`` must not shadow the ``kernels`` distribution that transformers >= 5.25 imports, and promptkd,
transformers models, ``python -m pytest`` and ``python -m promptkd`` must work. A wheel holds every module of
the source tree and works on its own, away from the checkout.

Every command here runs in a fresh interpreter with ``PYTHONSAFEPATH`` and ``PYTHONPATH`` removed from its
environment, as a user's shell would have them. How the folder is packaged, and why: DESIGN.md ("How kernels/ is
packaged")."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The issue's reproducer: transformers' model classes import the `kernels` distribution's hub helpers.
TINY_MODEL = ("from transformers import AutoModelForCausalLM, LlamaConfig; "
              "AutoModelForCausalLM.from_config(LlamaConfig(num_hidden_layers=1, hidden_size=32, "
              "intermediate_size=64, num_attention_heads=2, vocab_size=100)); print('model ok')")


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONSAFEPATH", "PYTHONPATH") and not k.startswith(("PYTEST_XDIST", "PYTEST_CURRENT"))}
    return {**env, **extra}


def python(*args: str, cwd: Path = ROOT, stdin: str | None = None, timeout: float = 300, **env) -> str:
    """Runs ``python ARGS`` in ``cwd`` (default: the checkout root); its stdout, or a failure showing stderr."""
    out = subprocess.run([sys.executable, *args], cwd=cwd, env=_env(**env), input=stdin, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"python {' '.join(args)} in {cwd} failed ({out.returncode}):\n{out.stderr[-4000:]}"
    return out.stdout


def test_the_kernels_folder_is_no_regular_package():
    """The cause: a kernels/__init__.py makes the folder a regular package, which the root's place at the head
    of sys.path puts before every installed one. promptkd/kernels is a link to it (promptkd.kernels)."""
    assert not list((ROOT / "kernels").glob("__init__.*")), "kernels/ must not be a regular package (see DESIGN.md)"
    link = ROOT / "promptkd" / "kernels"
    assert link.is_symlink() and os.readlink(link) == "../kernels"


#: One interpreter from the checkout root does what a user's first lines there would: import the `kernels`
#: distribution, build a transformers model, run a promptkd loss (each import costs seconds: done once).
FROM_ROOT = textwrap.dedent("""
    import json, kernels
    found = {"kernels": [getattr(kernels, "__file__", None), list(kernels.__path__)]}
    """) + TINY_MODEL + textwrap.dedent("""
    import torch, promptkd, promptkd.kernels.configs
    from promptkd.kd import native
    from transformers.utils import is_kernels_available
    loss = promptkd.fused_linear_kd_loss(torch.randn(4, 8), torch.randn(11, 8), torch.randn(4, 8),
                                         torch.randn(11, 8), impl="chunked")
    found.update(promptkd_kernels=list(promptkd.kernels.__path__), native=native.library() is not None,
                 why=native.unavailable_reason(), loss=float(loss), kernels_available=is_kernels_available())
    print(json.dumps(found))
    """)


@pytest.fixture(scope="module")
def from_root() -> tuple[dict, str]:
    out = python("-c", FROM_ROOT)
    return json.loads(out.splitlines()[-1]), out


def test_import_kernels_from_the_checkout_root_finds_the_distribution(from_root):
    found, _ = from_root
    file, path = found["kernels"]
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        # No distribution (transformers < 5.25 does not need one): the folder is a namespace portion at most,
        # which transformers' availability check tells from an installed package.
        assert file is None and not found["kernels_available"], found
        return
    installed = Path(str(dist.locate_file(""))).resolve()
    assert file is not None and Path(file).resolve().is_relative_to(installed), (file, installed)
    assert not Path(file).resolve().is_relative_to(ROOT / "kernels"), file


def test_transformers_models_load_from_the_checkout_root(from_root):
    assert "model ok" in from_root[1]  # python -c
    assert "model ok" in python("-", stdin=TINY_MODEL)  # python - <<EOF


def test_promptkd_and_its_kernels_import_from_the_checkout_root(from_root):
    got, _ = from_root
    assert [Path(p).resolve() for p in got["promptkd_kernels"]] == [(ROOT / "kernels").resolve()]
    if os.environ.get("PROMPTKD_REQUIRE_NATIVE") == "1":
        assert got["native"], got["why"]
    assert got["loss"] == got["loss"]  # a number, computed
    assert "native CPU kernels" in python("-m", "promptkd", "info")  # python -m promptkd


def test_python_m_pytest_runs_from_the_checkout_root():
    """pytest puts the root on sys.path too (``python -m``), and so do xdist's workers."""
    out = python("-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "1", "tests/test_hf_models.py", timeout=600)
    assert " passed" in out and "error" not in out.lower().split("passed")[-1], out[-2000:]


def _source_modules() -> set[str]:
    files = [*(ROOT / "promptkd").rglob("*.py"), *(ROOT / "promptkd").rglob("*.yaml")]
    return {str(p.relative_to(ROOT)) for p in files if "__pycache__" not in p.parts}


@pytest.mark.skipif(shutil.which("cmake") is None, reason="building the wheel's native library needs cmake")
def test_a_wheel_holds_every_module_and_works_away_from_the_checkout(tmp_path):
    """``pip install .`` (not editable) gives the same package: every module and config of the source tree
    (promptkd/kernels through the link), the native library, nothing at top level but promptkd, and it runs from
    another directory with no checkout in sight."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("no setuptools in this environment to build the wheel without isolation")
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if tracked.returncode != 0:
        pytest.skip("not a git checkout: cannot tell the tracked files")
    for name in filter(None, tracked.stdout.split("\0")):
        path, dest = ROOT / name, src / name
        if not path.exists() and not path.is_symlink():
            continue  # deleted in the working tree, not yet committed
        dest.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink():
            os.symlink(os.readlink(path), dest)
        else:
            shutil.copy2(path, dest)
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    str(src), "-w", str(wheels)], check=True, capture_output=True, timeout=600, env=_env())
    (wheel,) = wheels.glob("promptkd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    tops = {n.split("/")[0] for n in names}
    assert tops == {"promptkd", next(t for t in tops if t.endswith(".dist-info"))}, tops
    missing = _source_modules() - names
    assert not missing, f"modules of the source tree missing from the wheel: {sorted(missing)}"
    assert "promptkd/kernels/cpu/libpromptkd_cpu.so" in names
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    script = textwrap.dedent("""
        import json, torch, promptkd, promptkd.kernels.configs, promptkd.integrations, promptkd.train.trainer
        from promptkd.kd import native
        loss = promptkd.fused_linear_kd_loss(torch.randn(4, 8), torch.randn(11, 8), torch.randn(4, 8),
                                             torch.randn(11, 8), impl="chunked")
        print(json.dumps({"promptkd": promptkd.__file__, "kernels": list(promptkd.kernels.__path__),
                          "library": str(native.library_path()), "native": native.library() is not None}))
    """)
    got = json.loads(python("-c", script, cwd=elsewhere, PYTHONPATH=str(site)).splitlines()[-1])
    for key in ("promptkd", "library"):
        assert Path(got[key]).resolve().is_relative_to(site.resolve()), got
    assert [Path(p).resolve() for p in got["kernels"]] == [(site / "promptkd" / "kernels").resolve()]
    assert got["native"]


def test_no_module_is_over_450_lines():
    """Rooms a newcomer can hold in their head: a module that grows past this is split along its seams."""
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / "promptkd").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long
