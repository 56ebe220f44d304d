// The extension's operators are registered the same way: a schema, and its kernel for CPU tensors only (a
// tensor elsewhere finds no kernel, and torch says so, rather than having its device memory read as host memory).
#pragma once

#include <torch/library.h>

#include <string>

namespace codellama {

// m.def(schema) and `kernel` as its CPU implementation, under the schema's name (the text before "(").
template <typename F>
inline void cpu_op(torch::Library& m, const char* schema, F* kernel) {
  const std::string name = std::string(schema).substr(0, std::string(schema).find('('));
  m.def(schema);
  m.impl(name.c_str(), c10::DispatchKey::CPU, kernel);
}

}  // namespace codellama
