"""The selective scan of Mamba: a diagonal linear recurrence whose step depends on the input.

For every batch element b, channel d and state index n, with h_{-1} = 0:

    h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t u_t        (zero-order hold for A, Euler for B, as mamba-ssm)
    y_t = C_t · h_t + D u_t,        then y_t *= silu(z_t) when a gate z is given

where Δ_t = softplus(delta_t + delta_bias) if `delta_softplus` else delta_t + delta_bias.
`selective_scan` has the signature and semantics of mamba-ssm's `selective_scan_fn` for real
tensors, with three backends chosen explicitly:

- "cuda": mamba-ssm's fused kernel (GPU, float32/float16/bfloat16; mamba-ssm is optional and
  imported only when asked for);
- "torch": a pure-PyTorch chunked scan for CPU (or any device, any float dtype) whose Python
  loop runs over L/chunk chunks, not over time steps;
- "reference": the naive loop over time, written as the equations read: the specification the
  other two are tested against.

"auto" takes "cuda" when the tensors are on a GPU in a dtype the kernel accepts and mamba-ssm's
kernels import, and "torch" otherwise; an explicit "cuda" that cannot run raises instead of
falling back. Complex A (S4D-style) is not supported: Twin's A is real and negative.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor

BACKENDS = ("auto", "cuda", "torch", "reference")
INSTALL = 'pip install --no-build-isolation "twin[cuda]"  (builds mamba-ssm\'s CUDA kernels)'
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    backend: str = "auto",
    chunk: int = 4,
) -> Tensor | tuple[Tensor, Tensor]:
    """y (batch, dim, L), and the last state h_{L-1} (batch, dim, N) if `return_last_state`.

    u, delta: (batch, dim, L). A: (dim, N), real. B, C: (batch, N, L), or grouped (batch, G, N, L)
    where channel d uses group d // (dim / G). D, delta_bias: (dim,). z: (batch, dim, L).
    chunk: time steps per chunk of the "torch" backend; 4 was the fastest on CPU for L from 16
    to 512, as each doubling level streams the whole state tensor through memory.
    Computation is in float32 or wider; y comes back in u's dtype. Like mamba-ssm's kernel, the
    "cuda" backend does not backpropagate through the last state; "torch" and "reference" do.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    if backend not in BACKENDS:
        raise ValueError(f"selective_scan: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "cuda" if u.is_cuda and u.dtype in _KERNEL_DTYPES and _kernel()[0] is not None else "torch"
    if backend == "cuda":
        return _cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if backend == "reference":
        return _reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if not (isinstance(chunk, int) and chunk >= 1):
        raise ValueError(f"selective_scan: chunk must be an int >= 1, got {chunk!r}")

    dtype_in = u.dtype
    real, u, delta, A, B, C = _in_real(u, delta, A, B, C, delta_bias, delta_softplus)
    # Time first, (L, b, d, N): every step or chunk of steps is then one contiguous block, which
    # on CPU is several times faster than slicing along a trailing time axis.
    delta_t, u_t = _time_first(delta), _time_first(u)  # (L, b, d)
    log_a = delta_t[..., None] * A  # log of the decay exp(Δ A)
    x = _per_channel(delta_t * u_t, _time_first(B))  # the input Δ B u
    h = _scan_chunked(log_a, x, chunk)
    y = _contract(h, _time_first(C)).movedim(0, -1)  # (b, d, L)
    if D is not None:
        y = y + D.to(real)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(real))
    y = y.to(dtype_in)
    return (y, h[-1]) if return_last_state else y


def _scan_chunked(log_a: Tensor, x: Tensor, chunk: int) -> Tensor:
    """h_t = exp(log_a_t) h_{t-1} + x_t along the first axis, h_{-1} = 0: (L, ...) -> (L, ...).

    Time is cut into chunks of K steps. Inside every chunk at once, a log-depth doubling scan
    (Hillis-Steele) gives the state that starts from zero and the decay since the chunk began;
    a Python loop over the L/K chunks then carries each chunk's final state into the next.
    Why not the K x K segment-sum matrix exp(S_t - S_s) of Mamba-2: Mamba-1's decay differs
    per state index n, so that matrix would be (K, K, b, d, N), K times the memory of the
    states themselves; the doubling scan keeps log2(K) copies. It multiplies decays rather
    than forming exp(S_t) / exp(S_s), so nothing overflows when A <= 0.
    """
    L = x.shape[0]
    K = min(chunk, L)
    n_chunks = math.ceil(L / K)
    pad = n_chunks * K - L
    if pad:  # padding steps decay by exp(0) = 1 and add 0: the states up to L are untouched
        log_a = torch.cat([log_a, log_a.new_zeros(pad, *log_a.shape[1:])])
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
    a = log_a.exp().unflatten(0, (n_chunks, K))  # (chunks, K, ...)
    x = x.unflatten(0, (n_chunks, K))
    k = 1
    while k < K:
        # After this step x_t sums the inputs of the 2k steps ending at t, and a_t is their decay.
        x = torch.cat([x[:, :k], torch.addcmul(x[:, k:], a[:, k:], x[:, :-k])], dim=1)
        a = torch.cat([a[:, :k], a[:, k:] * a[:, :-k]], dim=1)
        k *= 2
    # unbind, not indexing in the loop: each index's backward would write a full-size gradient.
    carry = x.new_zeros(x.shape[2:])
    carried = []
    for x_end, a_end in zip(x[:, -1].unbind(0), a[:, -1].unbind(0)):
        carried.append(carry)
        carry = torch.addcmul(x_end, a_end, carry)
    h = torch.addcmul(x, a, torch.stack(carried)[:, None])
    return h.flatten(0, 1)[:L]


def _time_first(t: Tensor) -> Tensor:
    """(b, ..., L) -> (L, b, ...), contiguous."""
    return t.movedim(-1, 0).contiguous()


def _per_channel(v: Tensor, B: Tensor) -> Tensor:
    """v (L, b, d) times B (L, b, N), or grouped B (L, b, G, N) shared by dim/G channels -> (L, b, d, N)."""
    if B.dim() == 3:
        return v[..., None] * B[:, :, None, :]
    return (v.unflatten(2, (B.shape[2], -1))[..., None] * B[:, :, :, None, :]).flatten(2, 3)


def _contract(h: Tensor, C: Tensor) -> Tensor:
    """C_t · h_t over N: h (L, b, d, N) with C (L, b, N) or grouped (L, b, G, N) -> (L, b, d)."""
    if C.dim() == 3:
        return torch.einsum("lbdn,lbn->lbd", h, C)
    return torch.einsum("lbghn,lbgn->lbgh", h.unflatten(2, (C.shape[2], -1)), C).flatten(2, 3)


def _in_real(u, delta, A, B, C, delta_bias, delta_softplus):
    """Inputs in float32 or wider, and the step Δ = delta (+ bias) (softplus'd if asked): both paths start here."""
    real = torch.promote_types(u.dtype, torch.float32)
    u, delta, A, B, C = (t.to(real) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.to(real)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return real, u, delta, A, B, C


def _reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The specification: the recurrence stepped one time step at a time (float32 or wider)."""
    dtype_in = u.dtype
    real, u, delta, A, B, C = _in_real(u, delta, A, B, C, delta_bias, delta_softplus)
    dim = u.shape[1]
    # Group g of grouped B, C (b, G, N, L) serves channels g*H ... g*H + H-1, H = dim / G.
    B = B.repeat_interleave(dim // B.shape[1], dim=1) if B.dim() == 4 else B[:, None]  # (b, d or 1, N, L)
    C = C.repeat_interleave(dim // C.shape[1], dim=1) if C.dim() == 4 else C[:, None]
    h = u.new_zeros(u.shape[0], dim, A.shape[1])  # (b, d, N)
    ys = []
    for delta_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        dt = delta_t[..., None]  # (b, d, 1)
        h = torch.exp(dt * A) * h + dt * B_t * u_t[..., None]
        ys.append((C_t * h).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(real)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(real))
    y = y.to(dtype_in)
    return (y, h) if return_last_state else y


@functools.lru_cache(maxsize=None)
def _kernel():
    """(mamba-ssm's selective_scan_fn, None) or (None, why not), imported on first demand, once.

    Once: a failed import is not cached by Python, and "auto" asks on every call on a GPU. Any
    exception means no kernel: importing mamba-ssm also imports triton and transformers, whose
    version clashes raise more than ImportError.
    """
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as error:  # noqa: BLE001
        return None, error
    return selective_scan_fn, None


def _cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    if not u.is_cuda:
        raise RuntimeError(
            f'selective_scan: backend="cuda" needs CUDA tensors and mamba-ssm\'s kernels, got tensors on {u.device}; '
            f'use backend="torch" on CPU, and on a GPU machine install the kernels with: {INSTALL}'
        )
    fn, error = _kernel()
    if fn is None:
        raise RuntimeError(f'selective_scan: backend="cuda" needs mamba-ssm\'s CUDA kernels, which did not import ({error}); install them with: {INSTALL}')
    if u.dtype not in _KERNEL_DTYPES:
        raise ValueError(f'selective_scan: backend="cuda" takes u in float32, float16 or bfloat16, got {u.dtype}; use backend="torch"')
    # The kernel wants delta, B, C and z in u's dtype and A, D, delta_bias in float32. Under
    # autocast they arrive mixed (a softplus'd step in float32, B and C from a bfloat16 linear
    # layer), which the other backends take as they come: cast here, so "auto" never fails.
    delta, B, C, z = (t if t is None else t.to(u.dtype) for t in (delta, B, C, z))
    A, D, delta_bias = (t if t is None else t.float() for t in (A, D, delta_bias))
    return fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


def _check_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    if any(t is not None and t.is_complex() for t in (u, delta, A, B, C, D, z, delta_bias)):
        raise ValueError("selective_scan: complex tensors (complex A of S4D) are not supported; A must be real")
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, L = u.shape
    if L == 0:
        raise ValueError("selective_scan: u has no time steps (L = 0)")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (dim, N) = ({dim}, N), got {tuple(A.shape)}")
    N = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        grouped = t.dim() == 4 and t.shape[1] >= 1 and dim % t.shape[1] == 0
        if not ((t.dim() == 3 and t.shape == (batch, N, L)) or (grouped and t.shape[0] == batch and t.shape[2:] == (N, L))):
            raise ValueError(
                f"selective_scan: {name} must be (batch, N, L) = {(batch, N, L)} or (batch, G, N, L) with G dividing "
                f"dim={dim}, got {tuple(t.shape)}"
            )
    for name, t, shape in (("D", D, (dim,)), ("delta_bias", delta_bias, (dim,)), ("z", z, tuple(u.shape))):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"selective_scan: {name} must have shape {shape}, got {tuple(t.shape)}")
