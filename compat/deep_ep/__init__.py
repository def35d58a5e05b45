"""deep_ep on ep: DeepEP V1's Python API (commit 567632d, intranode) served by ep's kernels.

Install with ``pip install ./compat`` next to ep; code written against ``deep_ep.Buffer`` (vLLM, SGLang,
Megatron-LM, torchtitan) then runs unchanged. This package deliberately takes the name ``deep_ep``, so it
replaces a real DeepEP in that environment; ``deep_ep.__version__`` ends in ``+ep`` and the first Buffer logs
a line saying so. What is not supported raises NotImplementedError naming the feature (internode, LogFMT,
rank masking, combine bias, branch-only keywords); see the README's "DeepEP compatibility" section.
"""
import torch

import ep as _ep

from .config import Config
from .utils import EventHandle, EventOverlap
from .buffer import Buffer

topk_idx_t = torch.int64        # the dtype of topk_idx DeepEP's default build takes
__version__ = f"1.0.0+ep{_ep.__version__}"
__all__ = ["Buffer", "Config", "EventHandle", "EventOverlap", "topk_idx_t", "__version__"]
