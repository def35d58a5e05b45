"""MoECommunicator: validate, pick the mode runtime, convert arrays in and out. No kernel details here."""
from __future__ import annotations

import itertools
import logging
import warnings

from . import arrays, envs, sizes
from .bootstrap import Group, bind_device, make_group
from .config import DispatchHandle, DispatchOutput, MoECommunicatorConfig
from .errors import CapacityError, ConfigError, EPError, EPTimeoutError, InvalidStateError, PeerInputError

log = logging.getLogger("ep")
_ids = itertools.count(1)


def collective_check(group: Group, fn, peer_error=PeerInputError):
    """Run the local check ``fn`` on every rank and share the outcome: a rank whose check failed re-raises
    its own exception, the others raise ``peer_error`` naming the failing ranks. Returns fn's result."""
    result, failure = None, None
    try:
        result = fn()
    except (ValueError, TypeError, EPError) as exc:
        failure = exc
    failed = group.allgather(None if failure is None else f"{type(failure).__name__}: {failure}")
    if failure is not None:
        raise failure
    bad = {r: msg for r, msg in enumerate(failed) if msg is not None}
    if bad:
        raise peer_error(f"rank(s) {sorted(bad)} failed: " + "; ".join(f"rank {r}: {m}" for r, m in bad.items()))
    return result


def _choose_backend(knob: str) -> str:
    if knob != "auto":
        return knob
    try:
        import cupy
        return "gpu" if cupy.cuda.runtime.getDeviceCount() > 0 else "cpu"
    except Exception:
        return "cpu"


class MoECommunicator:
    """Dispatch MoE tokens to the ranks owning their experts and combine the expert outputs back.

    Collective: every rank of ``group`` constructs it with the same config and calls dispatch/combine in
    the same order. ``group``: None (``MPI.COMM_WORLD``), an mpi4py communicator or a torch.distributed
    process group. ``backend``: "gpu", "cpu" or None (knob ``EP_BACKEND``, default: gpu when visible).
    Raises ConfigError when the config does not fit the world size, or ranks disagree on config or knobs.
    """

    def __init__(self, config: MoECommunicatorConfig, group=None, *, backend: str | None = None):
        if not isinstance(config, MoECommunicatorConfig):
            raise ConfigError(f"config must be a MoECommunicatorConfig, got {type(config).__name__}")
        self.config = config
        self._group: Group = make_group(group)
        self._closed = True   # until fully built: __del__ stays quiet, close() is a no-op

        def check():
            knobs = envs.read()
            config.check_world(self._group.size)
            sizes.check_row_index_range(config, self._group.size)
            chosen = backend or _choose_backend(knobs.backend)
            if chosen not in ("gpu", "cpu"):
                raise ConfigError(f"backend must be 'gpu' or 'cpu', got {chosen!r}")
            return knobs, chosen

        # Every rank validates, then all agree, so a bad config or knob on one rank raises on every rank
        # instead of leaving the others waiting in a collective.
        self._knobs, self._backend = collective_check(self._group, check, ConfigError)
        logging.getLogger("ep").setLevel(self._knobs.log_level)
        mine = (repr(config), sorted(self._knobs.macros().items()), self._backend)
        everyone = self._group.allgather(mine)
        if any(other != mine for other in everyone):
            bad = [r for r, other in enumerate(everyone) if other != mine]
            raise ConfigError(f"ranks {bad} differ from rank {self._group.rank} in config, macro knobs or backend")
        self._id = next(_ids)
        self._broken: BaseException | None = None
        self.device = -1
        if self._backend == "cpu":
            from .cpu_backend import CpuRuntime
            self._rt = CpuRuntime(config, self._group, self._knobs)
        else:
            self.device = bind_device(self._group)
            if config.mode == "ht":
                from .ht import HtRuntime
                self._rt = HtRuntime(config, self._group, self._knobs)
            else:
                from .ll import LLRuntime
                self._rt = LLRuntime(config, self._group, self._knobs)   # buffers built on first use
        self._closed = False

    # -------------------------------------------------------------------------------- properties
    @property
    def rank(self) -> int:
        return self._group.rank

    @property
    def world_size(self) -> int:
        return self._group.size

    @property
    def num_local_experts(self) -> int:
        return self.config.num_experts // self._group.size

    @property
    def backend(self) -> str:
        return self._backend

    @staticmethod
    def required_bytes(config: MoECommunicatorConfig, world_size: int) -> int:
        """Device bytes a communicator of ``config`` keeps at ``world_size`` ranks (before allocating)."""
        return sizes.buffer_bytes(config, world_size)

    # ------------------------------------------------------------------------------------ checks
    def _check_usable(self) -> None:
        if self._closed:
            raise InvalidStateError("the communicator is closed")
        if self._broken is not None:
            raise InvalidStateError(f"the communicator is unusable after an earlier failure: {self._broken}")
        try:
            self._rt.check_errors()
        except EPTimeoutError as exc:
            self._broken = exc
            raise

    def prepare(self) -> None:
        """Build lazily created resources now (LL buffers and kernels). Collective. Call it before
        capturing a CUDA graph if no LL call has run yet."""
        self._check_usable()
        if hasattr(self._rt, "prepare"):
            self._rt.prepare()

    def _inputs(self, x, topk_ids, weights):
        cfg = self.config
        fw = arrays.framework_of(x)
        dev = self.device
        if self._backend == "gpu" and fw == arrays.NUMPY:
            raise TypeError("x: the GPU backend takes torch CUDA tensors or CuPy arrays, got a NumPy array")
        bf16 = arrays.bf16_dtypes(fw)
        xi = arrays.check_array(x, "x", shape=(None, cfg.hidden_size), dtypes=bf16, device=dev, fw=fw)
        T = xi.shape[0]
        if T > cfg.max_tokens_per_rank:
            raise CapacityError(f"x: {T} tokens exceed max_tokens_per_rank={cfg.max_tokens_per_rank}; nothing was sent")
        if arrays.framework_of(topk_ids) != fw:
            raise TypeError("topk_ids must come from the same framework as x")
        ii = arrays.check_array(topk_ids, "topk_ids", shape=(T, cfg.topk), dtypes=("int32", "int64"), device=dev,
                                fw=fw)
        wi = None
        if weights is not None:
            if arrays.framework_of(weights) != fw:
                raise TypeError("weights must come from the same framework as x")
            wi = arrays.check_array(weights, "weights", shape=(T, cfg.topk), dtypes=("float32",), device=dev, fw=fw)
        return fw, xi, ii, wi

    def _validated(self, check):
        """Input checks. The CPU backend shares the outcome (every rank raises together, peers get
        PeerInputError); the GPU backend raises on the calling rank only, before any launch, so that a call
        costs no host collective: peers then time out in their bounded waits."""
        if self._backend == "cpu":
            return collective_check(self._group, check)
        return check()

    def _run(self, fn, *args):
        try:
            return fn(*args)
        except EPTimeoutError as exc:
            self._broken = exc
            raise

    # ---------------------------------------------------------------------------------- dispatch
    def dispatch(self, x, topk_ids, weights=None, scales=None, *, previous_handle: DispatchHandle | None = None,
                 output_buffer=None, stream=None) -> tuple[DispatchOutput, DispatchHandle]:
        """Send every token to the ranks owning its experts; return the local experts' rows.

        x: ``[T, H]`` bf16 (torch.bfloat16, or uint16 bit patterns), C-contiguous, T <= max_tokens_per_rank.
        topk_ids: ``[T, K]`` int32/int64, -1 = unused slot. weights: ``[T, K]`` float32 or None (ones).
        previous_handle (HT): reuse that dispatch's layout (same routing), skipping the count exchange.
        output_buffer (LL): ``[L, W*T_max, H]`` bf16 to write into instead of the owned buffer.
        stream: torch/CuPy stream or raw pointer; default the caller's current stream.
        Returns (DispatchOutput, DispatchHandle). Raises ValueError/TypeError on bad input before any
        launch, PeerInputError when another rank's input was invalid, EPTimeoutError on a time-out.
        """
        self._check_usable()
        if scales is not None:
            raise NotImplementedError("FP8 dispatch (scales=QuantScales) is not implemented yet; pass bf16 tokens")
        cfg = self.config

        def check():
            if previous_handle is not None:
                if cfg.mode != "ht":
                    raise ValueError("previous_handle applies to mode='ht' only")
                self._check_handle(previous_handle, "previous_handle")
            if output_buffer is not None and cfg.mode != "ll":
                raise ValueError("output_buffer applies to mode='ll' only")
            return self._inputs(x, topk_ids, weights)

        fw, xi, ii, wi = self._validated(check)
        prev_state = None if previous_handle is None else previous_handle._state
        if self._backend == "cpu":
            if output_buffer is not None:
                self._check_output_buffer(output_buffer, fw)
            out, state = self._run(self._rt.dispatch, x, topk_ids, weights, prev_state, output_buffer, fw)
        else:
            stream_ = arrays.resolve_stream(stream, fw)
            if cfg.mode == "ht":
                out, state = self._run(self._rt.dispatch, x, xi, topk_ids, ii, weights, wi, prev_state, stream_, fw)
            else:
                self._rt.prepare()
                oi = self._check_output_buffer(output_buffer, fw) if output_buffer is not None else None
                out, state = self._run(self._rt.dispatch, xi, ii, wi, output_buffer, oi, stream_, fw)
        return out, DispatchHandle(self._id, cfg.mode, state, xi.shape[0])

    def _check_output_buffer(self, buf, fw):
        cfg = self.config
        if arrays.framework_of(buf) != fw:
            raise TypeError("output_buffer must come from the same framework as x")
        cap = self.world_size * cfg.max_tokens_per_rank
        bf16 = arrays.bf16_dtypes(fw)
        return arrays.check_array(buf, "output_buffer", shape=(self.num_local_experts, cap, cfg.hidden_size),
                                  dtypes=bf16, device=self.device, fw=fw)

    def _check_handle(self, handle, name: str) -> None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"{name} must be a DispatchHandle, got {type(handle).__name__}")
        if handle._owner != self._id:
            raise InvalidStateError(f"{name} comes from another communicator")
        if handle._mode != self.config.mode:
            raise InvalidStateError(f"{name} is a {handle._mode} handle, this communicator is {self.config.mode}")

    # ----------------------------------------------------------------------------------- combine
    def combine(self, expert_output, handle: DispatchHandle, *, out=None, stream=None):
        """Sum the expert outputs of every token back on its source rank.

        expert_output: bf16, the shape and row order of that dispatch's ``tokens``.
        out: optional ``[T, H]`` bf16 to write into. Returns ``[T, H]`` bf16 with
        ``out[t] = sum_k w[t,k] * expert_output[row(t,k)]`` rounded as documented in ep.reference.
        """
        self._check_usable()
        T, H = (handle.num_tokens if isinstance(handle, DispatchHandle) else 0), self.config.hidden_size

        def check():
            self._check_handle(handle, "handle")
            fw = arrays.framework_of(expert_output)
            if self._backend == "gpu" and fw == arrays.NUMPY:
                raise TypeError("expert_output: the GPU backend takes torch CUDA tensors or CuPy arrays")
            bf16 = arrays.bf16_dtypes(fw)
            yi = arrays.check_array(expert_output, "expert_output", shape=tuple(handle._state.tokens_shape),
                                    dtypes=bf16, device=self.device, fw=fw)
            oi = None
            if out is not None:
                if arrays.framework_of(out) != fw:
                    raise TypeError("out must come from the same framework as expert_output")
                oi = arrays.check_array(out, "out", shape=(T, H), dtypes=bf16, device=self.device, fw=fw)
            return fw, yi, oi

        fw, yi, oi = self._validated(check)
        state = handle._state
        if self._backend == "cpu":
            return self._run(self._rt.combine, expert_output, state, out, fw)
        stream_ = arrays.resolve_stream(stream, fw)
        return self._run(self._rt.combine, yi, state, out, 0 if oi is None else oi.ptr, stream_, fw)

    # ---------------------------------------------------------------------------------- lifetime
    def synchronize(self) -> None:
        """Wait for this rank's queued ep work (bounded by the device waits); raise what it reported."""
        self._check_usable()
        if self._backend == "gpu":
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
        self._check_usable()

    def close(self) -> None:
        """Collective and idempotent: wait for queued work, barrier, unmap peers, barrier, free."""
        if self._closed:
            return
        self._closed = True
        if self._backend == "gpu":
            import cupy
            try:
                cupy.cuda.runtime.deviceSynchronize()
            except Exception as exc:
                log.warning("[rank %d] synchronize before close failed: %s", self.rank, exc)
        self._group.barrier()
        self._rt.close()
        self._group.barrier()

    def __enter__(self) -> "MoECommunicator":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_closed", True) is False:
            warnings.warn("MoECommunicator was not closed; call close() (collective) or use it as a context manager",
                          ResourceWarning, stacklevel=1)
