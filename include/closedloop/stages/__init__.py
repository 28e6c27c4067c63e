"""The stages of the loop: plain typed functions, one module per step, no Airflow.

They import the core and each other (downwards: a stage's shared pieces live in the lower module);
:mod:`~closedloop.stages.runtime` builds their collaborators (lake, contract, Feast, MLflow) from settings.
"""
