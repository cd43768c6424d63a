// The one torch binding of the gsops CUDA kernels (csrc/include/gsops/kernels.h).
//
// Registers the ops under torch.ops.gsops_cuda.* (CUDA dispatch key) and makes an
// importable module gsops._C. Every op checks its arguments (device, dtype,
// contiguity, shapes) with messages naming the argument before it launches;
// the Python side (gsops.ops) has already validated the user's call.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include "gsops/device.h"  // the device the ops take tensors on (csrc/include/gsops/device.h)

#include <string>
#include <tuple>

#include "include/gsops/kernels.h"

namespace {

using at::Tensor;

void check_cuda(const char* name, const Tensor& t) {
  TORCH_CHECK(t.defined(), name, " must be a tensor, got None");
  TORCH_CHECK(GSOPS_ON_DEVICE(t), name, " must be " GSOPS_DEVICE_WORD ", got a tensor on ", t.device());
}

void check_contiguous(const char* name, const Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous (call .contiguous() first), got strides ", t.strides());
}

gsops::DType dtype_of(const char* name, const Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return gsops::DType::F32;
    case at::kHalf: return gsops::DType::F16;
    case at::kBFloat16: return gsops::DType::BF16;
    default: TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return gsops::DType::F32;
}

void check_same_device(const char* a, const Tensor& ta, const char* b, const Tensor& tb) {
  TORCH_CHECK(ta.device() == tb.device(), a, " and ", b, " must be on the same device, got ", ta.device(), " and ",
              tb.device());
}

void check_same_dtype(const char* a, const Tensor& ta, const char* b, const Tensor& tb) {
  TORCH_CHECK(ta.scalar_type() == tb.scalar_type(), a, " and ", b, " must have the same dtype, got ",
              ta.scalar_type(), " and ", tb.scalar_type());
}

void check_mode(const char* name, int64_t mode) {
  TORCH_CHECK(mode >= gsops::PERM_NONE && mode <= gsops::PERM_PT, name,
              "=", mode, " must be 0 (identity), 1 (P = perm(r, d)) or 2 (P^T)");
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "gsops CUDA kernel ", op, " failed: ", cudaGetErrorString(err));
}

// (r, b, b) blocks with 1 <= b <= 128.
void check_blocks(const char* name, const Tensor& B) {
  check_cuda(name, B);
  TORCH_CHECK(B.dim() == 3 && B.size(1) == B.size(2), name, " must have shape (r, b, b), got ", B.sizes());
  TORCH_CHECK(B.size(0) >= 1 && B.size(1) >= 1, name, " must have r >= 1 and b >= 1, got ", B.sizes());
  TORCH_CHECK(B.size(1) <= gsops::kMaxBlock, name, " block size b=", B.size(1), " must be <= ", gsops::kMaxBlock);
  TORCH_CHECK(at::isFloatingType(B.scalar_type()), name, " must be a floating tensor, got ", B.scalar_type());
}

// x (..., r*b): the activations of a block-diagonal factor.
int64_t check_features(const char* name, const Tensor& x, int64_t r, int64_t b) {
  check_cuda(name, x);
  dtype_of(name, x);
  check_contiguous(name, x);
  TORCH_CHECK(x.dim() >= 1, name, " must have at least one dimension, got a scalar");
  TORCH_CHECK(x.size(-1) == r * b, name, ".shape[-1]=", x.size(-1), " must equal r*b=", r * b, " (r=", r, ", b=", b, ")");
  return x.size(-1) ? x.numel() / x.size(-1) : 0;
}

// ---- fused block-diagonal x permutation ------------------------------------------
Tensor block_diag_perm(const Tensor& x, const Tensor& blocks, int64_t in_mode, int64_t out_mode, bool transpose_blocks) {
  check_blocks("blocks", blocks);
  const int64_t r = blocks.size(0), b = blocks.size(1);
  const int64_t n_tokens = check_features("x", x, r, b);
  check_same_device("x", x, "blocks", blocks);
  check_mode("in_mode", in_mode);
  check_mode("out_mode", out_mode);
  GSOPS_GUARD(x);
  const Tensor Bf = blocks.to(at::kFloat).contiguous();
  Tensor y = at::empty_like(x);
  check_launch(gsops::block_diag_perm(dtype_of("x", x), x.data_ptr(), Bf.data_ptr<float>(), y.data_ptr(), n_tokens,
                                      (int)r, (int)b, (int)in_mode, (int)out_mode, transpose_blocks,
                                      GSOPS_STREAM),
               "block_diag_perm");
  return y;
}

Tensor block_diag_perm_grad_blocks(const Tensor& dy, const Tensor& x, int64_t r, int64_t b, int64_t in_mode,
                                   int64_t out_mode) {
  TORCH_CHECK(r >= 1 && b >= 1 && b <= gsops::kMaxBlock, "r=", r, " and b=", b, " must satisfy r >= 1, 1 <= b <= ",
              gsops::kMaxBlock);
  const int64_t n_tokens = check_features("x", x, r, b);
  check_features("dy", dy, r, b);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  check_same_device("dy", dy, "x", x);
  check_same_dtype("dy", dy, "x", x);
  check_mode("in_mode", in_mode);
  check_mode("out_mode", out_mode);
  GSOPS_GUARD(x);
  Tensor dB = at::zeros({r, b, b}, x.options().dtype(at::kFloat));
  check_launch(gsops::block_diag_perm_grad_blocks(dtype_of("x", x), dy.data_ptr(), x.data_ptr(), dB.data_ptr<float>(),
                                                  n_tokens, (int)r, (int)b, (int)in_mode, (int)out_mode,
                                                  GSOPS_STREAM),
               "block_diag_perm_grad_blocks");
  return dB;
}

// ---- two factors in one pass --------------------------------------------------------
// (R, L): float32 copies of the blocks, both (r, b, b), on x's device.
std::tuple<Tensor, Tensor> pair_blocks(const Tensor& x, const Tensor& R, const Tensor& L) {
  check_blocks("R", R);
  check_blocks("L", L);
  TORCH_CHECK(R.sizes() == L.sizes(), "R and L must have the same shape (r, b, b), got ", R.sizes(), " and ", L.sizes());
  check_same_device("x", x, "R", R);
  check_same_device("x", x, "L", L);
  return {R.to(at::kFloat).contiguous(), L.to(at::kFloat).contiguous()};
}

bool gs_pair_supported(int64_t r, int64_t b) { return gsops::gs_pair_fits((int)r, (int)b); }

int64_t gs_pair_grad_factors(int64_t r, int64_t b) { return gsops::gs_pair_grad_factors_per_pass((int)r, (int)b); }

int64_t gs_pair_grad_splits_of(int64_t n_tokens, int64_t r, int64_t b) {
  return gsops::gs_pair_grad_splits(n_tokens, (int)r, (int)b);
}

Tensor gs_pair(const Tensor& x, const Tensor& R, const Tensor& L, bool linear_out, bool transposed) {
  const auto [Rf, Lf] = pair_blocks(x, R, L);
  const int64_t r = R.size(0), b = R.size(1);
  const int64_t n_tokens = check_features("x", x, r, b);
  TORCH_CHECK(gsops::gs_pair_fits((int)r, (int)b), "gs_pair: a group of r=", r, ", b=", b,
              " does not fit a CUDA block's shared memory (gs_pair_supported is false): use block_diag_perm");
  GSOPS_GUARD(x);
  Tensor y = at::empty_like(x);
  check_launch(gsops::gs_pair(dtype_of("x", x), x.data_ptr(), Rf.data_ptr<float>(), Lf.data_ptr<float>(),
                              y.data_ptr(), n_tokens, (int)r, (int)b, linear_out, transposed, GSOPS_STREAM),
               "gs_pair");
  return y;
}

bool gs_chain_rows_supported(int64_t r, int64_t b) { return gsops::gs_chain_rows_fits((int)r, (int)b); }

// (m, r, b) of a chain's stacked blocks (m, r, b, b), a floating CUDA tensor on x's device.
std::tuple<int64_t, int64_t, int64_t> check_chain_blocks(const Tensor& x, const Tensor& blocks) {
  check_cuda("blocks", blocks);
  TORCH_CHECK(blocks.dim() == 4 && blocks.size(2) == blocks.size(3) && blocks.size(0) >= 1 && blocks.size(1) >= 1,
              "blocks must have shape (m, r, b, b) with m, r, b >= 1, got ", blocks.sizes());
  TORCH_CHECK(at::isFloatingType(blocks.scalar_type()), "blocks must be a floating tensor, got ", blocks.scalar_type());
  check_same_device("x", x, "blocks", blocks);
  return {blocks.size(0), blocks.size(1), blocks.size(2)};
}

// blocks (m, r, b, b): y = B_m P ... P B_1 x
Tensor gs_chain_rows(const Tensor& x, const Tensor& blocks) {
  const auto [m, r, b] = check_chain_blocks(x, blocks);
  const int64_t n_tokens = check_features("x", x, r, b);
  TORCH_CHECK(gsops::gs_chain_rows_fits((int)r, (int)b), "gs_chain_rows: a row of r*b=", r * b,
              " features does not fit a CUDA block's shared memory (gs_chain_rows_supported is false)");
  GSOPS_GUARD(x);
  const Tensor Wf = blocks.to(at::kFloat).contiguous();
  Tensor y = at::empty_like(x);
  check_launch(gsops::gs_chain_rows(dtype_of("x", x), x.data_ptr(), Wf.data_ptr<float>(), y.data_ptr(), n_tokens,
                                    (int)r, (int)b, (int)m, GSOPS_STREAM),
               "gs_chain_rows");
  return y;
}

int64_t gs_chain_rows_grad_factors(int64_t r, int64_t b, int64_t m) {
  return gsops::gs_chain_rows_grad_factors_per_pass((int)r, (int)b, (int)m);
}

int64_t gs_chain_rows_grad_splits(int64_t n_tokens, int64_t r, int64_t b) {
  return gsops::gs_chain_rows_grad_splits(n_tokens, (int)r, (int)b);
}

// (dx or empty, dw_part): dw_part (n, splits, r, b, b) float32 for the n factors of the bit mask `grads` in
// increasing order; dB_f is the sum of its partials over dim 1.
std::tuple<Tensor, Tensor> gs_chain_rows_grad(const Tensor& dy, const Tensor& x, const Tensor& blocks, int64_t grads,
                                              bool want_dx, int64_t splits) {
  const auto [m, r, b] = check_chain_blocks(x, blocks);
  const int64_t n_tokens = check_features("x", x, r, b);
  check_features("dy", dy, r, b);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  check_same_device("dy", dy, "x", x);
  check_same_dtype("dy", dy, "x", x);
  TORCH_CHECK(m <= 32 && grads >= 0 && (grads >> m) == 0, "grads=", grads, " must be a bit mask of the m=", m,
              " factors (bit f: factor f)");
  TORCH_CHECK(grads != 0 || want_dx, "gs_chain_rows_grad: nothing asked (grads is 0 and want_dx is false)");
  TORCH_CHECK(splits >= 1, "splits=", splits, " must be >= 1 (gs_chain_rows_grad_splits)");
  int n = 0;
  for (int64_t f = 0; f < m; ++f) n += (int)(grads >> f & 1);
  const int per_pass = gsops::gs_chain_rows_grad_factors_per_pass((int)r, (int)b, (int)m);
  TORCH_CHECK(per_pass > 0 && n <= per_pass, "gs_chain_rows_grad: r=", r, ", b=", b, ", m=", m, " fits ", per_pass,
              " block-gradient accumulator(s) per launch (gs_chain_rows_grad_factors), asked for ", n);
  GSOPS_GUARD(x);
  const Tensor Wf = blocks.to(at::kFloat).contiguous();
  Tensor dx = want_dx ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor dw = at::empty({n, splits, r, b, b}, x.options().dtype(at::kFloat));
  if (n_tokens == 0) {
    dw.zero_();
    return {dx, dw};
  }
  check_launch(gsops::gs_chain_rows_grad(dtype_of("x", x), dy.data_ptr(), x.data_ptr(), Wf.data_ptr<float>(),
                                         want_dx ? dx.data_ptr() : nullptr, dw.data_ptr<float>(), n_tokens, (int)r,
                                         (int)b, (int)m, splits, (unsigned)grads, GSOPS_STREAM),
               "gs_chain_rows_grad");
  return {dx, dw};
}

// (dx or empty, dL_part or empty, dR_part or empty): dL / dR are the partials' sums over dim 0.
std::tuple<Tensor, Tensor, Tensor> gs_pair_grad(const Tensor& dy, const Tensor& x, const Tensor& R, const Tensor& L,
                                                bool linear_out, bool want_dx, bool want_l, bool want_r) {
  const auto [Rf, Lf] = pair_blocks(x, R, L);
  const int64_t r = R.size(0), b = R.size(1);
  const int64_t n_tokens = check_features("x", x, r, b);
  check_features("dy", dy, r, b);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  check_same_device("dy", dy, "x", x);
  check_same_dtype("dy", dy, "x", x);
  TORCH_CHECK(want_dx || want_l || want_r, "gs_pair_grad: nothing asked (want_dx, want_l and want_r are false)");
  const int per_pass = gsops::gs_pair_grad_factors_per_pass((int)r, (int)b);
  TORCH_CHECK((int)want_l + (int)want_r <= per_pass, "gs_pair_grad: r=", r, ", b=", b, " fits ", per_pass,
              " block-gradient accumulator(s) per launch (gs_pair_grad_factors), asked for ",
              (int)want_l + (int)want_r);
  GSOPS_GUARD(x);
  const int64_t splits = gsops::gs_pair_grad_splits(n_tokens, (int)r, (int)b);
  const auto fopt = x.options().dtype(at::kFloat);
  Tensor dx = want_dx ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor dl = want_l ? at::empty({splits, r, b, b}, fopt) : at::empty({0}, fopt);
  Tensor dr = want_r ? at::empty({splits, r, b, b}, fopt) : at::empty({0}, fopt);
  if (n_tokens == 0) {
    dl.zero_();
    dr.zero_();
    return {dx, dl, dr};
  }
  check_launch(gsops::gs_pair_grad(dtype_of("x", x), dy.data_ptr(), x.data_ptr(), Rf.data_ptr<float>(),
                                   Lf.data_ptr<float>(), want_dx ? dx.data_ptr() : nullptr,
                                   want_l ? dl.data_ptr<float>() : nullptr, want_r ? dr.data_ptr<float>() : nullptr,
                                   n_tokens, (int)r, (int)b, splits, linear_out, GSOPS_STREAM),
               "gs_pair_grad");
  return {dx, dl, dr};
}

// ---- batched Cayley ---------------------------------------------------------------
void check_square_batch(const char* name, const Tensor& K) {
  check_cuda(name, K);
  dtype_of(name, K);
  check_contiguous(name, K);
  TORCH_CHECK(K.dim() >= 2 && K.size(-1) == K.size(-2), name, " must have shape (..., b, b), got ", K.sizes());
  TORCH_CHECK(K.size(-1) >= 1 && K.size(-1) <= gsops::kMaxBlock, name, " block size b=", K.size(-1),
              " must be in 1..", gsops::kMaxBlock);
}

std::tuple<Tensor, Tensor> cayley_forward(const Tensor& K) {
  check_square_batch("K", K);
  const int64_t b = K.size(-1);
  const int64_t n_mats = K.numel() / (b * b);
  GSOPS_GUARD(K);
  Tensor Q = at::empty_like(K);
  Tensor M = at::empty(K.sizes(), K.options().dtype(at::kFloat));
  check_launch(gsops::cayley_forward(dtype_of("K", K), K.data_ptr(), M.data_ptr<float>(), Q.data_ptr(), n_mats, (int)b,
                                     GSOPS_STREAM),
               "cayley_forward");
  return {Q, M};
}

Tensor cayley_backward(const Tensor& M, const Tensor& G) {
  check_square_batch("G", G);
  check_cuda("M", M);
  check_contiguous("M", M);
  TORCH_CHECK(M.scalar_type() == at::kFloat, "M must be float32 (saved by cayley_forward), got ", M.scalar_type());
  TORCH_CHECK(M.sizes() == G.sizes(), "M and G must have the same shape, got ", M.sizes(), " and ", G.sizes());
  check_same_device("M", M, "G", G);
  const int64_t b = G.size(-1);
  GSOPS_GUARD(G);
  Tensor dK = at::empty_like(G);
  check_launch(gsops::cayley_backward(dtype_of("G", G), M.data_ptr<float>(), G.data_ptr(), dK.data_ptr(),
                                      G.numel() / (b * b), (int)b, GSOPS_STREAM),
               "cayley_backward");
  return dK;
}

// ---- grouped convolution exponential --------------------------------------------
gsops::ConvShape check_conv(const Tensor& x, const Tensor& weight, int64_t groups, int64_t terms) {
  check_cuda("x", x);
  dtype_of("x", x);
  check_contiguous("x", x);
  check_cuda("weight", weight);
  check_same_device("x", x, "weight", weight);
  TORCH_CHECK(x.dim() == 4, "x must have shape (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "weight must have shape (C, C/groups, kh, kw), got ", weight.sizes());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()), "weight must be a floating tensor, got ", weight.scalar_type());
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "groups=", groups, " must be >= 1 and divide x.shape[1]=",
              x.size(1));
  TORCH_CHECK(weight.size(0) == x.size(1) && weight.size(1) == x.size(1) / groups, "weight must have shape (C, C/groups, kh, kw) = (",
              x.size(1), ", ", x.size(1) / groups, ", kh, kw) for x.shape[1]=", x.size(1), " and groups=", groups,
              ", got ", weight.sizes());
  TORCH_CHECK(weight.size(2) % 2 == 1 && weight.size(3) % 2 == 1, "weight kernel size (", weight.size(2), ", ",
              weight.size(3), ") must be odd for 'same' padding");
  TORCH_CHECK(terms >= 0, "terms=", terms, " must be >= 0");
  return gsops::ConvShape{x.size(0), (int)x.size(1), (int)x.size(2), (int)x.size(3), (int)groups,
                          (int)weight.size(2), (int)weight.size(3)};
}

Tensor conv_exp_forward(const Tensor& x, const Tensor& weight, int64_t terms, int64_t groups, bool adjoint) {
  const gsops::ConvShape s = check_conv(x, weight, groups, terms);
  GSOPS_GUARD(x);
  const Tensor wf = weight.to(at::kFloat).contiguous();
  const int device = GSOPS_DEVICE_INDEX(x);
  Tensor ws = at::empty({(int64_t)gsops::conv_exp_forward_workspace(s, device)}, x.options().dtype(at::kFloat));
  Tensor y = at::empty_like(x);
  check_launch(gsops::conv_exp_forward(dtype_of("x", x), x.data_ptr(), wf.data_ptr<float>(), y.data_ptr(),
                                       ws.numel() ? ws.data_ptr<float>() : nullptr, s, (int)terms, adjoint, device,
                                       GSOPS_STREAM),
               "conv_exp_forward");
  return y;
}

Tensor conv_exp_weight_grad(const Tensor& x, const Tensor& dy, const Tensor& weight, int64_t terms, int64_t groups) {
  const gsops::ConvShape s = check_conv(x, weight, groups, terms);
  check_cuda("dy", dy);
  TORCH_CHECK(dy.sizes() == x.sizes(), "dy must have the shape of x ", x.sizes(), ", got ", dy.sizes());
  check_same_device("dy", dy, "x", x);
  GSOPS_GUARD(x);
  const Tensor xf = x.to(at::kFloat).contiguous(), dyf = dy.to(at::kFloat).contiguous();
  const Tensor wf = weight.to(at::kFloat).contiguous();
  Tensor ws = at::empty({(int64_t)gsops::conv_exp_weight_grad_workspace(s, (int)terms)}, x.options().dtype(at::kFloat));
  Tensor dw = at::zeros(weight.sizes(), x.options().dtype(at::kFloat));
  check_launch(gsops::conv_exp_weight_grad(xf.data_ptr<float>(), dyf.data_ptr<float>(), wf.data_ptr<float>(),
                                           dw.data_ptr<float>(), ws.data_ptr<float>(), s, (int)terms,
                                           GSOPS_STREAM),
               "conv_exp_weight_grad");
  return dw;
}

}  // namespace

TORCH_LIBRARY(gsops_cuda, m) {
  m.def("block_diag_perm(Tensor x, Tensor blocks, int in_mode, int out_mode, bool transpose_blocks) -> Tensor");
  m.def("block_diag_perm_grad_blocks(Tensor dy, Tensor x, int r, int b, int in_mode, int out_mode) -> Tensor");
  m.def("gs_pair(Tensor x, Tensor R, Tensor L, bool linear_out, bool transposed) -> Tensor");
  m.def("gs_pair_grad(Tensor dy, Tensor x, Tensor R, Tensor L, bool linear_out, bool want_dx, bool want_l, "
        "bool want_r) -> (Tensor, Tensor, Tensor)");
  m.def("gs_chain_rows(Tensor x, Tensor blocks) -> Tensor");
  m.def("gs_chain_rows_grad(Tensor dy, Tensor x, Tensor blocks, int grads, bool want_dx, int splits) -> (Tensor, Tensor)");
  m.def("cayley_forward(Tensor K) -> (Tensor, Tensor)");
  m.def("cayley_backward(Tensor M, Tensor G) -> Tensor");
  m.def("conv_exp_forward(Tensor x, Tensor weight, int terms, int groups, bool adjoint) -> Tensor");
  m.def("conv_exp_weight_grad(Tensor x, Tensor dy, Tensor weight, int terms, int groups) -> Tensor");
}

TORCH_LIBRARY_IMPL(gsops_cuda, GSOPS_DISPATCH_KEY, m) {
  m.impl("block_diag_perm", &block_diag_perm);
  m.impl("block_diag_perm_grad_blocks", &block_diag_perm_grad_blocks);
  m.impl("gs_pair", &gs_pair);
  m.impl("gs_pair_grad", &gs_pair_grad);
  m.impl("gs_chain_rows", &gs_chain_rows);
  m.impl("gs_chain_rows_grad", &gs_chain_rows_grad);
  m.impl("cayley_forward", &cayley_forward);
  m.impl("cayley_backward", &cayley_backward);
  m.impl("conv_exp_forward", &conv_exp_forward);
  m.impl("conv_exp_weight_grad", &conv_exp_weight_grad);
}

#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gsops CUDA kernels; the ops are registered as torch.ops.gsops_cuda.*";
  m.attr("max_block") = gsops::kMaxBlock;
  m.attr("device_type") = GSOPS_DEVICE_TYPE;
  // plans of the one-pass GS kernels (host-side, no launch): whether a group of (r, b) fits on chip, and
  // how many block-gradient accumulators one backward launch holds (2, 1 or 0)
  m.def("gs_pair_supported", &gs_pair_supported, "gs_pair(x, R, L, ...) takes blocks of shape (r, b, b)");
  m.def("gs_pair_grad_factors", &gs_pair_grad_factors, "block gradients one gs_pair_grad launch accumulates");
  m.def("gs_pair_grad_splits", &gs_pair_grad_splits_of, "token splits of gs_pair_grad's partials");
  m.def("gs_chain_rows_supported", &gs_chain_rows_supported, "gs_chain_rows(x, blocks) takes (m, r, b, b) blocks");
  m.def("gs_chain_rows_grad_factors", &gs_chain_rows_grad_factors,
        "block gradients one gs_chain_rows_grad launch accumulates for (r, b, m) (0: none fits)");
  m.def("gs_chain_rows_grad_splits", &gs_chain_rows_grad_splits, "token splits of gs_chain_rows_grad's partials");
}
