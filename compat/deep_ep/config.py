"""deep_ep.Config and the per-world-size tables of Buffer.get_dispatch_config / get_combine_config.

ep sizes its own buffers from the token counts it sees, so a Config's chunk sizes are accepted and checked as
DeepEP checks them but do not steer ep's kernels; the SM count ep uses is Buffer.num_sms.
"""
from __future__ import annotations


class Config:
    """DeepEP's tuning record: SMs and the NVLink / RDMA chunk sizes, positional or keyword."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256):
        if num_sms < 0:
            raise ValueError(f"Config: num_sms must be >= 0, got {num_sms}")
        if not 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens:
            raise ValueError("Config: need 0 < num_max_nvl_chunked_send_tokens < num_max_nvl_chunked_recv_tokens, got "
                             f"{num_max_nvl_chunked_send_tokens} and {num_max_nvl_chunked_recv_tokens}")
        if num_max_rdma_chunked_send_tokens <= 0:
            raise ValueError("Config: num_max_rdma_chunked_send_tokens must be > 0")
        step = num_max_rdma_chunked_send_tokens     # DeepEP rounds the receive side up to whole sends
        rdma_recv = -(-num_max_rdma_chunked_recv_tokens // step) * step
        if num_max_rdma_chunked_send_tokens > rdma_recv // 2:
            raise ValueError("Config: num_max_rdma_chunked_send_tokens must be <= half the rdma receive tokens")
        self.num_sms = num_sms
        self.num_max_nvl_chunked_send_tokens = num_max_nvl_chunked_send_tokens
        self.num_max_nvl_chunked_recv_tokens = num_max_nvl_chunked_recv_tokens
        self.num_max_rdma_chunked_send_tokens = num_max_rdma_chunked_send_tokens
        self.num_max_rdma_chunked_recv_tokens = rdma_recv

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """A byte budget for ``Buffer(num_nvl_bytes=)``: one receive ring of rows (and their index, weight and
        scale bytes) per channel pair and peer, as DeepEP sizes it. ep allocates what it needs itself."""
        channels = max(self.num_sms // 2, 1)
        per_token = hidden_bytes + 16 + 128 * (8 + 4) + 128 * 4
        size = channels * min(num_ranks, 8) * self.num_max_nvl_chunked_recv_tokens * per_token + 4096
        return -(-size // 128) * 128

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        """0 within one NVLink node (no RDMA buffer); internode is not served by this package."""
        if num_ranks <= 8:
            return 0
        raise NotImplementedError("deep_ep on ep is intranode only (at most 8 ranks of one node): no RDMA buffer "
                                  f"for {num_ranks} ranks")

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl={self.num_max_nvl_chunked_send_tokens}/"
                f"{self.num_max_nvl_chunked_recv_tokens}, rdma={self.num_max_rdma_chunked_send_tokens}/"
                f"{self.num_max_rdma_chunked_recv_tokens})")


# (nvl send, nvl recv) chunk tokens per world size, DeepEP's published intranode defaults; 1 is ours (DeepEP
# has no single-rank kernels), other counts up to 8 take the next entry. More than 8 ranks is internode, which
# this package does not serve.
_DISPATCH = {1: (24, 256), 2: (24, 256), 4: (6, 256), 8: (6, 256)}
_COMBINE = {1: (10, 256), 2: (10, 256), 4: (9, 256), 8: (4, 256)}


def table_config(table: dict, num_ranks: int, num_sms: int, what: str) -> Config:
    if num_ranks > 8:
        raise NotImplementedError(f"{what}: {num_ranks} ranks is internode; deep_ep on ep is intranode only")
    if num_ranks < 1:
        raise ValueError(f"{what}: num_ranks must be >= 1, got {num_ranks}")
    # DeepEP's intranode kernels exist for 2, 4 and 8 ranks; ep runs any count: the next listed entry serves.
    send, recv = table[min(r for r in table if r >= num_ranks)]
    return Config(num_sms, send, recv, 6, 128)


def dispatch_config(num_ranks: int, num_sms: int) -> Config:
    return table_config(_DISPATCH, num_ranks, num_sms, "get_dispatch_config")


def combine_config(num_ranks: int, num_sms: int) -> Config:
    return table_config(_COMBINE, num_ranks, num_sms, "get_combine_config")
