"""vLLM general plugin: makes `--attention-backend CUSTOM` select mempipe.

vLLM runs every entry point of group `vllm.general_plugins` in each of its processes (engine
core and workers too), possibly more than once, so `register()` is idempotent: it sets the
CUSTOM registry entry (a plain assignment) and wraps the CPU platform's backend choice once.

The CPU platform's `get_attn_backend_cls` returns CPU_ATTN whatever was selected. Overriding
the CPU_ATTN entry would replace vLLM's default CPU backend for every run; instead the wrapper
answers CUSTOM's registered class when, and only when, CUSTOM was selected, and defers to vLLM
otherwise. Selection on other platforms is vLLM's own.
"""

from __future__ import annotations

BACKEND_PATH = "mempipe.vllm.backend.MempipeAttentionBackend"


def _registry():
    try:
        from vllm.v1.attention.backends import registry
    except ImportError:  # vLLM releases before the v1 move
        from vllm.attention.backends import registry
    return registry


def _honor_custom_on_cpu(backend_enum) -> None:
    try:
        from vllm.platforms.cpu import CpuPlatform
    except ImportError:
        return
    original = CpuPlatform.__dict__["get_attn_backend_cls"]
    if getattr(original.__func__, "_mempipe_wrapped", False):
        return

    def get_attn_backend_cls(cls, selected_backend, *args, **kwargs):
        if selected_backend == backend_enum.CUSTOM:
            return backend_enum.CUSTOM.get_path()
        return original.__func__(cls, selected_backend, *args, **kwargs)

    get_attn_backend_cls._mempipe_wrapped = True
    get_attn_backend_cls.__doc__ = original.__func__.__doc__
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def register() -> None:
    """Entry point (vllm.general_plugins): registers mempipe as the CUSTOM backend."""
    registry = _registry()
    registry.register_backend(registry.AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    _honor_custom_on_cpu(registry.AttentionBackendEnum)
