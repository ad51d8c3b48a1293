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

static inline uint64_t fp_mix(uint64_t w, uint64_t c) {
  uint64_t x = (w ^ c) * FP_M;
  return x ^ (x >> 32);
}

void iteravg_fp_mix(const uint64_t *words, int64_t n, uint64_t start, uint64_t *out) {
  uint64_t s[4] = {0, 0, 0, 0}, x[4] = {0, 0, 0, 0};
  uint64_t c = start * FP_G;
  int64_t j = 0;
  for (; j + 3 < n; j += 4) {
    for (int k = 0; k < 4; ++k) {
      uint64_t h = fp_mix(words[j + k], c + (uint64_t)k * FP_G);
      s[k] += h; x[k] ^= h;
    }
    c += 4 * FP_G;
  }
  for (; j < n; ++j) { uint64_t h = fp_mix(words[j], c); s[0] += h; x[0] ^= h; c += FP_G; }
  out[0] = s[0] + s[1] + s[2] + s[3];
  out[1] = x[0] ^ x[1] ^ x[2] ^ x[3];
}

/* x *= scale (float32, in place) and, in the same pass, the fingerprint sums (as iteravg_fp_mix with
 * start 0) of the scaled buffer's 8-byte words (pairs of floats; an odd last float is left to the caller). Used
 * right after an allreduce-sum: the mean's scaling and the fingerprint that checks ranks agree then cost one pass
 * instead of two. numpy computes the same bits (one float32 multiply per element, then the fingerprint). */
void iteravg_scale_fp_mix_f32(float *x, int64_t n, float scale, uint64_t *out) {
  uint64_t s0 = 0, s1 = 0, x0 = 0, x1 = 0;
  uint64_t c = 0;
  int64_t j = 0;
  for (; j + 3 < n; j += 4) {
    float v[4] = {x[j] * scale, x[j + 1] * scale, x[j + 2] * scale, x[j + 3] * scale};
    memcpy(x + j, v, sizeof v);
    uint64_t w[2];
    memcpy(w, v, sizeof w);
    uint64_t h0 = fp_mix(w[0], c), h1 = fp_mix(w[1], c + FP_G);
    s0 += h0; s1 += h1; x0 ^= h0; x1 ^= h1;
    c += 2 * FP_G;
  }
  for (; j + 1 < n; j += 2) {
    float v[2] = {x[j] * scale, x[j + 1] * scale};
    memcpy(x + j, v, sizeof v);
    uint64_t w;
    memcpy(&w, v, sizeof w);
    uint64_t h = fp_mix(w, c);
    s0 += h; x0 ^= h;
    c += FP_G;
  }
  if (j < n) x[j] *= scale;
  out[0] = s0 + s1;
  out[1] = x0 ^ x1;
}
