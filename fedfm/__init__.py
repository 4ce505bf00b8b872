"""fedfm: Federated Foundation Models."""

import logging as _logging

__version__ = "0.1.0"

# peft imports torchao whenever it is installed (model.quantize uses it): its start-up notes about CUDA-only
# kernels that cannot load on this machine, and torch's about the enums torchao registers, are not the user's
# concern. Real errors still show.
for _name in ("torchao", "torch.utils._pytree"):
    _logging.getLogger(_name).setLevel(_logging.ERROR)


def run(config=None, overrides=(), resume=None, overwrite=False):
    """Run one federated job. ``config``: a RunConfig, a dict, a YAML path or None (the default job).

    ``resume=RUN_DIR``: continue a killed run from its latest checkpoint (with its own config).
    ``overwrite=True``: clear a non-empty ``out`` folder first (otherwise a new run refuses it).
    """
    from fedfm.runner import run as _run

    return _run(config, overrides, resume=resume, overwrite=overwrite)


__all__ = ["run", "__version__"]
