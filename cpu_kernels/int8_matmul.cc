// y[M, N] = (x[M, K] @ W) * scales[N] with W int8, stored [K, N] ("kn") or [N, K] ("nk"), x and y float32.
//
// Batch-1 decode reads each weight once and does two flops per byte, so the kernel is a stream over the
// int8 values: each byte is loaded once, widened to float32 in registers (never written back as a float
// copy, which is what XLA:CPU's convert-then-dot does) and multiplied into float32 accumulators. The
// weights come from memory, not cache (a model's are far larger than L3), so the order of the reads is
// chosen for the hardware prefetcher: always a few sequential streams, never a walk down a column.
// GCC vector extensions carry the arithmetic (16 lanes with AVX-512, 8 with AVX2, 4 elsewhere), so
// -march=native picks the widest the machine has.
//
// Work is split into chunks, claimed from an atomic counter by the calling thread and by helpers
// scheduled on XLA's intra-op thread pool (the FFI ThreadPool). The caller waits only for chunks a
// helper has claimed, never for a helper to start, so a busy or one-thread pool cannot deadlock it; a
// helper that starts after the work is done finds no chunk and returns.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int kLanes = 16;
#elif defined(__AVX2__)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;
#endif
typedef float f32v __attribute__((vector_size(kLanes * 4)));

// kLanes int8 values widened to float32. (GCC 12 turns __builtin_convertvector from int8 into one
// scalar conversion per lane, so the x86 paths name the two instructions it takes.)
inline f32v load_i8(const int8_t* p) {
#if defined(__AVX512F__)
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#elif defined(__AVX2__)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
#else
  f32v v;
  for (int i = 0; i < kLanes; ++i) v[i] = p[i];
  return v;
#endif
}

inline f32v load_f32(const float* p) {
  f32v v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store_f32(float* p, f32v v) { std::memcpy(p, &v, sizeof v); }

inline float sum(f32v v) {
#if defined(__AVX512F__)
  return _mm512_reduce_add_ps(v);
#else
  float s = 0;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
#endif
}

// ---- W [K, N] ----

// Rows [k, k + kb) of W against MB rows of x, added into acc [MB, N] (float32, in L1 or L2) at NV *
// kLanes columns from n. The kb rows are read side by side, left to right: kb sequential streams. (A
// column tile walked down all of K jumps N bytes a row, and from memory ran at a quarter of the
// bandwidth.)
template <int MB, int NV>
inline void kn_tile(const float* x, const int8_t* w, float* acc, int64_t K, int64_t N, int64_t k, int kb, int64_t n) {
  f32v a[MB][NV];
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NV; ++j) a[m][j] = load_f32(acc + m * N + n + kLanes * j);
  const int8_t* row = w + k * N + n;
  // The next block of rows, as many bytes of it as this tile reads of this one, asked for ahead of use.
  for (int b = 0; b < kb * NV * kLanes; b += 64) __builtin_prefetch(row + kb * N - n + n * kb + b);
  for (int i = 0; i < kb; ++i, row += N) {
    f32v wv[NV];
    for (int j = 0; j < NV; ++j) wv[j] = load_i8(row + kLanes * j);
    for (int m = 0; m < MB; ++m) {
      const float xm = x[m * K + k + i];
      for (int j = 0; j < NV; ++j) a[m][j] += xm * wv[j];
    }
  }
  for (int m = 0; m < MB; ++m)
    for (int j = 0; j < NV; ++j) store_f32(acc + m * N + n + kLanes * j, a[m][j]);
}

template <int MB>
void kn_block(const float* x, const int8_t* w, float* acc, int64_t K, int64_t N, int64_t k, int kb) {
  int64_t n = 0;
  for (; n + 4 * kLanes <= N; n += 4 * kLanes) kn_tile<MB, 4>(x, w, acc, K, N, k, kb, n);
  for (; n + kLanes <= N; n += kLanes) kn_tile<MB, 1>(x, w, acc, K, N, k, kb, n);
  for (; n < N; ++n) {  // the last N % kLanes columns
    for (int m = 0; m < MB; ++m) {
      float s = acc[m * N + n];
      for (int i = 0; i < kb; ++i) s += x[m * K + k + i] * w[(k + i) * N + n];
      acc[m * N + n] = s;
    }
  }
}

// acc [M, N] += x[:, k0:k1] @ W[k0:k1, :], eight rows of W at a time; each block of rows (in L1 after
// its first use) meets every four rows of x in turn.
void kn_rows(const float* x, const int8_t* w, float* acc, int64_t M, int64_t K, int64_t N, int64_t k0, int64_t k1) {
  constexpr int kBlock = 8;
  static constexpr void (*fns[])(const float*, const int8_t*, float*, int64_t, int64_t, int64_t, int) = {
      kn_block<1>, kn_block<2>, kn_block<3>, kn_block<4>};
  for (int64_t k = k0; k < k1; k += kBlock) {
    const int kb = int(std::min<int64_t>(kBlock, k1 - k));
    for (int64_t m = 0; m < M; m += 4) fns[std::min<int64_t>(4, M - m) - 1](x + m * K, w, acc + m * N, K, N, k, kb);
  }
}

// ---- W [N, K] ----

// R rows of W (R outputs) against MB rows of x: dot products along K, R contiguous rows read together.
template <int MB, int R>
void nk_rows(const float* x, const int8_t* w, const float* scales, float* y, int64_t K, int64_t N, int64_t n) {
  f32v acc[R][MB] = {};
  const int64_t kv = K - K % kLanes;
  const int8_t* next = w + (n + R) * K;  // the next R rows, prefetched R * kLanes bytes per step
  for (int64_t k = 0; k < kv; k += kLanes) {
    for (int b = 0; b < R * kLanes; b += 64) __builtin_prefetch(next + R * k + b);
    f32v xv[MB];
    for (int m = 0; m < MB; ++m) xv[m] = load_f32(x + m * K + k);
    for (int r = 0; r < R; ++r) {
      const f32v wv = load_i8(w + (n + r) * K + k);
      for (int m = 0; m < MB; ++m) acc[r][m] += wv * xv[m];
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int m = 0; m < MB; ++m) {
      float s = sum(acc[r][m]);
      for (int64_t k = kv; k < K; ++k) s += x[m * K + k] * w[(n + r) * K + k];
      y[m * N + n + r] = s * scales[n + r];
    }
  }
}

template <int MB>
void nk_block(const float* x, const int8_t* w, const float* scales, float* y, int64_t K, int64_t N, int64_t n0,
              int64_t n1) {
  constexpr int R = MB <= 2 ? 8 : 4;  // R * MB accumulators, within the 32 vector registers
  int64_t n = n0;
  for (; n + R <= n1; n += R) nk_rows<MB, R>(x, w, scales, y, K, N, n);
  for (; n < n1; ++n) nk_rows<MB, 1>(x, w, scales, y, K, N, n);
}

// Outputs [n0, n1) for all M rows of x, four at a time (their accumulators fit in registers; the
// chunk's weights come from memory for the first four, from L2 after).
void nk_rows_all(const float* x, const int8_t* w, const float* scales, float* y, int64_t M, int64_t K, int64_t N,
                 int64_t n0, int64_t n1) {
  static constexpr void (*fns[])(const float*, const int8_t*, const float*, float*, int64_t, int64_t, int64_t,
                                 int64_t) = {nk_block<1>, nk_block<2>, nk_block<3>, nk_block<4>};
  for (int64_t m = 0; m < M; m += 4)
    fns[std::min<int64_t>(4, M - m) - 1](x + m * K, w, scales, y + m * N, K, N, n0, n1);
}

// ---- threads ----

struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
  int64_t chunks = 0;
  // Used only for a claimed chunk, and the caller returns only after every claimed chunk is done.
  void (*run)(const void*, int64_t) = nullptr;
  const void* arg = nullptr;

  void drain() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
      run(arg, c);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

int64_t threads(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t chunks, const F& f) {
  const int64_t helpers = std::min(threads(pool), chunks) - 1;
  if (helpers <= 0) {
    for (int64_t c = 0; c < chunks; ++c) f(c);
    return;
  }
  auto work = std::make_shared<Work>();
  work->chunks = chunks;
  work->arg = &f;
  work->run = [](const void* arg, int64_t c) { (*static_cast<const F*>(arg))(c); };
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->drain(); });
  work->drain();
  // Spin briefly (a helper finishing its chunk is microseconds away), then yield: on a loaded machine
  // the helper may be waiting for this very core.
  for (int spins = 0; work->done.load(std::memory_order_acquire) < chunks; ++spins) {
    if (spins < 4096) {
#if defined(__x86_64__)
      __builtin_ia32_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

// ---- FFI handlers ----

ffi::Error check(const ffi::Buffer<ffi::F32>& x, const ffi::Buffer<ffi::S8>& w, const ffi::Buffer<ffi::F32>& scales,
                 ffi::ResultBuffer<ffi::F32>& y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || yd.size() != 2 || w.dimensions().size() != 2 || xd[0] != yd[0] ||
      scales.element_count() != size_t(yd[1]) || w.element_count() != size_t(xd[1] * yd[1]))
    return ffi::Error::InvalidArgument("int8_matmul: x [M, K], w [K, N] or [N, K], scales [N], y [M, N]");
  return ffi::Error::Success();
}

// W [K, N]: the rows of W split into one contiguous range per thread, each summed into a partial y of
// its own (the first into y itself), then the partials added and scaled.
ffi::Error MatmulKN(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error e = check(x, w, scales, y); e.failure()) return e;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = y->dimensions()[1];
  const int64_t chunks = std::max<int64_t>(1, std::min(threads(pool), K / 64));
  const int64_t rows = (K + chunks - 1) / chunks;
  thread_local std::vector<float> scratch;  // the calling thread's; it outlives every chunk's use
  scratch.assign((chunks - 1) * M * N, 0.f);
  float* yp = y->typed_data();
  std::fill(yp, yp + M * N, 0.f);
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  float* part = scratch.data();
  parallel_for(pool, chunks, [&](int64_t c) {
    kn_rows(xp, wp, c == 0 ? yp : part + (c - 1) * M * N, M, K, N, c * rows, std::min(K, (c + 1) * rows));
  });
  const float* s = scales.typed_data();
  for (int64_t m = 0; m < M; ++m) {
    float* ym = yp + m * N;
    for (int64_t c = 1; c < chunks; ++c) {
      const float* p = part + ((c - 1) * M + m) * N;
      for (int64_t n = 0; n < N; ++n) ym[n] += p[n];
    }
    for (int64_t n = 0; n < N; ++n) ym[n] *= s[n];
  }
  return ffi::Error::Success();
}

// W [N, K]: chunks of whole rows of W (outputs), about four per thread for balance.
ffi::Error MatmulNK(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> w,
                    ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y) {
  if (ffi::Error e = check(x, w, scales, y); e.failure()) return e;
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = y->dimensions()[1];
  const int64_t per = (N + 4 * threads(pool) - 1) / (4 * threads(pool));
  const int64_t chunk = std::max<int64_t>(8, (per + 7) / 8 * 8);
  const float* xp = x.typed_data();
  const int8_t* wp = w.typed_data();
  const float* sp = scales.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, (N + chunk - 1) / chunk,
               [&](int64_t c) { nk_rows_all(xp, wp, sp, yp, M, K, N, c * chunk, std::min(N, (c + 1) * chunk)); });
  return ffi::Error::Success();
}

// Both layouts: the intra-op pool, x [M, K] float32, W int8, scales [N] float32 -> y [M, N] float32.
auto binding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::S8>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_int8_matmul_kn, MatmulKN, binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(jaxinfer_int8_matmul_nk, MatmulNK, binding());
