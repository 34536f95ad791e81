// What the emulator's host check programs (tests/emu/sm90_*_check.cpp) share: counting failed
// cases, running one block in the emulator, and the exit status.
#pragma once

#include <cstdio>
#include <functional>
#include <stdexcept>
#include <string>

#include "emu/runtime.h"

namespace kvk {
namespace emu_check {

inline int& failures() {
  static int count = 0;
  return count;
}

// Records a failed case (the first dozen printed: the rest are usually the same mistake).
inline void check(bool ok, const std::string& what) {
  if (ok) return;
  if (failures()++ < 12) printf("FAIL %s\n", what.c_str());
}

// Runs one block of `threads` threads; returns "" or the emulator's error message.
inline std::string run(const char* name, int threads, size_t smem, const std::function<void()>& body) {
  try {
    emu::run_grid(name, dim3(1), dim3(threads), smem, body);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return "";
}

// main's return: 0 with `success` printed when every case passed, 1 otherwise.
inline int finish(const char* success) {
  if (failures()) {
    printf("%d failures\n", failures());
    return 1;
  }
  printf("%s\n", success);
  return 0;
}

}  // namespace emu_check
}  // namespace kvk
