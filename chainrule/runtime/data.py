"""Data sets as float arrays: scikit-learn's small sets, synthetic sets, MNIST-1D, Fashion-MNIST.

Every loader returns ``(x, y)``: ``x`` a float array of shape ``(N, features)``; ``y`` an integer
class vector of shape ``(N,)`` for classification sets (a :class:`Network` one-hot encodes it for a
classification loss) or a float array ``(N, outputs)`` for regression sets. Synthetic sets are seeded.
"""
from __future__ import annotations

import glob
import gzip
import os

import numpy as np

from .errors import ChainruleError, DataError, LabelError

__all__ = [
    "DATASETS",
    "fashion_mnist_available",
    "load_breast_cancer",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_iris",
    "load_mnist1d",
    "load_wine",
    "make_moons",
    "make_sine",
    "make_spirals",
    "make_xor",
    "mnist1d_available",
    "one_hot",
    "standardize",
    "train_test_split",
]


def _as(x, dtype):
    return np.ascontiguousarray(x, dtype=dtype)


def standardize(x, mean=None, std=None):
    """(x - mean) / std per column; columns with zero spread are left centred. Returns (x, mean, std)."""
    x = np.asarray(x, dtype=float)
    mean = x.mean(axis=0) if mean is None else mean
    std = x.std(axis=0) if std is None else std
    safe = np.where(std > 0, std, 1.0)
    return (x - mean) / safe, mean, std


# -- scikit-learn's bundled sets (no download) -------------------------------------------------
def _sklearn_data_file(name):
    """The path of a data file bundled with the installed scikit-learn, found without importing
    scikit-learn (its import, through SciPy's statistics, takes longer than training the demo),
    or None."""
    import importlib.util
    try:
        spec = importlib.util.find_spec("sklearn")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(root, "datasets", "data", name)
        if os.path.isfile(path):
            return path
    return None


def load_digits(dtype="float64"):
    """8×8 handwritten digits: 1797 examples, 64 features scaled to [0, 1], 10 classes.

    Read from the CSV file that scikit-learn installs (what ``sklearn.datasets.load_digits``
    reads), with scikit-learn's own loader as the fallback."""
    path = _sklearn_data_file("digits.csv.gz")
    if path is not None:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
        if table.shape == (1797, 65):
            return _as(table[:, :64] / 16.0, dtype), table[:, 64].astype(np.int64)
    from sklearn.datasets import load_digits as _ld
    d = _ld()
    return _as(d.data / 16.0, dtype), d.target.astype(np.int64)


def _sk_standardised(loader, dtype):
    d = loader()
    x, _, _ = standardize(d.data)
    return _as(x, dtype), d.target.astype(np.int64)


def load_iris(dtype="float64"):
    """Iris: 150 examples, 4 standardised features, 3 classes."""
    from sklearn.datasets import load_iris as _l
    return _sk_standardised(_l, dtype)


def load_breast_cancer(dtype="float64"):
    """Breast cancer Wisconsin: 569 examples, 30 standardised features, 2 classes."""
    from sklearn.datasets import load_breast_cancer as _l
    return _sk_standardised(_l, dtype)


def load_wine(dtype="float64"):
    """Wine: 178 examples, 13 standardised features, 3 classes."""
    from sklearn.datasets import load_wine as _l
    return _sk_standardised(_l, dtype)


# -- synthetic sets -------------------------------------------------------------------------------
def make_moons(n=400, noise=0.1, seed=0, dtype="float64"):
    """Two interleaving half circles: ``n`` examples, 2 features, 2 classes."""
    rng = np.random.default_rng(seed)
    n0 = n // 2
    n1 = n - n0
    t0 = rng.uniform(0, np.pi, n0)
    t1 = rng.uniform(0, np.pi, n1)
    x = np.concatenate([np.stack([np.cos(t0), np.sin(t0)], 1),
                        np.stack([1 - np.cos(t1), 0.5 - np.sin(t1)], 1)])
    x += rng.normal(0, noise, x.shape)
    y = np.concatenate([np.zeros(n0, np.int64), np.ones(n1, np.int64)])
    perm = rng.permutation(n)
    return _as(x[perm], dtype), y[perm]


def make_spirals(n=600, classes=3, noise=0.2, turns=1.0, seed=0, dtype="float64"):
    """``classes`` interleaved spiral arms: ``n`` examples, 2 features."""
    rng = np.random.default_rng(seed)
    per = [n // classes + (1 if c < n % classes else 0) for c in range(classes)]
    xs, ys = [], []
    for c, m in enumerate(per):
        r = np.linspace(0.05, 1.0, m)
        t = 2 * np.pi * turns * r + 2 * np.pi * c / classes + rng.normal(0, noise, m) * r
        xs.append(np.stack([r * np.cos(t), r * np.sin(t)], 1))
        ys.append(np.full(m, c, np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    perm = rng.permutation(n)
    return _as(x[perm], dtype), y[perm]


def make_xor(n=400, noise=0.05, seed=0, dtype="float64"):
    """XOR: points in [-1, 1]², class 1 where the coordinates' signs differ. 2 features, 2 classes."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 2))
    y = ((x[:, 0] > 0) != (x[:, 1] > 0)).astype(np.int64)
    x += rng.normal(0, noise, x.shape)
    return _as(x, dtype), y


def make_sine(n=256, noise=0.05, seed=0, dtype="float64"):
    """Regression: y = sin(x) + noise, x uniform in [-π, π]. Returns x (n, 1), y (n, 1)."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-np.pi, np.pi, (n, 1))
    y = np.sin(x) + rng.normal(0, noise, x.shape)
    return _as(x, dtype), _as(y, dtype)


# -- MNIST-1D (generated locally by the optional `mnist1d` package) -------------------------------
def mnist1d_available() -> bool:
    try:
        import mnist1d  # noqa: F401
    except ImportError:
        return False
    return True


def load_mnist1d(seed=0, dtype="float64", split="all"):
    """MNIST-1D (40 features, 10 classes), generated by the ``mnist1d`` package (not a dependency).

    ``split`` = "train", "test" or "all" (the two concatenated, train first).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as e:
        raise ChainruleError("MNIST-1D needs the optional package 'mnist1d' "
                             "(pip install mnist1d); it is not installed") from e
    args = get_dataset_args()
    args.seed = seed
    d = make_dataset(args)
    parts = {"train": (d["x"], d["y"]), "test": (d["x_test"], d["y_test"])}
    if split == "all":
        x = np.concatenate([d["x"], d["x_test"]])
        y = np.concatenate([d["y"], d["y_test"]])
    elif split in parts:
        x, y = parts[split]
    else:
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    return _as(x, dtype), np.asarray(y, dtype=np.int64)


# -- Fashion-MNIST from Debian's dataset-fashion-mnist package --------------------------------------
FASHION_MNIST_DIRS = ("/usr/share/dataset-fashion-mnist", "/usr/share/fashion-mnist",
                      "/usr/share/datasets/fashion-mnist")


def _find_fashion(kind: str):
    """(images, labels) paths of the train or t10k split, searched in the known folders and in any
    ``/usr/share/*fashion*`` folder (one level, plus their direct subfolders)."""
    prefix = "train" if kind == "train" else "t10k"
    roots = list(FASHION_MNIST_DIRS) + sorted(glob.glob("/usr/share/*fashion*"))
    roots += [d for r in list(roots) for d in sorted(glob.glob(os.path.join(r, "*"))) if os.path.isdir(d)]
    for root in dict.fromkeys(roots):
        if not os.path.isdir(root):
            continue
        found = []
        for what in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            hits = sorted(glob.glob(os.path.join(root, f"{prefix}-{what}*")))
            if hits:
                found.append(hits[0])
        if len(found) == 2:
            return tuple(found)
    return None


def fashion_mnist_available() -> bool:
    return _find_fashion("train") is not None


def _read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    return arr.reshape(dims)


def load_fashion_mnist(kind="train", dtype="float32"):
    """Fashion-MNIST (784 features scaled to [0, 1], 10 classes) from Debian's dataset-fashion-mnist.

    Raises a ChainruleError if the files are not installed (``apt-get install dataset-fashion-mnist``).
    """
    found = _find_fashion(kind)
    if found is None:
        raise ChainruleError("Fashion-MNIST files not found under /usr/share "
                             "(apt-get install dataset-fashion-mnist)")
    images, labels = found
    x = _read_idx(images).reshape(-1, 28 * 28) / 255.0
    y = _read_idx(labels).astype(np.int64)
    return _as(x, dtype), y


DATASETS = {
    "digits": load_digits, "iris": load_iris, "breast_cancer": load_breast_cancer, "wine": load_wine,
    "moons": make_moons, "spirals": make_spirals, "xor": make_xor, "sine": make_sine,
    "mnist1d": load_mnist1d, "fashion_mnist": load_fashion_mnist,
}


def load_dataset(name: str, **kw):
    if name not in DATASETS:
        raise ChainruleError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name](**kw)


# -- splitting and encoding -------------------------------------------------------------------------
def _is_label_vector(y) -> bool:
    y = np.asarray(y)
    if y.ndim != 1:
        return False
    if np.issubdtype(y.dtype, np.integer):
        return True
    return bool(np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)))


def train_test_split(x, y, test_size=0.2, seed=0, stratify=None):
    """Seeded split into ``(x_train, x_test, y_train, y_test)``.

    ``stratify`` None means: stratified by class when ``y`` is an integer label vector, a plain
    shuffled split otherwise. ``test_size`` is a fraction in (0, 1) or a count.
    """
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} rows but y has {len(y)}")
    n_test = round(test_size * n) if isinstance(test_size, float) else int(test_size)
    if not 0 < n_test < n:
        raise ValueError(f"test_size={test_size!r} leaves {n_test} of {n} examples for the test set")
    rng = np.random.default_rng(seed)
    if stratify is None:
        stratify = _is_label_vector(y)
    if stratify:
        labels = y.astype(np.int64)
        classes, counts = np.unique(labels, return_counts=True)
        # per-class test counts: proportional, largest remainders first, summing to n_test
        exact = counts * n_test / n
        take = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - take), kind="stable")[: n_test - take.sum()]:
            take[k] += 1
        test_idx = []
        for c, t in zip(classes, take):
            members = np.flatnonzero(labels == c)
            test_idx.append(rng.permutation(members)[:t])
        test_idx = np.concatenate(test_idx)
        mask = np.zeros(n, bool)
        mask[test_idx] = True
        test_idx = rng.permutation(np.flatnonzero(mask))
        train_idx = rng.permutation(np.flatnonzero(~mask))
    else:
        perm = rng.permutation(n)
        test_idx, train_idx = perm[:n_test], perm[n_test:]
    return x[train_idx], x[test_idx], y[train_idx], y[test_idx]


def one_hot(labels, n_classes=None, dtype="float64", name="y"):
    """Integer class labels (N,) -> one-hot rows (N, n_classes); labels must lie in [0, n_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise LabelError(f"labels for tensor {name} must be a vector (N,), got shape {labels.shape}")
    if not _is_label_vector(labels):
        bad = np.flatnonzero(~np.isfinite(labels) | (labels != np.round(labels)))
        first = int(bad[0]) if bad.size else 0
        raise LabelError(f"labels for tensor {name} must be integers; label {labels[first].item()!r} "
                         f"at index {first} is not")
    labels = labels.astype(np.int64)
    if n_classes is None:
        n_classes = int(labels.max()) + 1 if labels.size else 0
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        i = int(bad[0])
        raise LabelError(f"label {labels[i]} at index {i} is outside the range 0..{n_classes - 1} "
                         f"of the {n_classes} classes of tensor {name} "
                         f"({bad.size} label{'s' if bad.size > 1 else ''} out of range)")
    out = np.zeros((labels.size, n_classes), dtype=dtype)
    out[np.arange(labels.size), labels] = 1
    return out
