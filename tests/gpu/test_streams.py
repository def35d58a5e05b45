"""Ops launch on the caller's stream: torch's current stream for torch inputs (read through the raw query),
an explicit stream however it is given, and one CuPy wrapper per raw handle (ep/arrays.py resolve_stream)."""
from __future__ import annotations

import pytest

from ep import arrays


def test_torch_inputs_follow_torch_current_stream_inside_and_outside_a_stream_context():
    torch = pytest.importorskip("torch")
    side = torch.cuda.Stream()
    assert arrays.resolve_stream(None, arrays.TORCH).ptr == torch.cuda.current_stream().cuda_stream
    with torch.cuda.stream(side):
        resolved = arrays.resolve_stream(None, arrays.TORCH)
        assert resolved.ptr == side.cuda_stream != torch.cuda.default_stream().cuda_stream
    assert arrays.resolve_stream(side, arrays.TORCH).ptr == side.cuda_stream


def test_an_explicit_stream_is_used_whether_given_as_cupy_stream_or_raw_handle():
    import cupy
    s = cupy.cuda.Stream(non_blocking=True)
    assert arrays.resolve_stream(s, arrays.CUPY) is s
    raw = arrays.resolve_stream(s.ptr, arrays.CUPY)
    assert raw.ptr == s.ptr
    assert arrays.resolve_stream(s.ptr, arrays.CUPY) is raw   # one wrapper per handle
    with cupy.cuda.Stream(non_blocking=True) as current:
        assert arrays.resolve_stream(None, arrays.CUPY).ptr == current.ptr


def test_outputs_of_several_allocations_are_distinct_and_typed():
    import cupy
    s = cupy.cuda.Stream(non_blocking=True)
    (a, pa), (b, pb), (c, pc) = arrays.empty_many(arrays.CUPY, [((3, 4), "bf16"), ((5,), "int64"), ((2, 2), "float32")], s)
    assert (a.shape, a.dtype, b.shape, b.dtype, c.shape, c.dtype) == ((3, 4), "uint16", (5,), "int64", (2, 2), "float32")
    assert len({pa, pb, pc}) == 3 and (pa, pb, pc) == (a.data.ptr, b.data.ptr, c.data.ptr)
