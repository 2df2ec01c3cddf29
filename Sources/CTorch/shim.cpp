// extern "C" shim over ATen. Every entry point catches C++ exceptions (libtorch reports
// shape errors and the like by throwing) and turns them into a thread-local message.
#include "ctorch.h"
#include "shim_internal.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/core/Generator.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <map>
#include <immintrin.h>
#include <string>
#include <vector>

struct tt_generator_s { at::Generator g; };

thread_local std::string g_error;

#define TRY_HANDLE(...)                                              \
  try { return wrap(__VA_ARGS__); }                                         \
  catch (const c10::Error &e) { g_error = e.what_without_backtrace(); } \
  catch (const std::exception &e) { g_error = e.what(); }            \
  catch (...) { g_error = "unknown C++ exception"; }                 \
  return nullptr;

#define TRY_STATUS(...)                                              \
  try { __VA_ARGS__; return 0; }                                            \
  catch (const c10::Error &e) { g_error = e.what_without_backtrace(); } \
  catch (const std::exception &e) { g_error = e.what(); }            \
  catch (...) { g_error = "unknown C++ exception"; }                 \
  return 1;

static tt_tensor wrap(at::Tensor t) { return new tt_tensor_s{std::move(t)}; }
static const at::Tensor &T(tt_tensor h) { return h->t; }
static c10::optional<at::Tensor> opt(tt_tensor h) {
  return h ? c10::optional<at::Tensor>(h->t) : c10::nullopt;
}
static at::IntArrayRef dims(const int64_t *p, int n) { return at::IntArrayRef(p, (size_t)n); }

static at::ScalarType stype(int d) {
  switch (d) {
  case TT_F32: return at::kFloat;
  case TT_F64: return at::kDouble;
  case TT_F16: return at::kHalf;
  case TT_BF16: return at::kBFloat16;
  case TT_I64: return at::kLong;
  case TT_I32: return at::kInt;
  case TT_BOOL: return at::kBool;
  case TT_U8: return at::kByte;
  case TT_I8: return at::kChar;
  case TT_I16: return at::kShort;
  }
  throw std::invalid_argument("unknown dtype code " + std::to_string(d));
}
static int dcode(at::ScalarType s) {
  switch (s) {
  case at::kFloat: return TT_F32;
  case at::kDouble: return TT_F64;
  case at::kHalf: return TT_F16;
  case at::kBFloat16: return TT_BF16;
  case at::kLong: return TT_I64;
  case at::kInt: return TT_I32;
  case at::kBool: return TT_BOOL;
  case at::kByte: return TT_U8;
  case at::kChar: return TT_I8;
  case at::kShort: return TT_I16;
  default: return -1;
  }
}
static at::Device dev(int d, int idx) {
  return d == TT_CUDA ? at::Device(at::kCUDA, (c10::DeviceIndex)idx) : at::Device(at::kCPU);
}
static at::TensorOptions opts(int dtype, int device, int index) {
  return at::TensorOptions().dtype(stype(dtype)).device(dev(device, index));
}
static c10::optional<at::Generator> gen(tt_generator g) {
  return g ? c10::optional<at::Generator>(g->g) : c10::nullopt;
}

extern "C" {

const char *tt_last_error(void) { return g_error.c_str(); }
void tt_free(tt_tensor t) { delete t; }

void tt_set_num_threads(int n) { at::set_num_threads(n); }
int tt_get_num_threads(void) { return at::get_num_threads(); }
void tt_manual_seed(uint64_t seed) { at::manual_seed(seed); }
int tt_cuda_is_available(void) { return at::hasCUDA() ? 1 : 0; }
tt_generator tt_generator_new(uint64_t seed) {
  try { return new tt_generator_s{at::make_generator<at::CPUGeneratorImpl>(seed)}; }
  catch (const std::exception &e) { g_error = e.what(); return nullptr; }
}
void tt_generator_free(tt_generator g) { delete g; }
int tt_set_grad_enabled(int enabled) {
  bool prev = c10::GradMode::is_enabled();
  c10::GradMode::set_enabled(enabled != 0);
  return prev ? 1 : 0;
}
int tt_is_grad_enabled(void) { return c10::GradMode::is_enabled() ? 1 : 0; }

// creation
tt_tensor tt_from_data(const void *data, const int64_t *shape, int ndim, int dtype) {
  TRY_HANDLE(at::from_blob(const_cast<void *>(data), dims(shape, ndim), opts(dtype, TT_CPU, 0)).clone())
}
tt_tensor tt_empty(const int64_t *shape, int ndim, int dtype, int device, int index) {
  TRY_HANDLE(at::empty(dims(shape, ndim), opts(dtype, device, index)))
}
tt_tensor tt_full(const int64_t *shape, int ndim, double value, int dtype, int device, int index) {
  TRY_HANDLE(at::full(dims(shape, ndim), value, opts(dtype, device, index)))
}
tt_tensor tt_arange(double start, double end, double step, int dtype, int device, int index) {
  TRY_HANDLE(at::arange(start, end, step, opts(dtype, device, index)))
}
tt_tensor tt_randn(const int64_t *shape, int ndim, int dtype, tt_generator g) {
  TRY_HANDLE(at::randn(dims(shape, ndim), gen(g), opts(dtype, TT_CPU, 0)))
}
tt_tensor tt_rand(const int64_t *shape, int ndim, int dtype, tt_generator g) {
  TRY_HANDLE(at::rand(dims(shape, ndim), gen(g), opts(dtype, TT_CPU, 0)))
}
tt_tensor tt_scalar_tensor(double value, int dtype) {
  TRY_HANDLE(at::scalar_tensor(value, opts(dtype, TT_CPU, 0)))
}

// properties (cannot fail for a valid handle)
int tt_ndim(tt_tensor t) { return (int)T(t).dim(); }
void tt_shape(tt_tensor t, int64_t *out) {
  auto s = T(t).sizes();
  for (size_t i = 0; i < s.size(); i++) out[i] = s[i];
}
void tt_strides(tt_tensor t, int64_t *out) {
  auto s = T(t).strides();
  for (size_t i = 0; i < s.size(); i++) out[i] = s[i];
}
int tt_dtype(tt_tensor t) { return dcode(T(t).scalar_type()); }
int tt_device(tt_tensor t, int *index) {
  auto d = T(t).device();
  if (index) *index = d.has_index() ? d.index() : 0;
  return d.is_cuda() ? TT_CUDA : TT_CPU;
}
int64_t tt_numel(tt_tensor t) { return T(t).numel(); }
int64_t tt_version(tt_tensor t) { return T(t)._version(); }
int tt_is_contiguous(tt_tensor t) { return T(t).is_contiguous() ? 1 : 0; }
void *tt_data_ptr(tt_tensor t) { return T(t).data_ptr(); }
int tt_copy_out(tt_tensor t, void *dst, size_t nbytes) {
  TRY_STATUS({
    at::Tensor c = T(t).detach().to(at::kCPU).contiguous();
    size_t need = (size_t)c.numel() * c.element_size();
    if (need != nbytes) throw std::invalid_argument("copy_out: buffer has " + std::to_string(nbytes) +
                                                    " bytes, tensor needs " + std::to_string(need));
    if (need) memcpy(dst, c.data_ptr(), need);
  })
}
int tt_item(tt_tensor t, double *out) { TRY_STATUS(*out = T(t).item<double>()) }

// elementwise
static at::Tensor unary(const at::Tensor &x, int op) {
  switch (op) {
  case TT_NEG: return at::neg(x);
  case TT_EXP: return at::exp(x);
  case TT_LOG: return at::log(x);
  case TT_SQRT: return at::sqrt(x);
  case TT_RSQRT: return at::rsqrt(x);
  case TT_ABS: return at::abs(x);
  case TT_SIN: return at::sin(x);
  case TT_COS: return at::cos(x);
  case TT_TANH: return at::tanh(x);
  case TT_SIGMOID: return at::sigmoid(x);
  case TT_RELU: return at::relu(x);
  case TT_RELU6: return at::hardtanh(x, 0.0, 6.0);
  case TT_SILU: return at::silu(x);
  case TT_GELU: return at::gelu(x, "none");
  case TT_GELU_TANH: return at::gelu(x, "tanh");
  case TT_FLOOR: return at::floor(x);
  case TT_CEIL: return at::ceil(x);
  case TT_ROUND: return at::round(x);
  case TT_SIGN: return at::sign(x);
  case TT_RECIPROCAL: return at::reciprocal(x);
  case TT_SQUARE: return at::square(x);
  case TT_LOGICAL_NOT: return at::logical_not(x);
  case TT_ISFINITE: return at::isfinite(x);
  case TT_ISNAN: return at::isnan(x);
  case TT_LOG1P: return at::log1p(x);
  case TT_EXPM1: return at::expm1(x);
  case TT_ERF: return at::erf(x);
  }
  throw std::invalid_argument("unknown unary op " + std::to_string(op));
}
static at::Tensor binary(const at::Tensor &a, const at::Tensor &b, int op) {
  switch (op) {
  case TT_ADD: return at::add(a, b);
  case TT_SUB: return at::sub(a, b);
  case TT_MUL: return at::mul(a, b);
  case TT_DIV: return at::div(a, b);
  case TT_POW: return at::pow(a, b);
  case TT_MAXIMUM: return at::maximum(a, b);
  case TT_MINIMUM: return at::minimum(a, b);
  case TT_EQ: return at::eq(a, b);
  case TT_NE: return at::ne(a, b);
  case TT_LT: return at::lt(a, b);
  case TT_LE: return at::le(a, b);
  case TT_GT: return at::gt(a, b);
  case TT_GE: return at::ge(a, b);
  case TT_AND: return at::logical_and(a, b);
  case TT_OR: return at::logical_or(a, b);
  case TT_REMAINDER: return at::remainder(a, b);
  }
  throw std::invalid_argument("unknown binary op " + std::to_string(op));
}
static at::Tensor binary_scalar(const at::Tensor &a, const at::Scalar &s, int op) {
  switch (op) {
  case TT_ADD: return at::add(a, s);
  case TT_SUB: return at::sub(a, s);
  case TT_MUL: return at::mul(a, s);
  case TT_DIV: return at::div(a, s);
  case TT_POW: return at::pow(a, s);
  case TT_EQ: return at::eq(a, s);
  case TT_NE: return at::ne(a, s);
  case TT_LT: return at::lt(a, s);
  case TT_LE: return at::le(a, s);
  case TT_GT: return at::gt(a, s);
  case TT_GE: return at::ge(a, s);
  case TT_REMAINDER: return at::remainder(a, s);
  default: return binary(a, at::scalar_tensor(s, a.options()), op);
  }
}
tt_tensor tt_unary(tt_tensor t, int op) { TRY_HANDLE(unary(T(t), op)) }
tt_tensor tt_binary(tt_tensor a, tt_tensor b, int op) { TRY_HANDLE(binary(T(a), T(b), op)) }
tt_tensor tt_binary_scalar(tt_tensor a, double s, int op) { TRY_HANDLE(binary_scalar(T(a), s, op)) }
tt_tensor tt_rbinary_scalar(double s, tt_tensor a, int op) {
  TRY_HANDLE(binary(at::scalar_tensor(s, T(a).options()), T(a), op))
}
tt_tensor tt_where(tt_tensor c, tt_tensor a, tt_tensor b) { TRY_HANDLE(at::where(T(c), T(a), T(b))) }
tt_tensor tt_clamp(tt_tensor t, double lo, double hi, int has_lo, int has_hi) {
  TRY_HANDLE(at::clamp(T(t), has_lo ? c10::optional<at::Scalar>(lo) : c10::nullopt,
                       has_hi ? c10::optional<at::Scalar>(hi) : c10::nullopt))
}
tt_tensor tt_to(tt_tensor t, int dtype, int device, int index) {
  TRY_HANDLE(T(t).to(dev(device, index), stype(dtype)))
}

// reductions
static at::Tensor reduce(const at::Tensor &x, int op, at::IntArrayRef d, bool keep, int64_t correction) {
  bool all = d.empty();
  switch (op) {
  case TT_SUM: return all && !keep ? at::sum(x) : at::sum(x, d, keep);
  case TT_MEAN: return all && !keep ? at::mean(x) : at::mean(x, d, keep);
  case TT_AMAX: return at::amax(x, d, keep);
  case TT_AMIN: return at::amin(x, d, keep);
  case TT_LOGSUMEXP: {
    if (all) return at::logsumexp(x.reshape({-1}), {0}, false);
    return at::logsumexp(x, d, keep);
  }
  case TT_PROD: {
    if (all) return at::prod(x);
    if (d.size() != 1) throw std::invalid_argument("prod reduces one dim at a time");
    return at::prod(x, d[0], keep);
  }
  case TT_VAR: return at::var(x, all ? at::OptionalIntArrayRef() : d, at::Scalar(correction), keep);
  case TT_STD: return at::std(x, all ? at::OptionalIntArrayRef() : d, at::Scalar(correction), keep);
  case TT_NORM: return all && !keep ? at::norm(x) : at::norm(x, 2, d, keep);
  }
  throw std::invalid_argument("unknown reduction " + std::to_string(op));
}
tt_tensor tt_reduce(tt_tensor t, int op, const int64_t *d, int nd, int keepdim, int correction) {
  TRY_HANDLE(reduce(T(t), op, dims(d, nd), keepdim != 0, correction))
}
tt_tensor tt_argmax(tt_tensor t, int64_t dim, int keepdim) { TRY_HANDLE(at::argmax(T(t), dim, keepdim != 0)) }
tt_tensor tt_argmin(tt_tensor t, int64_t dim, int keepdim) { TRY_HANDLE(at::argmin(T(t), dim, keepdim != 0)) }
int tt_max_dim(tt_tensor t, int64_t dim, int keepdim, tt_tensor *values, tt_tensor *indices) {
  TRY_STATUS({
    auto r = at::max(T(t), dim, keepdim != 0);
    *values = wrap(std::get<0>(r));
    *indices = wrap(std::get<1>(r));
  })
}

// linear algebra / nn
tt_tensor tt_matmul(tt_tensor a, tt_tensor b) { TRY_HANDLE(at::matmul(T(a), T(b))) }
tt_tensor tt_bmm(tt_tensor a, tt_tensor b) { TRY_HANDLE(at::bmm(T(a), T(b))) }
// One input row times a weight [N, K] (batch-1 decode): each output is the dot product of a weight row with the
// input, streamed row by row. MKL's product for this shape reads an fp32 weight at 11–16 GB/s on the bench
// machine, where a plain read runs at 45; the step is bound by that read (86% of a batch-1 decode step). A bf16
// weight (bf16 decoding reads half the bytes) is widened to fp32 by a shift and the products accumulated in fp32,
// as the library's bf16 product does.
__attribute__((target("avx2,fma"))) static inline __m256 load8(const float *p) { return _mm256_loadu_ps(p); }
__attribute__((target("avx2,fma"))) static inline __m256 load8(const c10::BFloat16 *p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i *>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
extern "C++" {  // the shim's functions have C linkage; this template cannot
template <typename W>
__attribute__((target("avx2,fma"))) static void dotRows(const W *w, const float *x, float *y, int64_t k,
                                                       int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; r++) {
    const W *row = w + r * k;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
      a0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), a0);
      a1 = _mm256_fmadd_ps(load8(row + i + 8), _mm256_loadu_ps(x + i + 8), a1);
      a2 = _mm256_fmadd_ps(load8(row + i + 16), _mm256_loadu_ps(x + i + 16), a2);
      a3 = _mm256_fmadd_ps(load8(row + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(load8(row + i), _mm256_loadu_ps(x + i), a0);
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_hadd_ps(h, h);
    h = _mm_hadd_ps(h, h);
    float acc = _mm_cvtss_f32(h);
    for (; i < k; i++) acc += float(row[i]) * x[i];
    y[r] = acc;
  }
}
}  // extern "C++"

// Weight and input both fp32, or both bf16 (the bias in the weight's dtype).
static bool singleRowProduct(const at::Tensor &x, const at::Tensor &w, const c10::optional<at::Tensor> &b) {
  static const bool cpu = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool grad = at::GradMode::is_enabled() && (x.requires_grad() || w.requires_grad() || (b && b->requires_grad()));
  auto dtype = w.scalar_type();
  return cpu && !grad && x.device().is_cpu() && w.device().is_cpu() &&
         (dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype && w.dim() == 2 &&
         w.is_contiguous() && x.dim() >= 1 && x.size(-1) == w.size(1) && x.numel() == w.size(1) &&
         (!b || b->scalar_type() == dtype);
}

// x's shape with its last dimension (features in) replaced by n (features out).
static std::vector<int64_t> outputShape(const at::Tensor &x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return shape;
}

static at::Tensor singleRowLinear(const at::Tensor &x, const at::Tensor &w, const c10::optional<at::Tensor> &b) {
  const bool bf16 = w.scalar_type() == at::kBFloat16;
  at::Tensor xc = x.to(at::kFloat).contiguous();
  int64_t n = w.size(0), k = w.size(1);
  at::Tensor y = at::empty({n}, w.options().dtype(at::kFloat));
  const float *xp = xc.data_ptr<float>();
  float *yp = y.data_ptr<float>();
  if (bf16) {
    const c10::BFloat16 *wp = w.data_ptr<c10::BFloat16>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) { dotRows(wp, xp, yp, k, begin, end); });
  } else {
    const float *wp = w.data_ptr<float>();
    at::parallel_for(0, n, 64, [&](int64_t begin, int64_t end) { dotRows(wp, xp, yp, k, begin, end); });
  }
  if (b && b->defined()) y.add_(*b);
  return (bf16 ? y.to(at::kBFloat16) : y).view(outputShape(x, n));
}

// Inputs of more than two dimensions are flattened to rows first: at::linear sends a batched input whose
// strides are not the standard ones (e.g. the last position of each prompt, narrowed out of [B, T, H]) through
// batched matmul, which copies the weight once per batch entry (a 49k-row output head: 45 ms per prompt in bf16
// instead of 2 ms). As rows the product is one GEMM reading the input in place.
static at::Tensor linearRows(const at::Tensor &x, const at::Tensor &w, const c10::optional<at::Tensor> &b) {
  if (singleRowProduct(x, w, b)) return singleRowLinear(x, w, b);
  if (x.dim() <= 2) return at::linear(x, w, b);
  return at::linear(x.reshape({-1, x.size(-1)}), w, b).view(outputShape(x, w.size(0)));
}
tt_tensor tt_linear(tt_tensor x, tt_tensor w, tt_tensor b) { TRY_HANDLE(linearRows(T(x), T(w), opt(b))) }
tt_tensor tt_embedding(tt_tensor w, tt_tensor idx) { TRY_HANDLE(at::embedding(T(w), T(idx))) }
tt_tensor tt_softmax(tt_tensor t, int64_t dim) { TRY_HANDLE(at::softmax(T(t), dim)) }
tt_tensor tt_log_softmax(tt_tensor t, int64_t dim) { TRY_HANDLE(at::log_softmax(T(t), dim)) }
tt_tensor tt_sdpa(tt_tensor q, tt_tensor k, tt_tensor v, tt_tensor mask, int is_causal, double scale,
                  int enable_gqa) {
  TRY_HANDLE(at::scaled_dot_product_attention(T(q), T(k), T(v), opt(mask), 0.0, is_causal != 0,
                                              scale > 0 ? c10::optional<double>(scale) : c10::nullopt,
                                              enable_gqa != 0))
}
tt_tensor tt_conv2d(tt_tensor x, tt_tensor w, tt_tensor b, const int64_t *stride, const int64_t *padding,
                    const int64_t *dilation, int64_t groups) {
  TRY_HANDLE(at::conv2d(T(x), T(w), opt(b), dims(stride, 2), dims(padding, 2), dims(dilation, 2), groups))
}
tt_tensor tt_batch_norm(tt_tensor x, tt_tensor w, tt_tensor b, tt_tensor mean, tt_tensor var, double eps) {
  TRY_HANDLE(at::batch_norm(T(x), opt(w), opt(b), opt(mean), opt(var), false, 0.0, eps, false))
}
tt_tensor tt_layer_norm(tt_tensor x, const int64_t *shape, int nd, tt_tensor w, tt_tensor b, double eps) {
  TRY_HANDLE(at::layer_norm(T(x), dims(shape, nd), opt(w), opt(b), eps))
}
tt_tensor tt_rms_norm(tt_tensor x, const int64_t *shape, int nd, tt_tensor w, double eps) {
  TRY_HANDLE(at::rms_norm(T(x), dims(shape, nd), opt(w), eps))
}
tt_tensor tt_cross_entropy(tt_tensor logits, tt_tensor target, int64_t ignore_index, int reduction) {
  TRY_HANDLE(at::cross_entropy_loss(T(logits), T(target), c10::nullopt, reduction, ignore_index, 0.0))
}
tt_tensor tt_nll_loss(tt_tensor logp, tt_tensor target, int64_t ignore_index, int reduction) {
  TRY_HANDLE(at::nll_loss(T(logp), T(target), c10::nullopt, reduction, ignore_index))
}
tt_tensor tt_multinomial(tt_tensor probs, int64_t n, int replacement, tt_generator g) {
  TRY_HANDLE(at::multinomial(T(probs), n, replacement != 0, gen(g)))
}
int tt_topk(tt_tensor t, int64_t k, int64_t dim, int largest, tt_tensor *values, tt_tensor *indices) {
  TRY_STATUS({
    auto r = at::topk(T(t), k, dim, largest != 0, true);
    *values = wrap(std::get<0>(r));
    *indices = wrap(std::get<1>(r));
  })
}
int tt_sort(tt_tensor t, int64_t dim, int descending, tt_tensor *values, tt_tensor *indices) {
  TRY_STATUS({
    auto r = at::sort(T(t), /*stable=*/true, dim, descending != 0);
    *values = wrap(std::get<0>(r));
    *indices = wrap(std::get<1>(r));
  })
}
tt_tensor tt_cumsum(tt_tensor t, int64_t dim) { TRY_HANDLE(at::cumsum(T(t), dim)) }
tt_tensor tt_pad(tt_tensor t, const int64_t *pad, int npad, double value) {
  TRY_HANDLE(at::constant_pad_nd(T(t), dims(pad, npad), value))
}
tt_tensor tt_tril(tt_tensor t, int64_t d) { TRY_HANDLE(at::tril(T(t), d)) }
tt_tensor tt_triu(tt_tensor t, int64_t d) { TRY_HANDLE(at::triu(T(t), d)) }

// shape and indexing
tt_tensor tt_reshape(tt_tensor t, const int64_t *s, int n) { TRY_HANDLE(T(t).reshape(dims(s, n))) }
tt_tensor tt_view(tt_tensor t, const int64_t *s, int n) { TRY_HANDLE(T(t).view(dims(s, n))) }
tt_tensor tt_permute(tt_tensor t, const int64_t *d, int n) { TRY_HANDLE(T(t).permute(dims(d, n))) }
tt_tensor tt_transpose(tt_tensor t, int64_t a, int64_t b) { TRY_HANDLE(T(t).transpose(a, b)) }
tt_tensor tt_contiguous(tt_tensor t) { TRY_HANDLE(T(t).contiguous()) }
tt_tensor tt_expand(tt_tensor t, const int64_t *s, int n) { TRY_HANDLE(T(t).expand(dims(s, n))) }
tt_tensor tt_squeeze(tt_tensor t, int64_t d) { TRY_HANDLE(T(t).squeeze(d)) }
tt_tensor tt_unsqueeze(tt_tensor t, int64_t d) { TRY_HANDLE(T(t).unsqueeze(d)) }
tt_tensor tt_narrow(tt_tensor t, int64_t d, int64_t s, int64_t l) { TRY_HANDLE(T(t).narrow(d, s, l)) }
tt_tensor tt_slice(tt_tensor t, int64_t d, int64_t s, int64_t e, int64_t st) { TRY_HANDLE(T(t).slice(d, s, e, st)) }
tt_tensor tt_select(tt_tensor t, int64_t d, int64_t i) { TRY_HANDLE(T(t).select(d, i)) }
tt_tensor tt_index_select(tt_tensor t, int64_t d, tt_tensor i) { TRY_HANDLE(at::index_select(T(t), d, T(i))) }
tt_tensor tt_gather(tt_tensor t, int64_t d, tt_tensor i) { TRY_HANDLE(at::gather(T(t), d, T(i))) }
tt_tensor tt_scatter(tt_tensor t, int64_t d, tt_tensor i, tt_tensor s) { TRY_HANDLE(at::scatter(T(t), d, T(i), T(s))) }
tt_tensor tt_masked_fill(tt_tensor t, tt_tensor m, double v) { TRY_HANDLE(at::masked_fill(T(t), T(m), v)) }
static std::vector<at::Tensor> list(const tt_tensor *ts, int n) {
  std::vector<at::Tensor> v;
  v.reserve(n);
  for (int i = 0; i < n; i++) v.push_back(T(ts[i]));
  return v;
}
tt_tensor tt_cat(const tt_tensor *ts, int n, int64_t d) { TRY_HANDLE(at::cat(list(ts, n), d)) }
tt_tensor tt_stack(const tt_tensor *ts, int n, int64_t d) { TRY_HANDLE(at::stack(list(ts, n), d)) }
tt_tensor tt_repeat_interleave(tt_tensor t, int64_t r, int64_t d) { TRY_HANDLE(at::repeat_interleave(T(t), r, d)) }
tt_tensor tt_repeat(tt_tensor t, const int64_t *r, int n) { TRY_HANDLE(T(t).repeat(dims(r, n))) }
tt_tensor tt_flip(tt_tensor t, const int64_t *d, int n) { TRY_HANDLE(at::flip(T(t), dims(d, n))) }

// in place
int tt_copy_(tt_tensor dst, tt_tensor src) { TRY_STATUS(dst->t.copy_(T(src))) }
// Exchanges the storages of two tensors of one shape and dtype, without copying a byte, and their version
// counters with them: a counter then follows the values it counts changes of, so a copy derived from some
// values (a bf16 cast) is still recognised as current when those values come back (the reference weights
// swapped in for the KL pass every step). Caches key on the storage (data pointer) and its version.
int tt_swap_(tt_tensor a, tt_tensor b) {
  TRY_STATUS({
    if (a->t.sizes() != b->t.sizes() || a->t.dtype() != b->t.dtype())
      throw std::invalid_argument("swap_: tensors differ in shape or dtype");
    c10::AutoGradMode no_grad(false);
    at::Tensor held = at::empty({0}, a->t.options());
    {
      at::AutoDispatchBelowADInplaceOrView below; // set_ without bumping: the counters move instead
      held.set_(a->t);
      a->t.set_(b->t);
      b->t.set_(held);
    }
    c10::VariableVersion va = a->t.unsafeGetTensorImpl()->version_counter();
    c10::VariableVersion vb = b->t.unsafeGetTensorImpl()->version_counter();
    a->t.unsafeGetTensorImpl()->set_version_counter(std::move(vb));
    b->t.unsafeGetTensorImpl()->set_version_counter(std::move(va));
  })
}

// `cached` (a bf16 copy of the weight `w`, made earlier from the same values) in the graph as if it were
// `w` cast now: the forward reuses the copy, the backward casts the gradient back to w's dtype.
struct CachedCast : public torch::autograd::Function<CachedCast> {
  static at::Tensor forward(torch::autograd::AutogradContext *ctx, const at::Tensor &w, const at::Tensor &cached) {
    ctx->saved_data["dtype"] = static_cast<int64_t>(w.scalar_type());
    return cached.detach();
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grads) {
    auto dtype = static_cast<at::ScalarType>(ctx->saved_data["dtype"].toInt());
    return {grads[0].to(dtype), at::Tensor()};
  }
};
tt_tensor tt_cached_cast(tt_tensor w, tt_tensor cached) { TRY_HANDLE(CachedCast::apply(T(w), T(cached))) }

int tt_fill_(tt_tensor t, double v) { TRY_STATUS(t->t.fill_(v)) }
int tt_add_(tt_tensor t, tt_tensor o, double alpha) { TRY_STATUS(t->t.add_(T(o), alpha)) }
int tt_mul_scalar_(tt_tensor t, double s) { TRY_STATUS(t->t.mul_(s)) }

// autograd
int tt_requires_grad(tt_tensor t) { return T(t).requires_grad() ? 1 : 0; }
int tt_set_requires_grad(tt_tensor t, int f) { TRY_STATUS(t->t.set_requires_grad(f != 0)) }
int tt_backward(tt_tensor t, tt_tensor grad, int retain) {
  TRY_STATUS(T(t).backward(grad ? T(grad) : at::Tensor(), retain != 0 ? c10::optional<bool>(true) : c10::nullopt))
}
tt_tensor tt_grad(tt_tensor t) {
  try {
    const at::Tensor &g = T(t).grad();
    if (!g.defined()) { g_error.clear(); return nullptr; }
    return wrap(g);
  } catch (const std::exception &e) { g_error = e.what(); return nullptr; }
}
int tt_zero_grad(tt_tensor t) { TRY_STATUS(t->t.mutable_grad() = at::Tensor()) }
int tt_set_grad(tt_tensor t, tt_tensor g) { TRY_STATUS(t->t.mutable_grad() = T(g)) }
tt_tensor tt_detach(tt_tensor t) { TRY_HANDLE(T(t).detach()) }
int tt_is_leaf(tt_tensor t) { return T(t).is_leaf() ? 1 : 0; }

// optimisation
int tt_adamw_step(const tt_tensor *params, const tt_tensor *grads, const tt_tensor *m, const tt_tensor *v,
                  const tt_tensor *steps, int n, double lr, double b1, double b2, double wd, double eps) {
  TRY_STATUS({
    c10::AutoGradMode no_grad(false);
    auto p = list(params, n), g = list(grads, n), ea = list(m, n), eas = list(v, n), st = list(steps, n);
    // As torch.optim.AdamW does: the step count is bumped first, then the fused kernel reads
    // it for bias correction and applies decoupled weight decay.
    at::_foreach_add_(st, 1.0);
    at::_fused_adamw_(p, g, ea, eas, {}, st, lr, b1, b2, wd, eps, false, false);
    // The fused kernel writes the weights without advancing their version counters (the tensors outside
    // any autograd graph), and every copy derived from a weight (bf16 casts, merged LoRA) is keyed by
    // that counter: advance it as any in-place op would.
    for (auto &t : p) t.unsafeGetTensorImpl()->bump_version();
  })
}
int tt_clip_grad_norm(const tt_tensor *grads, int n, double max_norm, double *total) {
  TRY_STATUS({
    c10::AutoGradMode no_grad(false);
    if (n == 0) { *total = 0; return 0; }
    auto g = list(grads, n);
    auto norms = at::_foreach_norm(g, 2);
    double tn = at::norm(at::stack(norms), 2).item<double>();
    *total = tn;
    if (max_norm > 0 && std::isfinite(tn) && tn > max_norm) at::_foreach_mul_(g, max_norm / (tn + 1e-6));
  })
}

} // extern "C"


// Operator profile (libtorch's own profiler, CPU activity): `tt_profile_stop` writes one line per operator,
// sorted by self time (its time minus that of the operators it called), as "self_ms total_ms calls name".
int tt_profile_start(void) {
  TRY_STATUS({
    namespace p = torch::profiler::impl;
    p::ProfilerConfig config(p::ProfilerState::KINETO);
    std::set<p::ActivityType> cpu{p::ActivityType::CPU};
    torch::autograd::profiler::prepareProfiler(config, cpu);
    torch::autograd::profiler::enableProfiler(config, cpu);
  })
}
int tt_profile_stop(const char *path) {
  TRY_STATUS({
    auto result = torch::autograd::profiler::disableProfiler();
    struct Span { uint64_t start, end; std::string name; uint64_t thread; };
    std::vector<Span> spans;
    for (const auto &e : result->events())
      if (e.endNs() > e.startNs()) spans.push_back({e.startNs(), e.endNs(), e.name(), e.startThreadId()});
    std::sort(spans.begin(), spans.end(), [](const Span &a, const Span &b) {
      return a.thread != b.thread ? a.thread < b.thread : a.start != b.start ? a.start < b.start : a.end > b.end;
    });
    struct Row { double self = 0, total = 0; long calls = 0; };
    std::map<std::string, Row> rows;
    std::vector<size_t> stack;
    std::vector<double> childTime(spans.size(), 0);
    for (size_t i = 0; i < spans.size(); i++) {
      while (!stack.empty() && (spans[stack.back()].thread != spans[i].thread || spans[stack.back()].end <= spans[i].start))
        stack.pop_back();
      if (!stack.empty()) childTime[stack.back()] += double(spans[i].end - spans[i].start);
      stack.push_back(i);
    }
    for (size_t i = 0; i < spans.size(); i++) {
      auto &r = rows[spans[i].name];
      double d = double(spans[i].end - spans[i].start);
      r.total += d / 1e6; r.self += (d - childTime[i]) / 1e6; r.calls++;
    }
    std::vector<std::pair<std::string, Row>> sorted(rows.begin(), rows.end());
    std::sort(sorted.begin(), sorted.end(), [](auto &a, auto &b) { return a.second.self > b.second.self; });
    // Written beside the target and renamed over it: a reader never sees half a profile.
    std::string tmp = std::string(path) + ".tmp";
    {
      std::ofstream out(tmp);
      out << "self_ms total_ms calls name\n";
      for (auto &[name, r] : sorted) out << r.self << " " << r.total << " " << r.calls << " " << name << "\n";
      if (!out.flush()) throw std::runtime_error(std::string("profile: cannot write ") + tmp);
    }
    if (std::rename(tmp.c_str(), path) != 0) throw std::runtime_error(std::string("profile: cannot write ") + path);
  })
}
