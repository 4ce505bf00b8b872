"""Federated continual (lifelong) learning: staged client streams, an always-on server loop,
forgetting metrics and mitigations (replay, L2/EWC, per-task adapters). Entry point:
:func:`fedfm.drivers.continual.run_continual`, reached by ``fedfm run`` when ``continual.enabled``."""
