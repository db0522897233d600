"""Shared fixtures. Generated kernels are compiled once per test run, in a private cache dir."""
import os

import pytest


@pytest.fixture(scope="session")
def kernel_cache_dir(tmp_path_factory):
    """The run's kernel cache. Under pytest-xdist every worker is its own session, so the workers
    share one directory beside their base temps: a kernel one worker compiled, the others load
    (the cache's files are written atomically, so two workers compiling one kernel is safe)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "kernels"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("kernels")


@pytest.fixture(scope="session")
def compiled_model(kernel_cache_dir):
    """``compiled_model(name_or_spec, dtype="float64")`` -> CompiledModel, memoised per session."""
    from chainrule.codegen import compile_model
    from chainrule.derive import build_model
    memo = {}

    def get(name, dtype="float64"):
        if (name, dtype) not in memo:
            memo[name, dtype] = compile_model(build_model(name), dtype=dtype, cache_dir=kernel_cache_dir)
        return memo[name, dtype]
    return get


@pytest.fixture(scope="session")
def compiled_with(kernel_cache_dir):
    """``compiled_with(spec, optimizer, dtype="float64")`` -> CompiledModel whose train_step fuses
    that optimiser's update; memoised per session."""
    from chainrule.codegen import compile_model
    from chainrule.derive import build_model
    memo = {}

    def get(name, optimizer="sgd", dtype="float64"):
        key = (name, optimizer, dtype)
        if key not in memo:
            memo[key] = compile_model(build_model(name), dtype=dtype, cache_dir=kernel_cache_dir,
                                      optimizer=optimizer)
        return memo[key]
    return get


@pytest.fixture(scope="session")
def compiled_declared(kernel_cache_dir):
    """``compiled_declared(key, build, dtype="float64")`` -> CompiledModel of the Model ``build()``
    (a user-declared model), compiled once per session and key."""
    from chainrule.codegen import compile_model
    memo = {}

    def get(key, build, dtype="float64"):
        if (key, dtype) not in memo:
            memo[key, dtype] = compile_model(build(), dtype=dtype, cache_dir=kernel_cache_dir)
        return memo[key, dtype]
    return get


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Say loudly which LaTeX tests were skipped because node/KaTeX is missing, and how to run them."""
    from latex_tools import katex_skip_summary
    lines = katex_skip_summary(terminalreporter.stats.get("skipped", []))
    if lines:
        terminalreporter.write_sep("=", "LaTeX checks not run", yellow=True, bold=True)
        for line in lines:
            terminalreporter.write_line(line, yellow=True, bold=True)
