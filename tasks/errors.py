"""The one error type the pipeline layer raises for bad input (config keys, store problems)."""


class PipelineError(ValueError):
    """Bad pipeline input. The message names the config key and the allowed values."""
