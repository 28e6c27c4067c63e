"""The model's inputs and its fitted form: what training, its Dask engine and the scorers share.

The model matrix (:func:`model_matrix`, docs/explanation/gpu-matrix.md) and what is built on it (:func:`feature_frame`,
:func:`dmatrix`, :func:`predict`, :func:`predict_inplace`), the CUDA devices visible, and what an engine hands to
the logging (:class:`Fitted`, the booster :func:`trimmed` at its best iteration). Below
:mod:`closedloop.stages.training` and :mod:`closedloop.stages.dask_training`, which import it at the top (it imports
neither); :mod:`closedloop.stages.training` re-exports the names, where they were first defined.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd
    import xgboost as xgb

    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)


def cuda_device_count() -> int:
    """Number of CUDA devices the driver reports (0 without a driver or a GPU)."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        count = ctypes.c_int(0)
        if lib.cuInit(0) != 0 or lib.cuDeviceGetCount(ctypes.byref(count)) != 0:
            return 0
        return count.value
    return 0


# rows per block of the copy into the row-major matrix (a block of all columns stays in the CPU's cache), and
# the rows from which the copy is split over threads (NumPy releases the GIL while it copies)
_BLOCK_ROWS = 16_384
_PARALLEL_ROWS = 1_000_000


def _object_codes(values: Any) -> tuple[Any, Any]:
    """``(codes, distinct)`` of an object array by the identity of its objects: ``values[i] is distinct[codes[i]]``.

    Hashes the objects' addresses, not their values: about four times faster than hashing the strings, and
    exact, since each distinct object is then mapped on its own (pyarrow shares one object per distinct
    string of a column chunk, so Parquet reads give few). The addresses are read while ``values`` holds
    the objects.
    """
    import ctypes

    import numpy as np
    import pandas as pd

    values = np.ascontiguousarray(values)
    addresses = np.ctypeslib.as_array(ctypes.cast(values.ctypes.data, ctypes.POINTER(ctypes.c_size_t)),
                                      shape=(len(values),))
    codes, distinct_addresses = pd.factorize(addresses)
    where = np.empty(len(distinct_addresses), dtype=np.intp)
    where[codes] = np.arange(len(values), dtype=np.intp)  # one row holding each distinct object
    return codes, values[where]


@lru_cache(maxsize=64)
def _declared_index(categories: tuple[str, ...]) -> dict[str, int]:
    index = {c: i for i, c in enumerate(categories)}
    if len(index) != len(categories):
        raise ValueError(f"Categorical categories must be unique: {categories}")  # as pd.Categorical says
    return index


def category_codes(column: pd.Series, categories: tuple[str, ...], dtype: Any = "float32") -> Any:
    """The index of each value of ``column`` in the declared ``categories``; missing (NaN) outside them.

    The mapping of the model since the first version: a value's text (``astype("string")``) looked up in
    the declared categories (``pd.Categorical``); a missing value or one outside them is NaN. Here that
    mapping is applied once per distinct value, and spread to the rows through one array of codes.
    """
    import numpy as np
    import pandas as pd

    if len(column) == 0:
        return np.empty(0, dtype=dtype)
    if column.dtype == object:
        codes, distinct = _object_codes(column.to_numpy())
    else:  # pandas categorical, string or Arrow dtypes: their own factorize (a missing value gets code -1)
        codes, distinct = pd.factorize(column)
    distinct = np.asarray(distinct, dtype=object)
    if all(type(v) is str for v in distinct):  # text is its own string: the index in the declared categories
        index = _declared_index(tuple(categories))
        known = np.array([index.get(v, -1) for v in distinct], dtype=np.int64)
    else:
        known = pd.Categorical(pd.Series(distinct, dtype=object).astype("string").astype(object),
                               categories=list(categories)).codes
    table = np.append(np.where(known < 0, np.nan, known), np.nan).astype(dtype)  # code -1 -> the last: NaN
    return table[codes]


def _numeric_values(column: pd.Series) -> Any:
    """A numeric feature's values as a NumPy float array, as ``pd.to_numeric(errors="coerce")`` then float64."""
    import numpy as np
    import pandas as pd

    if isinstance(column.dtype, np.dtype) and column.dtype.kind in "fiub":
        values = column.to_numpy()
        return values if values.dtype.kind == "f" else values.astype(np.float64)
    return pd.to_numeric(column, errors="coerce").astype("float64").to_numpy()


def model_matrix(frame: pd.DataFrame, contract: DataContract, *, dtype: Any = "float32", device: str = "cpu") -> Any:
    """The model's input matrix: one row per row of ``frame``, the contract's features in order, row-major.

    The one matrix of training, batch scoring and online scoring. Categorical features become the index
    of their value in the contract's declared categories (:func:`category_codes`; a value outside them
    is missing, which the trees route like any missing value); numeric features are coerced to numbers
    (non-numbers missing). Each column is copied once into the matrix, by blocks of rows.

    ``dtype`` float32 is what XGBoost computes on (a float64 matrix gives the same scores: XGBoost rounds
    it to float32). ``device="cuda"`` returns a CuPy array on the current GPU, assembled there: each column
    is cast on the host and copied to the device once, the row-major matrix is made on the device (the
    ``gpu`` extra installs CuPy; without it, a warning and the host matrix). The values are the same.
    """
    import numpy as np

    names = list(contract.model_features)
    categorical = contract.categorical
    columns = [category_codes(frame[name], categorical[name], dtype) if name in categorical
               else _numeric_values(frame[name]) for name in names]
    rows = len(frame)
    threads = min(8, os.cpu_count() or 1) if rows >= _PARALLEL_ROWS else 1
    cupy = _cupy() if device == "cuda" else None
    if cupy is not None:
        return _device_matrix(cupy, columns, rows, dtype, threads)
    x = np.empty((rows, len(names)), dtype=dtype)

    def fill(start: int, stop: int) -> None:
        for lo in range(start, stop, _BLOCK_ROWS):
            hi = min(lo + _BLOCK_ROWS, stop)
            for j, values in enumerate(columns):
                x[lo:hi, j] = values[lo:hi]

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        step = -(-rows // threads)
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda lo: fill(lo, min(lo + step, rows)), range(0, rows, step)))
    else:
        fill(0, rows)
    return x


def _device_matrix(cupy: Any, columns: list[Any], rows: int, dtype: Any, threads: int) -> Any:
    """The row-major matrix of ``columns`` on the GPU: each column cast on the host (threads) and copied to
    the device once, as a row of the transposed matrix; the device transposes it (same values: a copy)."""
    import numpy as np

    transposed = cupy.empty((len(columns), rows), dtype=dtype)

    def cast(values: Any) -> Any:
        return np.ascontiguousarray(values, dtype=dtype)

    if threads > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:  # casts run ahead while the copies go in order
            for j, host in enumerate(pool.map(cast, columns)):
                transposed[j].set(host)
    else:
        for j, values in enumerate(columns):
            transposed[j].set(cast(values))
    return cupy.ascontiguousarray(transposed.T)


def _cupy() -> Any:
    """CuPy, or None with a warning (once) when it is not installed."""
    try:
        import cupy
    except ImportError:
        _warn_once("CuPy is not installed (the gpu extra): the model matrix stays in host memory")
        return None
    return cupy


def to_device(x: Any, device: str) -> Any:
    """``x`` on ``device``: a CuPy array for ``cuda`` when CuPy is installed (else ``x``)."""
    cupy = _cupy() if device == "cuda" else None
    return x if cupy is None else cupy.asarray(x)


def _warn_once(message: str, _said: set[str] = set()) -> None:  # noqa: B006 (the set remembers what was said)
    if message not in _said:
        _said.add(message)
        log.warning(message)


def on_device(x: Any) -> bool:
    """Whether ``x`` lives in GPU memory (a CuPy array or anything with the CUDA array interface)."""
    return hasattr(x, "__cuda_array_interface__")


def feature_frame(frame: pd.DataFrame, contract: DataContract) -> pd.DataFrame:
    """:func:`model_matrix` in float64 as a DataFrame: the contract's feature names, ``frame``'s index.

    For what needs names: the logged model's signature and input example (the model also works as a plain
    MLflow pyfunc on it), the Dask engine's partitions. The values are ``frame``'s own (float64 holds them all).
    """
    import pandas as pd

    return pd.DataFrame(model_matrix(frame, contract, dtype="float64"), index=frame.index,
                        columns=list(contract.model_features))


def dmatrix(frame: pd.DataFrame, contract: DataContract, with_label: bool = True, *, device: str = "cpu",
            ref: xgb.DMatrix | None = None, max_bin: int | None = None) -> xgb.DMatrix:
    """XGBoost's matrix of ``frame``: :func:`model_matrix`, with the label and the features' names and types.

    On ``cuda`` (with CuPy) the matrix and the label go to the GPU once and XGBoost gets a QuantileDMatrix
    of the device arrays, the fastest of the paths measured on an H200 (docs/explanation/gpu-matrix.md); a
    validation matrix takes the training one as ``ref`` (its bins). Elsewhere a DMatrix of the host matrix.
    The names and types ("float", what XGBoost records for a float64 DataFrame column) are the ones the
    models have always carried, so a model and its JSON are the same as before.
    """
    import xgboost as xgb

    x = model_matrix(frame, contract, device=device)
    label = to_device(frame[contract.label].to_numpy(), device) if with_label else None
    names = list(contract.model_features)
    info: dict[str, Any] = {"label": label, "feature_names": names, "feature_types": ["float"] * len(names)}
    if on_device(x):
        return xgb.QuantileDMatrix(x, ref=ref, **info, **({"max_bin": max_bin} if max_bin else {}))
    return xgb.DMatrix(x, **info)


def predict(booster: xgb.Booster, frame: pd.DataFrame, contract: DataContract) -> Any:
    """Fraud scores of ``frame``'s rows."""
    return booster.predict(dmatrix(frame, contract, with_label=False))


def predict_inplace(booster: xgb.Booster, frame: pd.DataFrame, contract: DataContract) -> Any:
    """The scores :func:`predict` gives, without building a DMatrix: for batch scoring and online scoring.

    Same matrix (:func:`model_matrix`), same trees, same float32 values: the scores are equal (tests compare
    them); about ten times faster for one row. The booster's feature names are checked against the
    contract's, as XGBoost does for a DataFrame.
    """
    names = booster.feature_names
    if names is not None and names != list(contract.model_features):
        raise ValueError(f"feature_names mismatch: the model has {names}, the contract {contract.model_features}")
    return booster.inplace_predict(model_matrix(frame, contract))


def trimmed(booster: xgb.Booster) -> xgb.Booster:
    """The booster cut at its best iteration (what gets logged and served)."""
    best = getattr(booster, "best_iteration", None)
    return booster[: best + 1] if best is not None else booster


@dataclass(frozen=True)
class Fitted:
    """What an engine hands to the logging: the model (trimmed, on the CPU) and what it was judged on."""

    engine: str
    model: xgb.Booster
    best_iteration: int
    threshold: float
    validation_metrics: dict[str, float]
    holdout_metrics: dict[str, float]
    reference_sample: pd.DataFrame  # at most training.reference_sample_rows rows of the train split
    reference_stats: dict[str, Any]
    example: pd.DataFrame  # a few holdout rows, for the model's signature and input example
    holdout_y: Any = None  # the holdout's labels and the model's scores on it, for the plots
    holdout_scores: Any = None
    # every row of the training window (time-ordered) with its out-of-sample score: what the drift thresholds
    # and the performance band are calibrated on (None: the engine does not provide it; thresholds stay fixed)
    reference_window: pd.DataFrame | None = None
