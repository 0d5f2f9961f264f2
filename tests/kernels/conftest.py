"""Kernel tests: the Triton kernels run on CPU tensors under Triton's interpreter.

`triton.jit` picks the interpreter (an `InterpretedFunction`) instead of the GPU compiler (a
`JITFunction`) when the kernel is *decorated*, that is when `pagedserve_kernels.paged_attention` and
`pagedserve_kernels.reshape_and_cache` are imported, and so do triton's own library functions
(`tl.max`, `tl.cdiv`, ...) when `triton.language` is first imported. So TRITON_INTERPRET must be set
before anything imports triton or the kernels: here, at the top of this conftest. pytest imports it
before this directory's test modules; with a plain `pytest` (testpaths = tests) the directories
before this one are tests/conftest.py and tests/e2e/, which import neither triton nor `kernels`;
when a path under tests/kernels is given on the command line, pytest loads this conftest at
start-up, before collecting anything (so `pytest tests/models tests/kernels` is safe too). The
`interpreter_mode` fixture below fails every kernel test with a clear message should some earlier
import ever load the kernels for the GPU compiler instead.

The variable stays set for the rest of the pytest process (triton reads it again when a kernel
runs). The ahead-of-time compile test (test_aot.py) therefore compiles in a subprocess with the
variable removed.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import importlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

KERNEL_MODULES = ("pagedserve_kernels.paged_attention", "pagedserve_kernels.reshape_and_cache",
                  "pagedserve_kernels.quant_gemm")


def jitted_kernels() -> dict[str, object]:
    """Every @triton.jit function of the kernel modules, by qualified name."""
    import triton

    found = {}
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name, value in vars(module).items():
            if isinstance(value, triton.runtime.KernelInterface):
                found[f"{module_name}.{name}"] = value
    return found


@pytest.fixture(autouse=True, scope="session")
def interpreter_mode():
    """Every kernel test needs the kernels decorated in interpreter mode (see the docstring)."""
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ.get("TRITON_INTERPRET") == "1"
    kernels = jitted_kernels()
    assert len(kernels) >= 5, sorted(kernels)
    compiled = sorted(name for name, fn in kernels.items()
                      if not isinstance(fn, InterpretedFunction))
    assert not compiled, (
        f"{compiled} were decorated for the GPU compiler, not the interpreter: something imported "
        f"triton or kernels before tests/kernels/conftest.py set TRITON_INTERPRET=1 "
        f"(already imported: "
        f"{sorted(m for m in sys.modules if m.startswith('pagedserve_kernels'))})")
    import triton.language as tl

    assert isinstance(tl.cdiv, InterpretedFunction), \
        "triton.language was imported before TRITON_INTERPRET=1 was set"


class LaunchLog:
    """Records which Triton kernels the wrappers launch, and with which grid; launches them."""

    def __init__(self) -> None:
        self.launches: list[tuple[str, tuple]] = []

    def names(self) -> list[str]:
        return [name for name, _ in self.launches]

    def wrap(self, name: str, kernel):
        log = self

        class Launcher:
            def __getitem__(self, grid):
                log.launches.append((name, tuple(grid)))
                return kernel[grid]

        return Launcher()


@pytest.fixture
def launches(monkeypatch) -> LaunchLog:
    """Count kernel launches made through the wrappers of the KERNEL_MODULES (the modules'
    globals are swapped for recording launchers)."""
    log = LaunchLog()
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(module_name)
        for name in [n for n in vars(module) if n.endswith("_kernel")]:
            monkeypatch.setattr(module, name, log.wrap(name, getattr(module, name)))
    return log


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN if `out` holds a NaN)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


TOLERANCE = {"float32": 1e-5, "float16": 2e-2, "bfloat16": 2e-2}


@pytest.fixture
def assert_close():
    """`assert_close(out, ref)`: finite, and relative error within the dtype's bound."""
    import torch

    def check(out: torch.Tensor, ref: torch.Tensor, what: str = "output") -> float:
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.isfinite(out).all(), \
            f"{what}: {int((~torch.isfinite(out)).sum())} non-finite values (poison left?)"
        err = rel_err(out, ref)
        bound = TOLERANCE[str(out.dtype).removeprefix("torch.")]
        assert err < bound, f"{what}: relative error {err:.3e} >= {bound:g}"
        return err

    return check
