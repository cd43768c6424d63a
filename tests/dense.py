"""Independent float64 numpy oracle for tests: matrices built with explicit loops from the
formulas of SPEC.md, never with the gsops functions under test."""
import numpy as np
import scipy.linalg


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


# ------------------------------------------------------------------ adapter oracles (numpy, float64)
def butterfly_matrix(d, b, level):
    """BOFT's level-l permutation B (gather form, B[j, g[j]] = 1) by its definition, with loops."""
    Bm = np.zeros((d, d))
    if level == 0:
        return np.eye(d)
    half, chunk = b // 2, b * 2 ** level
    n_half = chunk // half
    order = [h for h in range(n_half) if h % 2 == 0] + [h for h in range(n_half) if h % 2 == 1]
    for start in range(0, d, chunk):
        for pos, h in enumerate(order):
            for t in range(half):
                Bm[start + pos * half + t, start + h * half + t] = 1.0
    return Bm


def skew_np(params, packed, b):
    P = np64(params)
    if packed:
        return skew_from_packed(P, b)
    return P - np.swapaxes(P, -1, -2)


def neumann_np(K, terms):
    """SPEC's truncated Cayley: 2 (I + K + ... + K^terms) - I."""
    eye = np.eye(K.shape[-1])
    M, P = eye.copy(), eye.copy()
    for _ in range(terms):
        P = P @ K
        M = M + P
    return 2 * M - eye


def cayley_blocks_np(factors):
    """The (m, r, b, b) orthogonal blocks of a CayleyBlocks module: the Neumann series while the module
    uses it (``cayley="neumann"``, not switched to exact), else the exact Cayley transform."""
    K = skew_np(factors.params, factors.packed, factors.b)
    fn = (lambda k: neumann_np(k, factors.neumann_terms)) if factors.series else cayley
    return np.stack([np.stack([fn(K[i, j]) for j in range(K.shape[1])]) for i in range(K.shape[0])])


def dense_q_np(rotation, method):
    """The dense Q of a rotation from the SPEC formulas (GSOFT P^T L P R, OFT diag, BOFT butterflies)."""
    C = cayley_blocks_np(rotation.factors)
    d = rotation.d
    if method in ("gsoft", "double_gsoft"):
        r = d // rotation.b
        P = perm_matrix(r, d)
        return P.T @ block_diag(C[1]) @ P @ block_diag(C[0])
    if method == "oft":
        return block_diag(C[0])
    Q = np.eye(d)
    for level in range(C.shape[0]):  # Q = F_0^T F_1^T ... F_{m-1}^T
        Bl = butterfly_matrix(d, rotation.b, level)
        Q = Q @ (Bl @ block_diag(C[level]) @ Bl.T)
    return Q


def orthogonal_weight_np(layer, method, W0):
    """The (out, d_in) weight of an OrthogonalAdapter over the original weight ``W0`` by the SPEC formulas."""
    M = np64(W0).reshape(W0.shape[0], -1) @ dense_q_np(layer.rotation, method)
    if method == "double_gsoft":
        M = dense_q_np(layer.rotation_out, "gsoft") @ M
    if layer.scale is not None:
        M = np64(layer.scale)[:, None] * M
    return M


def lowrank_weight_np(method, W0, layer, rank):
    """The adapted weight of a SORSA / LoLDU layer from numpy SVD / scipy LU of the original (m, n) float64 ``W0``."""
    if method == "sorsa":
        U, S, Vh = np.linalg.svd(W0, full_matrices=False)
        resid = W0 - (U[:, :rank] * S[:rank]) @ Vh[:rank]
        return resid + (np64(layer.U) * np64(layer.S)) @ np64(layer.Vh)
    P, L, U = scipy.linalg.lu(W0)
    D = np.diag(U).copy()
    Un = U / np.where(D == 0, 1.0, D)[:, None]
    dsm0 = P @ L[:, :rank] @ np.diag(D[:rank]) @ Un[:rank]
    dsm = float(np64(layer.sigma)) * P @ L[:, :rank] @ np.diag(np64(layer.z)) @ Un[:rank]
    return W0 - dsm0 + dsm
