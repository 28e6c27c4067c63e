"""The ``closedloop`` command: what Airflow does not already do.

``generate`` writes a synthetic data set into the lake's landing zone, ``status`` shows the model's
champion, candidates and promotion history; ``airflow-config`` writes the embedded Airflow home and
``env`` prints the settings as shell exports (for the ``feast`` and ``mlflow`` CLIs).
"""

from __future__ import annotations

import json
import logging
from datetime import date, timedelta
from typing import Annotated

import typer

from closedloop.errors import ClosedloopError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log progress.")] = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


@app.command()
def generate(
    start: Annotated[str | None, typer.Option(help="First day, YYYY-MM-DD (default: DAYS days before today).")] = None,
    days: Annotated[int, typer.Option(min=1, help="Number of days of transactions.")] = 45,
    customers: Annotated[int, typer.Option(min=1)] = 2000,
    transactions_per_day: Annotated[int, typer.Option(min=1)] = 2000,
    seed: Annotated[int, typer.Option()] = 42,
    fraud_rate: Annotated[float, typer.Option(min=0.0, max=0.5)] = 0.01,
    covariate_drift: Annotated[float, typer.Option(min=0.0, help="Shift/rescale features from --drift-start.")] = 0.0,
    new_categories: Annotated[bool, typer.Option(help="Unknown categories appear from --drift-start.")] = False,
    concept_drift: Annotated[float, typer.Option(min=0.0, max=1.0, help="Change features->label from --drift-start.")
                             ] = 0.0,
    drift_start: Annotated[str | None, typer.Option(help="First drifted day, YYYY-MM-DD.")] = None,
    label_noise: Annotated[float, typer.Option(min=0.0, max=0.5, help="Share of labels flipped.")] = 0.0,
) -> None:
    """Write a seeded card-fraud data set as daily Parquet partitions into the lake's landing zone."""
    from closedloop.generate import GeneratorConfig
    from closedloop.generate import generate as run
    from closedloop.runtime import Runtime

    try:
        first = date.fromisoformat(start) if start else date.today() - timedelta(days=days)
        cfg = GeneratorConfig(
            start=first, days=days, customers=customers, transactions_per_day=transactions_per_day, seed=seed,
            fraud_rate=fraud_rate, covariate_drift=covariate_drift, new_categories=new_categories,
            concept_drift=concept_drift, drift_start=date.fromisoformat(drift_start) if drift_start else None,
            label_noise=label_noise,
        )
        rt = Runtime.from_env()
        uris = run(cfg, rt.lake, rt.contract)
    except (ClosedloopError, ValueError) as exc:
        _fail(exc)
    typer.echo(f"wrote {len(uris)} partitions for {first}..{first + timedelta(days=days - 1)} "
               f"under {rt.lake.uri('landing')}")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Show the champion, the candidates with their metrics and decisions, and the promotion history."""
    from closedloop.registry import status as registry_status
    from closedloop.runtime import Runtime

    try:
        rt = Runtime.from_env()
        report = registry_status(rt.client, rt.settings, rt.model_name)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
        return
    champ = report["champion"]
    typer.echo(f"model {report['model']} (tracking: {report['tracking_uri']})")
    if champ is None:
        typer.echo("champion: none yet (run the retraining DAG)")
    else:
        m = champ["metrics"]
        typer.echo(f"champion: version {champ['version']} trained on {champ['training_window']}, "
                   f"ROC AUC {m.get('roc_auc', float('nan')):.4f}, PR AUC {m.get('pr_auc', float('nan')):.4f}, "
                   f"recall@FPR {m.get('recall_at_fpr', float('nan')):.3f}")
        typer.echo(f"  run: {champ['run_id']}  artifacts: {champ.get('artifact_uri')}")
    typer.echo("versions:")
    for v in report["versions"]:
        aliases = ",".join(v["aliases"]) or "-"
        typer.echo(f"  v{v['version']:<4} {v['status'] or '-':<10} {aliases:<18} roc_auc="
                   f"{v['metrics'].get('roc_auc', float('nan')):.4f}  {v['reason'] or ''}")
    typer.echo("promotion history:")
    for h in report["history"]:
        typer.echo(f"  {h['at']}  v{h['from_version'] or '-'} -> v{h['to_version']}  by {h['actor']}: {h['reason']}")


@app.command()
def demo(
    warmup_days: Annotated[int, typer.Option(min=0, help="Days before the history (customer features' past).")
                           ] = 14,
    history_days: Annotated[int, typer.Option(min=7)] = 30,
    normal_days: Annotated[int, typer.Option(min=0)] = 2,
    drift_days: Annotated[int, typer.Option(min=1)] = 3,
    transactions_per_day: Annotated[int, typer.Option(min=100)] = 7000,
    customers: Annotated[int, typer.Option(min=10)] = 3500,
    port: Annotated[int, typer.Option()] = 8080,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the summary as JSON.")] = False,
) -> None:
    """Run the closed loop on the real Airflow scheduler: history, normal days, a new regime, a retrain."""
    from closedloop.demo import DemoPlan, run_demo
    from closedloop.runtime import Runtime

    plan = DemoPlan(warmup_days=warmup_days, history_days=history_days, normal_days=normal_days, drift_days=drift_days,
                    transactions_per_day=transactions_per_day, customers=customers)
    try:
        summary = run_demo(Runtime.from_env(), plan, port=port, say=typer.echo)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
    if summary["champion_after"] == summary["champion_before"]:
        typer.secho("the champion did not change: see the monitoring decisions above", fg=typer.colors.YELLOW)
        raise typer.Exit(code=2)


@app.command("airflow-config")
def airflow_config(
    force: Annotated[bool, typer.Option(help="Rewrite an existing airflow.cfg.")] = False,
    parallelism: Annotated[int, typer.Option(min=1, max=64)] = 4,
) -> None:
    """Write the embedded Airflow home's airflow.cfg (SQLite, LocalExecutor, the repo's DAGs)."""
    from closedloop.airflow_home import write_config
    from closedloop.settings import Settings

    typer.echo(str(write_config(Settings.from_env(), force=force, parallelism=parallelism)))


@app.command()
def env() -> None:
    """Print the resolved settings as shell exports (eval "$(closedloop env)")."""
    from closedloop.airflow_home import airflow_home
    from closedloop.settings import Settings

    s = Settings.from_env()
    values = {
        "CLOSEDLOOP_HOME": str(s.home), "CLOSEDLOOP_LAKE_URI": s.lake_uri, "AIRFLOW_HOME": str(airflow_home(s)),
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, **s.feast_env(),
    }
    for k, v in values.items():
        typer.echo(f"export {k}={json.dumps(v)}")


if __name__ == "__main__":
    app()
