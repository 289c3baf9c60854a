"""Layer 1, pure: batching, signatures, devices, metric states, early stopping, resources, config.

Nothing here imports Ray or touches files; tests of this layer run in milliseconds.
"""
