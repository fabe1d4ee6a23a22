"""mempipe: paged sparse attention (Quest page digests, relevancy, top-k pages, sparse decode).

    import mempipe
    mempipe.steps.score_and_select(...)   # the C++ steps on caller-owned tensors (DLPack)
    import mempipe.ops                    # torch.ops.mempipe.* custom operators
    import mempipe.hf                     # transformers attention function "mempipe"
    mempipe.devices                       # ("cpu",) or ("cpu", "cuda"): what this build runs

The vLLM backend lives in mempipe.vllm and is registered by the `vllm.general_plugins` entry
point; configuration is in mempipe.config (MEMPIPE_CONFIG).
"""

from mempipe import _mempipe as steps
from mempipe.config import MempipeConfig

# Devices whose tensors this build runs ("cuda" when pip found a CUDA toolchain, see README).
devices: tuple[str, ...] = tuple(steps.devices)

__version__ = "0.1.0"
__all__ = ["steps", "devices", "MempipeConfig", "__version__"]
