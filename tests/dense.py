"""Independent float64 numpy oracle for tests: matrices built with explicit loops from the
formulas of SPEC.md, never with the gsops functions under test."""
import numpy as np


def sigma(k, n):
    """Definition 5.2 of the GS paper: sigma(i) = (i mod k) * n/k + floor(i / k)."""
    return [(i % k) * (n // k) + i // k for i in range(n)]


def perm_matrix(k, n):
    """P with P[sigma(i), i] = 1."""
    P = np.zeros((n, n))
    for i, s in enumerate(sigma(k, n)):
        P[s, i] = 1.0
    return P


def paired_sigma(k, n):
    return [((i // 2) % k) * (n // k) + 2 * (i // (2 * k)) + (i % 2) for i in range(n)]


def block_diag(B):
    B = np.asarray(B, dtype=np.float64)
    r, b, _ = B.shape
    D = np.zeros((r * b, r * b))
    for i in range(r):
        for p in range(b):
            for q in range(b):
                D[i * b + p, i * b + q] = B[i, p, q]
    return D


def gs_chain_matrix(blocks):
    """B_m P ... B_2 P B_1 with P = perm(r, r*b)."""
    r, b, _ = np.asarray(blocks[0]).shape
    P = perm_matrix(r, r * b)
    A = block_diag(blocks[0])
    for B in blocks[1:]:
        A = block_diag(B) @ P @ A
    return A


def gsoft_matrix(L, R):
    """Q = P^T L P R with P = perm(r, d)."""
    r, b, _ = np.asarray(R).shape
    P = perm_matrix(r, r * b)
    return P.T @ block_diag(L) @ P @ block_diag(R)


def skew_from_packed(params, b):
    params = np.asarray(params, dtype=np.float64)
    K = np.zeros(params.shape[:-1] + (b, b))
    idx = 0
    for i in range(b):
        for j in range(i + 1, b):
            K[..., i, j] = params[..., idx]
            K[..., j, i] = -params[..., idx]
            idx += 1
    return K


def cayley(K):
    K = np.asarray(K, dtype=np.float64)
    eye = np.eye(K.shape[-1])
    return (eye + K) @ np.linalg.inv(eye - K)


def np64(t):
    return t.detach().to("cpu", dtype=__import__("torch").float64).numpy()
