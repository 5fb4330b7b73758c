"""The Python environment the Python-backend stub of nvidia-pytriton's tritonserver runs model code in.

The stub finds its environment through `python3` on PATH (it starts CPython with that program name, so
`pyvenv.cfg` beside it decides `sys.prefix`). The stub that nvidia-pytriton 0.7.0 ships (Triton 2.51) is
built with a pybind11 that predates NumPy 2: under NumPy 2 it copies BYTES and multi-element tensors with a
zero stride, corrupting every string input and output. So when this environment has NumPy >= 2, the stub
gets an overlay venv: NumPy 1.26 (installed once with `pip install --target`) first on sys.path, then
this environment's site-packages (torch, nld_trt, ...), whose compiled extensions run on NumPy 1.x too.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from ..errors import NLDError

STUB_NUMPY_PIN = "numpy==1.26.4"
STUB_SITE_ENV = "NLD_TRT_STUB_SITE"


def default_stub_site() -> Path:
    """Where the install step puts NumPy 1.x for the stub: `<venv>/triton-stub-site`."""
    return Path(sys.prefix) / "triton-stub-site"


def install_hint() -> str:
    return f"{sys.executable} -m pip install --no-deps --upgrade --target {default_stub_site()} '{STUB_NUMPY_PIN}'"


def numpy_major() -> int:
    import numpy

    return int(numpy.__version__.split(".")[0])


def stub_site() -> Path | None:
    """The NumPy-1.x directory for the stub, or None when this environment's NumPy already is 1.x."""
    if numpy_major() < 2:
        return None
    site = Path(os.environ.get(STUB_SITE_ENV) or default_stub_site())
    if not (site / "numpy").is_dir():
        raise NLDError(
            "the Triton Python backend stub (nvidia-pytriton 0.7.0) needs NumPy < 2 and this environment has "
            f"NumPy 2: install NumPy 1.26 beside it once with\n  {install_hint()}\n(or set {STUB_SITE_ENV})"
        )
    return site


def make_stub_env(target: Path) -> Path:
    """The bin/ directory to put first on PATH for the stub: this venv's, or an overlay venv in `target`."""
    site = stub_site()
    if site is None:
        return Path(sys.executable).parent
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    (target / "bin").mkdir(parents=True, exist_ok=True)
    (target / "pyvenv.cfg").write_text(
        f"home = {base.parent}\ninclude-system-site-packages = false\nversion = {sys.version.split()[0]}\n"
    )
    for name in ("python3", f"python{version}", "python"):
        link = target / "bin" / name
        if not link.exists():
            link.symlink_to(base)
    packages = target / "lib" / f"python{version}" / "site-packages"
    packages.mkdir(parents=True, exist_ok=True)
    own = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    lines = [str(site)] + [f"import site; site.addsitedir({p!r})" for p in own]
    (packages / "00-nld-trt-stub.pth").write_text("\n".join(lines) + "\n")
    return target / "bin"
