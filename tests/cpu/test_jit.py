"""Kernel variants, the honesty of the cache key, the on-disk cubin cache, and NVRTC compilation (no GPU needed)."""
from __future__ import annotations

import shutil
import stat

import pytest

from ep import envs, jit, tuning
from ep.errors import CompileError, EPError
from ep.jit import COMMON_MACROS, SOURCES, KernelVariant
from ep.tuning import default_macros


def V(source: str, **values) -> KernelVariant:  # noqa: N802
    """The variant of ``source`` at the default config's macro values, some replaced."""
    defaults = default_macros()
    names = SOURCES.get(source, ()) + COMMON_MACROS
    merged = {n: defaults[n] for n in names}
    merged.update(values)
    return KernelVariant.of(source, **merged)

ARCHS = ("sm_90", "sm_100")
# Sources compile in well under a second each; barrier.cu is the cheapest, so the cache tests use it.
CHEAP = "barrier.cu"


@pytest.fixture
def fresh_digest():
    """source_digest() is memoized per process; tests that change the sources must not see a stale digest."""
    jit.source_digest.cache_clear()
    yield
    jit.source_digest.cache_clear()


@pytest.fixture
def src_copy(tmp_path, monkeypatch, fresh_digest):
    """A private copy of cuda_src/ that jit reads instead of the checkout's."""
    dst = tmp_path / "cuda_src"
    shutil.copytree(jit.source_dir(), dst)
    monkeypatch.setattr(jit, "source_dir", lambda: dst)
    return dst


@pytest.fixture
def cache_snapshot(tmp_path):
    return envs.read({"EP_CACHE_DIR": str(tmp_path / "cache" / "kernels")})


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------------------- variants
@pytest.mark.parametrize("source", sorted(SOURCES))
def test_variant_macros_are_sorted_and_include_the_trap_macro(source):
    variant = V(source)
    names = [name for name, _ in variant.macros]
    assert names == sorted(names)
    assert set(names) == set(SOURCES[source]) | set(COMMON_MACROS)
    assert variant.macro("EP_DEBUG_TRAP") == "0"
    assert all(isinstance(value, str) for _, value in variant.macros)


@pytest.mark.parametrize("source, name", [
    ("barrier.cu", "barrier"),
    ("ht_layout.cu", "ht_layout"),
    ("ht_dispatch.cu", "ht_dispatch_tma0_w24"),
    ("ht_combine.cu", "ht_combine"),
    ("ll_dispatch.cu", "ll_dispatch_w16"),
    ("ll_combine.cu", "ll_combine_w16"),
    ("bench_copy.cu", "bench_copy")])
def test_default_variant_names(source, name):
    assert V(source).name == name


def test_variant_names_show_non_default_macros():
    assert V("barrier.cu", EP_DEBUG_TRAP=True).name == "barrier_trap1"
    assert V("ht_dispatch.cu", EP_NCCLEP_TMA=True, EP_DISPATCH_WARPS=8).name == "ht_dispatch_tma1_w8"
    assert V("ll_combine.cu", EP_LL_WARPS=8, EP_DEBUG_TRAP=True).name == "ll_combine_w8_trap1"


def test_a_variant_needs_every_macro_its_source_reads_and_no_other():
    with pytest.raises(EPError, match=r"missing \['EP_NCCLEP_TMA'\]"):
        KernelVariant.of("ht_dispatch.cu", EP_DISPATCH_WARPS=24)
    with pytest.raises(EPError, match=r"not read \['EP_LL_WARPS'\]"):
        KernelVariant.of("barrier.cu", EP_LL_WARPS=8)
    with pytest.raises(EPError, match="not read"):
        KernelVariant.of("ht_combine.cu", EP_NCCLEP_TMA=False)


def test_macro_values_are_type_checked():
    with pytest.raises(EPError, match="EP_NCCLEP_TMA takes a bool"):
        V("ht_dispatch.cu", EP_NCCLEP_TMA=1)
    with pytest.raises(EPError, match="EP_LL_WARPS takes an int"):
        V("ll_dispatch.cu", EP_LL_WARPS=True)


def test_variants_are_values():
    assert V("ll_dispatch.cu") == V("ll_dispatch.cu")
    assert len({V("ll_dispatch.cu"), V("ll_dispatch.cu")}) == 1
    assert V("ll_dispatch.cu") != V("ll_dispatch.cu", EP_LL_WARPS=8)


def test_unknown_source_raises():
    with pytest.raises(EPError, match="unknown kernel source 'nope.cu'"):
        KernelVariant.of("nope.cu")


def test_options_pass_the_macros_in_sorted_order():
    opts = V("ht_dispatch.cu", EP_DISPATCH_WARPS=8).options("sm_90")
    assert "-std=c++17" in opts and "--gpu-architecture=sm_90" in opts
    assert f"-I{jit.source_dir()}" in opts
    defines = [o for o in opts if o.startswith("-D")]
    assert defines == sorted(defines)
    assert "-DEP_DISPATCH_WARPS=8" in defines and "-DEP_DEBUG_TRAP=0" in defines


def test_all_variants_cover_every_source_and_both_trap_values():
    variants = tuning.all_variants()
    names = [v.name for v in variants]
    assert len(names) == len(set(names))
    assert {v.source for v in variants} == set(SOURCES)
    for source in SOURCES:
        assert {v.macro("EP_DEBUG_TRAP") for v in variants if v.source == source} == {"0", "1"}
    assert V("ht_dispatch.cu", EP_NCCLEP_TMA=True) in variants
    assert V("ht_combine.cu", EP_DEBUG_TRAP=True) in variants


# --------------------------------------------------------------------------------------- cache key
def test_cache_key_is_deterministic():
    variant = V("ll_dispatch.cu")
    assert jit.cache_key(variant, "sm_90") == jit.cache_key(V("ll_dispatch.cu"), "sm_90")


def test_cache_key_changes_when_a_macro_changes():
    assert jit.cache_key(V("ll_dispatch.cu"), "sm_90") != \
        jit.cache_key(V("ll_dispatch.cu", EP_LL_WARPS=8), "sm_90")
    assert jit.cache_key(V("barrier.cu"), "sm_90") != \
        jit.cache_key(V("barrier.cu", EP_DEBUG_TRAP=True), "sm_90")


def test_cache_key_changes_when_the_arch_changes():
    variant = V("ht_layout.cu")
    assert jit.cache_key(variant, "sm_90") != jit.cache_key(variant, "sm_100")


def test_cache_key_changes_with_the_nvrtc_version(monkeypatch):
    variant = V("ht_layout.cu")
    before = jit.cache_key(variant, "sm_90")
    monkeypatch.setattr(jit, "nvrtc_version", lambda: (99, 9))
    assert jit.cache_key(variant, "sm_90") != before


def test_cache_key_differs_between_sources():
    assert jit.cache_key(V("ll_dispatch.cu"), "sm_90") != \
        jit.cache_key(V("ll_combine.cu"), "sm_90")


@pytest.mark.parametrize("edited", ["common/ptx.cuh", "common/params.cuh", "ll_combine.cu"])
def test_cache_key_changes_when_any_file_under_cuda_src_changes(src_copy, edited):
    # NOTE: the key hashes every file, not only the variant's own: an edited header (pulled in with -I, which
    # CuPy's own cache would not see) or even another kernel file must never serve a stale binary.
    variant = V("ll_dispatch.cu")
    before = jit.cache_key(variant, "sm_90")
    with open(src_copy / edited, "a") as f:
        f.write("\n// edited\n")
    jit.source_digest.cache_clear()
    assert jit.cache_key(variant, "sm_90") != before


def test_cache_key_changes_when_a_header_is_added(src_copy):
    variant = V("barrier.cu")
    before = jit.cache_key(variant, "sm_90")
    (src_copy / "common" / "new.cuh").write_text("#pragma once\n")
    jit.source_digest.cache_clear()
    assert jit.cache_key(variant, "sm_90") != before


def test_source_digest_of_an_identical_copy_is_unchanged(fresh_digest, tmp_path, monkeypatch):
    original = jit.source_digest()
    dst = tmp_path / "copy"
    shutil.copytree(jit.source_dir(), dst)
    monkeypatch.setattr(jit, "source_dir", lambda: dst)
    jit.source_digest.cache_clear()
    assert jit.source_digest() == original


# ---------------------------------------------------------------------------------------- disk cache
def test_cached_cubin_compiles_once_then_hits(cache_snapshot, monkeypatch):
    variant = V(CHEAP)
    path, compiled_now = jit.cached_cubin(variant, "sm_90", cache_snapshot)
    assert compiled_now is True
    assert path.is_file() and path.stat().st_size > 0
    assert path.parent == jit.cache_dir(cache_snapshot)
    assert variant.name in path.name and "sm_90" in path.name
    content = path.read_bytes()

    def no_compile(*args, **kwargs):
        raise AssertionError("a cache hit must not recompile")

    monkeypatch.setattr(jit, "compile_cubin", no_compile)
    again, compiled_now = jit.cached_cubin(variant, "sm_90", cache_snapshot)
    assert (again, compiled_now) == (path, False)
    assert again.read_bytes() == content


def test_cache_directory_is_private_and_cubins_are_owner_only(cache_snapshot):
    path, _ = jit.cached_cubin(V(CHEAP), "sm_90", cache_snapshot)
    assert mode_of(path.parent) == 0o700
    assert mode_of(path) == 0o600
    assert [p.name for p in path.parent.iterdir()] == [path.name], "no temporary file is left behind"


def test_an_existing_cache_directory_is_made_private(tmp_path):
    directory = tmp_path / "shared"
    directory.mkdir(mode=0o755)
    directory.chmod(0o755)
    assert jit.cache_dir(envs.read({"EP_CACHE_DIR": str(directory)})) == directory
    assert mode_of(directory) == 0o700


def test_a_changed_macro_is_a_second_file_and_the_first_remains(cache_snapshot):
    first, compiled_first = jit.cached_cubin(V(CHEAP), "sm_90", cache_snapshot)
    second, compiled_second = jit.cached_cubin(V(CHEAP, EP_DEBUG_TRAP=True), "sm_90", cache_snapshot)
    assert compiled_first and compiled_second
    assert first != second
    assert first.is_file() and second.is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])
    assert jit.cached_cubin(V(CHEAP), "sm_90", cache_snapshot) == (first, False)


def test_another_arch_is_another_file(cache_snapshot):
    a, _ = jit.cached_cubin(V(CHEAP), "sm_90", cache_snapshot)
    b, compiled_now = jit.cached_cubin(V(CHEAP), "sm_100", cache_snapshot)
    assert compiled_now and a != b and a.is_file()


def test_an_edited_source_misses_the_cache(src_copy, cache_snapshot):
    variant = V(CHEAP)
    first, _ = jit.cached_cubin(variant, "sm_90", cache_snapshot)
    with open(src_copy / "common" / "wait.cuh", "a") as f:
        f.write("\n// edited\n")
    jit.source_digest.cache_clear()
    second, compiled_now = jit.cached_cubin(variant, "sm_90", cache_snapshot)
    assert compiled_now is True and second != first


# ---------------------------------------------------------------------------------------- compile errors
def test_a_broken_source_raises_compile_error_naming_the_variant(src_copy):
    with open(src_copy / "barrier.cu", "a") as f:
        f.write("\nthis is not C++;\n")
    variant = V("barrier.cu", EP_DEBUG_TRAP=True)
    with pytest.raises(CompileError, match=r"barrier_trap1 \(sm_90\) failed to compile") as info:
        jit.compile_cubin(variant, "sm_90")
    assert "barrier.cu" in str(info.value), "the message carries the compiler log"
    assert isinstance(info.value, EPError)


def test_a_failed_compile_leaves_nothing_in_the_cache(src_copy, cache_snapshot):
    with open(src_copy / "barrier.cu", "a") as f:
        f.write("\nthis is not C++;\n")
    with pytest.raises(CompileError, match="barrier"):
        jit.cached_cubin(V("barrier.cu"), "sm_90", cache_snapshot)
    assert list(jit.cache_dir(cache_snapshot).iterdir()) == []


# ------------------------------------------------------------------------- knob ranges vs config.cuh
def _config_cuh_accepts(defines: dict[str, str]) -> bool:
    """Whether cuda_src/common/config.cuh compiles (its static_asserts hold) under ``defines``."""
    from cupy.cuda import nvrtc
    prog = nvrtc.createProgram('#include "common/config.cuh"\n', "knob_check.cu", [], [])
    try:
        nvrtc.compileProgram(prog, ["-std=c++17", "--gpu-architecture=sm_90", f"-I{jit.source_dir()}",
                                    *(f"-D{k}={v}" for k, v in sorted(defines.items()))])
        return True
    except nvrtc.NVRTCError:
        return False
    finally:
        nvrtc.destroyProgram(prog)


# Each int macro and the knob/field that sets it: every value the knob table accepts must compile.
INT_MACROS = [("EP_DISPATCH_WARPS", "ht_dispatch.cu"), ("EP_LL_WARPS", "ll_dispatch.cu")]


@pytest.mark.parametrize("macro, source", INT_MACROS, ids=[m for m, _ in INT_MACROS])
def test_every_value_the_knob_table_accepts_compiles(macro, source):
    knob = envs.KNOB_BY_NAME[macro]
    rejected = [v for v in range(int(knob.lo), int(knob.hi) + 1)
                if not _config_cuh_accepts(dict(V(source, **{macro: knob.parse(str(v))}).macros))]
    assert not rejected, f"{macro}: values accepted by ep.envs but rejected by config.cuh: {rejected}"


# ------------------------------------------------------------------------------------- CI NVRTC check
@pytest.mark.parametrize("arch", ARCHS)
def test_compile_all_variants(arch):
    """Every variant the runtime can select compiles for the arch (CI's compile-only check; ~5 s per arch)."""
    sizes = {}
    for variant in tuning.all_variants():
        cubin = jit.compile_cubin(variant, arch)
        assert isinstance(cubin, bytes)
        sizes[variant.name] = len(cubin)
    empty = [name for name, size in sizes.items() if size == 0]
    assert not empty, f"{arch}: empty cubins for {empty}"
    assert set(sizes) == {v.name for v in tuning.all_variants()}
