"""Our CPU kernel for the products of decoding: `rows_product(x, weight, bias)` = `F.linear` for a
few rows, built from `rows_product.cpp` for the machine it runs on.

A decoding step multiplies one row (a token) or a few (a tree) by every weight matrix, so its time
is the time to read the weights. oneDNN and MKL read them well below the memory's rate on a few
rows, and oneDNN also spends ~15 us a call before it reads any; `rows_product.cpp` says how ours
reads them and what that measured.

The kernel is compiled with the machine's instruction set (`-march=native`) on first use, ~6 s,
and kept by torch's extension cache (keyed by this CPU's flags, so machines that share a home
folder keep one build each). Where it cannot be built (no C++ compiler) `built()` says so and the
model multiplies through oneDNN or MKL as before. It is registered as `medusa::rows_product`, an
operation that a compiled step calls as it is.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import subprocess
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("rows_product.cpp")

log = logging.getLogger(__name__)

_library = torch.library.Library("medusa", "FRAGMENT")
_library.define("rows_product(Tensor x, Tensor weight, Tensor? bias) -> Tensor")


@torch.library.register_fake("medusa::rows_product")
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


rows_product = torch.ops.medusa.rows_product  # x [..., K], weight [N, K], bias [N] or None -> [..., N]


def cpuinfo() -> str:
    """/proc/cpuinfo's text (what lscpu reads); "" where there is none (not Linux)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


@functools.cache
def built() -> bool:
    """Whether `rows_product` runs here: builds it the first time on this machine (~6 s), loads it
    after; False, with a warning, where it cannot be built."""
    from torch.utils import cpp_extension  # 0.3 s to import; only serving on a CPU needs it

    flags = next((line for line in cpuinfo().splitlines() if line.startswith("flags")), "")
    machine = hashlib.sha256(flags.encode()).hexdigest()[:12]
    start = time.perf_counter()
    try:
        cpp_extension.load(f"medusa_rows_product_{machine}", [str(SOURCE)], is_python_module=False,
                           extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"])
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        log.warning("cannot build our CPU kernel (%s); products go through oneDNN / MKL: %s", SOURCE.name, e)
        return False
    log.info("CPU kernel %s ready in %.1f s", SOURCE.name, time.perf_counter() - start)
    return True
