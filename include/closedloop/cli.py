"""The ``closedloop`` command: what Airflow does not already do.

``generate`` writes a synthetic data set into the lake's landing zone, ``status`` shows the model's
champion, candidates and promotion history, ``history`` the promotion history alone, ``promote`` makes a
version champion by hand, ``report`` finds the drift reports; ``quarantine list|show|release`` inspects and releases the
partitions validation rejected, ``rollback`` gives ``champion`` back to an earlier version;
``serve`` answers scoring requests online (:mod:`closedloop.adapters.serving`), ``airflow-config`` writes the
embedded Airflow home and ``env`` prints the settings as shell exports
(for the ``feast`` and ``mlflow`` CLIs); ``models`` lists the deployment's models (``models/``) with their DAG
ids, lake and Feast project. Every command about one model takes ``--model`` (default: ``CLOSEDLOOP_MODEL``,
else the only model, else the one with the root layout).

Long work (``generate``, ``demo``) reports its progress on stderr, one line per step done with its counts and
seconds (``[3/78] landing/transactions/2026-03-03.parquet written (2000 rows, 0.1 s)``), so that stdout holds
only the result (the JSON of ``--json``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from datetime import date, timedelta
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from closedloop.adapters.serving import app_from_runtime
from closedloop.core.errors import ClosedloopError, DataValidationError
from closedloop.core.settings import Settings, check_model, model_entries, models_dir, select_model
from closedloop.devtools.airflow_home import ADMIN, airflow_home, ensure_password, home_problem, prepare_home
from closedloop.devtools.demo import DemoPlan, run_demo
from closedloop.devtools.generate import GeneratorConfig, simulate, write_landing
from closedloop.stages.drift import find_report
from closedloop.stages.feast_config import feast_env
from closedloop.stages.quarantine import list_quarantine, release, show
from closedloop.stages.registry import end_rollout, history, rollout_state
from closedloop.stages.registry import status as registry_status
from closedloop.stages.rollback import promote_manually
from closedloop.stages.rollback import rollback as run
from closedloop.stages.runtime import Runtime

if TYPE_CHECKING:
    from closedloop.core.settings import Settings
    from closedloop.stages.runtime import Runtime

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
quarantine_app = typer.Typer(no_args_is_help=True,
                             help="List, inspect and release the partitions that validation quarantined.")
app.add_typer(quarantine_app, name="quarantine")

ActorOption = Annotated[str | None, typer.Option(help="Who is acting, for the record (default: your login name).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON.")]


def _select_model(value: str | None) -> str | None:
    """``--model``: the model the command works on, for every settings read of this process (and its children)."""
    if value:
        os.environ["CLOSEDLOOP_MODEL"] = value.strip()
        try:
            select_model()  # an unknown name: one line naming the models, before any work
        except ClosedloopError as exc:
            _fail(exc)
    return value


ModelOption = Annotated[str | None, typer.Option(
    "--model", "-m", callback=_select_model, show_default=False,
    help="The model (a folder of CLOSEDLOOP_MODELS; default: CLOSEDLOOP_MODEL, else the only model, else the one "
         "with the root layout).")]


def _fail(exc: Exception) -> NoReturn:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=1)


def _settings() -> Settings:
    """The settings, or one line on stderr and exit 1 (an empty CLOSEDLOOP_HOME, a file as home...)."""
    try:
        return Settings.from_env()
    except ClosedloopError as exc:
        _fail(exc)


def _existing_runtime(reads: str) -> Runtime:
    """The runtime of a command that reads (or changes) what is already in ``reads``: "registry" or "lake".

    On a home that does not exist, when that store lives there, it says so and exits 1 creating nothing
    (``Runtime.from_env`` would make an empty home and report an empty world).
    """
    s = _settings()
    local = s.mlflow_tracking_uri.startswith("sqlite:") if reads == "registry" else s.lake_uri.startswith("file:")
    if local and not s.home.exists():
        _fail(ClosedloopError(f"no closedloop home at {s.home} (CLOSEDLOOP_HOME): nothing to read or change there; "
                              "point CLOSEDLOOP_HOME at an existing home, or make one (`make demo`, "
                              "`closedloop generate`)"))
    try:
        return Runtime.from_env()
    except ClosedloopError as exc:
        _fail(exc)


class _Progress:
    """Progress on stderr: ``[done/total] what (detail, seconds of this step)``; stdout stays the result's."""

    def __init__(self, total: int | None = None) -> None:
        self.total, self.done = total, 0
        self.started = self._last = time.monotonic()

    def say(self, text: str) -> None:
        """A line on stderr; the next step's seconds count from here."""
        typer.echo(text, err=True)
        self._last = time.monotonic()

    def step(self, what: str, detail: str = "") -> None:
        self.done += 1
        count = f"[{self.done}/{self.total}]" if self.total else f"[{self.done}]"
        self.say(f"{count} {what} ({detail + ', ' if detail else ''}{time.monotonic() - self._last:.1f} s)")

    def elapsed(self) -> float:
        return time.monotonic() - self.started


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
    structure: Annotated[float, typer.Option(min=0.0, max=3.0, help="Strength of the day factor and the weekly and "
                                             "daily cycles (0: independent days).")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print what was written as JSON.")] = False,
    model: ModelOption = None,
) -> None:
    """Write a seeded data set with the data contract's columns as daily Parquet partitions into the landing zone."""
    progress = _Progress()
    try:
        first = date.fromisoformat(start) if start else date.today() - timedelta(days=days)
        cfg = GeneratorConfig(
            start=first, days=days, customers=customers, transactions_per_day=transactions_per_day, seed=seed,
            fraud_rate=fraud_rate, covariate_drift=covariate_drift, new_categories=new_categories,
            concept_drift=concept_drift, drift_start=date.fromisoformat(drift_start) if drift_start else None,
            label_noise=label_noise, structure=structure,
        )
        rt = Runtime.from_env()
        c = rt.contract
        data = simulate(cfg, c)
        # one landing file per event day of the transactions and per arrival day of the labels
        progress.total = (data.transactions[c.event_timestamp].dt.floor("D").nunique()
                          + data.labels[c.label_timestamp].dt.floor("D").nunique())
        progress.say(f"simulated {len(data.transactions)} transactions of {customers} customers over {days} days "
                     f"({progress.elapsed():.1f} s); writing {progress.total} landing files")
        root = rt.lake.root + "/"
        uris = write_landing(data, rt.lake, c, on_written=lambda uri, rows: progress.step(
            f"{uri.removeprefix(root)} written", f"{rows} rows"))
    except (ClosedloopError, ValueError) as exc:
        _fail(exc)
    last = first + timedelta(days=days - 1)
    progress.say(f"done in {progress.elapsed():.1f} s")
    if as_json:
        typer.echo(json.dumps({"start": first.isoformat(), "end": last.isoformat(), "partitions": len(uris),
                               "transactions": len(data.transactions), "landing": rt.lake.uri("landing"),
                               "uris": uris}, indent=2))
        return
    typer.echo(f"wrote {len(uris)} partitions for {first}..{last} under {rt.lake.uri('landing')}")


@app.command()
def status(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
           model: ModelOption = None) -> None:
    """Show the champion, the candidates with their metrics and decisions, and the promotion history."""
    try:
        rt = _existing_runtime("registry")
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
    rollout = report.get("rollout")
    if rollout is not None:
        serves = f"{rollout['share']:g} of traffic (step {rollout['step']})" if rollout["mode"] == "canary" \
            else "in shadow"
        typer.echo(f"rollout: version {rollout['version']} ({rollout['mode']}) serves {serves} against champion "
                   f"version {rollout['champion']}, since {rollout['started_at']}")
    typer.echo("versions:")
    for v in report["versions"]:
        aliases = ",".join(v["aliases"]) or "-"
        typer.echo(f"  v{v['version']:<4} {v['status'] or '-':<10} {aliases:<18} roc_auc="
                   f"{v['metrics'].get('roc_auc', float('nan')):.4f}  {v['reason'] or ''}")
    typer.echo("promotion history:")
    for h in report["history"]:
        typer.echo(f"  {h['at']}  v{h['from_version'] or '-'} -> v{h['to_version']}  by {h['actor']}: {h['reason']}")


def _finding_line(f: dict) -> str:
    return f"{f['rule']}({f['column']})" if f.get("column") else str(f["rule"])


@quarantine_app.command("list")
def quarantine_list(
    include_released: Annotated[bool, typer.Option("--all", help="Also list the released partitions.")] = False,
    as_json: JsonOption = False,
    model: ModelOption = None,
) -> None:
    """Every quarantined partition: kind, day, file, rows and hash, when, and the blocking rules."""
    try:
        entries = list_quarantine(_existing_runtime("lake").lake, include_released=include_released)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(entries, indent=2, sort_keys=True, default=str))
        return
    if not entries:
        typer.echo("nothing is quarantined")
        return
    for e in entries:
        rules = ", ".join(_finding_line(f) for f in e["blocking"]) or "-"
        sha = (e["sha256"] or "")[:12] or "-"
        rows = "-" if e["rows"] is None else e["rows"]
        typer.echo(f"{e['kind']:<12} {e['day']}  {e['status']:<11} rows={rows}  sha256={sha}  "
                   f"at {e['quarantined_at'] or '-'}  blocking: {rules}")
        if e["status"] == "released":
            typer.echo(f"    released at {e['released_at']} by {e['released_by']}: {e['release_reason']}")
        else:
            typer.echo(f"    file: {e['uri'] or '(missing: release it with --file)'}")
            if e["file_changed_since_report"]:
                typer.echo("    the file changed since it was validated (fixed in place?): release it to validate it")
            if e["superseded_by_curated"]:
                typer.echo("    a later delivery of this day was curated: this copy is stale")


@quarantine_app.command("show")
def quarantine_show(
    kind: Annotated[str, typer.Argument(help="transactions or labels.")],
    day: Annotated[str, typer.Argument(help="The partition's day, YYYY-MM-DD.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole validation report as JSON.")] = False,
    model: ModelOption = None,
) -> None:
    """The validation report of a quarantined partition (its summary; the whole report with --json)."""
    try:
        found = show(_existing_runtime("lake").lake, kind, day)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(found["report"], indent=2, sort_keys=True, default=str))
        return
    typer.echo(f"{found['kind']} {found['day']}: quarantined at {found['quarantined_at'] or '-'}")
    typer.echo(f"file: {found['uri'] or '(missing)'}  report: {found['report_uri'] or '(missing)'}")
    typer.echo(found["summary"] or "(no report summary)")


@quarantine_app.command("release")
def quarantine_release(
    kind: Annotated[str, typer.Argument(help="transactions or labels.")],
    day: Annotated[str, typer.Argument(help="The partition's day, YYYY-MM-DD.")],
    reason: Annotated[str, typer.Option(help="What was wrong and what was fixed (recorded).")],
    file: Annotated[str | None, typer.Option("--file", help="A corrected Parquet file that replaces the "
                                             "quarantined one (default: the quarantined file, fixed in place).")
                    ] = None,
    actor: ActorOption = None,
    as_json: JsonOption = False,
    model: ModelOption = None,
) -> None:
    """Validate a fixed partition again with the same rules; curate it if it passes, else keep it quarantined."""
    try:
        rt = _existing_runtime("lake")
        record = release(rt.lake, rt.contract, kind, day, reason=reason, actor=actor, fixed_file=file)
    except DataValidationError as exc:
        typer.secho(str(exc), fg=typer.colors.RED, err=True)
        raise typer.Exit(code=1) from None
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(record, indent=2, sort_keys=True, default=str))
        return
    if record["status"] == "already_released":
        typer.echo(f"{kind} {day} was already released at {record['released_at']} by {record['actor']}: "
                   f"{record['reason']}")
        return
    typer.echo(f"{kind} {day} released by {record['actor']}: validated again and curated ({record['rows']} rows, "
               f"sha256 {record['new_sha256'][:12]}); recorded under quarantine/_released/")
    for w in record["warnings"]:
        typer.echo(f"  warning: {w}")
    if record.get("recomputed"):
        typer.echo(f"  feature rows of the later days recomputed: {', '.join(record['recomputed'])}")
    typer.echo(f'next: trigger the ingest DAG with {{"day": "{day}"}} to materialise it (it is not validated again)')


@app.command()
def rollback(
    reason: Annotated[str, typer.Option(help="Why the champion is rolled back (recorded in the history).")],
    to: Annotated[str | None, typer.Option("--to", help="The version to make champion (default: previous).")
                  ] = None,
    force: Annotated[bool, typer.Option(help="Allow a version the promotion gate rejected.")] = False,
    actor: ActorOption = None,
    as_json: JsonOption = False,
    model: ModelOption = None,
) -> None:
    """Give `champion` back to the previous champion (or --to VERSION), through the same compare-and-set."""
    try:
        rt = _existing_runtime("registry")
        result = run(rt.client, rt.settings, rt.model_name, reason=reason, version=to, actor=actor, force=force)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    typer.echo(f"{result.model}: champion v{result.from_version} -> v{result.to_version} (rollback by "
               f"{result.actor}: {result.reason}); v{result.from_version} is now 'previous'")


@app.command("rollout-stop")
def rollout_stop(
    reason: Annotated[str, typer.Option(help="Why the rollout is stopped (recorded in the history).")],
    actor: ActorOption = None,
    model: ModelOption = None,
) -> None:
    """Stop the rollout in progress without promoting it: its alias removed, all traffic back to the champion at
    the scoring service's next poll (docs/explanation/ROLLOUT.md)."""
    import getpass

    try:
        rt = _existing_runtime("registry")
        running = rollout_state(rt.client, rt.model_name)
        if running is None:
            raise ClosedloopError(f"{rt.model_name}: no rollout in progress")
        end_rollout(rt.client, rt.settings, running, promoted=False, reason=f"stopped by hand: {reason}",
                    actor=actor or getpass.getuser())
    except ClosedloopError as exc:
        _fail(exc)
    typer.echo(f"{rt.model_name}: the {running.mode} rollout of v{running.version} stopped; champion "
               f"v{running.champion} serves all traffic at the service's next poll")


@app.command("history")
def history_cmd(
    limit: Annotated[int, typer.Option(min=1, help="How many moves, newest first.")] = 50,
    as_json: JsonOption = False,
    model: ModelOption = None,
) -> None:
    """The promotion history: every move of `champion` (gate, rollback, manual), newest first."""
    try:
        rt = _existing_runtime("registry")
        moves = history(rt.client, rt.model_name, limit=limit)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(moves, indent=2, sort_keys=True, default=str))
        return
    if not moves:
        typer.echo(f"model {rt.model_name}: no promotion yet (the retraining DAG's gate makes the first)")
        return
    for h in moves:
        typer.echo(f"{h['at']}  {h['kind'] or '-':<9} v{h['from_version'] or '-'} -> v{h['to_version']}  "
                   f"by {h['actor']}: {h['reason']}")


@app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="The version to make champion (e.g. 4 or v4).")],
    reason: Annotated[str, typer.Option(help="Why this version should serve (recorded in the history).")],
    force: Annotated[bool, typer.Option(help="Allow a version the promotion gate rejected.")] = False,
    actor: ActorOption = None,
    as_json: JsonOption = False,
    model: ModelOption = None,
) -> None:
    """Make VERSION the champion by hand, through the same compare-and-set as the gate (kind `manual`)."""
    try:
        rt = _existing_runtime("registry")
        result = promote_manually(rt.client, rt.settings, rt.model_name, version, reason=reason, actor=actor,
                                  force=force)
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    before = f"v{result.from_version}" if result.from_version else "none"
    typer.echo(f"{result.model}: champion {before} -> v{result.to_version} (manual promotion by {result.actor}: "
               f"{result.reason})" + (f"; {before} is now 'previous'" if result.from_version else ""))


@app.command()
def report(
    day: Annotated[str | None, typer.Option(help="A day inside the report's window (YYYY-MM-DD) or the window's "
                                            "name <start>_<end> (default: the newest report).")] = None,
    html: Annotated[bool, typer.Option("--html", help="Print the Evidently HTML report itself.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report's figures and decision (JSON).")
                       ] = False,
    model: ModelOption = None,
) -> None:
    """Where the drift report is (the newest or --day's), or its contents with --html / --json."""
    if html and as_json:
        typer.secho("error: --html and --json exclude each other: pick one (or neither for the paths)",
                    fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    try:
        lake = _existing_runtime("lake").lake
        found = find_report(lake, day)
        if html:
            typer.echo(lake.read_bytes(found["html"]).decode())
            return
        doc = lake.read_json(found["json"])
    except FileNotFoundError as exc:
        _fail(ClosedloopError(f"the drift report {found['window']} is incomplete ({exc}): run drift_monitoring "
                              "for that window again"))
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps({**doc, **found}, indent=2, sort_keys=True, default=str))
        return
    decision = doc.get("decision", {})
    verdict = ("no verdict" if not decision.get("judged") else "DRIFT" if decision.get("drift") else "no drift")
    typer.echo(f"drift report {found['window']} (window {found['start']}..{found['end']}, end exclusive): {verdict}")
    for r in decision.get("reasons", []):
        typer.echo(f"  {r}")
    typer.echo(f"html: {found['html']}")
    typer.echo(f"json: {found['json']}")


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
    plan = DemoPlan(warmup_days=warmup_days, history_days=history_days, normal_days=normal_days, drift_days=drift_days,
                    transactions_per_day=transactions_per_day, customers=customers)
    try:
        # the story (each step with its seconds) is progress: stderr, so that --json's stdout is JSON alone
        summary = run_demo(Runtime.from_env(), plan, port=port, say=lambda text: typer.echo(text, err=True))
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
    show_login: Annotated[bool, typer.Option(help="Print the admin user's generated password.")] = False,
) -> None:
    """Prepare the embedded Airflow home: airflow.cfg (SQLite, LocalExecutor, the repo's DAGs, a login, a shared
    JWT secret), then `airflow db migrate`. Idempotent; a configuration that is not closedloop's is rewritten."""
    try:
        settings = Settings.deployment()  # one Airflow home for every model
    except ClosedloopError as exc:
        _fail(exc)
    try:
        cfg, rewritten = prepare_home(settings, force=force, parallelism=parallelism)
    except (RuntimeError, OSError) as exc:
        _fail(exc)
    if rewritten:
        typer.secho(f"rewrote {cfg}: {rewritten}", fg=typer.colors.YELLOW, err=True)
    typer.echo(str(cfg))
    if show_login:
        typer.echo(f"Airflow login: user {ADMIN}, password {ensure_password(settings)}")


KINDS = ("ingest", "batch_scoring", "drift_monitoring", "retraining", "skew_check", "rollback", "rollout",
         "housekeeping")


@app.command("models")
def models_cmd(
    dag_id: Annotated[str | None, typer.Option(
        "--dag-id", help="Print only the id of this DAG (ingest, retraining...) of the model (--model, or the "
                         "default one): scripts and the Makefile use it.")] = None,
    as_json: JsonOption = False,
    model: ModelOption = None,
) -> None:
    """List the deployment's models: DAG ids, lake, Feast project, configuration, and whether it loads."""
    try:
        if dag_id is not None:
            if dag_id not in KINDS:
                raise ClosedloopError(f"--dag-id {dag_id!r}: one of {', '.join(KINDS)}")
            typer.echo(select_model().dag_id(dag_id))
            return
        try:
            default = select_model().name
        except ClosedloopError:  # several models and none is the default: listing them is how to choose
            default = ""
        rows = []
        for entry in model_entries():
            s = Settings.from_env(model=entry.name)
            try:
                check_model(entry)
                problem = ""
            except (ClosedloopError, OSError) as exc:
                problem = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip())
            rows.append({"model": entry.name, "default": entry.name == default,
                         "layout": "namespaced" if entry.namespaced else "root",
                         "dag_ids": [entry.dag_id(k) for k in KINDS], "config": str(entry.config_path),
                         "lake": s.lake_uri, "feast_project": s.feast_project, "problem": problem})
    except ClosedloopError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    single = os.environ.get("CLOSEDLOOP_CONFIG", "").strip()
    typer.echo(f"models of {'CLOSEDLOOP_CONFIG=' + single if single else models_dir()}:")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        typer.echo(f"  {r['model']}{mark}: {r['layout']} layout, DAGs {r['dag_ids'][0]}, {r['dag_ids'][3]}..., "
                   f"lake {r['lake']}, Feast project {r['feast_project']}")
        if r["problem"]:
            typer.secho(f"    refused: {r['problem']}", fg=typer.colors.RED)


@app.command()
def env(model: ModelOption = None) -> None:
    """Print the resolved settings as shell exports (eval "$(closedloop env)")."""
    s = _settings()
    values = {
        "CLOSEDLOOP_HOME": str(s.home), "AIRFLOW_HOME": str(airflow_home(s)),
        # the model (and so its data set's schema): `feast -c feature_repo plan` derives its objects from it
        **({"CLOSEDLOOP_MODELS": str(s.models_dir), "CLOSEDLOOP_MODEL": s.model} if s.models_dir is not None
           else {"CLOSEDLOOP_CONFIG": str(s.config_path)}),
        "MLFLOW_TRACKING_URI": s.mlflow_tracking_uri, **feast_env(s),
    }
    for k, v in values.items():
        typer.echo(f"export {k}={json.dumps(v)}")
    problem = home_problem(s)
    if problem:  # stderr: stdout is eval'd
        typer.secho(f"note: the Airflow home {airflow_home(s)} is not prepared ({problem}): run "
                    "`closedloop airflow-config` before the airflow CLI", fg=typer.colors.YELLOW, err=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind (0.0.0.0 in a container).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    access_log: Annotated[bool, typer.Option(help="Log every request (uvicorn's access log); off by default: "
                                                  "/metrics counts requests by status, and a log line per "
                                                  "request costs the latency of a one-transaction request.")] = False,
    model: ModelOption = None,
) -> None:
    """Serve the champion over HTTP (POST /score, GET /health, /ready, /metrics); see docs/how-to/online-scoring.md."""
    import uvicorn

    try:
        rt = Runtime.from_env()
        api = app_from_runtime(rt)
    except ClosedloopError as exc:
        _fail(exc)
    if not rt.settings.serve_token:
        logging.getLogger(__name__).warning("CLOSEDLOOP_SERVE_TOKEN is not set: POST /score is open to anyone "
                                            "who reaches %s:%s", host, port)
    uvicorn.run(api, host=host, port=port, workers=1, log_level="info", access_log=access_log)


if __name__ == "__main__":
    app()
