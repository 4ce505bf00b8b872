from fedfm.config.load import load_config, resolve_config, to_dict, validate
from fedfm.config.schema import RunConfig

__all__ = ["RunConfig", "load_config", "resolve_config", "to_dict", "validate"]
