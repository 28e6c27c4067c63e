"""Entities: the customer (card holder), keyed as the data contract says."""

from _definitions import DEFINITIONS

customer = DEFINITIONS.entity
