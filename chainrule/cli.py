"""`chainrule demo | derive | verify | codegen | train | docs`."""
from __future__ import annotations

import argparse
import os
import sys
import textwrap
from pathlib import Path

from .atomic import atomic_write_text, probe_writable


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("chainrule")
    except Exception:                     # pragma: no cover - not installed (a source checkout)
        return "unknown (not installed)"


class _VersionAction(argparse.Action):
    """``--version``, looked up when asked for: reading the installed package's metadata costs
    tens of milliseconds that every other command would pay when the parser is built."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0,
                         help=help or "show program's version number and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"chainrule {_version()}")        # (on standard output, as argparse's own action)
        parser.exit()


class UsageError(Exception):
    """A file or directory the command cannot use: reported as one line, before any work."""


def _writable_dir(path: Path, option: str):
    """Create ``path`` if needed and check that a file can be created in it."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} exists and is not a directory")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option} {path}: cannot create the directory: {e.strerror or e}") from None
    why = probe_writable(path)
    if why is not None:
        raise UsageError(f"{option} {path}: cannot write there: {why}")


def _docs_preflight(args):
    if args.pdf:
        import shutil
        if args.model:
            raise UsageError("--pdf builds the whole book: run it without MODEL arguments")
        if shutil.which("pdflatex") is None:
            raise UsageError("--pdf needs pdflatex (Debian: apt-get install texlive-latex-recommended "
                             "texlive-fonts-recommended)")
    if args.experiments and not Path(args.experiments).is_dir():
        raise UsageError(f"--experiments {args.experiments} is not a directory")


def _writable_file(path: str, option: str):
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{option} {path} is a directory: give a file name")
    parent = p.parent if str(p.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{option} {path}: {parent} is not a directory")
    try:
        _writable_dir(parent, option)
    except UsageError as e:
        raise UsageError(str(e).replace(f"{option} {parent}", f"{option} {path}: directory {parent}", 1)) from None


def _preflight(args):
    """Check every file and directory the command will write, before it does any work."""
    cmd = args.command
    if cmd in ("derive", "codegen") and args.output:
        _writable_file(args.output, "-o")
    elif cmd == "demo":
        _writable_dir(Path(args.out), "--out")
    elif cmd == "docs":
        _docs_preflight(args)
        _writable_dir(Path(args.out), "--out")
    elif cmd == "experiment":
        if args.epochs is not None and args.name == "vanishing-through-time":
            raise UsageError("--epochs: vanishing-through-time measures at initialisation (no training)")
        _writable_dir(Path(args.out), "--out")
    if cmd == "demo" or (cmd == "verify" and not args.claim and not args.symbolic_only):
        from .codegen.cache import prepare_cache_dir
        prepare_cache_dir()                # refuses a CHAINRULE_CACHE_DIR that is a file or unsafe

MODEL_HELP = textwrap.dedent("""\
    how to name a model:
      a built-in name: {names}
      a model declared in Python: {declared} (the GPT of `chainrule train char-gpt`)
      or a layer-list spec, items separated by '->' (or ','):
        '<inputs> -> <layer> -> ... -> <loss>'
        layers: dense(N), {acts}, softmax, log_softmax
        losses: {losses}
      e.g. '64 -> dense(128) -> sigmoid -> dense(10) -> softmax_cross_entropy' (the demo model)
    """)


def _model_help() -> str:
    from .derive import ACTIVATIONS, BUILTIN_MODELS, LOSSES
    from .derive.spec import DECLARED_MODELS
    return MODEL_HELP.format(names=", ".join(BUILTIN_MODELS), declared=", ".join(DECLARED_MODELS),
                             acts=", ".join(ACTIVATIONS), losses=", ".join(LOSSES))


def _epilog_when_shown(parser, make):
    """Give ``parser`` the epilog ``make()`` when its help is shown, not when the command line is
    parsed: the model lists come from the derivation engine, whose imports (SymPy, about 0.7 s)
    a command that reads everything from the cache (a warm `chainrule demo`) does not need."""
    format_help = parser.format_help

    def with_epilog():
        parser.epilog = make()
        return format_help()
    parser.format_help = with_epilog


def _examples_help() -> str:
    from .runtime.examples import EXAMPLES
    return ("examples (their own data, recipe and accuracy target):\n"
            + "\n".join(f"  {k:<22} {v.about}" + (f" (target {v.target})" if v.target else "")
                        for k, v in EXAMPLES.items())
            + "\n\n" + _model_help())


def _write(text: str, out: str | None):
    if out:
        atomic_write_text(out, text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)


def cmd_derive(args) -> int:
    from .derive import build_model, explain_model
    model = build_model(args.model)
    doc = explain_model(model)
    _write(doc.to_latex() if args.format == "latex" else doc.to_markdown(), args.output)
    return 0


def _say(*parts):
    print(*parts, flush=True)


def _claim(args) -> int:
    from .derive import build_model
    from .derive.errors import ChainruleError, SpecError
    from .derive.verify import check_claim
    if len(args.model) > 1:
        raise SpecError("--claim checks one model: give at most one MODEL")
    tensor, eq, formula = args.claim.partition("=")
    tensor, formula = tensor.strip(), formula.strip()
    if not eq or not tensor or not formula:
        raise SpecError(f"--claim {args.claim!r}: write TENSOR = FORMULA, e.g. 'z2 = (p2[b,o] - y2[b,o])/B'")
    model = build_model(args.model[0] if args.model else None)
    try:
        result = check_claim(model, tensor, formula)
    except ChainruleError:
        raise
    except (RecursionError, MemoryError, ArithmeticError, TypeError, ValueError) as err:   # never a traceback
        raise SpecError(f"cannot check the claim {formula!r}: {type(err).__name__}: {err}") from None
    if result.equal:
        _say(f"equal: the claim for dC/d{tensor} matches the gradient: {result.checked} element comparisons "
             f"({result.method}) at sizes {result.sizes_text()}, {result.points} random points each")
        return 0
    _say(f"not equal: counterexample for dC/d{tensor}:")
    for k, v in result.counterexample.items():
        if k == "sizes":
            v = ", ".join(f"{name}={value}" for name, value in v.items())
        _say(f"  {k}: {v}")
    return 1


def cmd_verify(args) -> int:
    import time
    from .derive import build_model
    from .derive.errors import ChainruleError
    from .derive.verify import builtin_declarations, verify_model
    if args.claim:
        return _claim(args)
    cases = {m: m for m in args.model} if args.model else builtin_declarations()
    numeric = None
    if not args.symbolic_only:
        try:
            from .codegen.verify import check_gradients as numeric
        except ImportError:
            print("(numeric check unavailable: chainrule.codegen is not importable)", file=sys.stderr)
    head = ("declaration", "result", "symbolic comparisons", "finite-diff rel. err", "time", "sizes")
    widths = (max(len(head[0]), *map(len, cases)), 6, 26, 20, 6)
    row = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths + (0,))).rstrip()  # noqa: E731
    _say(row(head))
    ok, started = True, time.perf_counter()
    for label, spec in cases.items():
        t0 = time.perf_counter()
        try:
            model = build_model(spec)
            checks = verify_model(model)
            sym_ok = all(checks)
            method = "exact" if all(c.method == "exact" for c in checks) else "50 digits"
            num = ""
            if numeric is not None:
                worst = max(e for _, e in numeric(model))
                num = f"{worst:.1e}"
                sym_ok = sym_ok and worst < 1e-6
            cells = (label, "pass" if sym_ok else "FAIL", f"{sum(c.checked for c in checks)} ({method})", num,
                     f"{time.perf_counter() - t0:.1f}s", checks[0].sizes_text())
            _say(row(cells))
            for c in checks:
                if not c:
                    _say(f"    {c}")
        except ChainruleError as err:
            sym_ok = False
            _say(row((label, "ERROR", "", "", f"{time.perf_counter() - t0:.1f}s", "")))
            _say(f"    {type(err).__name__}: {err}")
        ok &= sym_ok
    _say(("all passed" if ok else "SOME FAILED") + f" ({time.perf_counter() - started:.1f}s)")
    return 0 if ok else 1


def _verify_epilog() -> str:
    """The verify help: models, and the claim grammar with the demo model's names as an example."""
    from .derive import build_model, derive
    from .derive.verify import grammar_help
    model = build_model("demo")
    names = [t for t in model.tensors if model.tensors[t].role != "cost"]
    names += sorted(a.name for a in derive(model).adjoints.values())
    return (_model_help() + "\nclaims: --claim 'TENSOR = FORMULA' asks whether FORMULA is the gradient dC/dTENSOR, "
            "e.g.\n  chainrule verify demo --claim 'z2 = (p2[b,o] - y2[b,o])/B'\n  chainrule verify demo --claim "
            "'W1 = sum(b, d_z1[b,o]*x[b,i])'\n" + textwrap.fill(
                grammar_help(names).replace("A claim may use", "FORMULA may use") + " (names shown: the demo "
                "model's; an unknown name lists the model's own). FORMULA is read by a small parser, never "
                "evaluated as code.", width=100, initial_indent="  ", subsequent_indent="  ") + "\n")


def cmd_codegen(args) -> int:
    from .codegen import render_module
    from .derive import build_model
    if args.target != "numba":          # PyTorch / JAX: the forward and the derived backward
        from .codegen.targets import render_export
        _write(render_export(build_model(args.model), args.target), args.output)
        return 0
    _write(render_module(build_model(args.model), dtype=args.dtype, optimizer=args.optimizer), args.output)
    return 0


def cmd_docs(args) -> int:
    """The offline site (and with --pdf the book); with MODEL arguments, their pages added to it."""
    from .docs import build_site, build_user_pages
    say = (lambda *a: None) if args.quiet else (lambda line: print(line, file=sys.stderr))
    if args.model:
        build_user_pages(args.model, args.out, log=say)
    else:
        build_site(args.out, experiments=args.experiments, pdf=args.pdf, log=say, jobs=args.jobs)
    index = Path(args.out) / "index.html"
    print(f"site: {index.resolve().as_uri()}")
    if args.pdf and not args.model:
        print(f"book: {Path(args.out) / 'book.pdf'}")
    return 0


def _demo_worker():
    """The compile worker of a cold ``chainrule demo``, started first (before SymPy, the
    runtime and this command's checks are imported), so that its own start-up and Numba's warm-up
    run beside them (see run_demo); None when no core is idle or when the demo's module is
    described in the cache (a warm start: nothing to compile; the look-up costs the imports of
    NumPy and Numba, which the run needs anyway)."""
    from .codegen import background
    if not background.idle_core():
        return None
    from .codegen.compiled import is_described
    from .derive.errors import ChainruleError
    try:
        if is_described("demo"):
            return None
    except (ChainruleError, OSError):     # an unusable cache directory: _preflight words it
        return None
    return background.BackgroundCompile.warming_up("float64")


def cmd_demo(args) -> int:
    from .runtime.demo import run_demo
    result = run_demo(out_dir=args.out, progress=not args.no_progress, worker=args.worker)
    return 0 if result.get("test_accuracy", 0) >= 0.95 else 1


def cmd_experiment(args) -> int:
    from .runtime import experiments
    kw = {"out_dir": args.out}
    if args.epochs is not None:
        kw["epochs"] = args.epochs
    result = getattr(experiments, args.name.replace("-", "_"))(**kw)
    print(f"plot: {result['plot']}\nreport: {result['report']}\n({result['seconds']:.1f} s)")
    return 0


def cmd_optimizer(args) -> int:
    from .derive.optimizers import explain_decoupled_decay, explain_optimizer
    doc = explain_decoupled_decay() if args.name == "adamw-vs-l2" else explain_optimizer(args.name)
    text = doc.to_latex() if args.format == "latex" else doc.to_markdown()
    if args.output:
        from .atomic import atomic_write_text
        atomic_write_text(args.output, text)
    else:
        print(text)
    return 0


def cmd_train(args) -> int:
    """A named example (its own data, recipe and target), or any model on a built-in data set."""
    from .runtime.examples import run_example, EXAMPLES
    if args.model in EXAMPLES:
        run_example(args.model, out_dir=args.out, epochs=args.epochs, progress=not args.no_progress)
        return 0
    from .runtime import Network
    from .runtime.data import load_dataset, train_test_split
    from .runtime.optim import get_optimizer
    x, y = load_dataset(args.data)
    xtr, xte, ytr, yte = train_test_split(x, y, 0.2, seed=args.seed)
    net = Network(args.model, seed=args.seed, optimizer=get_optimizer(args.optimizer, args.lr))
    h = net.fit(xtr, ytr, epochs=20 if args.epochs is None else args.epochs, batch_size=args.batch_size, validation_split=0.2,
                seed=args.seed, progress=not args.no_progress)
    print("test:", ", ".join(f"{k} {v:.4f}" for k, v in net.evaluate(xte, yte).items()))
    if args.plots:
        for name, path in net.plot(h, args.plots).items():
            print(f"{name}: {path}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="chainrule", description="Derive backpropagation symbolically, "
                                     "explain it, generate Numba kernels and train with them.")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("demo", help="derive, generate, compile and train the demo MLP on digits")
    p.add_argument("--out", default="chainrule-demo", help="output folder (default: ./chainrule-demo)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("derive", help="write a model's derivation (Markdown or LaTeX)", formatter_class=fmt)
    _epilog_when_shown(p, _model_help)
    p.add_argument("model", nargs="?", default=None, help="built-in name or layer-list spec (default: demo)")
    p.add_argument("--format", choices=("markdown", "latex"), default="markdown")
    p.add_argument("-o", "--output", help="file to write (default: standard output)")
    p.set_defaults(fn=cmd_derive)

    p = sub.add_parser("verify", help="verify derived gradients (symbolic and finite differences)",
                       formatter_class=fmt)
    _epilog_when_shown(p, _verify_epilog)      # it derives the demo model
    p.add_argument("model", nargs="*", help="models to verify (default: every built-in declaration)")
    p.add_argument("--claim", metavar="'TENSOR = FORMULA'",
                   help="is FORMULA the gradient dC/dTENSOR? (grammar below; e.g. 'z2 = (p2[b,o]-y2[b,o])/B')")
    p.add_argument("--symbolic-only", action="store_true", help="skip the finite-difference check")
    p.set_defaults(fn=cmd_verify)

    p = sub.add_parser("codegen", help="print or write a model's generated module (Numba kernels, or a "
                       "PyTorch / JAX export with the derived backward)", formatter_class=fmt)
    _epilog_when_shown(p, _model_help)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--target", choices=("numba", "torch", "jax"), default="numba",
                   help="numba: the training kernels (default); torch: an autograd.Function and nn.Module; "
                        "jax: a custom_vjp function (torch/jax need not be installed to generate)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    p.add_argument("--optimizer", default="sgd", help="the update fused into train_step (default: sgd)")
    p.add_argument("-o", "--output")
    p.set_defaults(fn=cmd_codegen)

    p = sub.add_parser("train", help="train a named example, or a model on a built-in data set (plots with --plots)",
                       formatter_class=fmt)
    _epilog_when_shown(p, _examples_help)

    p.add_argument("model", help="an example name, a built-in model name or a layer-list spec")
    p.add_argument("--data", default="digits", help="digits, iris, wine, breast_cancer, moons, spirals, xor, sine")
    p.add_argument("--optimizer", default="adam",
                   choices=("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw"))
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the optimiser's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (default: the example's, else 20)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plots", metavar="DIR", help="write curves.png and gradient_norms.png into DIR")
    p.add_argument("--out", default=None, help="an example's output folder (default: ./chainrule-examples/NAME)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("experiment", help="run an experiment: overfitting, vanishing or vanishing-through-time "
                                          "(table + plot)")
    p.add_argument("name", choices=("overfitting", "vanishing", "vanishing-through-time"))
    p.add_argument("--out", default="chainrule-experiments", help="output folder")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the experiment's)")
    p.set_defaults(fn=cmd_experiment)

    p = sub.add_parser("optimizer", help="an optimiser's update rule, explained from its declaration")
    p.add_argument("name", choices=("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "adamw",
                                    "adamw-vs-l2"))
    p.add_argument("--format", choices=("markdown", "latex"), default="markdown")
    p.add_argument("-o", "--output")
    p.set_defaults(fn=cmd_optimizer)

    p = sub.add_parser("docs", help="build the offline documentation site (and the PDF book with --pdf)",
                       formatter_class=fmt)
    _epilog_when_shown(p, _model_help)
    p.add_argument("model", nargs="*", help="your models (built-in names or specs): their pages are added to the site")
    p.add_argument("--out", default="docs/site", help="the site's folder (default: ./docs/site)")
    p.add_argument("--pdf", action="store_true", help="also typeset book.pdf with pdflatex")
    p.add_argument("--experiments", metavar="DIR", help="include the plots `chainrule experiment` wrote into DIR")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="derive the pages in N processes (default: the CPUs available, at most 4)")
    p.add_argument("--quiet", action="store_true", help="do not list the pages written")
    p.set_defaults(fn=cmd_docs)

    args = parser.parse_args(argv)
    args.worker = _demo_worker() if args.command == "demo" else None
    from .derive.errors import ChainruleError
    try:
        _preflight(args)
    except (UsageError, ChainruleError) as err:
        if args.worker is not None:        # the command does no work: nor does its worker
            args.worker.stop()
        kind = "error" if isinstance(err, UsageError) else type(err).__name__
        print(f"chainrule {args.command}: {kind}: {err}", file=sys.stderr)
        return 2
    try:
        return args.fn(args)
    except ChainruleError as err:
        print(f"chainrule {args.command}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except OSError as err:                 # a file-system failure during the work (disk full, ...)
        where = f" {err.filename}" if err.filename else ""
        print(f"chainrule {args.command}: error:{where}: {err.strerror or err}", file=sys.stderr)
        return 1


def run():
    """The ``chainrule`` console script: :func:`main`, then exit without the interpreter's teardown.

    Why: after a cold ``chainrule demo`` that teardown (freeing SymPy's caches and Numba's compiled
    modules one object at a time) took about 0.5 s, a tenth of the command. Nothing is lost by
    skipping it: the commands write their files through context managers and rename them into place,
    the exit handlers still run (the compile worker is stopped, logging flushed), and so does the
    flush of the standard streams. An exception (argparse's usage error, Ctrl-C) exits as usual."""
    import atexit
    code = main()
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:          # pragma: no cover - not CPython
        sys.exit(code)
    run_exit_handlers()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):      # a closed pipe: nothing more can be written anyway
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    run()
