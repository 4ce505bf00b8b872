"""fedfm: Federated Foundation Models."""

__version__ = "0.1.0"


def run(config=None, overrides=()):
    """Run one federated job. ``config``: a RunConfig, a dict, a YAML path or None (the default job)."""
    from fedfm.runner import run as _run

    return _run(config, overrides)


__all__ = ["run", "__version__"]
