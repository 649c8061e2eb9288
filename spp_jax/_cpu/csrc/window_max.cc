// CPU kernels for spp_jax: max pooling of the pyramid bins of rectangular
// windows, its tangent (forward mode) and its gradient (reverse mode), the
// latter two linear maps that are each other's transpose. Called from JAX
// through the XLA FFI (as primitives with JVP, transpose and batching rules,
// spp_jax/_native.py);
// spp_jax/_native.py compiles this file once per machine and falls back to the
// pure-JAX code where it cannot.
//
// One kernel serves both public ops: spatial_pyramid_pool (window r is example
// r, its bins static or per-example adaptive) and roi_pyramid_pool (window r is
// box r on batch element bidx[r]). JAX computes every bin's cell range and
// passes them as int32 bounds, separable per level:
//   rows (R, sum_l n_h[l], 2): [start, end) of each row bin of each level,
//   cols (R, sum_l n_w[l], 2): the same for columns.
// Output bin k of window r runs over levels, then row bins, then column bins,
// so out (R, NB, C), NB = sum_l n_h[l] * n_w[l], is spp_jax's flattened layout.
//
// A level l with base[l] >= 0 is reduced from the outputs of level base[l]
// (which is reduced from the input): its bin (i, j) is the union of the base
// bins p in cover rows [lo, hi) and q in cover cols [lo, hi). That holds for
// adaptive bins whenever the coarse count divides the fine one, as in
// (6, 3, 2, 1), and cuts the work on large maps several times.
//
// Semantics (the pure-JAX path's, PyTorch's and torchvision's): a bin's value is
// its maximum; its gradient goes to one cell, the FIRST maximum in row-major
// order (its "key" h * W + w); a NaN counts as larger than any number and the
// first NaN wins. Bounds are clipped into the map; a bin left empty gives 0 and
// no gradient.
//
// The tangent and gradient kernels recompute the winners from x instead of
// saving them in the forward pass: that costs one more pass over the bins but
// saves R * NB * C int32 residuals (100 MB for 2,000 boxes of 256 channels) and
// their memory traffic, which measured slower than the recomputation.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#if defined(__SSE__) || defined(__AVX__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(lo, hi) over [0, n) in chunks of `grain`, on XLA's intra-op thread
// pool and the calling thread. Chunks are claimed from an atomic counter, so the
// caller only ever waits for chunks that some thread is already running: no
// deadlock even when the pool is busy.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, int64_t grain, const Body& body) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t chunks = (n + grain - 1) / grain;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
  if (helpers <= 0) {
    body(0, n);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, grain, chunks, &body]() {
    for (;;) {
      const int64_t c = state->next.fetch_add(1);
      if (c >= chunks) return;
      body(c * grain, std::min(n, (c + 1) * grain));
      if (state->done.fetch_add(1) + 1 == chunks) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  // A helper that starts after every chunk is claimed returns at once without
  // touching `body`, which may be gone by then; `state` is shared.
  for (int64_t i = 0; i < helpers; ++i) {
    auto task = work;
    pool.Schedule(std::move(task));
  }
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == chunks; });
}

inline int64_t Clamp(int64_t v, int64_t lo, int64_t hi) { return std::min(std::max(v, lo), hi); }

// Vectors of one native register (GCC/Clang vector extensions): 16 lanes with
// AVX-512, 8 with AVX, 4 otherwise (SSE, NEON). GCC lowers a vector wider than
// the target's registers lane by lane through memory, several times slower than
// native vectors. The auto-vectoriser gives up on the NaN-aware selects.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
typedef float VF __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));
typedef int32_t VI __attribute__((vector_size(4 * kLanes), aligned(4), may_alias));

inline VF LoadF(const float* p) { return *reinterpret_cast<const VF*>(p); }
inline VI LoadI(const int32_t* p) { return *reinterpret_cast<const VI*>(p); }
inline void Store(float* p, VF v) { *reinterpret_cast<VF*>(p) = v; }
inline void Store(int32_t* p, VI v) { *reinterpret_cast<VI*>(p) = v; }

// The comparisons below come in two versions: kNaN = true for windows that hold
// a NaN (a NaN counts as larger than any number), kNaN = false for the usual
// NaN-free windows, where they are plain comparisons and about half the work.

// Does candidate v beat the running maximum m, visited in row-major order?
// Larger wins, a NaN beats a number, ties keep the earlier candidate.
template <bool kNaN>
inline VI Later(VF v, VF m) {
  if (kNaN) return ~(v <= m) & (m == m);
  return v > m;
}
template <bool kNaN>
inline bool Later(float v, float m) {
  return kNaN ? (!(v <= m) && m == m) : v > m;
}

// Does (v, kv) beat (m, km) when candidates come in no particular order?
// Larger wins, a NaN beats a number, and equal values (or two NaNs) go to the
// smaller key: the total order that makes the winner the first maximum.
template <bool kNaN>
inline VI Beats(VF v, VI kv, VF m, VI km) {
  const VI smaller = kv < km;
  if (!kNaN) return (v > m) | ((v == m) & smaller);
  const VI v_nan = v != v, m_nan = m != m;
  return (v_nan & (~m_nan | smaller)) | (~v_nan & ~m_nan & ((v > m) | ((v == m) & smaller)));
}
template <bool kNaN>
inline bool Beats(float v, int32_t kv, float m, int32_t km) {
  const bool v_nan = kNaN && v != v, m_nan = kNaN && m != m;
  if (v_nan) return !m_nan || kv < km;
  return !m_nan && (v > m || (v == m && kv < km));
}

// Max, NaN-propagating where kNaN (values only). Without NaN it is `v > m ? v
// : m`, which is exactly x86's maxps(v, m): one instruction where the compiler
// would emit a compare and a blend.
template <bool kNaN>
inline VF Max(VF v, VF m) {
  if (kNaN) return ((v > m) | (v != v)) ? v : m;
#if defined(__AVX512F__)
  return reinterpret_cast<VF>(_mm512_max_ps(reinterpret_cast<__m512>(v),
                                            reinterpret_cast<__m512>(m)));
#elif defined(__AVX__)
  return reinterpret_cast<VF>(_mm256_max_ps(reinterpret_cast<__m256>(v),
                                            reinterpret_cast<__m256>(m)));
#elif defined(__SSE__)
  return reinterpret_cast<VF>(_mm_max_ps(reinterpret_cast<__m128>(v), reinterpret_cast<__m128>(m)));
#else
  return v > m ? v : m;
#endif
}
template <bool kNaN>
inline float Max(float v, float m) {
  return (v > m || (kNaN && v != v)) ? v : m;
}

// Might channels [0, n) of the cells [hs, he) x [ws, we) hold a NaN? Sums them:
// a NaN makes the sum NaN. (So do +inf and -inf together, or an overflow to
// both; then the caller just takes the NaN-aware path, which is always right.)
inline bool MaybeNaN(const float* xb, int64_t w_len, int64_t x_stride, int64_t n, int64_t hs,
                     int64_t he, int64_t ws, int64_t we) {
  VF acc[4] = {};  // four independent sums, so the additions pipeline
  float tail = 0.0f;
  for (int64_t h = hs; h < he; ++h) {
    for (int64_t w = ws; w < we; ++w) {
      const float* p = xb + (h * w_len + w) * x_stride;
      int64_t c = 0;
      for (; c + 4 * kLanes <= n; c += 4 * kLanes) {
        for (int64_t u = 0; u < 4; ++u) acc[u] += LoadF(p + c + u * kLanes);
      }
      for (; c + kLanes <= n; c += kLanes) acc[0] += LoadF(p + c);
      for (; c < n; ++c) tail += p[c];
    }
  }
  const VF sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
  bool nan = tail != tail;
  for (int64_t i = 0; i < kLanes; ++i) nan |= sum[i] != sum[i];
  return nan;
}

// Max (and first-max key) of the input cells [hs, he) x [ws, we) of one window,
// channels [0, n) of `xb`, whose cells hold `x_stride` channels. The running
// result stays in registers.
template <bool kKeys, bool kNaN>
void InputBin(const float* __restrict xb, int64_t w_len, int64_t x_stride, int64_t n, int64_t hs,
              int64_t he, int64_t ws, int64_t we, float* __restrict out,
              int32_t* __restrict keys) {
  const float* first = xb + (hs * w_len + ws) * x_stride;
  const int32_t key0 = static_cast<int32_t>(hs * w_len + ws);
  int64_t c = 0;
  // kUnroll vectors at a time: one visit of a cell feeds several registers, which
  // pays for the short loops over the few cells of a bin.
  constexpr int64_t kUnroll = 4;
  for (; c + kUnroll * kLanes <= n; c += kUnroll * kLanes) {
    VF m[kUnroll];
    VI k[kUnroll];
    for (int64_t u = 0; u < kUnroll; ++u) {
      m[u] = LoadF(first + c + u * kLanes);
      k[u] = VI{} + key0;
    }
    for (int64_t h = hs; h < he; ++h) {
      for (int64_t w = (h == hs ? ws + 1 : ws); w < we; ++w) {
        const float* p = xb + (h * w_len + w) * x_stride + c;
        const VI cell = VI{} + static_cast<int32_t>(h * w_len + w);
        for (int64_t u = 0; u < kUnroll; ++u) {
          const VF v = LoadF(p + u * kLanes);
          if (kKeys) {
            const VI take = Later<kNaN>(v, m[u]);
            m[u] = take ? v : m[u];
            k[u] = take ? cell : k[u];
          } else {
            m[u] = Max<kNaN>(v, m[u]);
          }
        }
      }
    }
    for (int64_t u = 0; u < kUnroll; ++u) {
      Store(out + c + u * kLanes, m[u]);
      if (kKeys) Store(keys + c + u * kLanes, k[u]);
    }
  }
  for (; c + kLanes <= n; c += kLanes) {
    VF m = LoadF(first + c);
    VI k = VI{} + key0;
    for (int64_t h = hs; h < he; ++h) {
      for (int64_t w = (h == hs ? ws + 1 : ws); w < we; ++w) {
        const VF v = LoadF(xb + (h * w_len + w) * x_stride + c);
        if (kKeys) {
          const VI take = Later<kNaN>(v, m);
          m = take ? v : m;
          k = take ? VI{} + static_cast<int32_t>(h * w_len + w) : k;
        } else {
          m = Max<kNaN>(v, m);
        }
      }
    }
    Store(out + c, m);
    if (kKeys) Store(keys + c, k);
  }
  for (; c < n; ++c) {  // the last n mod 16 channels
    float m = first[c];
    int32_t k = key0;
    for (int64_t h = hs; h < he; ++h) {
      for (int64_t w = (h == hs ? ws + 1 : ws); w < we; ++w) {
        const float v = xb[(h * w_len + w) * x_stride + c];
        if (!kKeys) {
          m = Max<kNaN>(v, m);
        } else if (Later<kNaN>(v, m)) {
          m = v;
          k = static_cast<int32_t>(h * w_len + w);
        }
      }
    }
    out[c] = m;
    if (kKeys) keys[c] = k;
  }
}

// Max (and key) over base bins [ps, pe) x [qs, qe) of a base level with n_w
// column bins, whose outputs (and keys) start at `base` (`base_keys`), n
// channels per bin.
template <bool kKeys, bool kNaN>
void BaseBin(const float* __restrict base, const int32_t* __restrict base_keys, int64_t n_w,
             int64_t n, int64_t ps, int64_t pe, int64_t qs, int64_t qe, float* __restrict out,
             int32_t* __restrict keys) {
  const int64_t first = (ps * n_w + qs) * n;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    VF m = LoadF(base + first + c);
    VI k = kKeys ? LoadI(base_keys + first + c) : VI{};
    for (int64_t p = ps; p < pe; ++p) {
      for (int64_t q = (p == ps ? qs + 1 : qs); q < qe; ++q) {
        const int64_t at = (p * n_w + q) * n + c;
        const VF v = LoadF(base + at);
        if (kKeys) {
          const VI kv = LoadI(base_keys + at);
          const VI take = Beats<kNaN>(v, kv, m, k);
          m = take ? v : m;
          k = take ? kv : k;
        } else {
          m = Max<kNaN>(v, m);
        }
      }
    }
    Store(out + c, m);
    if (kKeys) Store(keys + c, k);
  }
  for (; c < n; ++c) {
    float m = base[first + c];
    int32_t k = kKeys ? base_keys[first + c] : 0;
    for (int64_t p = ps; p < pe; ++p) {
      for (int64_t q = (p == ps ? qs + 1 : qs); q < qe; ++q) {
        const int64_t at = (p * n_w + q) * n + c;
        if (!kKeys) {
          m = Max<kNaN>(base[at], m);
        } else if (Beats<kNaN>(base[at], base_keys[at], m, k)) {
          m = base[at];
          k = base_keys[at];
        }
      }
    }
    out[c] = m;
    if (kKeys) keys[c] = k;
  }
}

// The static description of the pyramid: per level its bin counts, its base
// level (-1: reduced from the input) and, for levels with a base, the cover
// ranges of base bins (n_h row pairs, then n_w column pairs; zeros otherwise).
struct Pyramid {
  ffi::Span<const int64_t> n_h, n_w, base, cover;
  size_t size() const { return n_h.size(); }
};

// Where each level starts: its first output bin, row bin, column bin and cover
// pair.
struct Offsets {
  int64_t bin, row, col, cover;
};

// Per level offsets (plus the totals at [size()]) and an order of computation
// in which every level comes after its base.
struct Layout {
  std::vector<Offsets> off;
  std::vector<size_t> order;
};

Layout MakeLayout(const Pyramid& pyr) {
  Layout lay;
  lay.off.resize(pyr.size() + 1);
  for (size_t l = 0; l < pyr.size(); ++l) {
    const Offsets& o = lay.off[l];
    lay.off[l + 1] = {o.bin + pyr.n_h[l] * pyr.n_w[l], o.row + pyr.n_h[l], o.col + pyr.n_w[l],
                      o.cover + 2 * (pyr.n_h[l] + pyr.n_w[l])};
  }
  std::vector<bool> done(pyr.size(), false);
  for (size_t pass = 0; pass < pyr.size(); ++pass) {
    for (size_t l = 0; l < pyr.size(); ++l) {
      const int64_t b = pyr.base[l];
      if (!done[l] && (b < 0 || (b < static_cast<int64_t>(pyr.size()) && done[b]))) {
        done[l] = true;
        lay.order.push_back(l);
      }
    }
  }
  return lay;  // order is shorter than size() if the bases form a cycle
}

ffi::Error CheckPyramid(const Pyramid& pyr, const Layout& lay, int64_t nh_all, int64_t nw_all) {
  const size_t n = pyr.size();
  if (n == 0 || pyr.n_w.size() != n || pyr.base.size() != n)
    return ffi::Error::InvalidArgument("levels_h, levels_w and base must be equally long");
  if (static_cast<int64_t>(pyr.cover.size()) != lay.off[n].cover || lay.off[n].row != nh_all ||
      lay.off[n].col != nw_all)
    return ffi::Error::InvalidArgument("cover, rows or cols do not match the levels");
  if (lay.order.size() != n)
    return ffi::Error::InvalidArgument("the levels' bases must not form a cycle");
  for (size_t l = 0; l < n; ++l) {
    const int64_t b = pyr.base[l];
    if (b < 0) continue;
    const int64_t* cover = pyr.cover.begin() + lay.off[l].cover;
    for (int64_t i = 0; i < 2 * pyr.n_h[l]; ++i)
      if (cover[i] < 0 || cover[i] > pyr.n_h[b]) return ffi::Error::InvalidArgument("bad cover");
    for (int64_t i = 2 * pyr.n_h[l]; i < 2 * (pyr.n_h[l] + pyr.n_w[l]); ++i)
      if (cover[i] < 0 || cover[i] > pyr.n_w[b]) return ffi::Error::InvalidArgument("bad cover");
  }
  return ffi::Error::Success();
}

// One window's bin bounds, clipped into the map.
struct Bin {
  int64_t hs, he, ws, we;
  bool empty() const { return he <= hs || we <= ws; }
};

inline Bin BinOf(const int32_t* rows, const int32_t* cols, const Offsets& off, int64_t i, int64_t j,
                 int64_t h_len, int64_t w_len) {
  const int32_t* rb = rows + (off.row + i) * 2;
  const int32_t* cb = cols + (off.col + j) * 2;
  return {Clamp(rb[0], 0, h_len), Clamp(rb[1], 0, h_len), Clamp(cb[0], 0, w_len),
          Clamp(cb[1], 0, w_len)};
}

// All bins of one window, channels [0, n) of xb (cells of x_stride channels),
// into out (and keys): NB rows of n. Levels go in the layout's order, each after
// its base. (Bases are only used with bin rules that never leave a bin empty.)
template <bool kKeys, bool kNaN>
void PoolLevels(const float* xb, int64_t h_len, int64_t w_len, int64_t x_stride, int64_t n,
                const int32_t* rows, const int32_t* cols, const Pyramid& pyr, const Layout& lay,
                float* out, int32_t* keys) {
  for (const size_t l : lay.order) {
    const int64_t base = pyr.base[l];
    const int64_t n_h = pyr.n_h[l], n_w = pyr.n_w[l];
    const Offsets& off = lay.off[l];
    const int64_t* cover = pyr.cover.begin() + off.cover;
    for (int64_t i = 0; i < n_h; ++i) {
      for (int64_t j = 0; j < n_w; ++j) {
        const Bin bin = BinOf(rows, cols, off, i, j, h_len, w_len);
        const int64_t k = off.bin + i * n_w + j;
        float* o = out + k * n;
        int32_t* ok = kKeys ? keys + k * n : nullptr;
        if (bin.empty()) {
          std::fill(o, o + n, 0.0f);
          if (kKeys) std::fill(ok, ok + n, -1);
        } else if (base < 0) {
          InputBin<kKeys, kNaN>(xb, w_len, x_stride, n, bin.hs, bin.he, bin.ws, bin.we, o, ok);
        } else {
          const int64_t* cr = cover + 2 * i;
          const int64_t* cc = cover + 2 * n_h + 2 * j;
          const int64_t first = lay.off[base].bin * n;
          BaseBin<kKeys, kNaN>(out + first, kKeys ? keys + first : nullptr, pyr.n_w[base], n,
                               cr[0], cr[1], cc[0], cc[1], o, ok);
        }
      }
    }
  }
}

// PoolLevels, with the cheaper comparisons if the window holds no NaN (the scan
// also brings the window's cells into cache for the pooling).
template <bool kKeys>
void PoolWindow(const float* xb, int64_t h_len, int64_t w_len, int64_t x_stride, int64_t n,
                const int32_t* rows, const int32_t* cols, const Pyramid& pyr, const Layout& lay,
                float* out, int32_t* keys) {
  int64_t hs = h_len, he = 0, ws = w_len, we = 0;  // the union of all bins
  for (size_t l = 0; l < pyr.size(); ++l) {
    for (int64_t i = 0; i < pyr.n_h[l]; ++i) {
      for (int64_t j = 0; j < pyr.n_w[l]; ++j) {
        const Bin bin = BinOf(rows, cols, lay.off[l], i, j, h_len, w_len);
        if (bin.empty()) continue;
        hs = std::min(hs, bin.hs), he = std::max(he, bin.he);
        ws = std::min(ws, bin.ws), we = std::max(we, bin.we);
      }
    }
  }
  if (MaybeNaN(xb, w_len, x_stride, n, hs, he, ws, we)) {
    PoolLevels<kKeys, true>(xb, h_len, w_len, x_stride, n, rows, cols, pyr, lay, out, keys);
  } else {
    PoolLevels<kKeys, false>(xb, h_len, w_len, x_stride, n, rows, cols, pyr, lay, out, keys);
  }
}

ffi::Error WindowMax(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> bidx,
                     ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> cols,
                     ffi::Span<const int64_t> levels_h, ffi::Span<const int64_t> levels_w,
                     ffi::Span<const int64_t> base, ffi::Span<const int64_t> cover,
                     ffi::ResultBuffer<ffi::F32> out) {
  const Pyramid pyr{levels_h, levels_w, base, cover};
  const int64_t nh_all = rows.dimensions()[1], nw_all = cols.dimensions()[1];
  const Layout lay = MakeLayout(pyr);
  if (ffi::Error err = CheckPyramid(pyr, lay, nh_all, nw_all); err.failure()) return err;
  const auto xd = x.dimensions();
  const int64_t b_len = xd[0], h_len = xd[1], w_len = xd[2], c_len = xd[3];
  const int64_t nb = lay.off[pyr.size()].bin;
  const float* xp = x.typed_data();
  const int32_t* bp = bidx.typed_data();
  const int32_t* rp = rows.typed_data();
  const int32_t* cp = cols.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, bidx.element_count(), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = Clamp(bp[r], 0, b_len - 1);
      PoolWindow<false>(xp + b * h_len * w_len * c_len, h_len, w_len, c_len, c_len,
                        rp + r * nh_all * 2, cp + r * nw_all * 2, pyr, lay, op + r * nb * c_len,
                        nullptr);
    }
  });
  return ffi::Error::Success();
}

// o += g where k == cell: the cotangents of the bins whose winner is `cell`.
inline void AddWhere(float* __restrict o, const float* __restrict g, const int32_t* __restrict k,
                     int32_t cell, int64_t n) {
  int64_t c = 0;
  const VI cell_v = VI{} + cell;
  for (; c + kLanes <= n; c += kLanes) {
    Store(o + c, LoadF(o + c) + (LoadI(k + c) == cell_v ? LoadF(g + c) : VF{}));
  }
  for (; c < n; ++c) o[c] += k[c] == cell ? g[c] : 0.0f;
}

// Bins of up to this many cells add their cotangents by the vectorised masked
// add over their cells; larger ones scatter (n scalar additions whatever the
// bin's size). Measured on CPU: the masked add wins for small bins.
constexpr int64_t kMaskedAddCells = 8;

struct GradArgs {
  const float* x;
  const float* g;
  const int32_t* bidx;
  const int32_t* rows;
  const int32_t* cols;
  int64_t r_len, nh_all, nw_all;
  Pyramid pyr;
  Layout lay;
  int64_t b_len, h_len, w_len, c_len;
  float* gx;
};

// For the windows r with bidx[r] in [b0, b1): finds the winners of channels
// [c0, c1) of every bin and adds the bins' cotangents there, into gx (zeroed
// beforehand).
void GradPart(const GradArgs& a, int64_t b0, int64_t b1, int64_t c0, int64_t c1) {
  const int64_t h_len = a.h_len, w_len = a.w_len, c_len = a.c_len, n = c1 - c0;
  const int64_t nb = a.lay.off[a.pyr.size()].bin;
  std::vector<float> values(nb * n);
  std::vector<int32_t> keys(nb * n);
  for (int64_t r = 0; r < a.r_len; ++r) {
    const int64_t b = Clamp(a.bidx[r], 0, a.b_len - 1);
    if (b < b0 || b >= b1) continue;
    const int32_t* rows = a.rows + r * a.nh_all * 2;
    const int32_t* cols = a.cols + r * a.nw_all * 2;
    const int64_t image = b * h_len * w_len * c_len;
    PoolWindow<true>(a.x + image + c0, h_len, w_len, c_len, n, rows, cols, a.pyr, a.lay,
                     values.data(), keys.data());
    float* ob = a.gx + image + c0;
    for (size_t l = 0; l < a.pyr.size(); ++l) {
      for (int64_t i = 0; i < a.pyr.n_h[l]; ++i) {
        for (int64_t j = 0; j < a.pyr.n_w[l]; ++j) {
          const Bin bin = BinOf(rows, cols, a.lay.off[l], i, j, h_len, w_len);
          if (bin.empty()) continue;
          const int64_t k = a.lay.off[l].bin + i * a.pyr.n_w[l] + j;
          const float* gr = a.g + (r * nb + k) * c_len + c0;
          const int32_t* kr = keys.data() + k * n;
          if ((bin.he - bin.hs) * (bin.we - bin.ws) <= kMaskedAddCells) {
            for (int64_t h = bin.hs; h < bin.he; ++h) {
              for (int64_t w = bin.ws; w < bin.we; ++w) {
                const int32_t cell = static_cast<int32_t>(h * w_len + w);
                AddWhere(ob + cell * c_len, gr, kr, cell, n);
              }
            }
          } else {
            for (int64_t c = 0; c < n; ++c) ob[kr[c] * c_len + c] += gr[c];
          }
        }
      }
    }
  }
}

// Gradient of WindowMax with respect to x, given the cotangent g (R, NB, C).
// Threads split the batch elements (several per thread, as in
// spatial_pyramid_pool) or else the channels (roi_pyramid_pool on one image),
// so no two write one value and the additions always run in the same order:
// the result is deterministic.
ffi::Error WindowMaxGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> x,
                         ffi::Buffer<ffi::S32> bidx, ffi::Buffer<ffi::S32> rows,
                         ffi::Buffer<ffi::S32> cols, ffi::Span<const int64_t> levels_h,
                         ffi::Span<const int64_t> levels_w, ffi::Span<const int64_t> base,
                         ffi::Span<const int64_t> cover, ffi::ResultBuffer<ffi::F32> gx) {
  const Pyramid pyr{levels_h, levels_w, base, cover};
  const int64_t nh_all = rows.dimensions()[1], nw_all = cols.dimensions()[1];
  const Layout lay = MakeLayout(pyr);
  if (ffi::Error err = CheckPyramid(pyr, lay, nh_all, nw_all); err.failure()) return err;
  const auto xd = x.dimensions();
  const GradArgs a{x.typed_data(), g.typed_data(), bidx.typed_data(), rows.typed_data(),
                   cols.typed_data(), static_cast<int64_t>(bidx.element_count()), nh_all, nw_all, pyr,
                   lay, xd[0], xd[1], xd[2], xd[3], gx->typed_data()};
  const int64_t image = a.h_len * a.w_len * a.c_len;
  const int64_t threads = std::max<int64_t>(pool.num_threads(), 0) + 1;
  if (a.b_len >= 2 * threads) {
    ParallelFor(pool, a.b_len, 1, [&](int64_t b0, int64_t b1) {
      std::fill(a.gx + b0 * image, a.gx + b1 * image, 0.0f);
      GradPart(a, b0, b1, 0, a.c_len);
    });
    return ffi::Error::Success();
  }
  ParallelFor(pool, a.b_len * image, 1 << 16,
              [&](int64_t lo, int64_t hi) { std::fill(a.gx + lo, a.gx + hi, 0.0f); });
  // About one chunk of whole vectors per thread.
  const int64_t grain = std::max<int64_t>(
      kLanes, ((a.c_len + threads - 1) / threads + kLanes - 1) / kLanes * kLanes);
  ParallelFor(pool, a.c_len, grain,
              [&](int64_t c0, int64_t c1) { GradPart(a, 0, a.b_len, c0, c1); });
  return ffi::Error::Success();
}

// The tangent of WindowMax: out[r, k, c] = t[b, winner, c] for the first
// maximum of channel c of bin k of window r (0 for an empty bin). Linear in t;
// WindowMaxGrad is its transpose. Windows are split among threads.
ffi::Error WindowMaxTangent(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> t,
                            ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S32> bidx,
                            ffi::Buffer<ffi::S32> rows, ffi::Buffer<ffi::S32> cols,
                            ffi::Span<const int64_t> levels_h, ffi::Span<const int64_t> levels_w,
                            ffi::Span<const int64_t> base, ffi::Span<const int64_t> cover,
                            ffi::ResultBuffer<ffi::F32> out) {
  const Pyramid pyr{levels_h, levels_w, base, cover};
  const int64_t nh_all = rows.dimensions()[1], nw_all = cols.dimensions()[1];
  const Layout lay = MakeLayout(pyr);
  if (ffi::Error err = CheckPyramid(pyr, lay, nh_all, nw_all); err.failure()) return err;
  const auto xd = x.dimensions();
  const int64_t b_len = xd[0], h_len = xd[1], w_len = xd[2], c_len = xd[3];
  const int64_t nb = lay.off[pyr.size()].bin;
  const float* xp = x.typed_data();
  const float* tp = t.typed_data();
  const int32_t* bp = bidx.typed_data();
  const int32_t* rp = rows.typed_data();
  const int32_t* cp = cols.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, bidx.element_count(), 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> values(nb * c_len);
    std::vector<int32_t> keys(nb * c_len);
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t b = Clamp(bp[r], 0, b_len - 1);
      const int64_t image = b * h_len * w_len * c_len;
      PoolWindow<true>(xp + image, h_len, w_len, c_len, c_len, rp + r * nh_all * 2,
                       cp + r * nw_all * 2, pyr, lay, values.data(), keys.data());
      const float* tb = tp + image;
      float* o = op + r * nb * c_len;
      for (int64_t k = 0; k < nb; ++k) {
        const int32_t* kr = keys.data() + k * c_len;
        for (int64_t c = 0; c < c_len; ++c) {
          o[k * c_len + c] = kr[c] < 0 ? 0.0f : tb[kr[c] * c_len + c];
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppJaxWindowMax, WindowMax,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // bidx (R,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows (R, NH, 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cols (R, NW, 2)
                                  .Attr<ffi::Span<const int64_t>>("levels_h")
                                  .Attr<ffi::Span<const int64_t>>("levels_w")
                                  .Attr<ffi::Span<const int64_t>>("base")
                                  .Attr<ffi::Span<const int64_t>>("cover")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // (R, NB, C)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppJaxWindowMaxGrad, WindowMaxGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // g (R, NB, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // bidx (R,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows (R, NH, 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cols (R, NW, 2)
                                  .Attr<ffi::Span<const int64_t>>("levels_h")
                                  .Attr<ffi::Span<const int64_t>>("levels_w")
                                  .Attr<ffi::Span<const int64_t>>("base")
                                  .Attr<ffi::Span<const int64_t>>("cover")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // (B, H, W, C)

XLA_FFI_DEFINE_HANDLER_SYMBOL(SppJaxWindowMaxTangent, WindowMaxTangent,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // t (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x (B, H, W, C)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // bidx (R,)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // rows (R, NH, 2)
                                  .Arg<ffi::Buffer<ffi::S32>>()  // cols (R, NW, 2)
                                  .Attr<ffi::Span<const int64_t>>("levels_h")
                                  .Attr<ffi::Span<const int64_t>>("levels_w")
                                  .Attr<ffi::Span<const int64_t>>("base")
                                  .Attr<ffi::Span<const int64_t>>("cover")
                                  .Ret<ffi::Buffer<ffi::F32>>());  // (R, NB, C)
