"""Developer tools: the demo, its synthetic data set, the embedded Airflow home and stack.

Only the CLI imports them; nothing in core, stages or adapters does.
"""
