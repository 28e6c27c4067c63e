"""The secrets closedloop handles, registered with Airflow's log masking.

Airflow masks the values of its connections and of variables with secret-looking names; closedloop reads
more from the environment (the MLflow server's credentials, object-store keys, passwords inside service
URIs). :func:`mask_secrets` hands each to Airflow's masker when the code runs inside an Airflow task (where
:mod:`closedloop.adapters.airflow.secrets` registers it), so that a log line, an exception or an XCom that
happens to hold one shows ``***``. No secret is ever written into MLflow tags or params (the tests check the
runs for them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from urllib.parse import urlsplit

# Environment variables whose values are secrets wherever they are set.
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|WEBHOOK|CREDENTIAL)",
                         re.IGNORECASE)
# Environment variables that may hold a URI with a password in it.
URI_NAMES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CLOSEDLOOP_FEAST_REGISTRY", "CLOSEDLOOP_REDIS_URL",
             "CLOSEDLOOP_LAKE_URI", "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "CLOSEDLOOP_ONLINE_STORE")
MIN_LENGTH = 5  # shorter values would mask ordinary words in logs
# Where the values go: Airflow's masker once :mod:`closedloop.adapters.airflow.secrets` is imported.
MASKERS: list[Callable[[str], None]] = []


def uri_password(uri: str) -> str | None:
    """The password in ``scheme://user:<password>@host/...``, if any."""
    try:
        return urlsplit(uri).password
    except ValueError:
        return None


def secret_values(env: dict[str, str] | None = None) -> list[str]:
    """The secret values present in ``env`` (default: the process environment), longest first."""
    env = dict(os.environ if env is None else env)
    found = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_LENGTH}
    for name in URI_NAMES:
        secret = uri_password(env.get(name, ""))
        if secret and len(secret) >= MIN_LENGTH:
            found.add(secret)
    return sorted(found, key=len, reverse=True)


def register_masker(mask: Callable[[str], None]) -> None:
    """Hand every secret :func:`mask_secrets` finds to ``mask`` (the Airflow layer registers Airflow's masker)."""
    if mask not in MASKERS:
        MASKERS.append(mask)


def mask_secrets(env: dict[str, str] | None = None) -> int:
    """Register the secrets with the registered maskers (Airflow's, inside Airflow); returns how many."""
    if not MASKERS:  # not in an Airflow process: nothing logs through its masker
        return 0
    values = secret_values(env)
    for value in values:
        for mask in MASKERS:
            mask(value)
    return len(values)
