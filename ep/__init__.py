"""ep: Mixture-of-Experts token dispatch and combine between the GPUs of one NVLink node."""
from .communicator import MoECommunicator
from .config import (CommOverlapConfig, DispatchHandle, DispatchLayout, DispatchOutput, MoECommunicatorConfig,
                     QuantScales)
from .errors import (CapacityError, CompileError, ConfigError, EPError, EPTimeoutError, InvalidStateError,
                     PeerInputError)

__all__ = ["MoECommunicator", "MoECommunicatorConfig", "DispatchOutput", "DispatchHandle", "QuantScales",
           "DispatchLayout", "CommOverlapConfig", "EPError", "ConfigError", "CompileError", "InvalidStateError",
           "CapacityError", "PeerInputError", "EPTimeoutError"]
__version__ = "0.1.0"
