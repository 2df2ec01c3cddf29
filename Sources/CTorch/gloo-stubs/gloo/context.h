// Stub (see README.md): ProcessGroupGloo.hpp's inline setTimeout calls Context::setTimeout. The
// function is declared only; our code never calls it (the timeout goes in through the Options).
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
