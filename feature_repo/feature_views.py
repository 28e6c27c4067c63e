"""Feature views: aggregates over each customer's earlier events, with their TTL and tags."""

from _definitions import DEFINITIONS

customer_activity = DEFINITIONS.view
