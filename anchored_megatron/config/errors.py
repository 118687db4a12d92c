"""The one exception of the config layer; a leaf module so any package can raise it."""


class ConfigError(ValueError):
    """A bad option. The message starts with the option's dotted key (``parallel.tp: ...``)."""


def require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")
