"""The project's one error type for bad input, in a module without heavy imports (the data tools
import it without torch or megatron-core)."""


class ConfigError(ValueError):
    """A configuration value is invalid; the message is one line naming the value and the fix."""
