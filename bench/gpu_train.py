"""The train step on GPU and CPU vs the fastest bare ``xgboost.train`` measured in the same run (issue 23).

    python bench/gpu_train.py                              # 10M rows, device cuda then cpu (nthread 2)
    python bench/gpu_train.py --device cpu --rows 1000000  # the CPU side on a machine without a GPU
    python bench/gpu_train.py --rows 1000000 --json out.json --old   # figures as JSON; the old step too

Needs only Python 3.10+ with ``xgboost`` (a CUDA build for ``--device cuda``: the PyPI wheel is one),
``numpy``, ``pandas`` and ``scipy``, and CuPy for the device-array paths: no Airflow, MLflow, Feast or
closedloop installation. Run from a checkout of closedloop whose light dependencies (``pyyaml``,
``fsspec``) are installed, it times the project's own ``closedloop.stages.training.fit`` (found through
``include/`` next to this file); elsewhere it times :func:`fit_like_closedloop`, a copy of the train step
as it was before issue 23 (the per-column pandas matrix, a DMatrix per split). The line says which one ran.

The data: ``--rows`` synthetic labelled transactions with the benchmark schema's shape (30 model features:
28 numeric, 2 categorical with 10 and 5 categories as Python strings; about 1.5 % positives), split in
time order 70/15 (the holdout is not used by the train step). The parameters are the benchmark
configuration's (``bench/config/closedloop.yaml``: 100 rounds, early stopping 30, depth 5, ``hist``...),
with ``device`` set per run and ``nthread`` ``--cpu-threads`` (default 2: the benchmark machine's 2
cores) on the CPU and all cores on the GPU runs (XGBoost's default).

The train step starts from the pandas frames; the bare paths from the float32 matrices (codes for the
categoricals) built before their clock, each timing the matrices' construction and ``xgboost.train`` with
the same parameters and early stopping:

- ``dmatrix``: a DMatrix per split from the host arrays (the plain path);
- ``qdm_host``: a QuantileDMatrix per split from the host arrays (validation with ``ref`` the training one);
- ``qdm_device`` (cuda, with CuPy): the arrays copied to the GPU (timed), a QuantileDMatrix of each.

The floor is the fastest of them; the ratio to the plain DMatrix is printed too. Every path must grow the
same number of trees; the step's validation scores are compared with the plain DMatrix's (max difference).
``--old`` also times the step before issue 23 (the per-column pandas matrix). Targets (issue 23): at 10M
rows the train step within 1.2x of the GPU floor, and within 1.10x of the CPU floor on 2 threads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd

PARAMS: dict[str, Any] = {  # bench/config/closedloop.yaml, training.params
    "objective": "binary:logistic", "eval_metric": ["aucpr", "logloss"], "tree_method": "hist", "max_depth": 5,
    "learning_rate": 0.08, "subsample": 0.9, "colsample_bytree": 0.9, "min_child_weight": 2, "seed": 7,
}
TRAINING = {"num_boost_round": 100, "early_stopping_rounds": 30, "target_fpr": 0.01}
CATEGORIES = {
    "merchant_category": ("grocery", "fuel", "restaurant", "retail", "electronics", "travel", "entertainment",
                          "online_services", "health", "cash"),
    "channel": ("chip", "contactless", "online", "atm", "phone"),
}
NUMERIC = 28


def synthetic(rows: int, seed: int = 11) -> tuple[pd.DataFrame, SimpleNamespace]:
    """``rows`` labelled rows with 28 numeric and 2 categorical features, in time order; and their contract."""
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    logit = np.full(rows, -5.0)
    for i in range(NUMERIC):
        x = rng.standard_normal(rows, dtype=np.float32).astype(np.float64)
        if i % 7 == 0:
            x[rng.random(rows) < 0.02] = np.nan  # some missing values, as the aggregates have
        cols[f"f{i:02d}"] = x
        if i < 6:
            logit += (0.6 - 0.1 * i) * np.nan_to_num(x)
    for name, cats in CATEGORIES.items():
        codes = rng.integers(0, len(cats), rows)
        cols[name] = np.asarray(cats, dtype=object)[codes]
        logit += np.where(codes == 0, 0.8, 0.0)
    cols["is_fraud"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    frame = pd.DataFrame(cols)
    contract = SimpleNamespace(model_features=[f"f{i:02d}" for i in range(NUMERIC)] + list(CATEGORIES),
                               categorical=CATEGORIES, label="is_fraud")
    return frame, contract


# -- the train step as closedloop.stages.training.fit did it before issue 23 (the fallback and --old) ---------------
def feature_frame(frame: pd.DataFrame, contract: Any) -> pd.DataFrame:
    x = pd.DataFrame(index=frame.index)
    for name in contract.model_features:
        if name in contract.categorical:
            codes = pd.Categorical(frame[name].astype("string").astype(object),
                                   categories=list(contract.categorical[name])).codes
            x[name] = np.where(codes < 0, np.nan, codes).astype("float64")
        else:
            x[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return x


def threshold_at_fpr(y: np.ndarray, scores: np.ndarray, target_fpr: float) -> float:
    negatives = np.sort(scores[y == 0])[::-1]
    if len(negatives) == 0:
        return 0.5
    k = int(np.floor(target_fpr * len(negatives)))
    return float(np.nextafter(negatives[min(k, len(negatives) - 1)], np.inf))


def fit_like_closedloop(train: pd.DataFrame, validation: pd.DataFrame, contract: Any, config: dict[str, Any],
                        device: str) -> tuple[Any, float]:
    import xgboost as xgb

    params = {**config["params"], "device": device}
    dtrain = xgb.DMatrix(feature_frame(train, contract), label=train[contract.label].to_numpy())
    dval = xgb.DMatrix(feature_frame(validation, contract), label=validation[contract.label].to_numpy())
    booster = xgb.train(params, dtrain, num_boost_round=int(config["num_boost_round"]),
                        evals=[(dval, "validation")], early_stopping_rounds=int(config["early_stopping_rounds"]),
                        verbose_eval=False)
    scores = booster.predict(dval, iteration_range=(0, booster.best_iteration + 1))
    return booster, threshold_at_fpr(validation[contract.label].to_numpy(), scores, float(config["target_fpr"]))


def train_step() -> tuple[Any, str]:
    """closedloop.stages.training.fit when the project is importable here, else the copy above."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "include"))
    try:
        from closedloop.stages.training import fit
    except ImportError as exc:
        return fit_like_closedloop, f"fit_like_closedloop (closedloop not importable: {exc})"
    return fit, "closedloop.training.fit"


def host_matrix(frame: pd.DataFrame, contract: Any) -> np.ndarray:
    """The bare paths' input: the float32 matrix of the model's features (codes for the categoricals)."""
    return feature_frame(frame, contract).to_numpy(np.float32)


def roc_auc(y: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged), without scikit-learn."""
    from scipy.stats import rankdata

    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((rankdata(scores)[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def timed(fn: Any) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bare_paths(device: str, params: dict[str, Any], x_train: np.ndarray, y_train: np.ndarray,
               x_val: np.ndarray, y_val: np.ndarray) -> dict[str, Any]:
    """The bare paths available on ``device``: name -> a function that builds the matrices and trains."""
    import xgboost as xgb

    def train(dtrain: Any, dval: Any) -> Any:
        return xgb.train(params, dtrain, num_boost_round=TRAINING["num_boost_round"], evals=[(dval, "validation")],
                         early_stopping_rounds=TRAINING["early_stopping_rounds"], verbose_eval=False)

    def dmatrix() -> Any:
        return train(xgb.DMatrix(x_train, label=y_train), xgb.DMatrix(x_val, label=y_val))

    def quantile(xt: Any, yt: Any, xv: Any, yv: Any) -> Any:
        dtrain = xgb.QuantileDMatrix(xt, label=yt)
        return train(dtrain, xgb.QuantileDMatrix(xv, label=yv, ref=dtrain))

    paths: dict[str, Any] = {"dmatrix": dmatrix, "qdm_host": lambda: quantile(x_train, y_train, x_val, y_val)}
    if device == "cuda":
        try:
            import cupy
        except ImportError:
            print("no CuPy here: the device-array path is not measured", flush=True)
        else:
            def qdm_device() -> Any:
                out = quantile(cupy.asarray(x_train), cupy.asarray(y_train), cupy.asarray(x_val), cupy.asarray(y_val))
                cupy.cuda.runtime.deviceSynchronize()
                return out

            paths["qdm_device"] = qdm_device
    return paths


def main(argv: list[str] | None = None) -> int:
    import json

    import xgboost as xgb

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--device", choices=("both", "cuda", "cpu"), default="both")
    p.add_argument("--cpu-threads", type=int, default=2, help="nthread of the CPU runs (default 2)")
    p.add_argument("--old", action="store_true", help="also time the train step before issue 23")
    p.add_argument("--repeat", type=int, default=1, help="time the step and the bare paths this many times "
                   "(interleaved) and report the medians (default 1)")
    p.add_argument("--json", help="append the figures to this JSON-lines file")
    args = p.parse_args(argv)
    if args.device in ("both", "cuda") and not xgb.build_info().get("USE_CUDA"):
        p.error("this xgboost is built without CUDA: install a CUDA build (the PyPI wheel) or use --device cpu")

    step, step_name = train_step()
    t0 = time.perf_counter()
    frame, contract = synthetic(args.rows)
    n_train, n_val = int(args.rows * 0.70), int(args.rows * 0.15)
    train, validation = frame.iloc[:n_train].reset_index(drop=True), frame.iloc[n_train:n_train + n_val]
    validation = validation.reset_index(drop=True)
    del frame
    x_train, x_val = host_matrix(train, contract), host_matrix(validation, contract)
    y_train, y_val = train[contract.label].to_numpy(), validation[contract.label].to_numpy()
    print(f"xgboost {xgb.__version__}; {args.rows:,} rows ({n_train:,} train, {n_val:,} validation, "
          f"{y_train.mean():.2%} positives), 30 features; data made in {time.perf_counter() - t0:.1f} s; "
          f"train step: {step_name}", flush=True)
    matrix_s = device_matrix_s = None
    if step_name == "closedloop.training.fit":  # the step's host work alone: both splits' model matrices
        from closedloop.stages.training import model_matrix

        matrix_s, x_new = timed(lambda: (model_matrix(train, contract), model_matrix(validation, contract)))
        same_matrix = bool(np.array_equal(x_new[0], x_train, equal_nan=True)
                           and np.array_equal(x_new[1], x_val, equal_nan=True))
        del x_new
        print(f"model_matrix of both splits {matrix_s:.2f} s (equal to the old matrix: {same_matrix})", flush=True)
        if args.device in ("both", "cuda"):
            try:
                import cupy
            except ImportError:
                cupy = None
            if cupy is not None:
                model_matrix(validation.head(1000), contract, device="cuda")  # CuPy's kernels' first start
                cupy.cuda.runtime.deviceSynchronize()

                def on_device() -> Any:
                    both = (model_matrix(train, contract, device="cuda"), model_matrix(validation, contract,
                                                                                      device="cuda"))
                    cupy.cuda.runtime.deviceSynchronize()
                    return both

                device_matrix_s, x_dev = timed(on_device)
                same_dev = bool(np.array_equal(cupy.asnumpy(x_dev[0]), x_train, equal_nan=True)
                                and np.array_equal(cupy.asnumpy(x_dev[1]), x_val, equal_nan=True))
                del x_dev
                print(f"model_matrix on cuda of both splits {device_matrix_s:.2f} s (equal to the old matrix: "
                      f"{same_dev})", flush=True)

    devices = ["cuda", "cpu"] if args.device == "both" else [args.device]
    seconds: dict[str, tuple[float, float]] = {}
    for device in devices:
        params = {**PARAMS, "device": device}
        if device == "cpu":
            params["nthread"] = args.cpu_threads
        config = {**TRAINING, "params": params}
        if device == "cuda":  # the CUDA context and kernels' first start, outside every figure
            warm = xgb.train(params, xgb.DMatrix(x_train[:10_000], label=y_train[:10_000]), num_boost_round=2)
            paths = bare_paths(device, params, x_train[:10_000], y_train[:10_000], x_val[:10_000], y_val[:10_000])
            for name, fn in list(paths.items()):
                try:
                    fn()
                except Exception as exc:
                    print(f"bare path {name} failed at the warm-up: {type(exc).__name__}: {exc}", flush=True)
            del warm
        runs: dict[str, list[float]] = {}  # seconds of each repetition; the figures are their medians
        trees: dict[str, int] = {}
        plain = None
        paths = bare_paths(device, params, x_train, y_train, x_val, y_val)
        for _ in range(args.repeat):  # interleaved, so that a slow spell of the machine hits every path
            s, (booster, threshold) = timed(lambda config=config, device=device: step(train, validation, contract,
                                                                                      config, device))
            runs.setdefault("step", []).append(s)
            trees["step"] = booster.num_boosted_rounds()
            if args.old and step_name == "closedloop.training.fit":  # the step before issue 23, in the same rounds
                s, _ = timed(lambda config=config, device=device: fit_like_closedloop(train, validation, contract,
                                                                                      config, device))
                runs.setdefault("old", []).append(s)
            for name, fn in paths.items():
                try:
                    s, model = timed(fn)
                except Exception as exc:  # one path failing (a library mismatch on the device) leaves the others
                    print(f"bare path {name} failed: {type(exc).__name__}: {exc}", flush=True)
                    continue
                runs.setdefault(name, []).append(s)
                trees[name] = model.num_boosted_rounds()
                if name == "dmatrix":
                    plain = model
        all_runs = {k: list(v) for k, v in runs.items()}
        s_step = float(np.median(runs.pop("step")))
        old_s = float(np.median(runs.pop("old"))) if "old" in runs else None
        bare = {name: float(np.median(v)) for name, v in runs.items()}
        dval = xgb.DMatrix(x_val)
        best = (0, booster.best_iteration + 1)
        diff = float(np.abs(booster.predict(dval, iteration_range=best, validate_features=False)
                            - plain.predict(dval, iteration_range=best)
                            ).max()) if plain is not None and plain.best_iteration == booster.best_iteration else None
        auc = {"step": roc_auc(y_val, booster.predict(dval, iteration_range=best, validate_features=False))}
        if plain is not None:
            auc["dmatrix"] = roc_auc(y_val, plain.predict(dval, iteration_range=(0, plain.best_iteration + 1)))
        floor_name = min(bare, key=bare.get)
        floor = bare[floor_name]
        same = "same" if len(set(trees.values())) == 1 else "DIFFERENT"
        threads = f"nthread {args.cpu_threads}" if device == "cpu" else "all cores for the host side"
        to_plain = s_step / bare.get("dmatrix", np.nan)
        print(f"{device:<5} train step {s_step:7.2f} s   floor {floor:7.2f} s ({floor_name})   ratio "
              f"{s_step / floor:5.2f}x   to plain DMatrix {to_plain:5.2f}x   {threads}", flush=True)
        print("      " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vs) + " s" for k, vs in all_runs.items()),
              flush=True)
        print("      bare: " + ", ".join(f"{k} {v:.2f} s" for k, v in bare.items())
              + (f"; old step {old_s:.2f} s ({old_s / floor:.2f}x)" if old_s else ""), flush=True)
        print(f"      trees {trees} ({same}; best iteration {booster.best_iteration}); threshold {threshold:.6f}; "
              f"max |step - plain DMatrix| validation score "
              f"{'n/a (other best iteration)' if diff is None else f'{diff:.2e}'}; validation ROC AUC "
              + ", ".join(f"{k} {v:.6f}" for k, v in auc.items()), flush=True)
        seconds[device] = (s_step, floor)
        if args.json:
            record = {"rows": args.rows, "device": device, "threads": args.cpu_threads if device == "cpu" else None,
                      "xgboost": xgb.__version__, "step_name": step_name, "step_s": round(s_step, 3),
                      "floor": floor_name, "floor_s": round(floor, 3), "ratio": round(s_step / floor, 3),
                      "ratio_to_dmatrix": round(to_plain, 3),
                      "bare_s": {k: round(v, 3) for k, v in bare.items()},
                      "old_step_s": None if old_s is None else round(old_s, 3),
                      "model_matrix_s": None if matrix_s is None else round(matrix_s, 3),
                      "model_matrix_cuda_s": None if device_matrix_s is None else round(device_matrix_s, 3),
                      "pandas": pd.__version__,
                      "repeat": args.repeat, "runs_s": {k: [round(v, 3) for v in vs] for k, vs in all_runs.items()},
                      "validation_auc": auc, "trees": trees, "best_iteration": int(booster.best_iteration),
                      "threshold": threshold, "max_score_diff_to_dmatrix": diff,
                      "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            with open(args.json, "a") as f:
                f.write(json.dumps(record) + "\n")
    if len(seconds) == 2:
        print(f"GPU speed-up over the CPU ({args.cpu_threads} threads): train step "
              f"{seconds['cpu'][0] / seconds['cuda'][0]:.1f}x, floor {seconds['cpu'][1] / seconds['cuda'][1]:.1f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
