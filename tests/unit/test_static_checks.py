"""Static checks before anything runs: generated code that reaches files, processes, the network or
the import machinery, or leaves the work to torch, is refused with a reason a model can act on."""
import pytest

from shared.ops import rmsnorm
from shared.variants import render, static_problems
from support import rmsnorm_answers as answers

BASELINE = render(rmsnorm.TEMPLATE, rmsnorm.DEFAULT)


def with_launch_body(body: str, extra: str = "") -> str:
    return f'''import torch
import triton
import triton.language as tl
{extra}

@triton.jit
def _k(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs, tl.load(X + offs, mask=offs < N), mask=offs < N)


def launch(x, weight, eps=1e-6):
{body}
'''


CALLS_KERNEL = "    y = torch.empty_like(x)\n    _k[(1,)](x, y, x.numel(), BLOCK=1024)\n"


def test_template_and_partial_kernels_pass():
    assert static_problems(BASELINE) == []
    assert static_problems(answers.PARTIAL_SOURCE) == []
    assert static_problems(with_launch_body(CALLS_KERNEL + "    return y")) == []


@pytest.mark.parametrize("body, reason", [
    ("    torch.save(x, 'x.pt')\n" + CALLS_KERNEL + "    return y", "torch.save"),
    ("    w = torch.load('w.pt')\n" + CALLS_KERNEL + "    return y", "torch.load"),
    ("    w = torch.from_file('/etc/passwd')\n" + CALLS_KERNEL + "    return y", "torch.from_file"),
    ("    torch.ops.aten.add(x, x)\n" + CALLS_KERNEL + "    return y", "torch.ops"),
    ("    T.hub.load('a', 'b')\n" + CALLS_KERNEL + "    return y", "torch.hub"),
    ("    triton.runtime.driver.active\n" + CALLS_KERNEL + "    return y", "triton.runtime"),
    ("    torch._C._jit_pass\n" + CALLS_KERNEL + "    return y", "torch._C"),
    ("    x.__class__\n" + CALLS_KERNEL + "    return y", "__class__"),
    ("    f = open('x')\n" + CALLS_KERNEL + "    return y", "use of open"),
    ("    eval('1')\n" + CALLS_KERNEL + "    return y", "use of eval"),
])
def test_file_process_and_internals_access_is_refused(body, reason):
    problems = static_problems(with_launch_body(body, extra="import torch as T"))
    assert any(reason in p for p in problems), problems


@pytest.mark.parametrize("body, reason", [
    (CALLS_KERNEL + "    return torch.rsqrt(x)", "torch.rsqrt"),
    (CALLS_KERNEL + "    return F.softmax(x, -1)", "torch.nn.functional.softmax"),
    (CALLS_KERNEL + "    return y * x.sum(-1, keepdim=True)", ".sum()"),
    (CALLS_KERNEL + "    return x @ weight", "multiplies matrices"),
])
def test_torch_doing_the_work_on_the_host_is_refused(body, reason):
    problems = static_problems(with_launch_body(body, extra="import torch.nn.functional as F"))
    assert any(reason in p for p in problems), problems


@pytest.mark.parametrize("source, reason", [
    ("import os\n" + BASELINE, "import of os"),
    ("import subprocess\n" + BASELINE, "import of subprocess"),
    ("from importlib import import_module\n" + BASELINE, "import from importlib"),
    ("from torch import load\n" + BASELINE, "torch.load"),
    (BASELINE.replace("_rmsnorm_fwd[grid](", "print(grid, "), "launch() calls none"),
    (BASELINE.replace("@triton.jit", ""), "no @triton.jit kernel"),
    (BASELINE.replace("def launch(", "def run("), "no top-level launch()"),
])
def test_imports_and_structure_are_checked(source, reason):
    problems = static_problems(source)
    assert any(reason in p for p in problems), problems


def test_a_kernel_launched_from_a_host_helper_counts():
    source = with_launch_body("    return _go(x)").replace(
        "def launch(", "def _go(x):\n    y = torch.empty_like(x)\n    _k[(1,)](x, y, x.numel(), BLOCK=1024)\n"
                       "    return y\n\n\ndef launch(")
    assert static_problems(source) == []


def test_a_launcher_that_spins_passes_so_the_benchmarkers_deadline_judges_it():
    # undecidable statically; the worker's timeout ends it with status "timeout"
    source = answers.SPINS.strip().strip("`").removeprefix("python\n")
    assert static_problems(source) == []


@pytest.mark.parametrize("extra, body, refused", [
    ("from triton.tools.tensor_descriptor import TensorDescriptor", "    TensorDescriptor(x, [1], [1], [16])\n", None),
    ("import triton.tools.tensor_descriptor as td", "    td.TensorDescriptor(x, [1], [1], [16])\n", None),
    ("from triton.tools import compile", "", "triton.tools"),
    ("import triton.tools.compile", "", "triton.tools.compile"),
    ("", "    triton.tools.disasm.get_sass(b'')\n", "triton.tools.disasm"),
])
def test_only_the_tma_descriptor_of_triton_tools_is_allowed(extra, body, refused):
    problems = static_problems(with_launch_body(body + CALLS_KERNEL + "    return y", extra=extra))
    if refused is None:
        assert problems == []
    else:
        assert any(refused in p for p in problems), problems
