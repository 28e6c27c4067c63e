"""Feature services: what the model reads, offline for training and online for scoring."""

from _definitions import DEFINITIONS

model_features = DEFINITIONS.service
