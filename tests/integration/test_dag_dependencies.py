"""The loop as Airflow draws it: ingest -> scoring -> monitoring -> retraining in the UI's dependency graph.

The project's DAGs are parsed and written to the session's metadata database as the DAG processor does,
then read back by the very function behind the UI's dependency graph (``/ui/dependencies``,
``get_scheduling_dependencies``). The first edges are Assets (an outlet of one DAG scheduling the next); the
last is a ``trigger`` dependency that Airflow records from drift_monitoring's ``TriggerDagRunOperator``.
"""

from __future__ import annotations

from collections import deque

import pytest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def graph(airflow_db) -> dict[str, list[dict]]:
    from airflow.api_fastapi.core_api.services.ui.dependencies import get_scheduling_dependencies
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db

    manager = DagBundlesManager()
    manager.sync_bundles_to_db()
    bundle = manager.get_bundle("dags-folder")
    bundle.initialize()
    bag = BundleDagBag(dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name)
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, bundle.name, bundle.version)
    return get_scheduling_dependencies()


def _path(edges: list[dict], start: str, goal: str) -> list[str] | None:
    """The shortest directed path from ``start`` to ``goal`` (None: there is none)."""
    after: dict[str, list[str]] = {}
    for e in edges:
        after.setdefault(e["source_id"], []).append(e["target_id"])
    came_from: dict[str, str | None] = {start: None}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        if node == goal:
            path = [node]
            while came_from[path[-1]] is not None:
                path.append(came_from[path[-1]])
            return path[::-1]
        for nxt in after.get(node, []):
            if nxt not in came_from:
                came_from[nxt] = node
                todo.append(nxt)
    return None


def test_the_graph_leads_from_ingest_through_scoring_and_monitoring_to_retraining(graph):
    nodes = {n["id"]: n for n in graph["nodes"]}
    path = _path(graph["edges"], "dag:ingest", "dag:retraining")
    assert path is not None, graph
    shown = [(nodes[n]["type"], nodes[n]["label"]) for n in path]
    assert shown == [
        ("dag", "ingest"),
        ("asset", "closedloop_curated"),  # ingest's outlet schedules batch_scoring
        ("dag", "batch_scoring"),
        ("asset", "closedloop_predictions"),  # batch_scoring's outlet schedules drift_monitoring
        ("dag", "drift_monitoring"),
        ("trigger", "trigger_retraining"),  # the TriggerDagRunOperator
        ("dag", "retraining"),
    ], shown


def test_the_edges_point_downstream_only(graph):
    # nothing leads back: retraining starts nothing, monitoring does not schedule scoring, scoring not ingest
    for later, earlier in [("dag:retraining", "dag:ingest"), ("dag:retraining", "dag:drift_monitoring"),
                           ("dag:drift_monitoring", "dag:batch_scoring"), ("dag:batch_scoring", "dag:ingest")]:
        assert _path(graph["edges"], later, earlier) is None, (later, earlier)
