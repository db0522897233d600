"""``CompiledModel``: the generated module of one model, with a NumPy-facing wrapper."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..derive.errors import ShapeError, UnsupportedError
from .blas import ONE_THREAD_ANYWAY, SMALL_PRODUCT, call_on_one_thread
from .cache import (cache_key, fall_back_in_memory, load_description, load_or_generate, recipe_key,
                    save_description)
from .description import ModelDescription
from .facts import SimplexFact
from .dtypes import check_dtype


def _c_array(a, dtype) -> np.ndarray:
    """A C-contiguous array of ``dtype`` with the shape of ``a``: a rank-0 parameter stays 0-d
    (``np.ascontiguousarray`` would make it shape (1,))."""
    return np.require(np.asarray(a, dtype=dtype), requirements="C")


def _rows(arrays) -> int | None:
    """The batch's number of examples (the first array's first axis), None for a scalar input."""
    shape = arrays[0].shape
    return shape[0] if shape else None


class CompiledModel:
    """Generated kernels of one model in one dtype.

    Parameters are dicts ``name -> ndarray`` (names as in the model, e.g. ``W1``). Arrays handed to
    ``train_step`` are updated in place, so they must already be C-contiguous and of ``dtype``.
    """

    def __init__(self, description, module, path: Path, source: str, cache_hit: bool,
                 key: str | None = None, render=None, model=None):
        d = self.description = description
        self._model = model             # the symbolic model: built on first use (see ``model``)
        self.has_input_grads = d.input_grads
        self.optimizer = d.rule.name
        self.state_names = list(d.rule.state)
        self.hyper_names = list(d.rule.hyper_names)
        self.has_noise = d.has_noise
        self._hyper_template = None
        self._hyper_template = self.hyper_vector(step=0, clip=0.0, seed=0)
        self._eta_index = self.hyper_names.index("eta") if "eta" in self.hyper_names else None
        self.module = module
        self.module_path = Path(path)
        self._key, self._render = key, render
        self.source = source
        self.dtype = d.dtype
        self.cache_hit = cache_hit
        self.param_names = [name for name, *_ in d.params]
        self.param_shapes = {name: tuple(shape) for name, shape, *_ in d.params}
        self._shapes_in_order = [self.param_shapes[n] for n in self.param_names]
        self._np_dtype = np.dtype(self.dtype)
        self._inits = {name: init for name, _, init, _ in d.params}
        # buffers: non-trainable state (batch norm's running averages), updated by a training step
        self.buffer_names = [name for name, *_ in d.buffers]
        self.buffer_shapes = {name: tuple(shape) for name, shape, _ in d.buffers}
        self._buffer_inits = {name: init for name, _, init in d.buffers}
        self._batch_counts = list(d.batch_counts)
        self.input_name = d.inputs[0].name
        self.input_names = [t.name for t in d.inputs]     # every input, in the kernels' argument order
        self.target_name = d.targets[0].name
        self.target_names = [t.name for t in d.targets]   # every target (one per loss), in kernel order
        self._x = d.inputs[0]
        self._xs = d.inputs
        self._y = d.targets[0]
        self._ys = d.targets
        self.output_names = list(d.outputs)
        self._dims = {t.name: t.dims for t in (*self._xs, *self._ys)}
        # facts declared on the arguments, which the derived gradient may rely on
        self.facts = list(d.facts)
        self._facts_of = {n: [f for f in self.facts if f.tensor.name == n] for n in self._dims}
        self._always_facts_of = {n: [f for f in fs if f.always] for n, fs in self._facts_of.items()}
        self._simplex_check = hasattr(module, "_first_row_off_simplex")
        # an argument's axes after the batch axis, when the batch axis is the first and only one
        self._one_input_one_target = len(self._xs) == 1 and len(self._ys) == 1
        self._batch_tails = {n: d[1:] for n, d in self._dims.items()
                             if d and d[0] is None and None not in d[1:]}
        self._background = None       # a worker compiling kernels into Numba's cache (background.py)
        self._workspaces: dict = {}   # batch size -> the step's reused temporaries (workspace.py)
        # batches below this many rows keep the kernels' largest product under blas.SMALL_PRODUCT:
        # their calls run BLAS on one thread ("auto"; None leaves BLAS alone; see blas.py)
        self.blas_threads = "auto"
        largest = max((math.prod(s) for s in self.param_shapes.values()), default=1)
        self._one_thread_rows = -(-SMALL_PRODUCT // max(largest, 1))
        self._blas_single_rows = ONE_THREAD_ANYWAY // max(largest, 1)   # ... and up to this, BLAS itself

    @property
    def model(self):
        """The symbolic model (``chainrule.derive.Model``). A module loaded through its cached
        description (``compile_model("demo")``) builds it here, on first use, from its recipe: only
        what derives, explains or verifies needs it, never the kernels' calls."""
        if self._model is None:
            from ..derive.spec import build_model
            self._model = build_model(self.description.recipe)
        return self._model

    @property
    def rule(self):
        """The optimiser's declared update rule (``chainrule.derive.optimizers.UpdateRule``)."""
        from ..derive.optimizers import get_rule
        return get_rule(self.optimizer)

    @property
    def in_memory(self) -> bool:
        """True when the kernels were compiled in memory (the cache directory was not writable)."""
        return str(self.module_path).startswith("<")

    def __repr__(self):
        return f"CompiledModel({self.description.name}, {self.dtype}, {self.module_path})"

    # -- parameters ---------------------------------------------------------------------------
    def init_params(self, seed=0) -> dict:
        """Glorot uniform ("glorot"), He normal ("he") or zeros, from a seeded NumPy Generator."""
        rng = np.random.default_rng(seed)
        out = {}
        for name in self.param_names:
            shape, init = self.param_shapes[name], self._inits[name]
            fan_out = shape[0] if shape else 1
            fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else (shape[0] if shape else 1)
            if init == "zeros":
                a = np.zeros(shape)
            elif init == "ones":             # a normalisation layer's scale γ
                a = np.ones(shape)
            elif init == "glorot":
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                a = rng.uniform(-limit, limit, size=shape)
            elif init == "normal":           # an embedding table: N(0, 1), as PyTorch's nn.Embedding
                a = rng.normal(0.0, 1.0, size=shape)
            elif init == "he":
                a = rng.normal(0.0, math.sqrt(2.0 / fan_in), size=shape)
            else:
                raise UnsupportedError(f"parameter {name}: unknown initialiser {init!r} "
                                       "(known: glorot, he, zeros, ones)")
            out[name] = _c_array(a, self.dtype)
        return out

    def init_buffers(self) -> dict:
        """The buffers' initial values (running means 0, running variances 1, as declared)."""
        fill = {"zeros": 0.0, "ones": 1.0}
        return {n: np.full(self.buffer_shapes[n], fill[self._buffer_inits[n]], dtype=self.dtype)
                for n in self.buffer_names}

    def _buffers(self, buffers, inplace=False) -> list:
        """The buffers in kernel order; None: fresh initial values (nothing to update)."""
        if buffers is None:
            buffers = self.init_buffers()
        out = []
        for name in self.buffer_names:
            if name not in buffers:
                raise ShapeError(f"missing buffer {name}; expected {self.buffer_names}")
            a, shape = buffers[name], self.buffer_shapes[name]
            if tuple(np.shape(a)) != shape:
                raise ShapeError(f"buffer {name} has shape {tuple(np.shape(a))}, expected {shape}")
            if inplace and (not isinstance(a, np.ndarray) or a.dtype != np.dtype(self.dtype)
                            or not a.flags.c_contiguous or not a.flags.writeable):
                raise TypeError(f"a training step updates buffer {name} in place: it must be a "
                                f"writeable C-contiguous {self.dtype} ndarray (use init_buffers)")
            out.append(a if inplace else _c_array(a, self.dtype))
        return out

    def _check_training_batch(self, n_batch):
        """The unbiased variance of a running average needs two values per feature."""
        for layer, per_example in self._batch_counts:
            if per_example is None:        # a count of another form than B × sizes: evaluated symbolically
                m = self._symbolic_count(layer, n_batch)
            else:
                m = per_example * n_batch
            if m < 2:
                raise ShapeError(f"layer {layer}: a training batch of {n_batch} example(s) gives {m} "
                                 f"value per feature, and the batch variance needs at least 2: use "
                                 f"batches of 2 or more examples in training (evaluation takes any)")

    def _symbolic_count(self, layer, n_batch) -> int:
        from ..derive.layers import B
        count = next(eq.out.meta["count"] for eq in self.model.buffer_updates
                     if eq.layer == layer and "count" in eq.out.meta)
        return int(count.subs({**self.model.size_values, B: n_batch}))

    # -- argument checking --------------------------------------------------------------------
    def _params_fast(self, params):
        """The parameters for an in-place kernel when every one is already a writeable
        C-contiguous array of the right dtype and shape (the common case, checked by plain
        attribute reads: a few µs in all), else None (then ``_params`` says what is wrong)."""
        dt = self._np_dtype
        try:
            out = [params[n] for n in self.param_names]
        except (KeyError, TypeError):
            return None
        for a, shape in zip(out, self._shapes_in_order):
            if type(a) is not np.ndarray or a.shape != shape or a.dtype != dt:
                return None
            flags = a.flags
            if not (flags.c_contiguous and flags.writeable):
                return None
        return out

    def _params(self, params, inplace=False) -> list:
        if inplace:
            fast = self._params_fast(params)
            if fast is not None:
                return fast
        missing = [n for n in self.param_names if n not in params]
        if missing:
            raise ShapeError(f"missing parameters {missing}; expected {self.param_names}")
        out = []
        for name in self.param_names:
            a = params[name]
            shape = self.param_shapes[name]
            if tuple(np.shape(a)) != shape:
                raise ShapeError(f"parameter {name} has shape {tuple(np.shape(a))}, expected {shape}")
            if inplace:
                if not isinstance(a, np.ndarray) or a.dtype != np.dtype(self.dtype) \
                        or not a.flags.c_contiguous or not a.flags.writeable:
                    raise TypeError(f"train_step updates parameter {name} in place: it must be a "
                                    f"writeable C-contiguous {self.dtype} ndarray (use init_params)")
            else:
                a = _c_array(a, self.dtype)
            out.append(a)
        return out

    def _array(self, a, tensor, what, facts=False) -> np.ndarray:
        data_dtype = getattr(a, "dtype", None)
        if type(a) is not np.ndarray or data_dtype != self._np_dtype or not a.flags.c_contiguous:
            a = np.ascontiguousarray(a, dtype=self.dtype)
        name = tensor.name
        tail = self._batch_tails.get(name)
        # the common layout (batch first, fixed other axes) in one tuple comparison
        if tail is None or a.ndim != len(tail) + 1 or a.shape[1:] != tail:
            dims = self._dims[name]
            if a.ndim != len(dims) or any(d is not None and d != n for d, n in zip(dims, a.shape)):
                raise ShapeError(self._shape_message(a, tensor, what, dims))
        if a.ndim and a.shape[0] == 0:
            raise ShapeError(f"{what} {name} is an empty batch")
        for fact in self._facts_of[name] if facts else self._always_facts_of[name]:
            self._check_fact(fact, a, data_dtype)
        return a

    def _shape_message(self, a, tensor, what, dims) -> str:
        """Which layer reads the array, and for each axis of the wrong length the size the model was
        declared with and the parameters that size shapes too (the position table a longer context
        would overrun): a model's sizes are fixed when it is declared."""
        shape = "(" + ", ".join("B" if d is None else str(d) for d in dims) + ")"
        reader = f" (read by layer {tensor.reader})" if tensor.reader else ""
        message = f"{what} {tensor.name} has shape {a.shape}, expected {shape}{reader}"
        if a.ndim != len(dims):
            return message
        for axis, (want, got) in enumerate(zip(dims, a.shape)):
            if want is None or want == got:
                continue
            size = tensor.sizes[axis]
            message += (f"; axis {axis} is the size {size} = {want} the model was declared with"
                        f"{tensor.also_shapes[axis]}: declare the model with {size} = {got}")
        return message

    def _check_fact(self, fact, a, data_dtype):
        """A declared fact on an argument, checked before a kernel relies on it: a probability fact
        over the last axis by the module's compiled check (one pass), and only when that finds a
        row off, by the fact's NumPy check (the reference, which words the error)."""
        if self._simplex_check and isinstance(fact, SimplexFact) and fact.axis % a.ndim == a.ndim - 1:
            rows = a.reshape(-1, a.shape[-1])
            if self._call("_first_row_off_simplex", rows, fact.cached_tolerance(a, data_dtype)) < 0:
                return
        fact.check(a, data_dtype=data_dtype)

    def _inputs(self, x, facts=False) -> list:
        """The model's inputs as arrays in kernel order: one array for a one-input model; a list, a
        tuple or a dict by name for a model with several."""
        if hasattr(x, "arrays"):            # runtime.model.Inputs
            x = list(x.arrays)
        if len(self._xs) == 1:
            if isinstance(x, list) and len(x) == 1:
                x = x[0]
            if isinstance(x, dict):
                x = x.get(self._x.name, x)
            return [self._array(x, self._x, "input", facts)]
        if isinstance(x, dict):
            missing = [t.name for t in self._xs if t.name not in x]
            if missing:
                raise ShapeError(f"missing inputs {missing}; the model takes {self.input_names}")
            x = [x[t.name] for t in self._xs]
        if not isinstance(x, (list, tuple)) or len(x) != len(self._xs):
            raise ShapeError(f"the model takes {len(self._xs)} inputs {self.input_names}: give a list or a "
                             f"dict of arrays")
        xs = [self._array(a, t, "input", facts) for a, t in zip(x, self._xs)]
        for a, t in zip(xs[1:], self._xs[1:]):
            if a.shape[0] != xs[0].shape[0]:
                raise ShapeError(f"input {t.name} has {a.shape[0]} rows but input {self._x.name} has "
                                 f"{xs[0].shape[0]}")
        return xs

    def _targets(self, y, facts=False) -> list:
        """The targets as arrays in kernel order: one array for a one-target model; a list, a tuple or
        a dict by name for a model with several (one per loss)."""
        if len(self._ys) == 1:
            if isinstance(y, dict):
                y = y.get(self._y.name, y)
            return [self._array(y, self._y, "target", facts)]
        if isinstance(y, dict):
            missing = [t.name for t in self._ys if t.name not in y]
            if missing:
                raise ShapeError(f"missing targets {missing}; the model takes {self.target_names}")
            y = [y[t.name] for t in self._ys]
        if not isinstance(y, (list, tuple)) or len(y) != len(self._ys):
            raise ShapeError(f"the model takes {len(self._ys)} targets {self.target_names} (one per loss): "
                             f"give a list or a dict of arrays")
        return [self._array(a, t, "target", facts) for a, t in zip(y, self._ys)]

    def _xy(self, x, y, facts=False):
        """Checked arrays; ``facts``: also every fact declared on them (before a gradient)."""
        if self._one_input_one_target and type(x) is np.ndarray and type(y) is np.ndarray:
            # the common call (one array each), without the several-inputs bookkeeping
            xa, ya = self._array(x, self._x, "input", facts), self._array(y, self._y, "target", facts)
            if xa.shape[0] != ya.shape[0]:
                raise ShapeError(f"input {self._x.name} has {xa.shape[0]} rows but target "
                                 f"{self._y.name} has {ya.shape[0]}")
            return xa, ya
        xs = self._inputs(x, facts)
        ys = self._targets(y, facts)
        for a, t in zip(ys, self._ys):
            if xs[0].shape[0] != a.shape[0]:
                raise ShapeError(f"input {self._x.name} has {xs[0].shape[0]} rows but target "
                                 f"{t.name} has {a.shape[0]}")
        return (*xs, *ys)

    # -- kernels ------------------------------------------------------------------------------
    def compile_in_background(self, kernels, worker=None) -> bool:
        """Start compiling ``kernels`` (names, e.g. ``["forward"]``) in a worker process, into
        Numba's on-disk cache, while this process compiles something else (see
        :mod:`chainrule.codegen.background`); the first call of one of them waits for the worker.
        Done only for a module just generated into a writable cache, when a core is idle;
        returns whether a worker was started. ``worker``: one already warming up
        (``compile_model(..., background=)``), given these kernels (or stopped when unusable)."""
        usable = not (self.in_memory or self.cache_hit or self._background is not None) \
            and all(hasattr(getattr(self.module, k), "compile") for k in kernels)
        # (a split module's drivers are Python: their kernels compile on first use)
        if not usable and worker is None:      # (a warm start: nothing to compile, nothing imported)
            return False
        from . import background
        if not usable or (worker is None and not background.idle_core()):
            if worker is not None:
                worker.stop()
            return False
        if worker is not None and worker.kernels:      # given its job when the module was written
            self._background = worker
            return True
        signatures = {k: background.argument_types(self.description, k) for k in kernels}
        if worker is not None:             # started before the module existed (compile_model)
            self._background = worker.assign(self.module_path, self.module.__name__, signatures)
        else:
            self._background = background.BackgroundCompile(self.module_path, self.module.__name__, signatures)
        return True

    @property
    def background_kernels(self) -> frozenset:
        """The kernels a worker is compiling for this module (empty when none is)."""
        return frozenset(self._background.kernels) if self._background is not None else frozenset()

    def compile_now(self, kernels):
        """Compile ``kernels`` (names) in this process now, for the argument types this wrapper
        passes, without running them: what the process does while a worker compiles the others
        (the demo's worker compiles ``train_step`` while ``fit`` compiles ``forward`` here).
        A split module's drivers are Python: their kernels compile on first use, not here."""
        from . import background
        from ._compile_worker import argument_type
        for name in kernels:
            kernel = getattr(self.module, name)
            if name not in self.background_kernels and hasattr(kernel, "compile"):
                kernel.compile(tuple(argument_type(a, self.module)
                                     for a in background.argument_types(self.description, name)))

    def _call(self, fn: str, *args, rows=None):
        """Run a kernel (on a batch of ``rows`` examples: with small products, on one BLAS
        thread, see blas.py). Numba writes its cache on a kernel's first call: if that write fails
        (a full disk, a cache made read-only meanwhile), switch to a module compiled in memory
        (one warning) instead of failing."""
        if self._background is not None and fn in self._background.kernels:
            # its compiled code is (being) written into the cache by the worker: wait for it,
            # then this first call loads it (or compiles it here, if the worker failed)
            background, self._background = self._background, None
            background.wait()
        try:
            if rows is not None and self._blas_single_rows < rows < self._one_thread_rows \
                    and self.blas_threads == "auto":
                return call_on_one_thread(getattr(self.module, fn), *args)
            return getattr(self.module, fn)(*args)
        except OSError as e:
            if self.in_memory:
                raise
            new = fall_back_in_memory(e, self._key, self._render, self.module_path.parent)
            if new is None:
                raise
            self.module, label, self.source = new
            self.module_path, self.cache_hit = Path(label), False
            self._workspaces.clear()
            return getattr(self.module, fn)(*args)

    def workspace(self, n_batch: int) -> tuple:
        """The training step's large temporaries for batches of ``n_batch`` (the module's
        ``workspace``), allocated at the first step of that size and reused by the next ones (see
        :mod:`chainrule.codegen.workspace`). The two sizes used last are kept: an epoch's full
        minibatches and its last, shorter one."""
        ws = self._workspaces.pop(n_batch, None)
        if ws is None:
            ws = self.module.workspace(n_batch)
        self._workspaces[n_batch] = ws            # the most recent last
        while len(self._workspaces) > 2:
            del self._workspaces[next(iter(self._workspaces))]
        return ws

    def predict(self, params, x, buffers=None) -> np.ndarray:
        """The output in evaluation mode (``buffers``: the running averages; None: initial ones)."""
        xs = self._inputs(x)
        return self._call("predict", *self._params(params), *self._buffers(buffers), *xs, rows=_rows(xs))

    def outputs(self, params, x, buffers=None) -> dict:
        """Every declared output in evaluation mode (noise at its mean): ``{name: array}`` (a VAE's
        reconstruction, μ and log σ²; an autoencoder's reconstruction and code)."""
        xs = self._inputs(x)
        values = self._call("outputs", *self._params(params), *self._buffers(buffers), *xs, rows=_rows(xs))
        return dict(zip(self.output_names, (np.asarray(v) for v in values)))

    def input_grads(self, params, x, y, seed=-1, buffers=None):
        """(cost, ``{input name: dC/d input}``): the derived adjoints of the inputs, for pulling a
        gradient back through this model (compile with ``input_grads=True``)."""
        if not self.has_input_grads:
            raise UnsupportedError(f"model {self.description.name}: compile_model(..., input_grads=True) "
                                   f"generates the input gradients; this module was compiled without")
        xy = self._xy(x, y, facts=True)
        cost, grads = self._call("input_grads", *self._params(params), *self._buffers(buffers),
                                 *xy, int(seed), rows=_rows(xy))
        return float(cost), dict(zip(self.input_names, grads))

    def forward(self, params, x, y, seed=-1, buffers=None):
        """(cost, first output). ``seed`` >= 0: training mode (dropout masks and noise drawn from
        that seed, batch statistics); < 0 (the default): evaluation mode (masks and noise take
        their mean, normalisation reads the running averages in ``buffers``)."""
        xy = self._xy(x, y)
        cost, out = self._call("forward", *self._params(params), *self._buffers(buffers),
                               *xy, int(seed), rows=_rows(xy))
        return float(cost), out

    def cost(self, params, x, y, seed=-1, buffers=None) -> float:
        return self.forward(params, x, y, seed, buffers)[0]

    def loss_and_grads(self, params, x, y, seed=-1, buffers=None, facts_checked=False):
        """(cost, gradients) of the training form of the cost (batch statistics); ``seed`` as in
        :meth:`forward`. With ``seed`` >= 0 it is a training step: ``buffers`` (required then, if
        the model has any) get their running averages updated in place. ``facts_checked``: as in
        :meth:`train_step`."""
        training = int(seed) >= 0 and bool(self.buffer_names)
        if training and buffers is None:
            raise TypeError("a training step (seed >= 0) of a model with running averages updates "
                            "its buffers: pass buffers= (init_buffers())")
        xy = self._xy(x, y, facts=not facts_checked)
        if training:
            self._check_training_batch(xy[0].shape[0])
        cost, grads = self._call("loss_and_grads", *self._params(params),
                                 *self._buffers(buffers, inplace=training), *xy, int(seed),
                                 self.workspace(xy[0].shape[0]), rows=_rows(xy))
        return float(cost), dict(zip(self.param_names, grads))

    def init_state(self) -> dict:
        """The optimiser's state, all zeros: ``{param name: {state name: array}}``."""
        return {p: {s: np.zeros(self.param_shapes[p], dtype=self.dtype) for s in self.state_names}
                for p in self.param_names}

    def hyper_vector(self, lr=None, step=1, clip=0.0, seed=0, **hyper) -> np.ndarray:
        """The ``hp`` argument of the generated ``train_step``: the step t, the clipping norm and
        the rule's hyperparameters (its declared defaults unless given, e.g. ``beta1=0.8``)."""
        if not hyper and self._hyper_template is not None:
            # the common call (no hyperparameter overrides): fill a copy of the defaults
            hp = self._hyper_template.copy()
            hp[0], hp[1], hp[2] = step, clip, seed
            if lr is not None:
                hp[self._eta_index] = lr
            return hp
        rule = self.description.rule
        values = dict(rule.defaults)
        if lr is not None:
            values["eta"] = float(lr)
        for k, v in hyper.items():
            name = rule.keywords.get(k, k)
            if name not in values:
                raise TypeError(f"optimizer {self.optimizer} has no hyperparameter {k!r} "
                                f"(it has {', '.join(values)})")
            values[name] = float(v)
        values["t"], values["clip"], values["seed"] = float(step), float(clip), float(seed)
        return np.array([values[n] for n in self.hyper_names], dtype=np.float64)

    def train_step(self, params, x, y, lr=None, state=None, step=1, clip=0.0, hp=None, seed=0,
                   buffers=None, facts_checked=False, **hyper) -> float:
        """One fused step: forward, backward and the optimiser's update, in place (parameters and
        ``state`` from :meth:`init_state`; ``step`` is t, 1 at the first update; ``seed`` (>= 0)
        seeds the step's dropout masks and noise; ``buffers`` (from :meth:`init_buffers`, needed
        when the model has running averages) are updated in place). ``facts_checked=True``: the
        caller has already checked the facts declared on ``x`` and ``y`` (``Network.fit`` checks
        the whole data set once, not every minibatch again); shapes and dtypes are checked in any
        case."""
        states = self._states(state, buffers)
        if hp is None:
            hp = self.hyper_vector(lr, step, clip, seed, **hyper)
        xy = self._xy(x, y, facts=not facts_checked)
        if self.buffer_names and hp[2] >= 0:
            self._check_training_batch(xy[0].shape[0])
        return float(self._call("train_step", *self._params(params, inplace=True), *states,
                                *self._buffers(buffers, inplace=True), *xy, hp,
                                self.workspace(xy[0].shape[0]), rows=_rows(xy)))

    def _states(self, state, buffers) -> list:
        """The optimiser's state arrays in kernel order, checked (and that buffers are given when
        the model has running averages)."""
        if self.buffer_names and buffers is None:
            raise TypeError("train_step of a model with running averages updates its buffers: "
                            "pass buffers= (init_buffers())")
        if self.state_names and state is None:
            raise TypeError(f"train_step with optimizer {self.optimizer} needs its state "
                            f"(init_state())")
        states = []
        for p in self.param_names:
            for s in self.state_names:
                a = state[p][s]
                if not isinstance(a, np.ndarray) or a.dtype != np.dtype(self.dtype) \
                        or not a.flags.c_contiguous or a.shape != self.param_shapes[p]:
                    raise TypeError(f"optimizer state {s} of {p} must be a C-contiguous "
                                    f"{self.dtype} array of shape {self.param_shapes[p]}")
                states.append(a)
        return states

    def stepper(self, params, state=None, buffers=None):
        """``step(x, y, hp) -> cost``: :meth:`train_step` for a training loop, with the optimiser's
        ``state`` and the ``buffers`` checked once here, bound for the loop (an epoch: replacing
        those dicts' arrays meanwhile is not seen), and the caller keeping the hyperparameter
        vector ``hp`` (:meth:`hyper_vector`) up to date. Each call still checks the batch's shapes
        and the parameters (attribute reads), not the declared facts (the caller has checked them on
        the whole data set, as ``facts_checked=True``). What it saves over ``train_step``: the
        keywords, the hyperparameter vector and the re-checked state, about a fifth of a demo step
        at batch 32 (``Network.fit`` uses it)."""
        fixed = (*self._states(state, buffers), *self._buffers(buffers, inplace=True))
        check_batch = bool(self.buffer_names)
        params_fast, xy_of, workspace, call = self._params_fast, self._xy, self.workspace, self._call

        def step(x, y, hp) -> float:
            xy = xy_of(x, y)
            rows = xy[0].shape[0]
            if check_batch and hp[2] >= 0:
                self._check_training_batch(rows)
            args = params_fast(params)
            if args is None:                 # not the common layout: checked and worded as always
                args = self._params(params, inplace=True)
            return float(call("train_step", *args, *fixed, *xy, hp, workspace(rows), rows=rows))
        return step


def module_key(model, dtype="float64", optimizer="sgd", input_grads=False, split=None,
               fingerprint=None) -> str:
    """The cache key of a model's module: the model, the dtype, the fused optimiser's rule,
    whether it generates the input gradients and a forced module layout (``split``)
    (``fingerprint``: the model's, when the caller has it)."""
    import sympy as sp

    from ..derive.optimizers import RULES, get_rule
    rule = get_rule(optimizer)
    # the default (SGD) keeps the plain key; any other rule's declaration is part of it
    extra = "" if rule is RULES["sgd"] else rule.name + "".join(t + sp.srepr(b) for t, b in rule.assignments)
    layout = "" if split is None else ("+split" if split else "+fused")
    return cache_key(model, check_dtype(dtype), extra + ("+input_grads" if input_grads else "") + layout,
                     fingerprint=fingerprint)


def is_cached(model, dtype="float64", optimizer="sgd", cache_dir=None) -> bool:
    """True when the kernel cache holds this model's module (generated and verified; Numba's
    compiled code for it may or may not be there yet)."""
    from .cache import cached_source
    return cached_source(module_key(model, dtype, optimizer), cache_dir) is not None


def compile_model(model, dtype="float64", cache_dir=None, optimizer="sgd",
                  input_grads=False, split=None, background=(), worker=None) -> CompiledModel:
    """Generate (or load from the cache) the kernels of ``model`` in ``dtype``, with the update of
    ``optimizer`` (a name or an ``UpdateRule``) fused into ``train_step``.

    ``model``: a ``chainrule.derive.Model``, or what ``build_model`` builds one from (a built-in
    name such as ``"demo"``, or a layer-list spec). Given a name and an optimiser's name, a second
    run reads the model's description from the cache (:mod:`chainrule.codegen.description`) and
    loads the kernels without building the symbolic model or importing SymPy; the model is built
    when something asks for it (``CompiledModel.model``: derivation, explanation, verification).

    ``cache_dir`` (default: ``$CHAINRULE_CACHE_DIR`` or ``~/.cache/chainrule/kernels``) must be a
    private directory (see :mod:`chainrule.codegen.cache`); when it cannot be written the kernels
    are compiled in memory with one :class:`~chainrule.codegen.cache.KernelCacheWarning`.

    ``input_grads=True`` also generates ``input_grads``: the cost's derived gradient with respect to
    every input (to pull a gradient back through this model into another one).

    ``split``: the module's layout (see :mod:`chainrule.codegen.split`): None chooses by size (a
    large model gets one compiled function per kernel and Python drivers, which compile in a
    fraction of the time of one giant function), True or False forces it.

    ``background``: kernels (names, e.g. ``["train_step"]``) to compile in a worker process when
    the module is generated now (a cold start) and a core is idle: the worker starts before the
    module is rendered and warms Numba up meanwhile (:mod:`chainrule.codegen.background`); the
    first call of one of them waits for it and loads its code from the cache. ``worker``: one the
    caller started warming up earlier still (``BackgroundCompile.warming_up``: ``chainrule demo``
    starts it before importing SymPy, so that its start-up and warm-up are over when the module
    exists); it is given ``background`` when the module is generated now, and stopped otherwise."""
    dtype = check_dtype(dtype)
    if worker is not None and not background:
        worker.stop()
        worker = None
    if isinstance(model, str):
        return _compile_recipe(model, dtype, cache_dir, optimizer, input_grads, split, background, worker)
    return _compile_model(model, dtype, cache_dir, optimizer, input_grads, split, background, worker=worker)


class _Renderer:
    """``render(cache=True)``: the module's source, generated from the symbolic model
    (``get_model()``, built only when the module is not cached); on a cold start with
    ``background`` kernels, a worker warming Numba up is started first (``self.worker``)."""

    def __init__(self, get_model, dtype, optimizer, input_grads, split, background, worker=None):
        self.get_model, self.dtype, self.optimizer = get_model, dtype, optimizer
        self.input_grads, self.split, self.background = input_grads, split, background
        self.worker = worker                # (one started by the caller: see compile_model)

    def __call__(self, cache=True):
        if cache and self.background and self.worker is None:
            from . import background as bg
            if bg.idle_core():
                self.worker = bg.BackgroundCompile.warming_up(self.dtype)
        # imported here: loading a cached module needs neither Jinja nor the lowering
        from ..derive.optimizers import get_rule
        from .render import plan_model, render_plan
        return render_plan(plan_model(self.get_model(), self.dtype, optimizer=get_rule(self.optimizer),
                                      input_grads=self.input_grads, split=self.split), cache=cache)


def _load(description, key, renderer, cache_dir, background, model=None) -> CompiledModel:
    described = []                      # (the description, made once)

    def describe():
        if not described:
            described.append(description())
        return described[0]

    def hand_to_worker(path, name):
        # the module was just generated: the warming worker gets its job now, while this process
        # imports the module (and Numba with it, 0.3 s on a cold start)
        if renderer.worker is not None:
            from .background import argument_types
            renderer.worker.assign(path, name, {k: argument_types(describe(), k) for k in background})
    try:
        module, path, source, hit = load_or_generate(key, renderer, cache_dir, on_written=hand_to_worker)
        cm = CompiledModel(describe(), module, path, source, hit, key=key, render=renderer, model=model)
    except BaseException:
        if renderer.worker is not None:
            renderer.worker.stop()
        raise
    if renderer.worker is not None:
        cm.compile_in_background(background, worker=renderer.worker)
    return cm


def _compile_model(model, dtype, cache_dir, optimizer, input_grads, split, background,
                   recipe=None, worker=None) -> CompiledModel:
    """``compile_model`` of a symbolic model (``recipe``: the name it was built from, if any)."""
    from ..derive.optimizers import get_rule
    from .cache import model_fingerprint
    rule = get_rule(optimizer)
    fingerprint = model_fingerprint(model)      # (a tenth of a second for a GPT: computed once)
    key = module_key(model, dtype, rule, input_grads, split, fingerprint=fingerprint)
    renderer = _Renderer(lambda: model, dtype, rule, input_grads, split, background, worker)
    return _load(lambda: ModelDescription.of(model, rule, dtype, input_grads, key, recipe, fingerprint),
                 key, renderer, cache_dir, background, model=model)


def _recipe_key(recipe, dtype, optimizer, input_grads, split) -> str:
    return recipe_key(recipe, dtype, f"{optimizer.lower()}|input_grads={bool(input_grads)}|split={split}")


def is_described(recipe: str, dtype="float64", optimizer="sgd", input_grads=False, split=None,
                 cache_dir=None) -> bool:
    """True when the cache holds the description of ``build_model(recipe)``'s module: then
    ``compile_model(recipe)`` loads it (a warm start), without SymPy. ``chainrule demo`` asks
    before starting a compile worker, which a warm start does not need."""
    return load_description(_recipe_key(recipe, check_dtype(dtype), optimizer, input_grads, split),
                            cache_dir) is not None


def _compile_recipe(recipe, dtype, cache_dir, optimizer, input_grads, split, background,
                    worker=None) -> CompiledModel:
    """``compile_model`` of ``build_model(recipe)``, through its cached description when there is one."""
    def build_model(recipe):           # the derivation engine: imported only when a model is built
        from ..derive.spec import build_model
        return build_model(recipe)
    if not isinstance(optimizer, str):    # a rule object: only its declaration keys the module
        return _compile_model(build_model(recipe), dtype, cache_dir, optimizer, input_grads, split,
                              background, recipe=recipe, worker=worker)
    rkey = _recipe_key(recipe, dtype, optimizer, input_grads, split)
    text = load_description(rkey, cache_dir)
    description = ModelDescription.from_json(text) if text is not None else None
    if description is None:               # the first run: built, derived, generated, then described
        cm = _compile_model(build_model(recipe), dtype, cache_dir, optimizer, input_grads, split,
                            background, recipe=recipe, worker=worker)
        save_description(rkey, cm.description.to_json(), cache_dir)
        return cm
    # (a module missing beside its description is generated again, from the model built then)
    renderer = _Renderer(lambda: build_model(recipe), dtype, optimizer, input_grads, split, background, worker)
    return _load(lambda: description, description.module_key, renderer, cache_dir, background)
