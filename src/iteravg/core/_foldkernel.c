/* One-pass fold of a model iterate into the averaged state: b = a + alpha * (x - a), or b = x when alpha == 1.
 *
 * Why C: numpy needs four calls per bucket (gather, subtract, multiply, add) and ends at ~2.5x the memory
 * bound; this loop reads x and a and writes b once (12 bytes per float32 parameter) in one call per step.
 * Rounding is GluonTS's, operation by operation (x - a, then alpha * t, then a + u, each rounded to the
 * tensor's dtype): build with -ffp-contract=off so no multiply-add is fused.
 *
 * Loaded with ctypes (no Python API used). Returns the number of non-finite values written to b, so the
 * caller can refuse the step (b is a back buffer; a stays intact).
 */
#include <stdint.h>
#include <string.h>

#define FOLD(NAME, T, UINT, EXPMASK)                                                              \
  int64_t NAME(int64_t n_src, T *const *src, const int64_t *sizes, const T *a, T *b, double alpha) { \
    const T al = (T)alpha;                                                                          \
    UINT bad = 0;                                                                                   \
    int64_t pos = 0;                                                                                \
    for (int64_t i = 0; i < n_src; ++i) {                                                           \
      const T *restrict x = src[i];                                                                 \
      const T *restrict ai = a + pos;                                                               \
      T *restrict bi = b + pos;                                                                     \
      const int64_t n = sizes[i];                                                                   \
      if (alpha == 1.0) {                                                                           \
        for (int64_t j = 0; j < n; ++j) {                                                           \
          T v = x[j];                                                                               \
          UINT u; memcpy(&u, &v, sizeof u);                                                         \
          bad |= (UINT)((u & EXPMASK) == EXPMASK);                                                  \
          bi[j] = v;                                                                                \
        }                                                                                           \
      } else {                                                                                      \
        for (int64_t j = 0; j < n; ++j) {                                                           \
          T t = x[j] - ai[j];                                                                       \
          T m = al * t;                                                                             \
          T v = ai[j] + m;                                                                          \
          UINT u; memcpy(&u, &v, sizeof u);                                                         \
          bad |= (UINT)((u & EXPMASK) == EXPMASK);                                                  \
          bi[j] = v;                                                                                \
        }                                                                                           \
      }                                                                                             \
      pos += n;                                                                                     \
    }                                                                                               \
    return (int64_t)(bad != 0);                                                                     \
  }

FOLD(iteravg_fold_f32, float, uint32_t, 0x7f800000u)
FOLD(iteravg_fold_f64, double, uint64_t, 0x7ff0000000000000ull)

/* Fingerprint of a buffer in one pass (see averaged.fingerprint): each 8-byte word w at position i is mixed as
 *   x = (w ^ (i * G)) * M;  h = x ^ (x >> 32)
 * and the wrapping sum and the xor of the h are returned. A multiply by an odd constant and an xorshift are
 * bijections, so changing any bit of any word changes that word's h and hence the sum; the position enters before
 * the non-linear multiply, so moving words around changes it too. One multiply per 8 bytes: memory-bound as before.
 * Positions count from `start` (a caller fingerprinting a buffer in pieces passes each piece's first position).
 * The numpy fallback in _kernel.py computes the same bits. */
#define FP_G 0x9E3779B97F4A7C15ull
#define FP_M 0xD6E8FEB86659FD93ull

/* Four independent lanes per loop step so the compiler vectorises the 64-bit multiplies; on x86-64 with GCC an
 * AVX2 clone is picked at load time (integer arithmetic: every clone gives the same bits). */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FP_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define FP_CLONES
#endif

static inline uint64_t fp_mix(uint64_t w, uint64_t c) {
  uint64_t x = (w ^ c) * FP_M;
  return x ^ (x >> 32);
}

/* acc[0..3] += lane sums, acc[4..7] ^= lane xors of n words at positions start, start+1, ... */
static inline void fp_lanes(const uint64_t *words, int64_t n, uint64_t start, uint64_t *acc) {
  uint64_t s0 = acc[0], s1 = acc[1], s2 = acc[2], s3 = acc[3], x0 = acc[4], x1 = acc[5], x2 = acc[6], x3 = acc[7];
  uint64_t c0 = start * FP_G, c1 = c0 + FP_G, c2 = c0 + 2 * FP_G, c3 = c0 + 3 * FP_G;
  int64_t j = 0;
  for (; j + 3 < n; j += 4) {
    uint64_t h0 = fp_mix(words[j], c0), h1 = fp_mix(words[j + 1], c1);
    uint64_t h2 = fp_mix(words[j + 2], c2), h3 = fp_mix(words[j + 3], c3);
    s0 += h0; s1 += h1; s2 += h2; s3 += h3;
    x0 ^= h0; x1 ^= h1; x2 ^= h2; x3 ^= h3;
    c0 += 4 * FP_G; c1 += 4 * FP_G; c2 += 4 * FP_G; c3 += 4 * FP_G;
  }
  for (; j < n; ++j) { uint64_t h = fp_mix(words[j], c0); s0 += h; x0 ^= h; c0 += FP_G; }
  acc[0] = s0; acc[1] = s1; acc[2] = s2; acc[3] = s3; acc[4] = x0; acc[5] = x1; acc[6] = x2; acc[7] = x3;
}

FP_CLONES
void iteravg_fp_mix(const uint64_t *words, int64_t n, uint64_t start, uint64_t *out) {
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  fp_lanes(words, n, start, acc);
  out[0] = acc[0] + acc[1] + acc[2] + acc[3];
  out[1] = acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

/* x *= scale (float32, in place) and, in the same pass over memory, the fingerprint sums (as iteravg_fp_mix with
 * start 0) of the scaled buffer's 8-byte words (pairs of floats; an odd last float is left to the caller). Used
 * right after an allreduce-sum: the mean's scaling and the fingerprint that checks ranks agree then cost one pass
 * instead of two. Blocks of FP_BLOCK floats are scaled, then fingerprinted while still in L1.
 * numpy computes the same bits (one float32 multiply per element, then the fingerprint). */
#define FP_BLOCK 2048
FP_CLONES
void iteravg_scale_fp_mix_f32(float *x, int64_t n, float scale, uint64_t *out) {
  uint64_t acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t lo = 0; lo < n; lo += FP_BLOCK) {
    int64_t m = n - lo < FP_BLOCK ? n - lo : FP_BLOCK;
    float *restrict b = x + lo;
    for (int64_t k = 0; k < m; ++k) b[k] = b[k] * scale;
    fp_lanes((const uint64_t *)(const void *)b, m / 2, (uint64_t)(lo / 2), acc);  /* built -fno-strict-aliasing */
  }
  out[0] = acc[0] + acc[1] + acc[2] + acc[3];
  out[1] = acc[4] ^ acc[5] ^ acc[6] ^ acc[7];
}

/* In-place fold for states with no back buffer (sharded states keep one buffer: 1/N of the model, not 2/N).
 * Refusal must be decided before anything is written, over every dtype group of the iterate, so this is two calls:
 * check=1 only checks the iterate -- refused (returns 1) if any value is NaN, inf, or so large (|x| >= 2^emax) that
 * x - a could overflow; check=0 only folds in place, a = a + alpha * (x - a) with GluonTS's rounding as above.
 * Every accepted iterate has |x| < 2^emax, so every average (a convex combination of them) does too, and the fold
 * cannot overflow: a refused iterate never touches the average.
 * BIGMASK is the bit pattern of 2^emax (the largest exponent below inf's): |x| >= it iff (bits & ~sign) >= it. */
#define FOLD_INPLACE(NAME, T, UINT, ABSMASK, BIGMASK)                                               \
  int64_t NAME(int64_t n_src, T *const *src, const int64_t *sizes, T *a, double alpha, int64_t check) { \
    if (check) {                                                                                    \
      UINT big = 0;                                                                                 \
      for (int64_t i = 0; i < n_src; ++i) {                                                         \
        const T *restrict x = src[i];                                                               \
        const int64_t n = sizes[i];                                                                 \
        for (int64_t j = 0; j < n; ++j) {                                                           \
          T v = x[j];                                                                               \
          UINT u; memcpy(&u, &v, sizeof u);                                                         \
          big |= (UINT)((u & ABSMASK) >= BIGMASK);                                                  \
        }                                                                                           \
      }                                                                                             \
      return (int64_t)(big != 0);                                                                   \
    }                                                                                               \
    const T al = (T)alpha;                                                                          \
    int64_t pos = 0;                                                                                \
    for (int64_t i = 0; i < n_src; ++i) {                                                           \
      const T *restrict x = src[i];                                                                 \
      T *restrict ai = a + pos;                                                                     \
      const int64_t n = sizes[i];                                                                   \
      if (alpha == 1.0) {                                                                           \
        memcpy(ai, x, (size_t)n * sizeof(T));                                                       \
      } else {                                                                                      \
        for (int64_t j = 0; j < n; ++j) {                                                           \
          T t = x[j] - ai[j];                                                                       \
          T m = al * t;                                                                             \
          ai[j] = ai[j] + m;                                                                        \
        }                                                                                           \
      }                                                                                             \
      pos += n;                                                                                     \
    }                                                                                               \
    return 0;                                                                                       \
  }

FOLD_INPLACE(iteravg_fold_inplace_f32, float, uint32_t, 0x7fffffffu, 0x7f000000u)
FOLD_INPLACE(iteravg_fold_inplace_f64, double, uint64_t, 0x7fffffffffffffffull, 0x7fe0000000000000ull)

/* Per-tensor fingerprints of a flat buffer, for the sync's "which tensors already agree across ranks": element i
 * of the buffer (itemsize bytes, zero-extended to 64 bits) is mixed with its position as in iteravg_fp_mix,
 * h = mix(e_i, i * G), and a second, independent word h2 = mix(h, ~(i * G)); segment k (elements
 * bounds[k] .. bounds[k+1]) gets out[2k] = sum of h, out[2k+1] = sum of h2 (wrapping). 128 bits per tensor; a change
 * of any bit of a segment changes both sums (each mix is a bijection of the element for a fixed position).
 * The numpy fallback in _kernel.py computes the same bits. */
FP_CLONES
void iteravg_segment_fp(const void *data, int64_t itemsize, int64_t nseg, const int64_t *bounds, uint64_t *out) {
  const unsigned char *p = (const unsigned char *)data;
  for (int64_t k = 0; k < nseg; ++k) {
    uint64_t s1 = 0, s2 = 0;
    for (int64_t i = bounds[k]; i < bounds[k + 1]; ++i) {
      uint64_t e = 0;
      if (itemsize == 4) { uint32_t v; memcpy(&v, p + i * 4, 4); e = v; }
      else if (itemsize == 8) { memcpy(&e, p + i * 8, 8); }
      else { uint16_t v; memcpy(&v, p + i * 2, 2); e = v; }
      uint64_t c = (uint64_t)i * FP_G;
      uint64_t h = fp_mix(e, c);
      s1 += h;
      s2 += fp_mix(h, ~c);
    }
    out[2 * k] = s1;
    out[2 * k + 1] = s2;
  }
}
