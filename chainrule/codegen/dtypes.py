"""The dtypes a generated module can be compiled for (a module of its own, so that loading cached
kernels does not import the code generator: Jinja and the lowering are needed only to generate)."""
from __future__ import annotations

import numpy as np

DTYPES = ("float64", "float32")


def check_dtype(dtype) -> str:
    name = np.dtype(dtype).name
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported: use float64 or float32")
    return name
