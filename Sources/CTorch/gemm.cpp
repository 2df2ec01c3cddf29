// fp32 matrix products through oneDNN instead of MKL on x86 CPUs that are not Intel's.
//
// libtorch sends fp32 `mm`/`addmm`/`bmm` to MKL's sgemm. MKL chooses its code by CPU vendor and runs its AVX2
// kernels on AMD processors even where they have AVX-512: on this project's machines (AMD EPYC, 2 threads) it
// reaches 160–195 GFLOP/s at the shapes of a TTRV step, where oneDNN's AVX-512 fp32 kernels — shipped inside
// the same libtorch, and used by it for bf16 — reach 380–450 (both exact fp32 arithmetic; see the README's
// Status for the measurements). So the CPU kernels of those three operators are replaced
// here: fp32 operands go to oneDNN's matmul primitive, everything else to libtorch's own CPU kernel (called
// directly, not through the dispatcher, so there is no recursion). Autograd's backward products are the same
// operators, so training gets the faster products too.
//
// TTRV_FP32_GEMM=onednn|blas overrides the choice (default: oneDNN on a non-Intel x86 CPU with AVX-512; on
// Intel CPUs MKL already runs its AVX-512 code).
//
// Where MKL keeps the products (no AVX-512, or TTRV_FP32_GEMM=blas), its vendor check is answered here: MKL asks
// `mkl_serv_intel_cpu_true` whether to use the kernels it picks from the CPU's feature bits, and on other vendors'
// CPUs runs its generic code path (mkl_blas_def_sgemm_kernel_0_zen instead of mkl_blas_avx2_sgemm_kernel_0).
// libtorch_cpu exports that function and calls it through its PLT; the linker exports an executable's definition
// of a symbol that a linked library also defines, so in every executable linking the shim this definition is the
// one bound. On an AMD EPYC with AVX2 only (2 threads), fp32 [4096×1024]·[1024×1024] went from 86–115 to 136–139
// GFLOP/s.
// TTRV_MKL_VENDOR_CHECK=1 gives MKL its own answer (true only on Intel CPUs).

#include <ATen/ATen.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/bmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "ctorch.h"

#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>

namespace at::native {
// Exported by libtorch_cpu (ATen/native/mkldnn/Matmul.h, not among the installed headers):
// result = beta * result + alpha * (mat1 @ mat2), for 2-D or 3-D (batched) fp32/bf16/fp16 operands.
TORCH_API void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2, const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace {

std::atomic<uint64_t> oneDNNProducts{0};

bool chooseOneDNN() {
  if (const char* env = std::getenv("TTRV_FP32_GEMM"); env && *env) return std::strcmp(env, "onednn") == 0;
#if defined(__x86_64__)
  __builtin_cpu_init();
  return !__builtin_cpu_is("intel") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

const bool useOneDNN = chooseOneDNN();

// fp32 operands of any layout (mkldnn_matmul takes contiguous and transposed ones, such as the views autograd's
// backward passes, without a copy, and copies others); empty products stay with libtorch (no work, and a
// zero-length inner dimension must still give zeros).
bool routed(const at::Tensor& a, const at::Tensor& b) {
  return a.scalar_type() == at::kFloat && b.scalar_type() == at::kFloat && a.numel() > 0 && b.numel() > 0;
}

at::Tensor product(const at::Tensor& a, const at::Tensor& b, at::Tensor out, float beta) {
  at::native::mkldnn_matmul(a, b, out, beta, 1.0f);
  oneDNNProducts.fetch_add(1, std::memory_order_relaxed);
  return out;
}

at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
  if (!routed(a, b) || a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0)) return at::cpu::mm(a, b);
  return product(a, b, at::empty({a.size(0), b.size(1)}, a.options()), 0.0f);
}

at::Tensor bmm(const at::Tensor& a, const at::Tensor& b) {
  if (!routed(a, b) || a.dim() != 3 || b.dim() != 3 || a.size(0) != b.size(0) || a.size(2) != b.size(1)) {
    return at::cpu::bmm(a, b);
  }
  return product(a, b, at::empty({a.size(0), a.size(1), b.size(2)}, a.options()), 0.0f);
}

// self + a @ b, the form `linear` with a bias takes; other scalings stay with libtorch.
at::Tensor addmm(const at::Tensor& self, const at::Tensor& a, const at::Tensor& b, const at::Scalar& beta,
                 const at::Scalar& alpha) {
  bool plain = beta.equal(1) && alpha.equal(1) && self.scalar_type() == at::kFloat;
  if (!plain || !routed(a, b) || a.dim() != 2 || b.dim() != 2 || a.size(1) != b.size(0)) {
    return at::cpu::addmm(self, a, b, beta, alpha);
  }
  at::Tensor out = at::empty({a.size(0), b.size(1)}, a.options());
  out.copy_(self);  // broadcast (a bias row); oneDNN then adds the product into it
  return product(a, b, out, 1.0f);
}

// The dispatcher warns when a kernel is replaced; that is the intent here, so the warning is not shown.
struct Quiet final : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};

struct Install {
  std::unique_ptr<torch::Library> library;
  Install() {
    if (!useOneDNN) return;
    Quiet quiet;
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    library = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", c10::DispatchKey::CPU, __FILE__,
                                               __LINE__);
    library->impl("mm", TORCH_FN(mm));
    library->impl("bmm", TORCH_FN(bmm));
    library->impl("addmm", TORCH_FN(addmm));
  }
} install;

}  // namespace

// The environment variable is read on the first call only.
extern "C" __attribute__((visibility("default"), used)) int mkl_serv_intel_cpu_true(void) {
  static const int answer = [] {
    const char* env = std::getenv("TTRV_MKL_VENDOR_CHECK");
    if (env == nullptr || std::strcmp(env, "1") != 0) return 1;
#if defined(__x86_64__)
    __builtin_cpu_init();
    return __builtin_cpu_is("intel") ? 1 : 0;
#else
    return 0;
#endif
  }();
  return answer;
}

extern "C" int tt_mkl_vendor_check_bound(void) {
  void* bound = dlsym(RTLD_DEFAULT, "mkl_serv_intel_cpu_true");
  return bound == reinterpret_cast<void*>(&mkl_serv_intel_cpu_true) ? 1 : 0;
}

extern "C" int tt_fp32_gemm_onednn(void) { return useOneDNN ? 1 : 0; }
extern "C" uint64_t tt_onednn_products(void) { return oneDNNProducts.load(std::memory_order_relaxed); }
