"""Code generation: equations -> kernel plans -> Jinja templates -> cached Python/Numba modules.

    cm = compile_model(model, dtype="float64")
    params = cm.init_params(seed=0)
    cost = cm.train_step(params, x, y, lr=0.1)      # forward + backward + SGD, one njit call

Other targets print the same equations for tensor frameworks (``codegen.targets``: PyTorch, JAX);
their modules are generated without importing torch or jax.
"""
from __future__ import annotations

import importlib

__all__ = ["CompiledModel", "FactError", "KernelCacheError", "KernelCacheWarning", "compile_model",
           "default_cache_dir", "render_module"]

# each name is imported from its module when first used: ``chainrule.codegen.background`` (which
# the demo imports first, to start its compile worker before SymPy is even imported) must not
# pull in the compiled wrapper and SymPy, nor loading a cached module the code generator (Jinja,
# the lowering)
_HOME = {"CompiledModel": "compiled", "compile_model": "compiled", "FactError": "facts",
         "KernelCacheError": "cache", "KernelCacheWarning": "cache", "default_cache_dir": "cache",
         "render_module": "render"}


def __getattr__(name):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
