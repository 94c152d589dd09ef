"""megatron-prores: ProRes and GPAS inside Megatron-Core Transformer layers."""

__version__ = "0.1.0"


def _quiet_cpu_cuda_build_notice() -> None:
    """A CUDA build of torch on a machine without CUDA (what pip gives Python 3.12 on CPU machines)
    logs "No CUDA runtime is found, using CUDA_HOME=..." when megatron-core imports torch's
    extension helpers: noise before every one-line error of the tools. Drop that one record."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").addFilter(
        lambda record: not str(record.msg).startswith("No CUDA runtime is found"))


_quiet_cpu_cuda_build_notice()
