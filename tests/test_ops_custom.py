"""The torch.library custom ops (gsops/ops/library.py and the op modules): opcheck on every backend that runs here,
the reference backend's backward formulas against torch autograd of the reference, dispatch
rules, and torch.compile == eager."""
import pytest
import torch

import gsops
from gsops import backends, reference as ref
from gsops.ops import dispatch
from gsops.tolerances import tol

BACKENDS = ["torch", "triton"]


def _available(backend, device=torch.device("cpu")):
    ok, reason = backends.runs_on(backend, device)
    if not ok:
        pytest.skip(f"{backend} backend unavailable: {reason}")


def _leaf(t, device):
    return t.to(device).requires_grad_()


def _skew(n, b, scale=0.3):
    A = torch.randn(n, b, b, dtype=torch.float64) * scale
    return A - A.transpose(-1, -2)


def _opcheck(op, args):
    # the full default set: schema, autograd registration, fake tensor, AOT dispatch (static + dynamic)
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_gs_ops(backend, device):
    _available(backend, device)
    r, b = 3, 2
    x = _leaf(torch.randn(2, r * b, dtype=torch.float64), device)
    L = _leaf(torch.randn(r, b, b, dtype=torch.float64), device)
    R = _leaf(torch.randn(r, b, b, dtype=torch.float64), device)
    g = torch.randn(2, r * b, dtype=torch.float64).to(device)
    _opcheck(torch.ops.gsops.block_diag_mm.default, (x, R, backend))
    _opcheck(torch.ops.gsops.gs_chain.default, (x, [R, L], backend))
    _opcheck(torch.ops.gsops.gs_apply.default, (x, L, R, backend))
    _opcheck(torch.ops.gsops.block_diag_mm_backward.default, (g, x.detach(), R.detach(), backend))
    _opcheck(torch.ops.gsops.gs_chain_backward.default, (g, x.detach(), [R.detach(), L.detach()], backend))
    _opcheck(torch.ops.gsops.gs_apply_backward.default, (g, x.detach(), L.detach(), R.detach(), backend))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_cayley_ops(backend, device):
    _available(backend, device)
    K = _leaf(_skew(2, 3), device)
    G = torch.randn(2, 3, 3, dtype=torch.float64).to(device)
    _opcheck(torch.ops.gsops.cayley_exact.default, (K, backend))
    _opcheck(torch.ops.gsops.cayley_neumann.default, (K, 3, backend))
    Q = torch.ops.gsops.cayley_exact(K.detach(), backend)
    _opcheck(torch.ops.gsops.cayley_exact_backward.default, (G, Q, backend))
    _opcheck(torch.ops.gsops.cayley_neumann_backward.default, (G, K.detach(), 3, backend))


@pytest.mark.parametrize("b,r", [(1, 4), (3, 2), (4, 4)])
def test_reference_backend_backward_matches_autograd(b, r):
    """The explicit backward formulas of the torch backend vs torch autograd through the reference."""
    x = torch.randn(2, 5, r * b, dtype=torch.float64)
    blocks = [torch.randn(r, b, b, dtype=torch.float64) for _ in range(3)]
    g = torch.randn(2, 5, r * b, dtype=torch.float64)

    def both(fn_public, fn_ref, *tensors):
        mine = [t.clone().requires_grad_() for t in tensors]
        theirs = [t.clone().requires_grad_() for t in tensors]
        with gsops.use_backend("torch"):
            fn_public(*mine).backward(g)
        fn_ref(*theirs).backward(g)
        for a, c in zip(mine, theirs):
            torch.testing.assert_close(a.grad, c.grad, rtol=1e-12, atol=1e-12)

    both(gsops.block_diag_mm, ref.block_diag_mm, x, blocks[0])
    both(lambda x, *B: gsops.gs_chain(x, list(B)), lambda x, *B: ref.gs_chain(x, list(B)), x, *blocks)
    both(gsops.gs_apply, ref.gs_apply, x, blocks[0], blocks[1])


@pytest.mark.parametrize("method", ["exact", "neumann"])
@pytest.mark.filterwarnings("ignore:cayley\\(method='neumann'")
def test_reference_backend_cayley_backward(method):
    K = _skew(3, 5, scale=0.05)  # ||K|| < 1 for the series
    G = torch.randn(3, 5, 5, dtype=torch.float64)
    Km, Kr = K.clone().requires_grad_(), K.clone().requires_grad_()
    with gsops.use_backend("torch"):
        gsops.cayley(Km, method=method, terms=4).backward(G)
    (ref.cayley_exact(Kr) if method == "exact" else ref.cayley_neumann(Kr, 4)).backward(G)
    torch.testing.assert_close(Km.grad, Kr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_conv_exp_ops(backend, device):
    _available(backend, device)
    from gsops.reference import conv_exp as cref

    C, groups, k, terms = 4, 2, 3, 3
    L = _leaf(0.3 * cref.skew_kernel(torch.randn(C, C // groups, k, k, dtype=torch.float64), groups), device)
    x = _leaf(torch.randn(2, C, 3, 4, dtype=torch.float64), device)
    _opcheck(torch.ops.gsops.conv_exp.default, (x, L, terms, groups, backend))
    y, zs = torch.ops.gsops.conv_exp(x.detach(), L.detach(), terms, groups, backend)
    g = torch.randn_like(y)
    _opcheck(torch.ops.gsops.conv_exp_backward.default, (g, x.detach(), L.detach(), zs, terms, groups, backend))
    # the custom op's gradients against torch autograd of the naive series
    y = torch.ops.gsops.conv_exp(x, L, terms, groups, backend)[0]
    want = cref.conv_exp(x, L, terms, groups)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    for a, c in zip(torch.autograd.grad(y, (x, L), g), torch.autograd.grad(want, (x, L), g)):
        torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


def test_conv_exp_reference_backward_matches_autograd_and_keeps_zero_terms():
    """The torch backend's conv_exp backward formula vs torch autograd of the naive series (also in
    float32), and terms=0 returns x itself."""
    from gsops.reference import conv_exp as cref

    for dtype in (torch.float64, torch.float32):
        L = (0.2 * cref.skew_kernel(torch.randn(6, 2, 3, 3, dtype=dtype), 3)).requires_grad_()
        x = torch.randn(3, 6, 4, 5, dtype=dtype, requires_grad=True)
        y, zs = cref.conv_exp_forward(x.detach(), L.detach(), 4, 3)
        want = cref.conv_exp(x, L, 4, 3)
        torch.testing.assert_close(y, want.detach(), **tol(dtype))
        g = torch.randn_like(y)
        for a, c in zip(cref.conv_exp_backward(g, x.detach(), L.detach(), zs, 4, 3),
                        torch.autograd.grad(want, (x, L), g)):
            torch.testing.assert_close(a, c, **tol(dtype))
    x = torch.randn(1, 6, 3, 3)
    assert gsops.conv_exp(x, L.detach().float(), 0, 3) is x


def test_auto_on_cpu_uses_torch_and_forced_triton_without_interpreter_raises(monkeypatch):
    assert dispatch.choose("gs_apply", torch.randn(2, 4), torch.randn(2, 2, 2)) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, L = torch.randn(2, 4), torch.randn(2, 2, 2)
    with gsops.use_backend("triton"), pytest.raises(gsops.BackendUnavailable, match="runs on CUDA tensors"):
        gsops.gs_apply(x, L, L)


def test_backward_must_exist_on_the_chosen_backend():
    """A gradient-requiring call refuses (before running) a backend that lacks the backward op."""
    with pytest.raises(gsops.BackendUnavailable, match="has no kernel for gs_apply_no_such_backward"):
        with gsops.use_backend("torch"):
            dispatch.choose("gs_apply", torch.randn(2, 4), also=("gs_apply_no_such_backward",))


def test_custom_op_names_are_registered():
    for name in ["block_diag_mm", "gs_chain", "gs_apply", "cayley_exact", "cayley_neumann", "conv_exp"]:
        assert hasattr(torch.ops.gsops, name) and hasattr(torch.ops.gsops, name + "_backward")


def _compiler_or_skip(fn, *args, backend="inductor"):
    try:
        return torch.compile(fn, backend=backend)(*args)
    except Exception as e:  # noqa: BLE001 - decide below whether it is the environment or us
        msg = f"{type(e).__name__}: {e}"
        if any(s in msg for s in ("InvalidCxxCompiler", "CppCompileError", "No working C compiler", "gcc", "g++")):
            pytest.skip(f"the CPU compiler for torch.compile is unavailable: {msg[:200]}")
        raise


# inductor (generated C++) once; the Triton backend's kernels run opaque inside the custom ops either
# way, so its graph is only traced (aot_eager) to keep the CPU suite short
@pytest.mark.parametrize("backend,compiler", [("torch", "inductor"), ("triton", "aot_eager")])
def test_torch_compile_matches_eager(backend, compiler, device):
    _available(backend, device)
    r, b = 2, 4
    x = torch.randn(3, r * b).to(device)
    pL = (torch.randn(r, b * (b - 1) // 2) * 0.1).to(device)
    pR = (torch.randn(r, b * (b - 1) // 2) * 0.1).to(device)

    def gsoft(x, pL, pR):
        L = gsops.cayley(gsops.skew(pL, b))
        R = gsops.cayley(gsops.skew(pR, b))
        return gsops.gs_apply(x, L, R).sin().sum()

    torch._dynamo.reset()
    with gsops.use_backend(backend):
        leaves = [t.clone().requires_grad_() for t in (x, pL, pR)]
        eager = gsoft(*leaves)
        eager.backward()
        cleaves = [t.clone().requires_grad_() for t in (x, pL, pR)]
        compiled = _compiler_or_skip(gsoft, *cleaves, backend=compiler)
        compiled.backward()
    torch.testing.assert_close(compiled, eager, **tol(torch.float32))
    for a, c in zip(cleaves, leaves):
        torch.testing.assert_close(a.grad, c.grad, **tol(torch.float32))


def test_compiled_function_follows_a_backend_switch(monkeypatch, device):
    """torch.compile bakes the chosen backend into its graph; its guards must notice a switch
    (use_backend or GSOPS_BACKEND) so a compiled function never silently keeps the old backend."""
    _available("triton", device)
    calls = []
    real = dispatch.impl("gs_apply", "triton")
    monkeypatch.setitem(backends._KERNELS["triton"], "gs_apply", lambda *a: calls.append(1) or real(*a))
    x, L, R = (t.to(device) for t in (torch.randn(3, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 4)))
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, L, R: gsops.gs_apply(x, L, R) * 2, backend="aot_eager")
    with gsops.use_backend("torch"):
        a = compiled(x, L, R)
    assert calls == []
    with gsops.use_backend("triton"):
        b = compiled(x, L, R)
    assert calls == [1]
    monkeypatch.setenv("GSOPS_BACKEND", "torch")
    compiled(x, L, R)
    monkeypatch.setenv("GSOPS_BACKEND", "triton")
    compiled(x, L, R)
    assert calls == [1, 1]
    torch.testing.assert_close(a, b, **tol(torch.float32))


def _forbid_kernels(monkeypatch):
    """Every registered kernel raises if called: a refused call must refuse before any kernel runs."""
    for name in backends.NAMES:
        backends.load(name)
        for op in list(backends._KERNELS[name]):
            monkeypatch.setitem(backends._KERNELS[name], op,
                                lambda *a, _op=op, _b=name: pytest.fail(f"{_b} kernel {_op} ran"))


def test_forced_backend_that_cannot_run_raises_the_reason_before_any_kernel(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    _forbid_kernels(monkeypatch)
    x, L = torch.randn(2, 4), torch.randn(2, 2, 2)
    with gsops.use_backend("triton"), pytest.raises(gsops.BackendUnavailable,
                                                    match="GSOPS_BACKEND=triton cannot run gs_apply: .*CUDA tensors"):
        gsops.gs_apply(x, L, L)
    with gsops.use_backend("cuda"), pytest.raises(gsops.BackendUnavailable,
                                                  match="GSOPS_BACKEND=cuda cannot run block_diag_mm: "):
        gsops.block_diag_mm(x, L)
    with gsops.use_backend("triton"), pytest.raises(gsops.BackendUnavailable,
                                                    match="GSOPS_BACKEND=triton cannot run conv_exp: "):
        gsops.conv_exp(torch.randn(1, 2, 3, 3), torch.zeros(2, 2, 3, 3), 2)


def test_backend_modules_say_why_instead_of_falling_back(monkeypatch):
    """The triton backend's supports() names the device, dtype and block-size rules; the dispatcher
    refuses on its word, so an unsupported call never runs a reference computation in its place."""
    _available("triton")
    from gsops.backends import triton_backend as tb

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "runs on CUDA tensors" in tb.supports("gs_apply", torch.randn(2, 4), torch.randn(2, 2, 2))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4)
    assert tb.supports("gs_apply", x, torch.randn(2, 2, 2)) is None
    why = tb.supports("gs_apply", x.long(), torch.randn(2, 2, 2).long())
    assert why and "torch.int64" in why
    _forbid_kernels(monkeypatch)
    with gsops.use_backend("triton"), pytest.raises(gsops.BackendUnavailable, match="torch.int64"):
        dispatch.choose("gs_apply", x.long(), torch.randn(2, 2, 2).long())


class _OnCuda(torch.Tensor):
    """A meta tensor that reports a CUDA device: stands in for CUDA tensors where dispatch only
    reads devices, dtypes and shapes."""

    @property
    def device(self):
        return torch.device("cuda")


def test_auto_on_cuda_lands_on_torch_with_every_reason_once(monkeypatch):
    """auto on CUDA tensors takes the first backend whose supports() is None and, when that is the
    reference path, warns once naming each refusal (supports patched to refuse triton and cuda)."""
    import warnings

    monkeypatch.setattr(backends, "supports", lambda name, op, *t: None if name == "torch" else f"{name} says no")
    monkeypatch.setattr(dispatch, "_warned", set())
    cuda_like = torch.empty(2, 4, device="meta").as_subclass(_OnCuda)
    with gsops.use_backend("auto"), pytest.warns(UserWarning, match="triton: triton says no; cuda: cuda says no"):
        assert dispatch.choose("gs_apply", cuda_like) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.choose("gs_apply", cuda_like) == "torch"  # said once
    monkeypatch.setattr(backends, "supports", lambda name, op, *t: None if name == "cuda" else f"{name} says no")
    assert dispatch.choose("gs_apply", cuda_like) == "cuda"
