"""closedloop: the fraud model's closed loop, as layers whose imports point only down.

- :mod:`closedloop.core`: the data contract, the lake, settings, errors, metrics: what every stage shares.
- :mod:`closedloop.stages`: one module per step of the loop (validation, ingest, features, training, registry,
  gate, scoring, drift, monitoring, ...), plain typed functions, and :mod:`closedloop.stages.runtime`, which
  builds their collaborators from settings.
- :mod:`closedloop.adapters`: the outside worlds the stages are run from: the Airflow layer
  (:mod:`closedloop.adapters.airflow`, the only code that imports Airflow), online serving and the exporter.
- :mod:`closedloop.devtools`: the demo, its data generator and the embedded stack; nothing in the product
  imports them.
- :mod:`closedloop.cli`: the ``closedloop`` command, on top of all of them.

The ``[tool.importlinter]`` contracts of pyproject.toml check these rules (``lint-imports``, run by ``make test``).
"""
