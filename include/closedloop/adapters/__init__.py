"""What runs the stages: the Airflow layer (:mod:`closedloop.adapters.airflow`), online serving, the exporter."""
