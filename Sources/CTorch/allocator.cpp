// libtorch's CPU allocator with a cache of large blocks.
//
// glibc serves blocks above 32 MiB (its largest mmap threshold) with a fresh mmap and unmaps them on free,
// so every large tensor of a training step (the tied embedding's dense gradient, 113 MB for SmolLM2; the
// logits; bf16 copies of gradients) costs a page fault per 4 KiB page each time it is allocated: 97 ms per
// embedding backward, most of it in faults, in the profile of a bf16 TTRV step. Steps repeat the same
// shapes, so freed large blocks are kept and handed out again, as PyTorch's CUDA allocator does on GPUs.
// Small blocks go straight to posix_memalign/free as in libtorch's default allocator.
//
// Blocks of 2 MiB and more start on a 2 MiB boundary and are marked for transparent huge pages (Linux's
// default "madvise" mode makes them opt-in): the first touch of a block then faults once per 2 MiB instead
// of once per 4 KiB page. Faults cost ≈ 30 µs each on the virtual machines we measure on, so loading the
// default VLM and evaluating 64 images took 404k faults and 2.0–11 s of system time before, 257k faults and
// 0.7–2.0 s after (glibc's own huge-page tunable, applied to every malloc, was slower still: 6.8–7.5 s).

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include "ctorch.h"

#include <cstdlib>
#include <list>
#include <map>
#include <mutex>
#include <new>
#include <string>

#include <malloc.h>
#include <sys/mman.h>

namespace {

constexpr size_t kAlignment = 64;         // libtorch's CPU alignment (AVX-512 loads)
constexpr size_t kHeader = kAlignment;    // keeps the data aligned; holds the block's capacity
constexpr size_t kLarge = size_t(1) << 20;  // blocks from 1 MiB on are cached
constexpr size_t kGranule = size_t(64) << 10;
constexpr size_t kHuge = size_t(2) << 20;  // x86-64's transparent huge page

// How many bytes of free blocks to keep: TTRV_CPU_CACHE_MIB, else 2 GiB. 0 turns the cache off.
size_t cacheLimit() {
  constexpr size_t kDefault = size_t(2) << 30;
  const char* env = std::getenv("TTRV_CPU_CACHE_MIB");
  if (!env || !*env) return kDefault;
  char* end = nullptr;
  unsigned long long mib = std::strtoull(env, &end, 10);
  return *end == 0 ? size_t(mib) << 20 : kDefault;
}

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    if (n == 0) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};
    void* data = n >= kLarge ? takeLarge(n) : fresh(n, n);
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  static size_t cachedBytes() { std::lock_guard<std::mutex> g(lock()); return cache().bytes; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  struct Free {
    std::multimap<size_t, std::list<void*>::iterator> bySize;  // capacity → entry in `order`
    std::list<void*> order;                                     // oldest first, for eviction
    size_t bytes = 0;
  };
  static Free& cache() { static Free f; return f; }
  static std::mutex& lock() { static std::mutex m; return m; }
  static size_t limit() { static size_t l = cacheLimit(); return l; }

  static size_t& capacity(void* data) { return *reinterpret_cast<size_t*>(static_cast<char*>(data) - kHeader); }

  static void* fresh(size_t n, size_t cap) {
    void* base = nullptr;
    size_t align = cap >= kHuge ? kHuge : kAlignment;
    if (posix_memalign(&base, align, cap + kHeader) != 0) {
      dropCache();  // the cache may be what is holding the memory
      if (posix_memalign(&base, align, cap + kHeader) != 0) {
        throw c10::OutOfMemoryError(c10::SourceLocation{__func__, __FILE__, __LINE__},
                                    "CPU allocation of " + std::to_string(n) + " bytes failed");
      }
    }
    if (align == kHuge) madvise(base, cap, MADV_HUGEPAGE);  // advice only: failure changes nothing
    void* data = static_cast<char*>(base) + kHeader;
    capacity(data) = cap;
    return data;
  }

  // The smallest cached block at least `n` bytes long and at most an eighth longer (of equal ones the most
  // recently freed), else a new one.
  static void* takeLarge(size_t n) {
    {
      std::lock_guard<std::mutex> g(lock());
      Free& f = cache();
      auto it = f.bySize.lower_bound(n);
      if (it != f.bySize.end() && it->first <= n + n / 8) {
        void* data = *it->second;
        f.bytes -= it->first;
        f.order.erase(it->second);
        f.bySize.erase(it);
        return data;
      }
    }
    return fresh(n, (n + kGranule - 1) / kGranule * kGranule);
  }

  static void release(void* data) {
    if (!data) return;
    size_t cap = capacity(data);
    if (cap >= kLarge && cap <= limit()) {
      std::lock_guard<std::mutex> g(lock());
      Free& f = cache();
      while (f.bytes + cap > limit()) evictOldest(f);
      f.order.push_back(data);
      // First among blocks of its size, so the next request of that size gets the most recently freed one
      // (still in the CPU's caches and TLB), and a freed block comes back to a request of its own size.
      f.bySize.emplace_hint(f.bySize.lower_bound(cap), cap, std::prev(f.order.end()));
      f.bytes += cap;
      return;
    }
    std::free(static_cast<char*>(data) - kHeader);
  }

  static void evictOldest(Free& f) {
    void* data = f.order.front();
    size_t cap = capacity(data);
    auto range = f.bySize.equal_range(cap);
    for (auto it = range.first; it != range.second; ++it) {
      if (*it->second == data) { f.bySize.erase(it); break; }
    }
    f.order.pop_front();
    f.bytes -= cap;
    std::free(static_cast<char*>(data) - kHeader);
  }

  static void dropCache() {
    std::lock_guard<std::mutex> g(lock());
    Free& f = cache();
    while (!f.order.empty()) evictOldest(f);
  }
};

// Installed when the program loads (libc10's default allocator registers itself earlier, at priority 0):
// every CPU tensor libtorch allocates from then on comes from here. Tensors allocated before keep their own
// deleters, so switching is safe at any point.
//
// Blocks under 1 MiB stay with glibc, but not under its default policy, which hands the top of the heap back
// to the kernel whenever more than twice its (moving) mmap threshold is free there and serves blocks above that
// threshold with a fresh mmap: both make the next tensor of that size fault its pages in again, and a
// forward pass allocates thousands of 0.1–1 MB activations. A fixed threshold and no trimming keep that
// memory with the process (the peak is unchanged: it is reused). Measured (`ttrv eval --model default --data
// fashion-mnist:test --limit 128`, three alternating rounds): 12.1 / 15.0 / 13.3 images/s before, 17.5 /
// 16.6 / 14.7 after, system time 1.7–6.5 s before and 0.9–1.7 s after.
struct Install {
  Install() {
    mallopt(M_MMAP_THRESHOLD, 32 << 20);  // glibc's largest; fixing it also stops the threshold moving
    mallopt(M_TRIM_THRESHOLD, 1 << 30);
    static CachingCPUAllocator allocator;
    c10::SetCPUAllocator(&allocator, /*priority=*/1);
  }
} install;

}  // namespace

extern "C" size_t tt_cpu_cached_bytes(void) { return CachingCPUAllocator::cachedBytes(); }
