"""megatron-prores: ProRes and GPAS inside Megatron-Core Transformer layers."""

__version__ = "0.1.0"
