"""The Airflow layer: task wrappers and error mapping, extra links, the notifier, secret masking.

The only part of closedloop that imports Airflow.
"""
