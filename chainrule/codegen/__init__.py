"""Code generation: equations -> kernel plans -> Jinja templates -> cached Python/Numba modules.

    cm = compile_model(model, dtype="float64")
    params = cm.init_params(seed=0)
    cost = cm.train_step(params, x, y, lr=0.1)      # forward + backward + SGD, one njit call

Other targets print the same equations for tensor frameworks (``codegen.targets``: PyTorch, JAX);
their modules are generated without importing torch or jax.
"""
from __future__ import annotations

from .cache import KernelCacheError, KernelCacheWarning, default_cache_dir
from .compiled import CompiledModel, compile_model
from .facts import FactError

__all__ = ["CompiledModel", "FactError", "KernelCacheError", "KernelCacheWarning", "compile_model",
           "default_cache_dir", "render_module"]


def __getattr__(name):
    # the code generator (Jinja, the lowering) is imported when first used, not to load cached kernels
    if name == "render_module":
        from .render import render_module
        return render_module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
