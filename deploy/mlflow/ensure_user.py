"""Give closedloop its own MLflow login: run once per start of the stack by the ``mlflow-init`` service.

The Airflow services log runs and register models as this ordinary user, never as MLflow's admin, whose
password stays with the MLflow server and this job. The user is created when missing, and its password set
to the one in ``.env`` otherwise, so that changing it there and restarting the stack rotates it.

Environment: ``MLFLOW_TRACKING_URI``, ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` (the admin),
``CLOSEDLOOP_MLFLOW_USERNAME``/``CLOSEDLOOP_MLFLOW_PASSWORD`` (the user to ensure).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("closedloop.deploy.mlflow")


def main() -> int:
    from mlflow.exceptions import RestException
    from mlflow.server import get_app_client

    missing = [name for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                 "CLOSEDLOOP_MLFLOW_USERNAME", "CLOSEDLOOP_MLFLOW_PASSWORD")
               if not os.environ.get(name)]
    if missing:
        log.error("set %s (see .env.example)", ", ".join(missing))
        return 2
    username, password = os.environ["CLOSEDLOOP_MLFLOW_USERNAME"], os.environ["CLOSEDLOOP_MLFLOW_PASSWORD"]
    if username == os.environ["MLFLOW_TRACKING_USERNAME"]:
        log.error("CLOSEDLOOP_MLFLOW_USERNAME must differ from the MLflow admin's name: closedloop is no admin")
        return 2
    client = get_app_client("basic-auth", tracking_uri=os.environ["MLFLOW_TRACKING_URI"])
    try:
        user = client.get_user(username)
    except RestException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_user(username, password)
        log.info("created the MLflow user %s", username)
        return 0
    if user.is_admin:
        log.error("the MLflow user %s is an admin; closedloop must run as an ordinary user", username)
        return 2
    client.update_user_password(username, password)
    log.info("the MLflow user %s exists; its password is the one in .env", username)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
