// Definitions shared by the shim's translation units (shim.cpp, distributed.cpp); not part of the C API.
#pragma once
#include <ATen/ATen.h>
#include <string>

struct tt_tensor_s { at::Tensor t; };

// The message tt_last_error() returns (per thread).
extern thread_local std::string g_error;
