"""The Feast objects of closedloop, derived from the data contract named by the configuration.

The other modules of this repository pick their objects from here, so that the `feast` CLI
(`eval "$(closedloop env)"; feast -c feature_repo plan`) sees exactly what the pipeline applies.
"""

from closedloop.stages.runtime import Runtime

_runtime = Runtime.from_env()
DEFINITIONS = _runtime.defs
