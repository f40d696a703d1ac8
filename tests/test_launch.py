"""fa2lab.kernels.launch on the CPU, with a stand-in for a Triton kernel: which calls launch directly,
which go through Triton's launch, and that a refused direct launch falls back (the GPU side:
tests/test_gluon_gpu.py::test_direct_launch_equals_tritons_launch)."""

import pytest
import torch

from fa2lab.kernels import launch as L


class FakeCompiled:
    function = object()

    def __init__(self, log, refuse=False):
        self.log, self.refuse = log, refuse

    def __getitem__(self, grid):
        def runner(*args):
            if self.refuse:
                raise TypeError("function takes exactly 9 arguments")
            self.log.append(("direct", grid, args))
        return runner


class FakeKernel:
    arg_names = ["X", "Y", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self, refuse=False):
        self.log, self.refuse = [], refuse

    def __getitem__(self, grid):
        def launch(*args, **constexprs):
            self.log.append(("triton", grid, args, constexprs))
            return FakeCompiled(self.log, self.refuse)
        return launch


@pytest.fixture
def compiled_mode(monkeypatch):
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L, "capturing", lambda device: False)
    monkeypatch.setattr(L.KernelLaunch, "ENABLED", True)


def kinds(kernel):
    return [entry[0] for entry in kernel.log]


def test_second_call_of_a_signature_launches_directly(compiled_mode):
    kernel = FakeKernel()
    launch = L.KernelLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        launch((4,), (x, y), (64, 0.5), BLOCK=16, FLAG=True)
    assert kinds(kernel) == ["triton", "direct", "direct"]
    # the grid in three dimensions (a compiled kernel's launcher reads all three), constants last
    assert kernel.log[1] == ("direct", (4, 1, 1), (x, y, 64, 0.5, 16, True))


@pytest.mark.parametrize("change", ["n", "n_type", "scale", "grid", "constexpr", "dtype"])
def test_any_change_of_signature_goes_through_triton(compiled_mode, change):
    kernel = FakeKernel()
    launch = L.KernelLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    launch((4,), (x, y), (64, 0.5), BLOCK=16, FLAG=True)
    args = dict(grid=(4,), tensors=(x, y), scalars=(64, 0.5), const=dict(BLOCK=16, FLAG=True))
    if change == "n":
        args["scalars"] = (65, 0.5)
    elif change == "n_type":
        args["scalars"] = (64.0, 0.5)
    elif change == "scale":
        args["scalars"] = (64, 0.25)
    elif change == "grid":
        args["grid"] = (8,)
    elif change == "constexpr":
        args["const"] = dict(BLOCK=32, FLAG=True)
    else:
        args["tensors"] = (x.double(), y)
    launch(args["grid"], args["tensors"], args["scalars"], **args["const"])
    assert kinds(kernel) == ["triton", "triton"]


def test_a_static_signature_part_stands_for_grid_scalars_and_constants(compiled_mode):
    """launch(..., static): the caller's plan identifies grid, scalars and constants; the tensors'
    dtypes and device are still read per call."""
    kernel = FakeKernel()
    launch = L.KernelLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        launch.launch((4,), (x, y), (64, 0.5), dict(BLOCK=16, FLAG=True), ("plan", 1))
    launch.launch((4,), (x.double(), y), (64, 0.5), dict(BLOCK=16, FLAG=True), ("plan", 1))  # another dtype
    launch.launch((8,), (x, y), (65, 0.5), dict(BLOCK=32, FLAG=True), ("plan", 2))  # another plan
    assert kinds(kernel) == ["triton", "direct", "triton", "triton"]
    assert kernel.log[1] == ("direct", (4, 1, 1), (x, y, 64, 0.5, 16, True))


def test_unaligned_tensors_are_never_bound(compiled_mode):
    kernel = FakeKernel()
    launch = L.KernelLaunch(kernel)
    x = torch.zeros(65)[1:]  # 4 bytes past an aligned start
    for _ in range(2):
        launch((1,), (x,), (64, 0.5), BLOCK=16, FLAG=False)
    assert kinds(kernel) == ["triton", "triton"]


def test_a_refused_direct_launch_falls_back_for_good(compiled_mode):
    kernel = FakeKernel(refuse=True)
    launch = L.KernelLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(3):
        launch((4,), (x, y), (64, 0.5), BLOCK=16, FLAG=True)
    assert kinds(kernel) == ["triton", "triton", "triton"]
    assert list(launch._bound.values()) == [None]


def test_a_constant_left_to_its_default_keeps_tritons_launch(compiled_mode):
    kernel = FakeKernel()
    launch = L.KernelLaunch(kernel)
    x, y = torch.zeros(64), torch.zeros(64)
    for _ in range(2):
        launch((4,), (x, y), (64, 0.5), BLOCK=16)  # FLAG not given: its default is not known here
    assert kinds(kernel) == ["triton", "triton"]


def test_interpreter_and_switch_take_tritons_launch(monkeypatch):
    monkeypatch.setattr(L, "capturing", lambda device: False)
    kernel = FakeKernel()
    x = torch.zeros(64)
    monkeypatch.setattr(L, "interpreting", lambda: True)
    for _ in range(2):
        L.KernelLaunch(kernel)((1,), (x,), (1, 0.5), BLOCK=16, FLAG=True)
    monkeypatch.setattr(L, "interpreting", lambda: False)
    monkeypatch.setattr(L.KernelLaunch, "ENABLED", False)
    launch = L.KernelLaunch(kernel)
    for _ in range(2):
        launch((1,), (x,), (1, 0.5), BLOCK=16, FLAG=True)
    assert kinds(kernel) == ["triton"] * 4


def test_memory_is_bounded(compiled_mode, monkeypatch):
    monkeypatch.setattr(L.KernelLaunch, "MEMORY", 4)
    launch = L.KernelLaunch(FakeKernel())
    x = torch.zeros(64)
    for n in range(10):
        launch((1,), (x,), (n, 0.5), BLOCK=16, FLAG=True)
    assert len(launch._bound) <= 4
