"""Layer 3, every touch of Ray: the session, the launcher (a Ray task or Ray Train), Ray Data
sources, the batch-inference pipeline, the ``TorchTrainer.fit`` driver, and ``compat``.
"""
