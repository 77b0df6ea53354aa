"""The selective scan's backends against each other, a closed form, and mamba-ssm's own reference."""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from twin.dynamics.selective_scan import selective_scan

ss = importlib.import_module("twin.dynamics.selective_scan")  # the module; the package exports the function

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _inputs(L, *, dtype=torch.float64, batch=2, dim=4, N=3, groups=0, seed=0):
    """Random real inputs with Δ >= 0 and A < 0, Mamba's regime (a decaying, well-conditioned scan).

    groups=G gives grouped (batch, G, N, L) B and C.
    """
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    bc = (batch, groups, N, L) if groups else (batch, N, L)
    return dict(
        u=r(batch, dim, L), delta=r(batch, dim, L).abs() * 0.5, A=-torch.rand(dim, N, generator=g, dtype=dtype) * 2 - 0.1,
        B=r(*bc), C=r(*bc), D=r(dim), z=r(batch, dim, L), delta_bias=r(dim).abs() * 0.1,
    )


def _outputs_and_grads(fn, inputs, options, seed=1):
    """Run fn, contract y (and the last state) with fixed random weights, return outputs and grads."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = fn(**leaves, **options)
    y, last = out if options.get("return_last_state") else (out, None)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum()
    if last is not None:
        loss = loss + (last * torch.randn(last.shape, generator=g, dtype=last.dtype)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return [t.detach() for t in (y, last) if t is not None], dict(zip(leaves, grads))


OPTIONS = [
    dict(),
    dict(delta_softplus=True, return_last_state=True),
    dict(D=True, z=True, delta_bias=True, delta_softplus=True),
    dict(D=True, delta_bias=True, return_last_state=True),
]


def _pick(inputs, option):
    """Drop the optional tensors an option set does not ask for."""
    keep = {k: v for k, v in inputs.items() if k in ("u", "delta", "A", "B", "C") or option.get(k)}
    flags = {k: v for k, v in option.items() if k in ("delta_softplus", "return_last_state")}
    return keep, flags


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("L", [1, 5, 16, 37])
@pytest.mark.parametrize("option", range(len(OPTIONS)))
def test_chunked_matches_naive_loop_outputs_and_grads(dtype, L, option):
    inputs, flags = _pick(_inputs(L, dtype=dtype, seed=L), OPTIONS[option])
    # chunk 16: L = 5 < K, L = 16 = K, L = 37 not a multiple of K; chunk 1 is a loop in disguise.
    for chunk in (16, 3):
        fast = _outputs_and_grads(lambda **kw: selective_scan(**kw, backend="torch", chunk=chunk), inputs, flags)
        slow = _outputs_and_grads(lambda **kw: selective_scan(**kw, backend="reference"), inputs, flags)
        for a, b in zip(fast[0], slow[0]):
            torch.testing.assert_close(a, b, **TOL[dtype])
        assert fast[1].keys() == slow[1].keys() == inputs.keys()
        for name in inputs:
            torch.testing.assert_close(fast[1][name], slow[1][name], **TOL[dtype], msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_grouped_B_C_equal_the_same_B_C_repeated_per_channel(backend):
    dim, G = 6, 3
    x = _inputs(9, dim=dim, groups=G)
    grouped = selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], return_last_state=True, backend=backend, chunk=4)
    H = dim // G
    per_channel = [
        selective_scan(x["u"][:, [d]], x["delta"][:, [d]], x["A"][[d]], x["B"][:, d // H], x["C"][:, d // H],
                       return_last_state=True, backend=backend)
        for d in range(dim)
    ]
    torch.testing.assert_close(grouped[0], torch.cat([p[0] for p in per_channel], 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grouped[1], torch.cat([p[1] for p in per_channel], 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_constant_step_has_the_geometric_closed_form(backend):
    # N = 1, B = C = u = 1, Δ and A constant: h_t = Δ (1 - q^{t+1}) / (1 - q) with q = exp(Δ A).
    L, step, a = 23, 0.3, -0.7
    ones = torch.ones(1, 1, L, dtype=torch.float64)
    y = selective_scan(ones, ones * step, torch.tensor([[a]], dtype=torch.float64), ones, ones, backend=backend, chunk=5)
    q = math.exp(step * a)
    t = torch.arange(L, dtype=torch.float64)
    torch.testing.assert_close(y[0, 0], step * (1 - q ** (t + 1)) / (1 - q), rtol=1e-12, atol=1e-14)


def test_growing_recurrence_is_not_assumed_away():
    # Correctness does not rely on A < 0 (only stability does): A > 0 and Δ of either sign.
    x = _inputs(29, seed=3)
    x["A"], x["delta"] = x["A"].abs() * 0.3, torch.randn(x["u"].shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    fast = _outputs_and_grads(lambda **kw: selective_scan(**kw, backend="torch", chunk=8), x, dict(return_last_state=True))
    slow = _outputs_and_grads(lambda **kw: selective_scan(**kw, backend="reference"), x, dict(return_last_state=True))
    assert fast[0][1].abs().max() > 10  # it does grow
    for a, b in zip(fast[0] + list(fast[1].values()), slow[0] + list(slow[1].values())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_fast_decay_does_not_overflow_in_float32():
    # Δ A down to -200 per step: a scan that formed exp(-cumsum(Δ A)) would overflow float32.
    x = _inputs(70, dtype=torch.float32, N=16, dim=3)
    A = -torch.arange(1, 17, dtype=torch.float32).repeat(3, 1)
    delta = x["delta"].abs() * 10 + 2
    fast = selective_scan(x["u"], delta, A, x["B"], x["C"], backend="torch", chunk=32)
    slow = selective_scan(x["u"], delta, A, x["B"], x["C"], backend="reference")
    assert torch.isfinite(fast).all()
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_half_inputs_compute_in_float32_and_return_half():
    x = _inputs(10, dtype=torch.float32)
    half = {k: v.to(torch.bfloat16) for k, v in x.items()}
    y = selective_scan(**half, backend="torch")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, selective_scan(**half, backend="reference"), rtol=1e-2, atol=1e-2)


# mamba-ssm's own reference ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def mamba_ref():
    """mamba-ssm's selective_scan_ref, loaded on a CPU-only machine (skips without mamba-ssm).

    A kernel-less install (MAMBA_SKIP_CUDA_BUILD=TRUE) cannot `import mamba_ssm`: the package's
    __init__ pulls in triton, huggingface_hub and transformers, and selective_scan_interface
    imports the compiled `selective_scan_cuda`. Stand-ins for the package (its path without its
    __init__), for `selective_scan_cuda` and for the triton layer norm let that one file load;
    selective_scan_ref is plain PyTorch and touches none of them. sys.modules is put back after.
    """
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        pytest.skip("mamba-ssm is not installed")
    pytest.importorskip("einops")
    root = Path(next(iter(spec.submodule_search_locations)))
    package = types.ModuleType("mamba_ssm")
    package.__path__ = [str(root)]
    layer_norm = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    layer_norm._layer_norm_fwd = None  # used only by mamba's fused RMSNorm, not by the scan
    saved = dict(sys.modules)
    sys.modules.update({
        "mamba_ssm": package,
        "selective_scan_cuda": types.ModuleType("selective_scan_cuda"),
        "mamba_ssm.ops.triton.layer_norm": layer_norm,
    })
    try:
        file = importlib.util.spec_from_file_location("_mamba_selective_scan_interface", root / "ops" / "selective_scan_interface.py")
        module = importlib.util.module_from_spec(file)
        file.loader.exec_module(module)
    finally:
        for name in set(sys.modules) - set(saved):
            del sys.modules[name]
        sys.modules.update(saved)
    return module.selective_scan_ref


@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("option", range(len(OPTIONS)))
def test_matches_mamba_ssm_selective_scan_ref(mamba_ref, option, groups):
    # mamba's reference computes in float32 whatever comes in: compare in float32.
    inputs, flags = _pick(_inputs(21, dtype=torch.float32, groups=groups, seed=option), OPTIONS[option])
    ours = _outputs_and_grads(lambda **kw: selective_scan(**kw, backend="torch", chunk=8), inputs, flags)
    theirs = _outputs_and_grads(mamba_ref, inputs, flags)
    for a, b in zip(ours[0], theirs[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for name in inputs:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-5, msg=lambda m: f"grad {name}: {m}")


# backends ----------------------------------------------------------------------------------------

def test_cuda_backend_on_cpu_raises_with_the_install_command():
    x = _inputs(4, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r'backend="cuda" needs CUDA tensors.*got tensors on cpu.*pip install'):
        selective_scan(**x, backend="cuda")


def test_auto_on_cpu_is_the_torch_path_and_never_touches_mamba(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("auto on CPU must not try the CUDA kernels")

    monkeypatch.setattr(ss, "_kernel", boom)
    monkeypatch.setattr(ss, "_cuda", boom)
    x = _inputs(7, dtype=torch.float32)
    assert torch.equal(selective_scan(**x), selective_scan(**x, backend="torch"))


def test_any_failure_to_import_the_kernels_means_none_and_is_tried_once(monkeypatch):
    import builtins

    real, tries = builtins.__import__, []

    def clash(name, *args, **kwargs):
        if name.startswith("mamba_ssm"):
            tries.append(name)
            raise RuntimeError("triton version clash")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", clash)
    ss._kernel.cache_clear()
    try:
        fn, error = ss._kernel()
        assert fn is None and "triton version clash" in str(error)
        assert ss._kernel()[1] is error and len(tries) == 1
    finally:
        ss._kernel.cache_clear()


# mamba-ssm's fused CUDA kernel (GPU machines with the `cuda` extra) --------------------------------

@pytest.fixture(scope="module")
def kernel():
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    fn, error = ss._kernel()
    if fn is None:
        pytest.skip(f"mamba-ssm's CUDA kernels did not import: {error}")
    return fn


def _on_gpu(inputs, dtype):
    return {k: v.to("cuda", dtype) for k, v in inputs.items()}


def _y_and_grads(backend, inputs, flags, seed=1):
    """Outputs and the gradients of a fixed random contraction of y alone: the kernel, like
    mamba-ssm's, does not backpropagate through the last state."""
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    out = selective_scan(**leaves, **flags, backend=backend)
    y, last = out if flags.get("return_last_state") else (out, None)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device, y.dtype)
    grads = torch.autograd.grad((y * w).float().sum(), list(leaves.values()))
    return y.detach(), last, dict(zip(leaves, grads))


def test_auto_on_gpu_takes_the_kernel(kernel, monkeypatch):
    calls = []
    real = ss._cuda
    monkeypatch.setattr(ss, "_cuda", lambda *args: calls.append(args[0].dtype) or real(*args))
    x = _on_gpu(_inputs(5, dtype=torch.float32), torch.float32)
    torch.testing.assert_close(selective_scan(**x), selective_scan(**x, backend="torch"), rtol=1e-4, atol=1e-4)
    assert calls == [torch.float32]


@pytest.mark.parametrize("L", [1, 37, 300])
@pytest.mark.parametrize("groups", [0, 2])
@pytest.mark.parametrize("option", range(len(OPTIONS)))
def test_cuda_kernel_matches_torch_path_outputs_and_grads(kernel, L, groups, option):
    inputs, flags = _pick(_inputs(L, dtype=torch.float32, groups=groups, seed=option), OPTIONS[option])
    inputs = _on_gpu(inputs, torch.float32)
    y, last, grads = _y_and_grads("cuda", inputs, flags)
    y_ref, last_ref, grads_ref = _y_and_grads("torch", inputs, flags)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    if last is not None:
        torch.testing.assert_close(last, last_ref, rtol=1e-4, atol=1e-4)
    for name in inputs:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-3, atol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_kernel_in_half_precision_matches_torch_path(kernel, dtype):
    # Both compute in float32 from the same half inputs: they differ by the rounding of the results.
    inputs, flags = _pick(_inputs(64, dtype=torch.float32, groups=2), OPTIONS[2])
    inputs = _on_gpu(inputs, dtype)
    y, _, grads = _y_and_grads("cuda", inputs, flags)
    y_ref, _, grads_ref = _y_and_grads("torch", inputs, flags)
    assert y.dtype == y_ref.dtype == dtype
    torch.testing.assert_close(y, y_ref, rtol=2e-2, atol=2e-2)
    for name in inputs:
        assert grads[name].dtype == dtype, name
        torch.testing.assert_close(grads[name].float(), grads_ref[name].float(), rtol=5e-2, atol=5e-2,
                                   msg=lambda m: f"grad {name}: {m}")


def test_cuda_kernel_takes_the_mixed_dtypes_of_autocast(kernel):
    # Under autocast a softplus'd step comes in float32 and B, C from linear layers in bfloat16;
    # the kernel alone would refuse the mix.
    x = _on_gpu(_inputs(20, dtype=torch.float32), torch.float32)
    mixed = {**x, "B": x["B"].bfloat16(), "C": x["C"].bfloat16(), "D": x["D"].bfloat16()}
    y = selective_scan(**mixed, delta_softplus=True, backend="cuda")
    torch.testing.assert_close(y, selective_scan(**mixed, delta_softplus=True, backend="torch"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(A=torch.zeros(4, 3, dtype=torch.complex64)), "complex"),
        (dict(A=torch.zeros(5, 3)), r"A must be \(dim, N\) = \(4, N\), got \(5, 3\)"),
        (dict(B=torch.zeros(2, 3, 6)), r"B must be \(batch, N, L\) = \(2, 3, 5\) .* got \(2, 3, 6\)"),
        (dict(C=torch.zeros(2, 3, 3, 5)), r"C must be .*G dividing dim=4, got \(2, 3, 3, 5\)"),
        (dict(delta=torch.zeros(2, 4, 4)), r"delta must have u's shape \(2, 4, 5\), got \(2, 4, 4\)"),
        (dict(D=torch.zeros(3)), r"D must have shape \(4,\), got \(3,\)"),
        (dict(backend="triton"), r"backend must be one of .* got 'triton'"),
        (dict(backend="torch", chunk=0), r"chunk must be an int >= 1, got 0"),
    ],
)
def test_bad_arguments_say_what_was_expected_and_what_came(change, message):
    x = {**_inputs(5, dtype=torch.float32), **change}
    with pytest.raises(ValueError, match=message):
        selective_scan(**x)
