"""ep: Mixture-of-Experts token dispatch and combine between the GPUs of one NVLink node."""
from .communicator import MoECommunicator
from .config import (CommOverlapConfig, DispatchHandle, DispatchLayout, DispatchOutput, Fp8Cast, HtTuning, LLTuning,
                     MoECommunicatorConfig, QuantScales)
from .overlap import CommEvent, OverlapSignals
from .errors import (CapacityError, CompileError, ConfigError, EPError, EPTimeoutError, InvalidStateError,
                     PeerInputError)

__all__ = ["MoECommunicator", "MoECommunicatorConfig", "HtTuning", "LLTuning", "Fp8Cast", "DispatchOutput", "DispatchHandle",
           "QuantScales", "DispatchLayout", "CommOverlapConfig", "CommEvent", "OverlapSignals", "EPError", "ConfigError", "CompileError",
           "InvalidStateError", "CapacityError", "PeerInputError", "EPTimeoutError"]
__version__ = "0.2.0"
