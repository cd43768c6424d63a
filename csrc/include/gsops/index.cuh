// The permutation of SPEC.md as index arithmetic (torch-free, host and device).
//
// perm(k, n): sigma(i) = (i % k) * (n / k) + i / k, matrix P[sigma(i), i] = 1, so
// (P x)[sigma(i)] = x[i]; as a gather, (P x)[p] = x[tau(p)] with tau = perm(n / k, n)
// = sigma^{-1}. GS ops use k = r (number of blocks), n = d = r * b.
// No kernel ever materialises P: loads gather with `gather_index`, stores scatter
// with `scatter_index`.
#pragma once

#include "common.cuh"

namespace gsops {

// How a block-diagonal factor's input is read or its output is written.
enum PermMode : int {
  PERM_NONE = 0,  // identity
  PERM_P = 1,     // P = perm(r, d)
  PERM_PT = 2,    // P^T = perm(b, d)
};

// The mode of the inverse permutation (P <-> P^T).
GSOPS_HD int perm_inverse_mode(int mode) {
  return mode == PERM_P ? PERM_PT : mode == PERM_PT ? PERM_P : PERM_NONE;
}

// sigma of the paper's P_(k,n): sigma(i) = (i % k) * (n / k) + i / k.
GSOPS_HD int64_t perm_sigma(int64_t i, int64_t k, int64_t n) { return (i % k) * (n / k) + i / k; }

// Source index of a gather: (P^mode x)[p] = x[gather_index(mode, p)], d = r * b.
// P x = x[perm(n / k, n)] with k = r, so P gathers with perm(b, d); P^T with perm(r, d).
GSOPS_HD int64_t gather_index(int mode, int64_t p, int64_t r, int64_t b) {
  if (mode == PERM_P) return perm_sigma(p, b, r * b);   // (p % b) * r + p / b
  if (mode == PERM_PT) return perm_sigma(p, r, r * b);  // (p % r) * b + p / r
  return p;
}

// Destination index of a scatter: writing z[p] to y[scatter_index(mode, p)] gives y = P^mode z.
GSOPS_HD int64_t scatter_index(int mode, int64_t p, int64_t r, int64_t b) {
  return gather_index(perm_inverse_mode(mode), p, r, b);
}

// Block addressing: entry (i, j) of block k in a contiguous (r, b, b) tensor, optionally transposed.
GSOPS_HD int64_t block_entry(int64_t k, int64_t i, int64_t j, int64_t b, bool transpose) {
  return k * b * b + (transpose ? j * b + i : i * b + j);
}

}  // namespace gsops
