// extern "C" shim over PyTorch's c10d (the engine of torch.distributed): TCPStore rendezvous and
// the Gloo process group (NCCL when libtorch has CUDA). Same conventions as shim.cpp: no C++
// exception crosses the boundary, failures leave a message for tt_last_error().
//
// The torch wheel ships the c10d headers but not the gloo headers ProcessGroupGloo.hpp includes.
// gloo-stubs/ declares just the gloo names that header mentions (we chose these stubs over Debian's
// libgloo-dev: no extra system package, and no second, older gloo whose layouts could disagree with
// the one compiled into libtorch_cpu.so). Our code never creates or touches a gloo object, and all
// c10d layouts come from torch's own headers, so a mismatch fails to compile instead of misbehaving.
#include "ctorch.h"
#include "shim_internal.h"

#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#define USE_C10D_GLOO
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#ifdef TTRV_WITH_NCCL // defined by Package.swift for a CUDA libtorch with CUDA and NCCL headers (not built here)
#define USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

struct tt_store_s { c10::intrusive_ptr<c10d::Store> store; int port; };
struct tt_group_s {
  c10::intrusive_ptr<c10d::Backend> backend;
  int rank, size;
  std::chrono::milliseconds timeout;
};

static std::chrono::milliseconds millis(double seconds) {
  return std::chrono::milliseconds((int64_t)(seconds * 1000));
}

static void set_error(const std::string &what, const std::exception &e) {
  auto *ce = dynamic_cast<const c10::Error *>(&e);
  g_error = what + ": " + (ce ? ce->what_without_backtrace() : e.what());
}

#define DIST_TRY(what, failed, ...)                              \
  try { __VA_ARGS__ }                                            \
  catch (const std::exception &e) { set_error(what, e); }        \
  catch (...) { g_error = std::string(what) + ": unknown C++ exception"; } \
  return failed;

// Connecting runs on its own thread so that we can give up at our deadline: the c10d client
// keeps retrying a refused connection. On timeout the thread is left behind (detached); the
// caller is expected to report the error and exit.
static c10::intrusive_ptr<c10d::Store> connect_with_deadline(const std::string &host,
                                                             const c10d::TCPStoreOptions &o, double timeout_s) {
  struct State {
    std::mutex m;
    std::condition_variable cv;
    bool done = false;
    c10::intrusive_ptr<c10d::Store> store;
    std::string error;
  };
  auto st = std::make_shared<State>();
  std::thread([st, host, o] {
    c10::intrusive_ptr<c10d::Store> s;
    std::string err;
    try { s = c10::make_intrusive<c10d::TCPStore>(host, o); }
    catch (const c10::Error &e) { err = e.what_without_backtrace(); }
    catch (const std::exception &e) { err = e.what(); }
    catch (...) { err = "unknown C++ exception"; }
    std::lock_guard<std::mutex> lock(st->m);
    st->store = std::move(s);
    st->error = std::move(err);
    st->done = true;
    st->cv.notify_all();
  }).detach();
  std::unique_lock<std::mutex> lock(st->m);
  if (!st->cv.wait_for(lock, millis(timeout_s), [&] { return st->done; }))
    throw std::runtime_error("no store answered at " + host + ":" + std::to_string(o.port) + " within " +
                             std::to_string((int)timeout_s) + " s (is the master node's launcher or rank 0 running?)");
  if (!st->error.empty()) throw std::runtime_error(st->error);
  return st->store;
}

// One contiguous buffer holding all tensors (the tensor itself when there is one contiguous tensor).
static at::Tensor flatten(const tt_tensor *ts, int n) {
  if (n < 1) throw std::invalid_argument("no tensors");
  const at::Tensor &first = ts[0]->t;
  std::vector<at::Tensor> flat;
  for (int i = 0; i < n; i++) {
    const at::Tensor &t = ts[i]->t;
    if (t.scalar_type() != first.scalar_type() || t.device() != first.device())
      throw std::invalid_argument("tensor " + std::to_string(i) + " is " + std::string(c10::toString(t.scalar_type())) +
                                  " on " + t.device().str() + ", tensor 0 is " +
                                  std::string(c10::toString(first.scalar_type())) + " on " + first.device().str());
    flat.push_back(t.reshape({-1}));
  }
  if (n == 1 && first.is_contiguous()) return first;
  return at::cat(flat);
}

static void unflatten(const at::Tensor &buffer, const tt_tensor *ts, int n) {
  if (n == 1 && buffer.is_same(ts[0]->t)) {
    // The backend wrote the memory directly: count it as an in-place change, as copy_ would,
    // so that caches keyed on the version (merged LoRA weights) see it.
    torch::autograd::impl::bump_version(buffer);
    return;
  }
  int64_t offset = 0;
  for (int i = 0; i < n; i++) {
    at::Tensor &t = ts[i]->t;
    t.copy_(buffer.narrow(0, offset, t.numel()).view(t.sizes()));
    offset += t.numel();
  }
}

static std::string where(const char *op, tt_group g) {
  return std::string(op) + " (rank " + std::to_string(g->rank) + " of " + std::to_string(g->size) + ")";
}

extern "C" {

tt_store tt_store_new(const char *host, int port, int is_server, double timeout_s) {
  DIST_TRY("store", nullptr, {
    c10d::TCPStoreOptions o;
    o.port = (uint16_t)port;
    o.isServer = is_server != 0;
    o.waitWorkers = false;
    o.timeout = millis(timeout_s);
    if (o.isServer) {
      auto s = c10::make_intrusive<c10d::TCPStore>(std::string(host), o);
      int p = s->getPort();
      return new tt_store_s{s, p};
    }
    return new tt_store_s{connect_with_deadline(host, o, timeout_s), port};
  })
}
int tt_store_port(tt_store s) { return s->port; }
void tt_store_free(tt_store s) { delete s; }

// c10d's flight recorder (a process-wide log of collectives, for debugging hangs) adds each process group's status
// to a map before taking its lock: two groups in one process that start collectives together corrupt the map
// (a crash in 1 of 8 runs of the two-ranks-as-threads tests, traced with gdb to
// FlightRecorder::recordWithResetEnabled). ttrv never dumps that log, so it is off unless the user sets its size.
static void disable_flight_recorder_unless_asked() {
  static std::once_flag once;
  std::call_once(once, [] {
    if (!getenv("TORCH_FR_BUFFER_SIZE") && !getenv("TORCH_NCCL_TRACE_BUFFER_SIZE"))
      setenv("TORCH_FR_BUFFER_SIZE", "0", 0);
  });
}

tt_group tt_group_gloo_new(tt_store s, const char *prefix, int rank, int size, const char *interface,
                           const char *address, double timeout_s) {
  disable_flight_recorder_unless_asked();
  DIST_TRY("gloo process group", nullptr, {
    auto o = c10d::ProcessGroupGloo::Options::create(millis(timeout_s));
    o->devices.push_back(interface ? c10d::ProcessGroupGloo::createDeviceForInterface(interface)
                                   : c10d::ProcessGroupGloo::createDeviceForHostname(address));
    auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, s->store);
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, o);
    return new tt_group_s{pg, rank, size, millis(timeout_s)};
  })
}

tt_group tt_group_nccl_new(tt_store s, const char *prefix, int rank, int size, double timeout_s) {
#ifdef TTRV_WITH_NCCL
  DIST_TRY("nccl process group", nullptr, {
    auto o = c10d::ProcessGroupNCCL::Options::create();
    o->timeout = millis(timeout_s);
    auto store = c10::make_intrusive<c10d::PrefixStore>(prefix, s->store);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, o);
    return new tt_group_s{pg, rank, size, millis(timeout_s)};
  })
#else
  g_error = "nccl process group: not built (needs a CUDA libtorch, LIBTORCH=... make setup, and the CUDA and NCCL "
            "headers, CUDA_HOME / NCCL_HOME, when building)";
  return nullptr;
#endif
}

void tt_group_free(tt_group g) { delete g; }

int tt_group_allreduce(tt_group g, const tt_tensor *ts, int n, int op) {
  DIST_TRY(where("allreduce", g), 1, {
    at::NoGradGuard no_grad;
    at::Tensor buffer = flatten(ts, n);
    if (op == TT_REDUCE_AVG && !at::isFloatingType(buffer.scalar_type()))
      throw std::invalid_argument("an average needs floating-point tensors");
    c10d::AllreduceOptions o;
    o.timeout = g->timeout;
    // Gloo has no AVG: sum, then divide.
    o.reduceOp = c10d::ReduceOp(op == TT_REDUCE_MAX   ? c10d::ReduceOp::MAX
                                : op == TT_REDUCE_MIN ? c10d::ReduceOp::MIN
                                                      : c10d::ReduceOp::SUM);
    std::vector<at::Tensor> v{buffer};
    g->backend->allreduce(v, o)->wait(g->timeout);
    if (op == TT_REDUCE_AVG) buffer.div_(g->size);
    unflatten(buffer, ts, n);
    return 0;
  })
}

int tt_group_broadcast(tt_group g, const tt_tensor *ts, int n, int root) {
  DIST_TRY(where("broadcast", g), 1, {
    at::NoGradGuard no_grad;
    at::Tensor buffer = flatten(ts, n);
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = g->timeout;
    std::vector<at::Tensor> v{buffer};
    g->backend->broadcast(v, o)->wait(g->timeout);
    unflatten(buffer, ts, n);
    return 0;
  })
}

tt_tensor tt_group_allgather(tt_group g, tt_tensor t) {
  DIST_TRY(where("allgather", g), nullptr, {
    at::NoGradGuard no_grad;
    std::vector<at::Tensor> in{t->t.contiguous()};
    std::vector<std::vector<at::Tensor>> out(1);
    for (int r = 0; r < g->size; r++) out[0].push_back(at::empty_like(in[0]));
    c10d::AllgatherOptions o;
    o.timeout = g->timeout;
    g->backend->allgather(out, in, o)->wait(g->timeout);
    return new tt_tensor_s{at::stack(out[0])};
  })
}

int tt_group_barrier(tt_group g) {
  DIST_TRY(where("barrier", g), 1, {
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    g->backend->barrier(o)->wait(g->timeout);
    return 0;
  })
}

int tt_local_address_towards(const char *host, char *out, size_t cap) {
  addrinfo hints{}, *res = nullptr;
  hints.ai_socktype = SOCK_DGRAM;
  int rc = getaddrinfo(host, "9", &hints, &res);
  if (rc != 0) {
    g_error = std::string("cannot resolve ") + host + ": " + gai_strerror(rc);
    return 1;
  }
  // connect() on a UDP socket only picks the route and source address; nothing is sent.
  int fd = socket(res->ai_family, SOCK_DGRAM, 0);
  sockaddr_storage local{};
  socklen_t len = sizeof local;
  bool ok = fd >= 0 && connect(fd, res->ai_addr, res->ai_addrlen) == 0 &&
            getsockname(fd, (sockaddr *)&local, &len) == 0;
  if (fd >= 0) close(fd);
  freeaddrinfo(res);
  const void *a = local.ss_family == AF_INET6 ? (const void *)&((sockaddr_in6 *)&local)->sin6_addr
                                              : (const void *)&((sockaddr_in *)&local)->sin_addr;
  if (!ok || !inet_ntop(local.ss_family, a, out, (socklen_t)cap)) {
    g_error = std::string("no route to ") + host + ": " + strerror(errno);
    return 1;
  }
  return 0;
}

} // extern "C"
