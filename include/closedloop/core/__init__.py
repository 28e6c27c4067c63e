"""The core: errors, settings (the one reader of the environment), the lake, the data contract, metrics.

Imports nothing else of closedloop.
"""
