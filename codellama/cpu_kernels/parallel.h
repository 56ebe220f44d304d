// Work shared out as it is done: the threads take chunks of [0, n) from one counter, each as it finishes its
// last. A static split (each thread half the rows) makes a decode step wait for the slower thread, and on a
// machine shared with other processes one core is often slower: batch-1 tok/s moved by 25% between runs.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <type_traits>

namespace codellama {

// f(begin, end) over [0, n) in chunks of `chunk` items, on at most at::get_num_threads() threads.
template <typename F>
inline void parallel_chunks(int64_t n, int64_t chunk, const F& f) {
  const int64_t chunks = (n + chunk - 1) / chunk;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), chunks);
  if (threads <= 1 || at::in_parallel_region()) {
    f(0, n);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t c = next.fetch_add(1); c < chunks; c = next.fetch_add(1)) f(c * chunk, std::min(n, (c + 1) * chunk));
  });
}

// f(std::integral_constant<int, R>{}, m) for m = 0, 4, 8, ... < M, R = min(4, M - m): the kernels compute up to
// four activation rows together, their count a compile-time constant (their accumulators live in registers).
template <typename F>
inline void in_fours(int64_t M, const F& f) {
  for (int64_t m = 0; m < M; m += 4) {
    switch (std::min<int64_t>(4, M - m)) {
      case 1: f(std::integral_constant<int, 1>{}, m); break;
      case 2: f(std::integral_constant<int, 2>{}, m); break;
      case 3: f(std::integral_constant<int, 3>{}, m); break;
      default: f(std::integral_constant<int, 4>{}, m); break;
    }
  }
}

}  // namespace codellama
