// Two block-diagonal factors with the GS permutation between them in one pass over the activations:
// GSOFT's y = P^T L P R x (or a chain's L P R x), its transpose (the input gradient) and its backward.
//
// Structure (SPEC "GS matrices", P = perm(r, d), d = r b): write the intermediate t = R x of one token
// as rows of b entries (row j = R-block j's output); L-block p reads entry q of its input at t[q r + p].
// * r % b == 0 ("band"): the b R-blocks j*k + s (k = r / b) and the b L-blocks s*b + p' form a closed
//   group s whose features are b runs of b consecutive ones (row j: features j r + s b .. + b).
// * otherwise the group is the whole row (all r blocks, d features).
// A group has nrows rows (b or r) of b entries, G = nrows * b features; held in shared memory as
// t_s[j b + u], L-block p' of the group reads entry q at t_s[q nrows + p'] (both cases).
//
// A CUDA block owns one group x a tile of tokens: it loads the group's features of its tokens (runs of
// b (band) or d consecutive elements: every warp access is contiguous), applies R, permutes and applies
// L in shared memory, and stores runs of nrows (band: b) consecutive outputs. x is read once and y
// written once. The transposed pass (dx = R^T P^T L^T P dy) is the same with the roles swapped. The
// backward kernel reads x and dy once per token tile, recomputes R x on chip, writes dx (optional) and
// accumulates the group's block gradients of L and R (optional, each) in shared memory, or L's there and
// R's in registers where both do not fit (sm_90: 128 registers per thread, 472 bytes spilled), the entries
// past the registers' 32768 in shared memory too; where not even one fits in shared memory alone, one per
// launch, split between registers and shared memory (a 1024-feature row of b = 64); each CUDA block
// writes its partial sums for its token split to dL_part / dR_part [split, r, b, b], which the caller
// sums (deterministic, no atomics). Index arithmetic over the features is incremental (no runtime
// division per element; the block-gradient entries divide once per entry and token tile, not per
// token). Products are float32 FMAs with the blocks read through the read-only cache.
#include "include/gsops/common.cuh"
#include "include/gsops/dtype.cuh"
#include "include/gsops/kernels.h"
#include "include/gsops/launch.cuh"

namespace gsops {

namespace {

constexpr int kPairThreads = 256;
constexpr int kPairRegThreads = 512;  // threads of a backward block that keeps R's accumulator in registers
constexpr int kPairRegAcc = 64;       // accumulator entries per thread there (<= 128 registers per thread)
constexpr size_t kPairSmemLimit = 200 * 1024;  // of the 227 KiB an sm_90 block may use: room for the rest
constexpr size_t kChainGradSmemLimit = 224 * 1024;  // the whole-row backward: its accumulators take the most

// Walks f = start, start + step, ... < n over a (row, column) grid with `cols` columns, keeping
// row = f / cols and col = f % cols without dividing inside the loop.
struct Cursor {
  int f, row, col;
  const int step_rows, step_cols, cols;
  __device__ Cursor(int start, int step, int cols_)
      : f(start), row(start / cols_), col(start % cols_), step_rows(step / cols_), step_cols(step % cols_),
        cols(cols_) {}
  __device__ void next() {
    f += step_rows * cols + step_cols;  // = step (not kept: one register less)
    row += step_rows;
    col += step_cols;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

struct GroupView {
  int r, b, nrows, k, s;
  bool band;
  __device__ GroupView(int r_, int b_, int s_) : r(r_), b(b_), s(s_) {
    const PairGroups g = pair_groups(r_, b_);
    band = g.band;
    nrows = g.nrows;
    k = g.k;
  }
  __device__ int base() const { return band ? s * b : 0; }
  __device__ int64_t in_feature(int j, int v) const { return (int64_t)j * (band ? r : b) + base() + v; }
  __device__ int64_t rblock(int j) const { return band ? (int64_t)j * k + s : j; }
  __device__ int64_t lblock(int p) const { return (int64_t)base() + p; }
  // output feature of entry i of L-block p (GSOFT: y = P^T z; linear_out: y = z)
  __device__ int64_t out_feature(int p, int i, bool linear_out) const {
    return linear_out ? lblock(p) * b + i : (int64_t)i * r + base() + p;
  }
};

// Loads the group's input features of tokens t0..t0+tn-1 into xs[tt G + j b + v] (0 past the last token).
template <typename T>
__device__ void load_rows(const T* __restrict__ x, float* xs, const GroupView& g, int64_t n_tokens, int64_t t0,
                          int tn) {
  const int64_t d = (int64_t)g.r * g.b;
  const int G = g.nrows * g.b;
  for (int tt = 0; tt < tn; ++tt) {
    const int64_t t = t0 + tt;
    for (Cursor c(threadIdx.x, blockDim.x, g.b); c.f < G; c.next())
      xs[tt * G + c.f] = t < n_tokens ? to_float(x[t * d + g.in_feature(c.row, c.col)]) : 0.f;
  }
}

// Loads the group's output features of the tokens into gs[tt G + p b + i], in the order of the output
// runs (coalesced), and the same for stores below.
template <typename T>
__device__ void load_outputs(const T* __restrict__ y, float* gs, const GroupView& g, bool linear_out,
                             int64_t n_tokens, int64_t t0, int tn) {
  const int64_t d = (int64_t)g.r * g.b;
  const int G = g.nrows * g.b;
  for (int tt = 0; tt < tn; ++tt) {
    const int64_t t = t0 + tt;
    if (linear_out) {
      for (Cursor c(threadIdx.x, blockDim.x, g.b); c.f < G; c.next())  // (p, i), i fastest
        gs[tt * G + c.f] = t < n_tokens ? to_float(y[t * d + g.out_feature(c.row, c.col, true)]) : 0.f;
    } else {
      for (Cursor c(threadIdx.x, blockDim.x, g.nrows); c.f < G; c.next())  // (i, p), p fastest
        gs[tt * G + c.col * g.b + c.row] = t < n_tokens ? to_float(y[t * d + g.out_feature(c.col, c.row, false)]) : 0.f;
    }
  }
}

template <typename T>
__device__ void store_outputs(T* __restrict__ y, const float* zs, const GroupView& g, bool linear_out,
                              int64_t n_tokens, int64_t t0, int tn) {
  const int64_t d = (int64_t)g.r * g.b;
  const int G = g.nrows * g.b;
  for (int tt = 0; tt < tn; ++tt) {
    const int64_t t = t0 + tt;
    if (t >= n_tokens) break;
    if (linear_out) {
      for (Cursor c(threadIdx.x, blockDim.x, g.b); c.f < G; c.next())
        y[t * d + g.out_feature(c.row, c.col, true)] = from_float<T>(zs[tt * G + c.f]);
    } else {
      for (Cursor c(threadIdx.x, blockDim.x, g.nrows); c.f < G; c.next())
        y[t * d + g.out_feature(c.col, c.row, false)] = from_float<T>(zs[tt * G + c.col * g.b + c.row]);
    }
  }
}

template <typename T>
__device__ void store_rows(T* __restrict__ x, const float* xs, const GroupView& g, int64_t n_tokens, int64_t t0,
                           int tn) {
  const int64_t d = (int64_t)g.r * g.b;
  const int G = g.nrows * g.b;
  for (int tt = 0; tt < tn; ++tt) {
    const int64_t t = t0 + tt;
    if (t >= n_tokens) break;
    for (Cursor c(threadIdx.x, blockDim.x, g.b); c.f < G; c.next())
      x[t * d + g.in_feature(c.row, c.col)] = from_float<T>(xs[tt * G + c.f]);
  }
}

// ts[tt G + j b + u] = sum_v R_{rb(j)}[u][v] xs[tt G + j b + v]   (R x; with transpose: R^T)
__device__ void apply_rows(const float* __restrict__ R, const float* xs, float* ts, const GroupView& g, int tn,
                           bool transpose) {
  const int G = g.nrows * g.b, b = g.b;
  for (Cursor c(threadIdx.x, blockDim.x, b); c.f < G; c.next()) {
    const float* blk = R + g.rblock(c.row) * b * b;
    const int64_t s0 = transpose ? c.col : (int64_t)c.col * b, sv = transpose ? b : 1;
    for (int tt = 0; tt < tn; ++tt) {
      const float* in = xs + tt * G + c.row * b;
      float acc = 0.f;
      for (int v = 0; v < b; ++v) acc += __ldg(blk + s0 + v * sv) * in[v];
      ts[tt * G + c.f] = acc;
    }
  }
}

// zs[tt G + p b + i] = sum_q L_{lb(p)}[i][q] ts[tt G + q nrows + p]   (L P t)
__device__ void apply_cols(const float* __restrict__ L, const float* ts, float* zs, const GroupView& g, int tn) {
  const int G = g.nrows * g.b, b = g.b, nr = g.nrows;
  for (Cursor c(threadIdx.x, blockDim.x, b); c.f < G; c.next()) {  // (p, i)
    const float* row = L + (g.lblock(c.row) * b + c.col) * b;
    for (int tt = 0; tt < tn; ++tt) {
      const float* in = ts + tt * G + c.row;
      float acc = 0.f;
      for (int q = 0; q < b; ++q) acc += __ldg(row + q) * in[q * nr];
      zs[tt * G + c.f] = acc;
    }
  }
}

// dus[tt G + q nrows + p] = sum_i L_{lb(p)}[i][q] gs[tt G + p b + i]   (P^T L^T dz, in the rows' layout)
__device__ void apply_cols_transposed(const float* __restrict__ L, const float* gs, float* dus, const GroupView& g,
                                      int tn) {
  const int G = g.nrows * g.b, b = g.b, nr = g.nrows;
  for (Cursor c(threadIdx.x, blockDim.x, b); c.f < G; c.next()) {  // (p, q)
    const float* col = L + g.lblock(c.row) * b * b + c.col;
    for (int tt = 0; tt < tn; ++tt) {
      const float* in = gs + tt * G + c.row * b;
      float acc = 0.f;
      for (int i = 0; i < b; ++i) acc += __ldg(col + i * b) * in[i];
      dus[tt * G + c.col * nr + c.row] = acc;
    }
  }
}

// Block-gradient entry e = (p b + i) b + q of the group's L-blocks over the tile's nt tokens:
// sum_t gs[t][p b + i] ts[t][q nrows + p] (dz times the input P R x of L-block p).
__device__ float l_grad_entry(const float* gs, const float* ts, int e, int b, int G, int nr, int nt) {
  const int q = e % b, pi = e / b, p = pi / b;  // once per entry and tile, not per token
  float s = 0.f;
  for (int tt = 0; tt < nt; ++tt) s += gs[tt * G + pi] * ts[tt * G + q * nr + p];
  return s;
}

// Entry e = (j b + u) b + v of the group's R-blocks: sum_t dus[t][j b + u] xs[t][j b + v].
__device__ float r_grad_entry(const float* dus, const float* xs, int e, int b, int G, int nt) {
  const int v = e % b, ju = e / b, j = ju / b;
  float s = 0.f;
  for (int tt = 0; tt < nt; ++tt) s += dus[tt * G + ju] * xs[tt * G + j * b + v];
  return s;
}

// `cap`, or less where the current device lets a block opt into less shared memory (sm_80: 163 KiB).
size_t smem_budget(size_t cap) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return 48 * 1024;
  return std::min(cap, (size_t)max_dynamic_smem(device));
}

// Tokens per tile: the largest power of two <= 16 whose shared memory fits (`bufs` tiles of G floats,
// plus `fixed` bytes) within smem_budget(cap); 0 when not even one token fits.
int pair_tile(int G, int bufs, size_t fixed, size_t cap = kPairSmemLimit) {
  const size_t limit = smem_budget(cap);
  for (int tn = 16; tn >= 1; tn /= 2)
    if (fixed + sizeof(float) * (size_t)bufs * tn * G <= limit) return tn;
  return 0;
}

template <typename T>
__global__ void __launch_bounds__(kPairThreads)
    gs_pair_kernel(const T* __restrict__ x, const float* __restrict__ R, const float* __restrict__ L,
                   T* __restrict__ y, int64_t n_tokens, int r, int b, int tn, bool linear_out, bool transposed) {
  extern __shared__ float pair_smem[];
  const PairGroups pg = pair_groups(r, b);
  const GroupView g(r, b, (int)(blockIdx.x % pg.n_groups));
  const int64_t t0 = (int64_t)(blockIdx.x / pg.n_groups) * tn;
  const int G = pg.features;
  float* a = pair_smem;
  float* c = pair_smem + (size_t)tn * G;
  if (!transposed) {  // y = P^T L P R x
    load_rows(x, a, g, n_tokens, t0, tn);
    __syncthreads();
    apply_rows(R, a, c, g, tn, false);
    __syncthreads();
    apply_cols(L, c, a, g, tn);
    __syncthreads();
    store_outputs(y, a, g, linear_out, n_tokens, t0, tn);
  } else {  // x here is dy, y is dx = R^T P^T L^T P dy
    load_outputs(x, a, g, linear_out, n_tokens, t0, tn);
    __syncthreads();
    apply_cols_transposed(L, a, c, g, tn);
    __syncthreads();
    apply_rows(R, c, a, g, tn, true);
    __syncthreads();
    store_rows(y, a, g, n_tokens, t0, tn);
  }
}

// Backward of one group x one token split: dx (want_dx) and partial dL, dR (want_l, want_r).
// Shared memory: xs, ts (R x), gs (dy), dus (P^T L^T dy): 4 tiles of tn x G floats; then the
// accumulators of L and R (G b floats each, when wanted). With REG > 0 one accumulator (R's when wanted,
// else L's) is in registers instead, as far as they hold it: thread t owns entries t + m * blockDim.x
// (m < REG, kPairRegThreads threads), and the entries from REG * blockDim.x on are in shared memory after
// the other accumulator.
template <typename T, int REG>
__global__ void __launch_bounds__(REG > 0 ? kPairRegThreads : kPairThreads, 1)
    gs_pair_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ R,
                        const float* __restrict__ L, T* __restrict__ dx, float* __restrict__ dl_part,
                        float* __restrict__ dr_part, int64_t n_tokens, int r, int b, int tn, int64_t tokens_per_split,
                        bool linear_out, bool want_dx, bool want_l, bool want_r) {
  extern __shared__ float pair_smem[];
  const PairGroups pg = pair_groups(r, b);
  const GroupView g(r, b, (int)(blockIdx.x % pg.n_groups));
  const int64_t split = blockIdx.x / pg.n_groups;
  const int G = pg.features;
  const int GB = G * b;
  const int reg_cap = REG * (int)blockDim.x;           // entries of the register accumulator (REG > 0)
  const bool reg_l = REG > 0 && want_l && !want_r;     // which one is there: L's alone, else R's
  const bool reg_r = REG > 0 && want_r;
  const int spill = REG > 0 ? max(0, GB - reg_cap) : 0;  // its entries past the registers, in shared memory
  float* xs = pair_smem;
  float* ts = xs + (size_t)tn * G;
  float* gs = ts + (size_t)tn * G;
  float* dus = gs + (size_t)tn * G;
  float* acc_l = dus + (size_t)tn * G;                    // L's (not reg_l)
  float* acc_r = acc_l + (want_l && !reg_l ? GB : 0);     // R's (REG == 0), or the spill of the register one
  float acc_reg[REG > 0 ? REG : 1];
  for (int m = 0; m < (REG > 0 ? REG : 1); ++m) acc_reg[m] = 0.f;
  const int in_smem = (want_l && !reg_l ? GB : 0) + (REG > 0 ? spill : (want_r ? GB : 0));
  for (int e = threadIdx.x; e < in_smem; e += blockDim.x) acc_l[e] = 0.f;
  const int64_t begin = split * tokens_per_split;
  const int64_t end = min(n_tokens, begin + tokens_per_split);
  for (int64_t t0 = begin; t0 < end; t0 += tn) {
    const int nt = (int)min((int64_t)tn, end - t0);
    __syncthreads();  // the previous tile's readers are done
    load_rows(x, xs, g, end, t0, tn);
    load_outputs(dy, gs, g, linear_out, end, t0, tn);
    __syncthreads();
    if (want_l) apply_rows(R, xs, ts, g, tn, false);
    if (want_r || want_dx) apply_cols_transposed(L, gs, dus, g, tn);
    __syncthreads();
    const int nr = g.nrows;
    if (reg_l || reg_r) {  // this thread's entries in registers, the rest in shared memory
#pragma unroll
      for (int m = 0; m < (REG > 0 ? REG : 1); ++m) {
        const int e = threadIdx.x + m * blockDim.x;
        if (e < GB)
          acc_reg[m] += reg_r ? r_grad_entry(dus, xs, e, b, G, nt) : l_grad_entry(gs, ts, e, b, G, nr, nt);
      }
      for (int e = reg_cap + threadIdx.x; e < GB; e += blockDim.x)
        acc_r[e - reg_cap] += reg_r ? r_grad_entry(dus, xs, e, b, G, nt) : l_grad_entry(gs, ts, e, b, G, nr, nt);
    }
    if (want_l && !reg_l)
      for (int e = threadIdx.x; e < GB; e += blockDim.x) acc_l[e] += l_grad_entry(gs, ts, e, b, G, nr, nt);
    if (want_r && !reg_r)
      for (int e = threadIdx.x; e < GB; e += blockDim.x) acc_r[e] += r_grad_entry(dus, xs, e, b, G, nt);
    if (want_dx) {  // dx_j[v] = sum_u R_j[u][v] dus[j b + u], into ts (read above)
      __syncthreads();
      apply_rows(R, dus, ts, g, nt, true);
      __syncthreads();
      store_rows(dx, ts, g, end, t0, nt);
    }
  }
  __syncthreads();
  const int64_t bb = (int64_t)b * b;
  for (int e = threadIdx.x; e < GB; e += blockDim.x) {
    const int blk = e / (b * b), rest = e % (b * b);
    if (want_l && !reg_l) dl_part[(split * r + g.lblock(blk)) * bb + rest] = acc_l[e];
    if (want_r && !reg_r) dr_part[(split * r + g.rblock(blk)) * bb + rest] = acc_r[e];
    if ((reg_l || reg_r) && e >= reg_cap) {
      float* part = reg_r ? dr_part + (split * r + g.rblock(blk)) * bb : dl_part + (split * r + g.lblock(blk)) * bb;
      part[rest] = acc_r[e - reg_cap];
    }
  }
  if (reg_l || reg_r) {
#pragma unroll
    for (int m = 0; m < (REG > 0 ? REG : 1); ++m) {
      const int e = threadIdx.x + m * blockDim.x;
      if (e < GB) {
        const int blk = e / (b * b);
        float* part = reg_r ? dr_part + (split * r + g.rblock(blk)) * bb : dl_part + (split * r + g.lblock(blk)) * bb;
        part[e % (b * b)] = acc_reg[m];
      }
    }
  }
}

// out[tt d + j b + u] = sum_v B_j[u][v] in(j, v) for whole rows of tn tokens: a chain factor whose input
// entry v of block j is in[j b + v] (the first factor) or in[v r + j] (after P, the previous output).
__device__ void apply_chain_factor(const float* __restrict__ B, const float* in_tile, float* out_tile, int r, int b,
                                   bool first, int tn) {
  const int d = r * b;
  const int stride = first ? 1 : r;
  for (Cursor cur(threadIdx.x, blockDim.x, b); cur.f < d; cur.next()) {
    const float* row = B + ((int64_t)cur.row * b + cur.col) * b;
    const int start = first ? cur.row * b : cur.row;
    for (int tt = 0; tt < tn; ++tt) {
      const float* in = in_tile + tt * d + start;
      float acc = 0.f;
      for (int v = 0; v < b; ++v) acc += __ldg(row + v) * in[v * stride];
      out_tile[tt * d + cur.f] = acc;
    }
  }
}

// y = B_m P ... P B_1 x over whole rows: the m factors' blocks stacked (m, r, b, b), float32. A CUDA block
// holds whole rows of tn tokens (two buffers of tn x d floats), applies the factors one after another with
// the gather P as shared-memory index arithmetic (factor f > 0 reads entry v of block j at v r + j of the
// previous output), and stores the rows: x read once, y written once, for any m.
template <typename T>
__global__ void __launch_bounds__(kPairThreads)
    gs_chain_rows_kernel(const T* __restrict__ x, const float* __restrict__ W, T* __restrict__ y, int64_t n_tokens,
                         int r, int b, int m, int tn) {
  extern __shared__ float pair_smem[];
  const int d = r * b;
  const int64_t t0 = (int64_t)blockIdx.x * tn;
  float* a = pair_smem;
  float* c = pair_smem + (size_t)tn * d;
  for (int tt = 0; tt < tn; ++tt) {
    const int64_t t = t0 + tt;
    for (int f = threadIdx.x; f < d; f += blockDim.x) a[tt * d + f] = t < n_tokens ? to_float(x[t * d + f]) : 0.f;
  }
  for (int h = 0; h < m; ++h) {
    __syncthreads();
    apply_chain_factor(W + (int64_t)h * r * b * b, a, c, r, b, h == 0, tn);
    float* tmp = a;
    a = c;
    c = tmp;
  }
  __syncthreads();
  for (int tt = 0; tt < tn; ++tt) {
    const int64_t t = t0 + tt;
    if (t >= n_tokens) break;
    for (int f = threadIdx.x; f < d; f += blockDim.x) y[t * d + f] = from_float<T>(a[tt * d + f]);
  }
}


// Block-gradient entry e = (j b + i) b + v of a chain factor over the tile's nt tokens: sum_t dz[t][j b + i]
// in[t](j, v), the factor's input read at j b + v (the first factor) or v r + j (after P).
__device__ float chain_grad_entry(const float* g, const float* in_tile, int e, int r, int b, int d, bool first,
                                  int nt) {
  const int v = e % b, ji = e / b, j = ji / b;  // once per entry and tile, not per token
  const int feat = first ? j * b + v : v * r + j;
  float s = 0.f;
  for (int tt = 0; tt < nt; ++tt) s += g[tt * d + ji] * in_tile[tt * d + feat];
  return s;
}

// Backward of gs_chain_rows for one token split: dx (want_dx) and the partial block gradients of the factors
// in the bit mask `grads` (bit f: factor f), written to dw_part[k, split] for the k-th of them ([n, splits, r, b,
// b]). Per token tile the CUDA block loads x and dy once (whole rows), recomputes the inputs of factors 0..top
// (top: the highest in `grads`) in shared memory, then walks the factors down from m - 1: a factor in `grads`
// adds sum_t dz[t][j b + i] in[t](j, v) to its accumulator (shared memory, d b floats each), and the gradient
// moves to the factor's input (dz' = B^T dz through the same gather) while a lower factor or dx needs it.
// Shared memory: top + 1 input tiles and two gradient tiles of tn x d floats, then the accumulators. With
// REG > 0 the accumulator of the highest factor in `grads` is in registers instead, as far as they hold it
// (thread t owns entries t + q * blockDim.x, q < REG; kPairRegThreads threads); its entries from
// REG * blockDim.x on follow the others in shared memory.
template <typename T, int REG>
__global__ void __launch_bounds__(REG > 0 ? kPairRegThreads : kPairThreads, 1)
    gs_chain_rows_grad_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ W,
                              T* __restrict__ dx, float* __restrict__ dw_part, int64_t n_tokens, int r, int b, int m,
                              int tn, int64_t tokens_per_split, int64_t splits, unsigned grads, bool want_dx) {
  extern __shared__ float pair_smem[];
  const int d = r * b;
  const int DB = d * b;
  int top = 0, low = m, n_acc = 0;
  for (int f = 0; f < m; ++f)
    if (grads >> f & 1u) {
      top = f;
      low = min(low, f);
      ++n_acc;
    }
  const int64_t split = blockIdx.x;
  float* acts = pair_smem;                      // input of factor h: acts + h tn d (h <= top)
  float* g = acts + (size_t)(top + 1) * tn * d;  // gradient at the current factor's output
  float* gn = g + (size_t)tn * d;                // at its input
  float* acc = gn + (size_t)tn * d;              // n_smem x d b, then the register accumulator's spill
  const int n_smem = n_acc - (REG > 0 ? 1 : 0);
  const int reg_cap = REG * (int)blockDim.x;
  const int spill = REG > 0 ? max(0, DB - reg_cap) : 0;
  float* acc_spill = acc + (size_t)n_smem * DB;
  for (int e = threadIdx.x; e < n_smem * DB + spill; e += blockDim.x) acc[e] = 0.f;
  float acc_reg[REG > 0 ? REG : 1];
  for (int q = 0; q < (REG > 0 ? REG : 1); ++q) acc_reg[q] = 0.f;
  const int64_t begin = split * tokens_per_split;
  const int64_t end = min(n_tokens, begin + tokens_per_split);
  for (int64_t t0 = begin; t0 < end; t0 += tn) {
    const int nt = (int)min((int64_t)tn, end - t0);
    __syncthreads();  // the previous tile's readers are done
    for (int tt = 0; tt < tn; ++tt) {
      const int64_t t = t0 + tt;
      for (int f = threadIdx.x; f < d; f += blockDim.x) {
        acts[tt * d + f] = t < end ? to_float(x[t * d + f]) : 0.f;
        g[tt * d + f] = t < end ? to_float(dy[t * d + f]) : 0.f;
      }
    }
    for (int h = 0; h < top; ++h) {  // inputs of factors 1..top
      __syncthreads();
      apply_chain_factor(W + (int64_t)h * d * b, acts + (size_t)h * tn * d, acts + (size_t)(h + 1) * tn * d, r, b,
                         h == 0, nt);
    }
    __syncthreads();
    int k = n_acc;
    for (int f = m - 1; f >= (want_dx ? 0 : low); --f) {
      const float* B = W + (int64_t)f * d * b;
      if (grads >> f & 1u) {  // entry e = (j b + i) b + v of factor f
        --k;
        const float* in_tile = acts + (size_t)f * tn * d;
        if (REG > 0 && k == n_acc - 1) {  // this thread's entries, in registers
#pragma unroll
          for (int q = 0; q < (REG > 0 ? REG : 1); ++q) {
            const int e = threadIdx.x + q * blockDim.x;
            if (e < DB) acc_reg[q] += chain_grad_entry(g, in_tile, e, r, b, d, f == 0, nt);
          }
          for (int e = reg_cap + threadIdx.x; e < DB; e += blockDim.x)
            acc_spill[e - reg_cap] += chain_grad_entry(g, in_tile, e, r, b, d, f == 0, nt);
        } else {
          float* a = acc + (size_t)k * DB;
          for (int e = threadIdx.x; e < DB; e += blockDim.x) a[e] += chain_grad_entry(g, in_tile, e, r, b, d, f == 0, nt);
        }
      }
      if (f > low || want_dx) {  // dz'[in(j, v)] = sum_i B_j[i][v] dz[j b + i]
        for (Cursor cur(threadIdx.x, blockDim.x, b); cur.f < d; cur.next()) {
          const float* col = B + (int64_t)cur.row * b * b + cur.col;
          const int feat = f == 0 ? cur.f : cur.col * r + cur.row;
          for (int tt = 0; tt < nt; ++tt) {
            const float* in = g + tt * d + cur.row * b;
            float s = 0.f;
            for (int i = 0; i < b; ++i) s += __ldg(col + i * b) * in[i];
            gn[tt * d + feat] = s;
          }
        }
        __syncthreads();
        float* tmp = g;
        g = gn;
        gn = tmp;
      }
    }
    if (want_dx)
      for (int tt = 0; tt < nt; ++tt)
        for (int f = threadIdx.x; f < d; f += blockDim.x) dx[(t0 + tt) * d + f] = from_float<T>(g[tt * d + f]);
  }
  __syncthreads();
  for (int q = 0; q < n_smem; ++q)
    for (int e = threadIdx.x; e < DB; e += blockDim.x) dw_part[((int64_t)q * splits + split) * DB + e] = acc[(size_t)q * DB + e];
  if (REG > 0) {
#pragma unroll
    for (int q = 0; q < (REG > 0 ? REG : 1); ++q) {
      const int e = threadIdx.x + q * blockDim.x;
      if (e < DB) dw_part[((int64_t)(n_acc - 1) * splits + split) * DB + e] = acc_reg[q];
    }
    for (int e = reg_cap + threadIdx.x; e < DB; e += blockDim.x)
      dw_part[((int64_t)(n_acc - 1) * splits + split) * DB + e] = acc_spill[e - reg_cap];
  }
}
}  // namespace

bool gs_pair_fits(int r, int b) {
  if (r < 1 || b < 1 || b > kMaxBlock) return false;
  return pair_tile(pair_groups(r, b).features, 2, 0) > 0;
}

// Both accumulators in shared memory; or L's there and R's in registers (its entries past the registers in
// shared memory too); or one of them per launch, in shared memory or in registers with the rest in shared
// memory (kSplit).
enum class GradPlan { kNone, kOne, kSplit, kShared, kRegisters };

constexpr size_t kPairRegBytes = sizeof(float) * kPairRegThreads * kPairRegAcc;

size_t past_registers(size_t acc) { return acc > kPairRegBytes ? acc - kPairRegBytes : 0; }

GradPlan grad_plan(int r, int b) {
  if (!gs_pair_fits(r, b)) return GradPlan::kNone;
  const int G = pair_groups(r, b).features;
  const size_t acc = sizeof(float) * (size_t)G * b;
  if (pair_tile(G, 4, 2 * acc) > 0) return GradPlan::kShared;
  if (pair_tile(G, 4, acc + past_registers(acc)) > 0) return GradPlan::kRegisters;
  if (pair_tile(G, 4, acc) > 0) return GradPlan::kOne;
  return pair_tile(G, 4, past_registers(acc)) > 0 ? GradPlan::kSplit : GradPlan::kNone;
}

int factors_per_pass(GradPlan p) {
  return p == GradPlan::kNone ? 0 : (p == GradPlan::kOne || p == GradPlan::kSplit) ? 1 : 2;
}

int gs_pair_grad_factors_per_pass(int r, int b) { return factors_per_pass(grad_plan(r, b)); }

// Token splits of a backward whose partial sums are per (group, split): at least 16 b tokens per split (the
// partial sums stay small against the activations read), and enough splits x groups to fill ~2 CUDA blocks
// per SM of a 132-SM part.
int64_t grad_splits(int64_t n_tokens, int b, int n_groups) {
  const int64_t min_tokens = 16 * (int64_t)b;
  const int64_t want = std::max<int64_t>(1, ceil_div(264, n_groups));
  return std::max<int64_t>(1, std::min<int64_t>(want, ceil_div(n_tokens, min_tokens)));
}

int64_t gs_pair_grad_splits(int64_t n_tokens, int r, int b) { return grad_splits(n_tokens, b, pair_groups(r, b).n_groups); }

cudaError_t gs_pair(DType dt, const void* x, const float* R, const float* L, void* y, int64_t n_tokens, int r, int b,
                    bool linear_out, bool transposed, cudaStream_t stream) {
  if (!gs_pair_fits(r, b) || n_tokens < 0) return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const PairGroups g = pair_groups(r, b);
  const int tn = pair_tile(g.features, 2, 0);
  const int64_t grid = ceil_div(n_tokens, tn) * g.n_groups;
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * 2 * (size_t)tn * g.features;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t err = ensure_dynamic_smem(gs_pair_kernel<T>, smem);
    if (err != cudaSuccess) return err;
    gs_pair_kernel<T><<<(unsigned)grid, kPairThreads, smem, stream>>>(
        static_cast<const T*>(x), R, L, static_cast<T*>(y), n_tokens, r, b, tn, linear_out, transposed);
    return cudaGetLastError();
  });
}

bool gs_chain_rows_fits(int r, int b) {
  return r >= 1 && b >= 1 && b <= kMaxBlock && pair_tile(r * b, 2, 0) > 0;
}

cudaError_t gs_chain_rows(DType dt, const void* x, const float* W, void* y, int64_t n_tokens, int r, int b, int m,
                          cudaStream_t stream) {
  if (!gs_chain_rows_fits(r, b) || m < 1 || n_tokens < 0) return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const int tn = pair_tile(r * b, 2, 0);
  const int64_t grid = ceil_div(n_tokens, tn);
  if (grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  const size_t smem = sizeof(float) * 2 * (size_t)tn * r * b;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    cudaError_t err = ensure_dynamic_smem(gs_chain_rows_kernel<T>, smem);
    if (err != cudaSuccess) return err;
    gs_chain_rows_kernel<T><<<(unsigned)grid, kPairThreads, smem, stream>>>(
        static_cast<const T*>(x), W, static_cast<T*>(y), n_tokens, r, b, m, tn);
    return cudaGetLastError();
  });
}

// Shared memory of a gs_chain_rows_grad launch: `bufs` tiles of tn x d floats and n_acc accumulators of d b.
int chain_grad_tile(int r, int b, int bufs, int n_acc, bool registers = false) {
  const size_t one = sizeof(float) * (size_t)r * b * b;
  return pair_tile(r * b, bufs, one * n_acc + (registers ? past_registers(one) : 0), kChainGradSmemLimit);
}

// Accumulators in shared memory for a launch with `bufs` tiles.
int chain_grad_smem_accs(int r, int b, int bufs, int most) {
  int n = 0;
  while (n < most && chain_grad_tile(r, b, bufs, n + 1) > 0) ++n;
  return n;
}

int gs_chain_rows_grad_factors_per_pass(int r, int b, int m) {
  // m <= 32: the factors of a launch are a 32-bit mask
  if (!gs_chain_rows_fits(r, b) || m < 1 || m > 32 || chain_grad_tile(r, b, m + 2, 0) == 0) return 0;
  // with every input tile (the worst case), plus one in registers (its rest in shared memory) where it fits
  const int n = chain_grad_smem_accs(r, b, m + 2, m);
  return std::min(m, n + (chain_grad_tile(r, b, m + 2, n, true) > 0 ? 1 : 0));
}

int64_t gs_chain_rows_grad_splits(int64_t n_tokens, int r, int b) { return grad_splits(n_tokens, b, 1); }  // whole rows

cudaError_t gs_chain_rows_grad(DType dt, const void* dy, const void* x, const float* W, void* dx, float* dw_part,
                               int64_t n_tokens, int r, int b, int m, int64_t splits, unsigned grads,
                               cudaStream_t stream) {
  int top = -1, n_acc = 0;
  for (int f = 0; f < m && f < 32; ++f)
    if (grads >> f & 1u) {
      top = f;
      ++n_acc;
    }
  const bool want_dx = dx != nullptr;
  const int per_pass = gs_chain_rows_grad_factors_per_pass(r, b, m);  // 0 for m outside 1..32
  if (per_pass == 0 || (m < 32 && (grads >> m) != 0u) || n_tokens < 0 || splits < 1 || (n_acc == 0 && !want_dx) ||
      n_acc > per_pass)
    return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const int bufs = std::max(top, 0) + 3;  // the kernel's input tiles 0..top (one, x, when only dx is asked)
  // the highest factor's accumulator in registers where the shared memory does not hold them all
  const bool registers = n_acc > 0 && chain_grad_smem_accs(r, b, bufs, n_acc) < n_acc;
  const int in_smem = n_acc - (int)registers;
  const int tn = chain_grad_tile(r, b, bufs, in_smem, registers);
  if (tn == 0 || splits > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t per_split = ceil_div(ceil_div(n_tokens, splits), tn) * tn;
  const size_t smem = sizeof(float) * ((size_t)bufs * tn * r * b + (size_t)in_smem * r * b * b) +
                      (registers ? past_registers(sizeof(float) * (size_t)r * b * b) : 0);
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto gs_chain_rows_grad_launch =
        registers ? gs_chain_rows_grad_kernel<T, kPairRegAcc> : gs_chain_rows_grad_kernel<T, 0>;
    cudaError_t err = ensure_dynamic_smem(gs_chain_rows_grad_launch, smem);
    if (err != cudaSuccess) return err;
    gs_chain_rows_grad_launch<<<(unsigned)splits, registers ? kPairRegThreads : kPairThreads, smem, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), W, static_cast<T*>(dx), dw_part, n_tokens, r, b, m, tn,
        per_split, splits, grads, want_dx);
    return cudaGetLastError();
  });
}

cudaError_t gs_pair_grad(DType dt, const void* dy, const void* x, const float* R, const float* L, void* dx,
                         float* dl_part, float* dr_part, int64_t n_tokens, int r, int b, int64_t splits,
                         bool linear_out, cudaStream_t stream) {
  const bool want_dx = dx != nullptr, want_l = dl_part != nullptr, want_r = dr_part != nullptr;
  const GradPlan plan = grad_plan(r, b);
  const int per_pass = factors_per_pass(plan);
  if (per_pass < (int)want_l + (int)want_r || (!want_dx && !want_l && !want_r) || n_tokens < 0 || splits < 1)
    return cudaErrorInvalidValue;
  if (n_tokens == 0) return cudaSuccess;
  const PairGroups g = pair_groups(r, b);
  // the register accumulator: R's beside L's in shared memory, or the one asked for where it fits nowhere else
  const bool registers = (want_r && want_l && plan == GradPlan::kRegisters) || plan == GradPlan::kSplit;
  const size_t one = sizeof(float) * (size_t)g.features * b;
  const size_t acc = registers ? (want_l && want_r ? one : 0) + past_registers(one)
                               : one * ((int)want_l + (int)want_r);
  const int tn = pair_tile(g.features, 4, acc);
  const int64_t grid = splits * g.n_groups;
  if (tn == 0 || grid > 0x7fffffffLL) return cudaErrorInvalidValue;
  const int64_t per_split = ceil_div(ceil_div(n_tokens, splits), tn) * tn;
  const size_t smem = sizeof(float) * 4 * (size_t)tn * g.features + acc;
  return dispatch_dtype(dt, [&](auto tag) {
    using T = decltype(tag);
    auto gs_pair_grad_launch = registers ? gs_pair_grad_kernel<T, kPairRegAcc> : gs_pair_grad_kernel<T, 0>;
    cudaError_t err = ensure_dynamic_smem(gs_pair_grad_launch, smem);
    if (err != cudaSuccess) return err;
    gs_pair_grad_launch<<<(unsigned)grid, registers ? kPairRegThreads : kPairThreads, smem, stream>>>(
        static_cast<const T*>(dy), static_cast<const T*>(x), R, L, static_cast<T*>(dx), dl_part, dr_part, n_tokens,
        r, b, tn, per_split, linear_out, want_dx, want_l, want_r);
    return cudaGetLastError();
  });
}

}  // namespace gsops
