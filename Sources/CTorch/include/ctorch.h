// The only C++ boundary of ttrv: a plain C API over libtorch (ATen + autograd).
// Conventions:
//  - tensors are opaque heap handles; every handle returned must be released with tt_free.
//  - a function returning a handle returns NULL on failure; one returning int returns
//    nonzero on failure. The message is then available from tt_last_error() (per thread).
//  - no C++ exception ever crosses this boundary.
#ifndef CTORCH_H
#define CTORCH_H
#include <stdint.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct tt_tensor_s *tt_tensor;
typedef struct tt_generator_s *tt_generator;

// dtype codes (mirrored by Swift's DType)
enum { TT_F32 = 0, TT_F64 = 1, TT_F16 = 2, TT_BF16 = 3, TT_I64 = 4, TT_I32 = 5, TT_BOOL = 6, TT_U8 = 7, TT_I8 = 8, TT_I16 = 9 };
// device codes
enum { TT_CPU = 0, TT_CUDA = 1 };

const char *tt_last_error(void);
void tt_free(tt_tensor t);

// runtime
void tt_set_num_threads(int n);
int tt_get_num_threads(void);
void tt_manual_seed(uint64_t seed);
int tt_cuda_is_available(void);
// bytes of freed large CPU blocks the allocator keeps for reuse (allocator.cpp)
size_t tt_cpu_cached_bytes(void);
// 1 when fp32 matrix products go to oneDNN instead of MKL (gemm.cpp); products oneDNN has computed so far
int tt_fp32_gemm_onednn(void);
uint64_t tt_onednn_products(void);
// 1 when libtorch's MKL asks this shim's mkl_serv_intel_cpu_true (see gemm.cpp) for its vendor check
int tt_mkl_vendor_check_bound(void);
tt_generator tt_generator_new(uint64_t seed);
void tt_generator_free(tt_generator g);
int tt_set_grad_enabled(int enabled); // returns the previous state
int tt_is_grad_enabled(void);

// creation
tt_tensor tt_from_data(const void *data, const int64_t *shape, int ndim, int dtype);
tt_tensor tt_empty(const int64_t *shape, int ndim, int dtype, int device, int device_index);
tt_tensor tt_full(const int64_t *shape, int ndim, double value, int dtype, int device, int device_index);
tt_tensor tt_arange(double start, double end, double step, int dtype, int device, int device_index);
tt_tensor tt_randn(const int64_t *shape, int ndim, int dtype, tt_generator g);
tt_tensor tt_rand(const int64_t *shape, int ndim, int dtype, tt_generator g);
tt_tensor tt_scalar_tensor(double value, int dtype);

// properties
int tt_ndim(tt_tensor t);
void tt_shape(tt_tensor t, int64_t *out);
void tt_strides(tt_tensor t, int64_t *out);
int tt_dtype(tt_tensor t);
int tt_device(tt_tensor t, int *index);
int64_t tt_numel(tt_tensor t);
// in-place modification counter (bumped by every in-place op, e.g. an optimiser step)
int64_t tt_version(tt_tensor t);
int tt_copy_out(tt_tensor t, void *dst, size_t nbytes); // dst receives contiguous CPU data
int tt_item(tt_tensor t, double *out);
int tt_is_contiguous(tt_tensor t);
void *tt_data_ptr(tt_tensor t); // the first element; reading through it: CPU, contiguous tensors only (checked by the caller)

// elementwise
enum {
  TT_NEG, TT_EXP, TT_LOG, TT_SQRT, TT_RSQRT, TT_ABS, TT_SIN, TT_COS, TT_TANH, TT_SIGMOID,
  TT_RELU, TT_RELU6, TT_SILU, TT_GELU, TT_GELU_TANH, TT_FLOOR, TT_CEIL, TT_ROUND, TT_SIGN,
  TT_RECIPROCAL, TT_SQUARE, TT_LOGICAL_NOT, TT_ISFINITE, TT_ISNAN, TT_LOG1P, TT_EXPM1, TT_ERF
};
tt_tensor tt_unary(tt_tensor t, int op);
enum {
  TT_ADD, TT_SUB, TT_MUL, TT_DIV, TT_POW, TT_MAXIMUM, TT_MINIMUM, TT_EQ, TT_NE, TT_LT, TT_LE,
  TT_GT, TT_GE, TT_AND, TT_OR, TT_REMAINDER
};
tt_tensor tt_binary(tt_tensor a, tt_tensor b, int op);
tt_tensor tt_binary_scalar(tt_tensor a, double s, int op);  // a op s
tt_tensor tt_rbinary_scalar(double s, tt_tensor a, int op); // s op a
tt_tensor tt_where(tt_tensor cond, tt_tensor a, tt_tensor b);
tt_tensor tt_clamp(tt_tensor t, double lo, double hi, int has_lo, int has_hi);
tt_tensor tt_to(tt_tensor t, int dtype, int device, int device_index);

// reductions over dims (ndims == 0 means all dims)
enum { TT_SUM, TT_MEAN, TT_AMAX, TT_AMIN, TT_LOGSUMEXP, TT_PROD, TT_VAR, TT_STD, TT_NORM };
tt_tensor tt_reduce(tt_tensor t, int op, const int64_t *dims, int ndims, int keepdim, int correction);
tt_tensor tt_argmax(tt_tensor t, int64_t dim, int keepdim);
tt_tensor tt_argmin(tt_tensor t, int64_t dim, int keepdim);
int tt_max_dim(tt_tensor t, int64_t dim, int keepdim, tt_tensor *values, tt_tensor *indices);

// linear algebra / nn
tt_tensor tt_matmul(tt_tensor a, tt_tensor b);
tt_tensor tt_bmm(tt_tensor a, tt_tensor b);
tt_tensor tt_linear(tt_tensor x, tt_tensor w, tt_tensor b /* nullable */);
tt_tensor tt_embedding(tt_tensor weight, tt_tensor indices);
tt_tensor tt_softmax(tt_tensor t, int64_t dim);
tt_tensor tt_log_softmax(tt_tensor t, int64_t dim);
tt_tensor tt_sdpa(tt_tensor q, tt_tensor k, tt_tensor v, tt_tensor mask /* nullable */, int is_causal,
                  double scale /* <= 0: default */, int enable_gqa);
tt_tensor tt_conv2d(tt_tensor x, tt_tensor w, tt_tensor b, const int64_t *stride, const int64_t *padding,
                    const int64_t *dilation, int64_t groups);
tt_tensor tt_batch_norm(tt_tensor x, tt_tensor w, tt_tensor b, tt_tensor mean, tt_tensor var, double eps);
tt_tensor tt_layer_norm(tt_tensor x, const int64_t *shape, int ndim, tt_tensor w, tt_tensor b, double eps);
tt_tensor tt_rms_norm(tt_tensor x, const int64_t *shape, int ndim, tt_tensor w, double eps);
tt_tensor tt_cross_entropy(tt_tensor logits, tt_tensor target, int64_t ignore_index, int reduction /* 0 none 1 mean 2 sum */);
tt_tensor tt_nll_loss(tt_tensor logp, tt_tensor target, int64_t ignore_index, int reduction);
tt_tensor tt_multinomial(tt_tensor probs, int64_t n, int replacement, tt_generator g);
int tt_topk(tt_tensor t, int64_t k, int64_t dim, int largest, tt_tensor *values, tt_tensor *indices);
int tt_sort(tt_tensor t, int64_t dim, int descending, tt_tensor *values, tt_tensor *indices);
tt_tensor tt_cumsum(tt_tensor t, int64_t dim);
tt_tensor tt_pad(tt_tensor t, const int64_t *pad, int npad, double value);
tt_tensor tt_tril(tt_tensor t, int64_t diagonal);
tt_tensor tt_triu(tt_tensor t, int64_t diagonal);

// shape and indexing
tt_tensor tt_reshape(tt_tensor t, const int64_t *shape, int ndim);
tt_tensor tt_view(tt_tensor t, const int64_t *shape, int ndim);
tt_tensor tt_permute(tt_tensor t, const int64_t *dims, int ndim);
tt_tensor tt_transpose(tt_tensor t, int64_t d0, int64_t d1);
tt_tensor tt_contiguous(tt_tensor t);
tt_tensor tt_expand(tt_tensor t, const int64_t *shape, int ndim);
tt_tensor tt_squeeze(tt_tensor t, int64_t dim);
tt_tensor tt_unsqueeze(tt_tensor t, int64_t dim);
tt_tensor tt_narrow(tt_tensor t, int64_t dim, int64_t start, int64_t length);
tt_tensor tt_slice(tt_tensor t, int64_t dim, int64_t start, int64_t end, int64_t step);
tt_tensor tt_select(tt_tensor t, int64_t dim, int64_t index);
tt_tensor tt_index_select(tt_tensor t, int64_t dim, tt_tensor index);
tt_tensor tt_gather(tt_tensor t, int64_t dim, tt_tensor index);
tt_tensor tt_scatter(tt_tensor t, int64_t dim, tt_tensor index, tt_tensor src);
tt_tensor tt_masked_fill(tt_tensor t, tt_tensor mask, double value);
tt_tensor tt_cat(const tt_tensor *ts, int n, int64_t dim);
tt_tensor tt_stack(const tt_tensor *ts, int n, int64_t dim);
tt_tensor tt_repeat_interleave(tt_tensor t, int64_t repeats, int64_t dim);
tt_tensor tt_repeat(tt_tensor t, const int64_t *repeats, int ndim);
tt_tensor tt_flip(tt_tensor t, const int64_t *dims, int ndim);

// in place (no autograd history expected; used by caches and optimisers)
int tt_copy_(tt_tensor dst, tt_tensor src);
int tt_swap_(tt_tensor a, tt_tensor b); // exchanges storages and version counters (same shape and dtype)
// `cached` (a copy of w in another dtype) in the graph as w cast now: backward casts the gradient back
tt_tensor tt_cached_cast(tt_tensor w, tt_tensor cached);
int tt_fill_(tt_tensor t, double value);
int tt_add_(tt_tensor t, tt_tensor other, double alpha);
int tt_mul_scalar_(tt_tensor t, double s);

// autograd
int tt_requires_grad(tt_tensor t);
int tt_set_requires_grad(tt_tensor t, int flag);
int tt_backward(tt_tensor t, tt_tensor grad /* nullable */, int retain_graph);
tt_tensor tt_grad(tt_tensor t); // NULL with empty error when there is no gradient
int tt_zero_grad(tt_tensor t);  // drops the gradient (set to undefined)
int tt_set_grad(tt_tensor t, tt_tensor g);  // sets the gradient (same shape and dtype)
tt_tensor tt_detach(tt_tensor t);
int tt_is_leaf(tt_tensor t);

// optimisation (under no-grad). steps: one float32 scalar tensor per parameter.
int tt_adamw_step(const tt_tensor *params, const tt_tensor *grads, const tt_tensor *exp_avg,
                  const tt_tensor *exp_avg_sq, const tt_tensor *steps, int n, double lr, double beta1,
                  double beta2, double weight_decay, double eps);
// total L2 norm of the gradients; scales them in place by max_norm/(norm+1e-6) when the norm
// exceeds max_norm and is finite (max_norm <= 0: never scale).
int tt_clip_grad_norm(const tt_tensor *grads, int n, double max_norm, double *total_norm);

// distributed (c10d; implemented in distributed.cpp). Timeouts are in seconds; every wait has one.
typedef struct tt_store_s *tt_store;
typedef struct tt_group_s *tt_group;
// A TCPStore. is_server: host it on `port` (0: any free port) on all interfaces; else connect to
// host:port, failing after timeout_s (c10d's client alone keeps retrying for a master that never comes).
tt_store tt_store_new(const char *host, int port, int is_server, double timeout_s);
int tt_store_port(tt_store s);
void tt_store_free(tt_store s);
// A Gloo process group over the store, its keys under `prefix` (a store that outlives one attempt,
// like torchrun's, must not hand out a previous attempt's addresses). Its sockets bind to `interface`
// when non-NULL, else to `address` (a local IP address or host name). Every collective fails after timeout_s.
tt_group tt_group_gloo_new(tt_store s, const char *prefix, int rank, int size, const char *interface,
                           const char *address, double timeout_s);
// A NCCL process group (CUDA tensors); NULL with an error when libtorch was built without CUDA.
tt_group tt_group_nccl_new(tt_store s, const char *prefix, int rank, int size, double timeout_s);
void tt_group_free(tt_group g);
enum { TT_REDUCE_SUM = 0, TT_REDUCE_AVG = 1, TT_REDUCE_MAX = 2, TT_REDUCE_MIN = 3 };
// In place on all n tensors (same dtype and device), flattened into one buffer for one collective.
int tt_group_allreduce(tt_group g, const tt_tensor *ts, int n, int op);
int tt_group_broadcast(tt_group g, const tt_tensor *ts, int n, int root);
// Every rank's `t` (same shape on all ranks) stacked along a new first dimension.
tt_tensor tt_group_allgather(tt_group g, tt_tensor t);
int tt_group_barrier(tt_group g);
// The local IP address that packets to `host` leave from (no packet is sent), written to out.
int tt_local_address_towards(const char *host, char *out, size_t cap);


// operator profile: start, then stop writing "self_ms total_ms calls name" lines to path
int tt_profile_start(void);
int tt_profile_stop(const char *path);
#ifdef __cplusplus
}
#endif
#endif
