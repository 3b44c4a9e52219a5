/* Native matrix products over quantised weights, for decode (a few rows of activations) on the CPU.
 *
 * Weights stay in their stored form and are decoded in registers while they stream past, so a decode step reads
 * the quantised bytes once and nothing else: GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, F16,
 * BF16, F32) as llama.cpp writes them, and the project's own int8 (one scale per output row) and int4 (torch's
 * CPU tile layout, gemma3n/quant/formats.py) formats. Activations and sums are float32: the result is the float32
 * product of the dequantised weight with x, up to the order of the additions (the tests bound it).
 *
 * Every entry point is plain C (called through ctypes), computes y[m, n] = sum_k W[n, k] x[m, k] for row-major
 * x [M, K] and y [M, N], and splits the output rows over OpenMP threads. OpenMP is the runtime PyTorch itself
 * loads (its wheels ship libgomp.so.1), so both share one thread pool. AVX2 + FMA paths are chosen at run time;
 * the portable C below them is the reference the vector code is tested against.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define G3N_X86 1
#endif

#define EXPORT __attribute__((visibility("default")))
#define G3N_ABI_VERSION 14

/* GGML type ids (ggml.h's enum ggml_type; the GGUF tensor type field). */
enum { T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8, T_Q4_K = 12,
       T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30 };
/* Scale dtypes of the int8 / int4 formats. */
enum { S_F32 = 0, S_F16 = 1, S_BF16 = 2 };

#define QK 32    /* values per block of the "legacy" GGUF types */
#define QKK 256  /* values per super-block of the k-quants */
#define MAX_BLOCK 256

/* ------------------------------------------------------------------------------------------------------------ */
/* scalar conversions                                                                                            */

static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return f32_from_bits(sign | 0x7F800000u | (man << 13));     /* inf / nan */
    if (exp == 0) {
        if (man == 0) return f32_from_bits(sign);
        /* subnormal half: man * 2^-24, exact in float32 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

static inline float bf16_to_float(uint16_t b) { return f32_from_bits((uint32_t)b << 16); }

static inline uint16_t rd16(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline uint32_t rd32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

/* v rounded to the scale dtype (nearest even), back in float */
static inline float round_as(int type, float v) {
    if (type == S_BF16) {
        uint32_t u;
        memcpy(&u, &v, 4);
        if ((u & 0x7F800000u) != 0x7F800000u) u += 0x7FFFu + ((u >> 16) & 1u);
        return f32_from_bits(u & 0xFFFF0000u);
    }
#ifdef __FLT16_MAX__
    if (type == S_F16) return (float)(_Float16)v;
#endif
    return v;
}

static inline float scale_at(const void *s, int type, int64_t i) {
    switch (type) {
    case S_F16: return half_to_float(((const uint16_t *)s)[i]);
    case S_BF16: return bf16_to_float(((const uint16_t *)s)[i]);
    default: return ((const float *)s)[i];
    }
}

/* ------------------------------------------------------------------------------------------------------------ */
/* GGUF block geometry and portable block decoders (the reference for everything vectorised)                     */

static int block_values(int type) {
    switch (type) {
    case T_F32: case T_F16: case T_BF16: return 1;
    case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: case T_Q8_0: return QK;
    case T_Q4_K: case T_Q5_K: case T_Q6_K: return QKK;
    default: return 0;
    }
}

static int block_bytes(int type) {
    switch (type) {
    case T_F32: return 4;
    case T_F16: case T_BF16: return 2;
    case T_Q4_0: return 2 + 16;
    case T_Q4_1: return 4 + 16;
    case T_Q5_0: return 2 + 4 + 16;
    case T_Q5_1: return 4 + 4 + 16;
    case T_Q8_0: return 2 + 32;
    case T_Q4_K: return 4 + 12 + 128;
    case T_Q5_K: return 4 + 12 + 32 + 128;
    case T_Q6_K: return 128 + 64 + 16 + 2;
    default: return 0;
    }
}

/* The 6-bit (scale, min) pair of sub-block j of a Q4_K / Q5_K super-block, from its 12 packed bytes. */
static inline void kquant_scale_min(int j, const uint8_t *q, int *sc, int *mn) {
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4);
        *mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

/* One block -> block_values(type) floats. */
static void decode_block(int type, const uint8_t *b, float *out) {
    switch (type) {
    case T_F32: memcpy(out, b, 4); return;
    case T_F16: out[0] = half_to_float(rd16(b)); return;
    case T_BF16: out[0] = bf16_to_float(rd16(b)); return;
    case T_Q4_0: {
        float d = half_to_float(rd16(b));
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            out[j] = (float)((qs[j] & 0x0F) - 8) * d;
            out[j + 16] = (float)((qs[j] >> 4) - 8) * d;
        }
        return;
    }
    case T_Q4_1: {
        float d = half_to_float(rd16(b)), m = half_to_float(rd16(b + 2));
        const uint8_t *qs = b + 4;
        for (int j = 0; j < 16; j++) {
            out[j] = (float)(qs[j] & 0x0F) * d + m;
            out[j + 16] = (float)(qs[j] >> 4) * d + m;
        }
        return;
    }
    case T_Q5_0: case T_Q5_1: {
        int has_min = type == T_Q5_1;
        float d = half_to_float(rd16(b)), m = has_min ? half_to_float(rd16(b + 2)) : 0.0f;
        uint32_t qh = rd32(b + (has_min ? 4 : 2));
        const uint8_t *qs = b + (has_min ? 8 : 6);
        int offset = has_min ? 0 : 16;
        for (int j = 0; j < 16; j++) {
            int lo = (qs[j] & 0x0F) | (((qh >> j) & 1) << 4);
            int hi = (qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
            out[j] = has_min ? (float)lo * d + m : (float)(lo - offset) * d;
            out[j + 16] = has_min ? (float)hi * d + m : (float)(hi - offset) * d;
        }
        return;
    }
    case T_Q8_0: {
        float d = half_to_float(rd16(b));
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) out[j] = (float)qs[j] * d;
        return;
    }
    case T_Q4_K: case T_Q5_K: {
        int five = type == T_Q5_K;
        float d = half_to_float(rd16(b)), dmin = half_to_float(rd16(b + 2));
        const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + (five ? 48 : 16);
        for (int c = 0; c < 4; c++) {  /* 64 values: low nibbles, then high nibbles, of 32 bytes */
            int sc1, m1, sc2, m2;
            kquant_scale_min(2 * c, scales, &sc1, &m1);
            kquant_scale_min(2 * c + 1, scales, &sc2, &m2);
            float d1 = d * (float)sc1, n1 = dmin * (float)m1, d2 = d * (float)sc2, n2 = dmin * (float)m2;
            for (int l = 0; l < 32; l++) {
                int lo = qs[32 * c + l] & 0x0F, hi = qs[32 * c + l] >> 4;
                if (five) {
                    lo += ((qh[l] >> (2 * c)) & 1) << 4;
                    hi += ((qh[l] >> (2 * c + 1)) & 1) << 4;
                }
                out[64 * c + l] = d1 * (float)lo - n1;
                out[64 * c + 32 + l] = d2 * (float)hi - n2;
            }
        }
        return;
    }
    case T_Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t *sc = (const int8_t *)(b + 192);
        float d = half_to_float(rd16(b + 208));
        for (int h = 0; h < 2; h++) {  /* two halves of 128 values */
            for (int l = 0; l < 32; l++) {
                int s = l / 16;
                int q1 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                out[128 * h + l] = d * (float)sc[s] * (float)q1;
                out[128 * h + l + 32] = d * (float)sc[s + 2] * (float)q2;
                out[128 * h + l + 64] = d * (float)sc[s + 4] * (float)q3;
                out[128 * h + l + 96] = d * (float)sc[s + 6] * (float)q4;
            }
            ql += 64; qh += 32; sc += 8;
        }
        return;
    }
    }
}

static int decode_row_avx2(int type, const uint8_t *row, int64_t k, float *out);

static void decode_row(int type, const uint8_t *row, int64_t k, float *out, int vec) {
#ifdef G3N_X86
    if (vec && decode_row_avx2(type, row, k, out)) return;
#else
    (void)vec;
#endif
    int qv = block_values(type), qb = block_bytes(type);
    if (type == T_F32) { memcpy(out, row, (size_t)k * 4); return; }
    for (int64_t i = 0; i < k / qv; i++) decode_block(type, row + i * qb, out + i * qv);
}

/* ------------------------------------------------------------------------------------------------------------ */
/* AVX2 + FMA fused dot products (one weight row with one activation row)                                       */

/* g3n_set_avx512's switch (have_avx512 below): declared for every build, as g3n_set_avx512 is exported by all */
static int avx512_allowed = 1;

#ifdef G3N_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx2,fma,f16c,avx512f,avx512bw")))  /* where have_avx512() */
#define AVX512_VNNI __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vnni")))  /* where have_avx512_vnni() */

/* half -> float with the F16C instruction (exact, as half_to_float) */
AVX2 static inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

AVX2 static inline __m256i load8_u8(const uint8_t *p) {  /* 8 bytes -> 8 int32 (zero-extended) */
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

AVX2 static inline __m256 load8_bf16(const void *p) {  /* 8 bfloat16 -> 8 floats (exact: the top half of each) */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

AVX2 static inline __m256i load8_i8(const uint8_t *p) {  /* 8 bytes -> 8 int32 (sign-extended) */
    return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* Weights are prefetched this many bytes ahead of use, "non-temporal" (used once: on AMD cores such lines stay out of
 * L2 and leave L1 first), so that they do not push x out of L1: a float32 x of 8192 values is 32 KB, as large as
 * L1 on many cores, and long rows (E2B's down projection) ran at half the speed of short ones without it. */
#define PF_AHEAD 2048
#define PF_HINT _MM_HINT_NTA
#define PREFETCH(p) _mm_prefetch((const char *)(p) + PF_AHEAD, PF_HINT)

AVX2 static float dot_q8_0(const uint8_t *row, const float *x, int64_t nb) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += 34, x += 32) {
        if ((i & 1) == 0) PREFETCH(row);
        const uint8_t *q = row + 2;
        __m256 s = _mm256_mul_ps(_mm256_cvtepi32_ps(load8_i8(q)), _mm256_loadu_ps(x));
        __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(load8_i8(q + 8)), _mm256_loadu_ps(x + 8));
        s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8(q + 16)), _mm256_loadu_ps(x + 16), s);
        t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8(q + 24)), _mm256_loadu_ps(x + 24), t);
        __m256 d = _mm256_set1_ps(h2f(rd16(row)));
        if (i & 1) acc1 = _mm256_fmadd_ps(d, _mm256_add_ps(s, t), acc1);
        else acc0 = _mm256_fmadd_ps(d, _mm256_add_ps(s, t), acc0);
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

/* Q4_0 / Q4_1 / Q5_0 / Q5_1: 16 bytes of nibbles (values j and j + 16), optional fifth bits, scale d, and either
 * an offset (8 or 16, subtracted in integers) or a min m (added as m * sum(x) over the block). */
AVX2 static float dot_legacy(int type, const uint8_t *row, const float *x, int64_t nb) {
    const int bb = block_bytes(type), five = type == T_Q5_0 || type == T_Q5_1;
    const int has_min = type == T_Q4_1 || type == T_Q5_1;
    const __m256i low = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1);
    const __m256i offset = _mm256_set1_epi32(has_min ? 0 : (five ? 16 : 8));
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += bb, x += 32) {
        const uint8_t *qs = row + (has_min ? 4 : 2) + (five ? 4 : 0);
        __m256i qh = five ? _mm256_set1_epi32((int)rd32(row + (has_min ? 4 : 2))) : _mm256_setzero_si256();
        __m256 s = _mm256_setzero_ps(), t = _mm256_setzero_ps();
        for (int j = 0; j < 16; j += 8) {
            __m256i bytes = load8_u8(qs + j);
            __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_srli_epi32(bytes, 4);
            if (five) {
                __m256i idx = _mm256_add_epi32(lanes, _mm256_set1_epi32(j));
                lo = _mm256_or_si256(lo, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(qh, idx), one), 4));
                idx = _mm256_add_epi32(idx, _mm256_set1_epi32(16));
                hi = _mm256_or_si256(hi, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(qh, idx), one), 4));
            }
            __m256 xl = _mm256_loadu_ps(x + j), xh = _mm256_loadu_ps(x + 16 + j);
            s = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lo, offset)), xl, s);
            t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(hi, offset)), xh, t);
            if (has_min) macc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(row + 2))),
                                                _mm256_add_ps(xl, xh), macc);
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(row))), _mm256_add_ps(s, t), acc);
    }
    return hsum8(_mm256_add_ps(acc, macc));
}

/* Q4_K / Q5_K: per 32-value sub-block  d*sc * sum(q x) - dmin*m * sum(x). */
AVX2 static float dot_q45_k(int type, const uint8_t *row, const float *x, int64_t nb) {
    const int five = type == T_Q5_K, bb = block_bytes(type);
    const __m256i low = _mm256_set1_epi32(0x0F), one = _mm256_set1_epi32(1);
    __m256 acc = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += bb, x += QKK) {
        float d = h2f(rd16(row)), dmin = h2f(rd16(row + 2));
        const uint8_t *scales = row + 4, *qh = row + 16, *qs = row + (five ? 48 : 16);
        for (int c = 0; c < 4; c++) {
            int sc1, m1, sc2, m2;
            kquant_scale_min(2 * c, scales, &sc1, &m1);
            kquant_scale_min(2 * c + 1, scales, &sc2, &m2);
            const float *xa = x + 64 * c, *xb = xa + 32;
            __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), xs = _mm256_setzero_ps(),
                   xt = _mm256_setzero_ps();
            for (int l = 0; l < 32; l += 8) {
                __m256i bytes = load8_u8(qs + 32 * c + l);
                __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_srli_epi32(bytes, 4);
                if (five) {
                    __m256i h = load8_u8(qh + l);
                    lo = _mm256_or_si256(lo, _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2 * c), one), 4));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi32(
                        _mm256_and_si256(_mm256_srli_epi32(h, 2 * c + 1), one), 4));
                }
                __m256 xl = _mm256_loadu_ps(xa + l), xh = _mm256_loadu_ps(xb + l);
                s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), xl, s0);
                s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(hi), xh, s1);
                xs = _mm256_add_ps(xs, xl);
                xt = _mm256_add_ps(xt, xh);
            }
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc1), s0, acc);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc2), s1, acc);
            macc = _mm256_fmadd_ps(_mm256_set1_ps(dmin * (float)m1), xs, macc);
            macc = _mm256_fmadd_ps(_mm256_set1_ps(dmin * (float)m2), xt, macc);
        }
    }
    return hsum8(_mm256_sub_ps(acc, macc));
}

AVX2 static float dot_q6_k(const uint8_t *row, const float *x, int64_t nb) {
    const __m256i low = _mm256_set1_epi32(0x0F), three = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += 210, x += QKK) {
        const uint8_t *ql = row, *qh = row + 128;
        const int8_t *sc = (const int8_t *)(row + 192);
        float d = h2f(rd16(row + 208));
        for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8) {
            const float *xh = x + 128 * h;
            for (int g = 0; g < 2; g++) {  /* 16 values share a scale */
                __m256 s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps(),
                       s4 = _mm256_setzero_ps();
                for (int l = 16 * g; l < 16 * g + 16; l += 8) {
                    __m256i a = load8_u8(ql + l), b = load8_u8(ql + 32 + l), hb = load8_u8(qh + l);
                    __m256i q1 = _mm256_or_si256(_mm256_and_si256(a, low), _mm256_slli_epi32(_mm256_and_si256(hb, three), 4));
                    __m256i q2 = _mm256_or_si256(_mm256_and_si256(b, low),
                                                 _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2), three), 4));
                    __m256i q3 = _mm256_or_si256(_mm256_srli_epi32(a, 4),
                                                 _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 4), three), 4));
                    __m256i q4 = _mm256_or_si256(_mm256_srli_epi32(b, 4), _mm256_slli_epi32(_mm256_srli_epi32(hb, 6), 4));
                    s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q1, off)), _mm256_loadu_ps(xh + l), s1);
                    s2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q2, off)), _mm256_loadu_ps(xh + 32 + l), s2);
                    s3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q3, off)), _mm256_loadu_ps(xh + 64 + l), s3);
                    s4 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q4, off)), _mm256_loadu_ps(xh + 96 + l), s4);
                }
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[g]), s1, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[g + 2]), s2, acc1);
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[g + 4]), s3, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d * (float)sc[g + 6]), s4, acc1);
            }
        }
    }
    return hsum8(_mm256_add_ps(acc0, acc1));
}

AVX2 static float dot_f32(const float *w, const float *x, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < k; i++) s += w[i] * x[i];
    return s;
}

AVX2 static float dot_f16(const uint8_t *w, const float *x, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i + 16))),
                             _mm256_loadu_ps(x + i + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < k; i++) s += h2f(rd16(w + 2 * i)) * x[i];
    return s;
}

AVX2 static float dot_bf16(const uint8_t *w, const float *x, int64_t k) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        a0 = _mm256_fmadd_ps(load8_bf16(w + 2 * i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load8_bf16(w + 2 * i + 16), _mm256_loadu_ps(x + i + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; i < k; i++) s += bf16_to_float(rd16(w + 2 * i)) * x[i];
    return s;
}

AVX2 static float dot_i8(const int8_t *w, const float *x, int64_t k) {
    /* four independent sums: one FMA chain per 8 lanes would wait on the FMA latency, not on the loads */
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        if ((i & 63) == 0) _mm_prefetch((const char *)w + i + 2048, _MM_HINT_NTA);  /* see PF_AHEAD, gemv_f32.c */
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i)), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i + 8)), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i + 16)), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i + 24)), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 16 <= k; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i)), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i + 8)), _mm256_loadu_ps(x + i + 8), a1);
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a2), _mm256_add_ps(a1, a3)));
    for (; i < k; i++) s += (float)w[i] * x[i];
    return s;
}

/* dot_i8 for three activation rows at once: each weight vector is widened and converted once and meets the three
 * rows, each summed in dot_i8's own four chains and order, so every row gets the bits dot_i8 gives it alone (a
 * batch of decodes computes what each would alone). Converting once per three rows instead of once per row makes
 * a batch's int8 rows (an int4 checkpoint's LM head) about half the vector work per row. */
AVX2 static void dot_i8_x3(const int8_t *w, const float *x0, const float *x1, const float *x2, int64_t k, float *out) {
    const float *xs[3] = {x0, x1, x2};
    __m256 a[3][4];
    for (int r = 0; r < 3; r++)
        for (int c = 0; c < 4; c++) a[r][c] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= k; i += 32) {
        if ((i & 63) == 0) _mm_prefetch((const char *)w + i + 2048, _MM_HINT_NTA);
        for (int c = 0; c < 4; c++) {
            __m256 wv = _mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i + 8 * c));
            for (int r = 0; r < 3; r++) a[r][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[r] + i + 8 * c), a[r][c]);
        }
    }
    for (; i + 16 <= k; i += 16)
        for (int c = 0; c < 2; c++) {
            __m256 wv = _mm256_cvtepi32_ps(load8_i8((const uint8_t *)w + i + 8 * c));
            for (int r = 0; r < 3; r++) a[r][c] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xs[r] + i + 8 * c), a[r][c]);
        }
    for (int r = 0; r < 3; r++) {
        float sum = hsum8(_mm256_add_ps(_mm256_add_ps(a[r][0], a[r][2]), _mm256_add_ps(a[r][1], a[r][3])));
        for (int64_t j = i; j < k; j++) sum += (float)w[j] * xs[r][j];
        out[r] = sum;
    }
}

/* Vectorised block decoders for the hot types (same float operations as decode_block, so the same bits). */
AVX2 static inline void store_scaled(float *out, __m256i q, __m256 d) {
    _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_cvtepi32_ps(q), d));
}

AVX2 static int decode_row_avx2(int type, const uint8_t *row, int64_t k, float *out) {
    const __m256i low = _mm256_set1_epi32(0x0F), three = _mm256_set1_epi32(3), one = _mm256_set1_epi32(1);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    switch (type) {
    case T_Q8_0:
        for (int64_t i = 0; i < k / QK; i++, row += 34, out += 32) {
            __m256 d = _mm256_set1_ps(h2f(rd16(row)));
            for (int j = 0; j < 32; j += 8) store_scaled(out + j, load8_i8(row + 2 + j), d);
        }
        return 1;
    case T_Q5_0: case T_Q4_0:
        for (int64_t i = 0; i < k / QK; i++, out += 32) {
            int five = type == T_Q5_0;
            __m256 d = _mm256_set1_ps(h2f(rd16(row)));
            __m256i qh = five ? _mm256_set1_epi32((int)rd32(row + 2)) : _mm256_setzero_si256();
            __m256i off = _mm256_set1_epi32(five ? 16 : 8);
            const uint8_t *qs = row + (five ? 6 : 2);
            for (int j = 0; j < 16; j += 8) {
                __m256i bytes = load8_u8(qs + j);
                __m256i lo = _mm256_and_si256(bytes, low), hi = _mm256_srli_epi32(bytes, 4);
                if (five) {
                    __m256i idx = _mm256_add_epi32(lanes, _mm256_set1_epi32(j));
                    lo = _mm256_or_si256(lo, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(qh, idx), one), 4));
                    idx = _mm256_add_epi32(idx, _mm256_set1_epi32(16));
                    hi = _mm256_or_si256(hi, _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(qh, idx), one), 4));
                }
                store_scaled(out + j, _mm256_sub_epi32(lo, off), d);
                store_scaled(out + 16 + j, _mm256_sub_epi32(hi, off), d);
            }
            row += five ? 22 : 18;
        }
        return 1;
    case T_Q4_K:
        for (int64_t i = 0; i < k / QKK; i++, row += 144, out += QKK) {
            float d = h2f(rd16(row)), dmin = h2f(rd16(row + 2));
            const uint8_t *qs = row + 16;
            for (int c = 0; c < 4; c++) {
                int sc1, m1, sc2, m2;
                kquant_scale_min(2 * c, row + 4, &sc1, &m1);
                kquant_scale_min(2 * c + 1, row + 4, &sc2, &m2);
                __m256 d1 = _mm256_set1_ps(d * (float)sc1), n1 = _mm256_set1_ps(dmin * (float)m1);
                __m256 d2 = _mm256_set1_ps(d * (float)sc2), n2 = _mm256_set1_ps(dmin * (float)m2);
                for (int l = 0; l < 32; l += 8) {
                    __m256i bytes = load8_u8(qs + 32 * c + l);
                    __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low));
                    __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
                    _mm256_storeu_ps(out + 64 * c + l, _mm256_sub_ps(_mm256_mul_ps(d1, lo), n1));
                    _mm256_storeu_ps(out + 64 * c + 32 + l, _mm256_sub_ps(_mm256_mul_ps(d2, hi), n2));
                }
            }
        }
        return 1;
    case T_Q6_K: {
        const __m256i off = _mm256_set1_epi32(32);
        for (int64_t i = 0; i < k / QKK; i++, row += 210, out += QKK) {
            const uint8_t *ql = row, *qh = row + 128;
            const int8_t *sc = (const int8_t *)(row + 192);
            float d = h2f(rd16(row + 208));
            for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8) {
                float *o = out + 128 * h;
                for (int l = 0; l < 32; l += 8) {
                    int s = l / 16;
                    __m256i a = load8_u8(ql + l), b = load8_u8(ql + 32 + l), hb = load8_u8(qh + l);
                    __m256i q1 = _mm256_or_si256(_mm256_and_si256(a, low), _mm256_slli_epi32(_mm256_and_si256(hb, three), 4));
                    __m256i q2 = _mm256_or_si256(_mm256_and_si256(b, low),
                                                 _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 2), three), 4));
                    __m256i q3 = _mm256_or_si256(_mm256_srli_epi32(a, 4),
                                                 _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(hb, 4), three), 4));
                    __m256i q4 = _mm256_or_si256(_mm256_srli_epi32(b, 4), _mm256_slli_epi32(_mm256_srli_epi32(hb, 6), 4));
                    store_scaled(o + l, _mm256_sub_epi32(q1, off), _mm256_set1_ps(d * (float)sc[s]));
                    store_scaled(o + l + 32, _mm256_sub_epi32(q2, off), _mm256_set1_ps(d * (float)sc[s + 2]));
                    store_scaled(o + l + 64, _mm256_sub_epi32(q3, off), _mm256_set1_ps(d * (float)sc[s + 4]));
                    store_scaled(o + l + 96, _mm256_sub_epi32(q4, off), _mm256_set1_ps(d * (float)sc[s + 6]));
                }
            }
        }
        return 1;
    }
    case T_F16:
        for (int64_t i = 0; i + 8 <= k; i += 8)
            _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 2 * i))));
        for (int64_t i = k / 8 * 8; i < k; i++) out[i] = h2f(rd16(row + 2 * i));
        return 1;
    case T_BF16:  /* the top halves of floats: exact, as bf16_to_float */
        for (int64_t i = 0; i + 8 <= k; i += 8) _mm256_storeu_ps(out + i, load8_bf16(row + 2 * i));
        for (int64_t i = k / 8 * 8; i < k; i++) out[i] = bf16_to_float(rd16(row + 2 * i));
        return 1;
    }
    return 0;
}

/* A Q6_K half super-block's 128 six-bit values (ql: its 64 bytes of low nibbles, qh: its 32 bytes of high bits) as two
 * registers of 64 bytes, values 0-63 then 64-127: bits 0-3 of each byte from the nibbles, bits 4-7 from the high
 * bits shifted into place with one 64-bit shift per half register (one select each: 0xE4 takes the first operand
 * where the third is set, else the second). Bits 6-7 are not the value's: the callers mask each byte to six bits. */
AVX512 static inline void q6_k_half_values(const uint8_t *ql, const uint8_t *qh, __m512i q[2]) {
    const __m512i low = _mm512_set1_epi32(0x0F0F0F0F);
    const __m512i up = _mm512_setr_epi64(4, 4, 4, 4, 2, 2, 2, 2), down = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2);
    const __m512i ab = _mm512_loadu_si512((const void *)ql);
    const __m512i hb = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qh));
    q[0] = _mm512_ternarylogic_epi32(ab, _mm512_sllv_epi64(hb, up), low, 0xE4);
    q[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi32(ab, 4), _mm512_srlv_epi64(hb, down), low, 0xE4);
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

/* 512-bit vectors: used where a kernel is bound by its vector operations and the CPU runs them at full width
 * (AMD Zen 5, Intel server cores); g3n_set_avx512(0) turns them off (the tests compare both paths). */
static int have_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = have_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
    }
    return cached && avx512_allowed;
}
/* VNNI's vpdpbusd for the int8-activation kernels (512-bit, so also where have_avx512) */
static int have_avx512_vnni(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512vnni");
    }
    return cached && have_avx512();
}
#else
static int have_avx2(void) { return 0; }
static int have_avx512(void) { return 0; }
static int have_avx512_vnni(void) { return 0; }
#endif

/* What a kernel's `vec` argument allows on this CPU: 0 the portable C, 1 AVX2, 2 AVX2 and AVX-512. */
static int vector_level(int vec) {
    if (!vec || !have_avx2()) return 0;
    return have_avx512() ? 2 : 1;
}

EXPORT int g3n_avx512(void) { return have_avx512(); }

EXPORT int g3n_set_avx512(int allowed) {
    avx512_allowed = allowed != 0;
    return have_avx512();
}

/* ------------------------------------------------------------------------------------------------------------ */
/* portable dot products                                                                                         */

static float dot_plain(const float *w, const float *x, int64_t k) {
    float s = 0.0f;
    for (int64_t i = 0; i < k; i++) s += w[i] * x[i];
    return s;
}

/* One GGUF row with one activation row; `buf` holds MAX_BLOCK floats for the portable path. */
static float gguf_dot(int type, const uint8_t *row, const float *x, int64_t k, int vec, float *buf) {
#ifdef G3N_X86
    if (vec) {
        switch (type) {
        case T_F32: return dot_f32((const float *)row, x, k);
        case T_F16: return dot_f16(row, x, k);
        case T_BF16: return dot_bf16(row, x, k);
        case T_Q8_0: return dot_q8_0(row, x, k / QK);
        case T_Q4_0: case T_Q4_1: case T_Q5_0: case T_Q5_1: return dot_legacy(type, row, x, k / QK);
        case T_Q4_K: case T_Q5_K: return dot_q45_k(type, row, x, k / QKK);
        case T_Q6_K: return dot_q6_k(row, x, k / QKK);
        }
    }
#endif
    int qv = block_values(type), qb = block_bytes(type);
    if (qv == 1) qv = 64;  /* float rows: decode 64 values at a time */
    float s = 0.0f;
    for (int64_t i = 0; i < k; i += qv) {
        int64_t n = k - i < qv ? k - i : qv;
        if (block_values(type) == 1) {
            for (int64_t j = 0; j < n; j++) decode_block(type, row + (i + j) * qb, buf + j);
        } else {
            decode_block(type, row + (i / qv) * qb, buf);
        }
        s += dot_plain(buf, x + i, n);
    }
    return s;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* exported: GGUF                                                                                                */

EXPORT int g3n_abi_version(void) { return G3N_ABI_VERSION; }
EXPORT int g3n_vectorised(void) { return have_avx2(); }

/* Bytes of one row of `k` values, or 0 when the type is not supported (or k is not a whole number of blocks). */
EXPORT int64_t g3n_gguf_row_bytes(int type, int64_t k) {
    int qv = block_values(type);
    if (qv == 0 || k <= 0 || k % qv) return 0;
    return k / qv * block_bytes(type);
}

#ifdef G3N_X86
/* gemv_f32.c */
static int exact_sum_block(int type);
static int exact_needs_lanes(int type);
static void block_sums(const float *x, int64_t k, int block, float *xs);
static void x_lane_order(int type, const float *x, int64_t k, float *xl, int vec);
static int exact_dot(int type, const uint8_t *row, const float *x, const float *xs, const float *xl, int64_t k,
                     int vec, float *out);
#endif

/* One GGUF row times one activation row (`xs`: its per-block sums where exact_sum_block, `xl`: it in lane order
 * where exact_needs_lanes, else NULL). The same arithmetic for every activation row of every batch: a request
 * computes the same bits alone as in the server's continuous batch, whatever the other rows are. */
static float gguf_row_dot(int type, const uint8_t *row, const float *x, const float *xs, const float *xl, int64_t k,
                          int vec, float *buf) {
#ifdef G3N_X86
    float out;
    if (vec && exact_dot(type, row, x, xs, xl, k, vec, &out)) return out;
#else
    (void)xs;
    (void)xl;
#endif
    return gguf_dot(type, row, x, k, vec, buf);
}

/* What the exact kernels take beside x (gguf_row_dot): for each of its m rows, the per-block sums (*xs, n_sums a
 * row) and the row in lane order (*xl); each NULL where the type's kernel does not take it. 0, or -2 when out of
 * memory; free both with free(). */
static int gguf_prepare_x(int type, const float *x, int64_t m, int64_t k, int vec, float **xs, float **xl,
                          int64_t *n_sums) {
    *xs = *xl = NULL;
    *n_sums = 0;
#ifdef G3N_X86
    int sum_block = vec ? exact_sum_block(type) : 0;
    if (sum_block) {
        *n_sums = k / sum_block;
        *xs = (float *)malloc(sizeof(float) * (size_t)(m * *n_sums));
        if (!*xs) return -2;
        for (int64_t i = 0; i < m; i++) block_sums(x + i * k, k, sum_block, *xs + i * *n_sums);
    }
    if (vec && exact_needs_lanes(type)) {
        *xl = (float *)malloc(sizeof(float) * (size_t)(m * k));
        if (!*xl) {
            free(*xs);
            *xs = NULL;
            return -2;
        }
        for (int64_t i = 0; i < m; i++) x_lane_order(type, x + i * k, k, *xl + i * k, vec);
    }
#else
    (void)type, (void)x, (void)m, (void)k, (void)vec;
#endif
    return 0;
}

/* y[m, r] = W[rows[r]] . x[m] for r < n_rows (rows NULL: rows 0 .. n_rows-1). vec = 0 forces the portable code. */
EXPORT int g3n_gguf_matmul(int type, const uint8_t *w, int64_t n_rows, int64_t k, const int64_t *rows,
                           const float *x, int64_t m, float *y, int threads, int vec) {
    int64_t rb = g3n_gguf_row_bytes(type, k);
    if (rb == 0) return -1;
    vec = vector_level(vec);
    float *xs, *xl;
    int64_t n_sums;  /* per activation row */
    if (gguf_prepare_x(type, x, m, k, vec, &xs, &xl, &n_sums)) return -2;
    /* every activation row against the weight row, which stays in L1 after the first: the weights are read from
     * memory once, and each output is computed exactly as it would be alone (m = 1) */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        float buf[MAX_BLOCK];
        const uint8_t *row = w + (rows ? rows[r] : r) * rb;
        for (int64_t i = 0; i < m; i++)
            y[i * n_rows + r] = gguf_row_dot(type, row, x + i * k, xs ? xs + i * n_sums : NULL,
                                             xl ? xl + i * k : NULL, k, vec, buf);
    }
    free(xs);
    free(xl);
    return 0;
}

/* y[e] = W[rows[e]] . x[xrows[e]] for e < n_pairs, W having n rows: each activation row against its own rows of W (a
 * sparse MLP's up projection over a prompt). Pairs sorted by xrows keep each x row in L1 while its rows of W stream
 * past. Each product is computed as g3n_gguf_matmul computes it. */
EXPORT int g3n_gguf_matmul_pairs(int type, const uint8_t *w, int64_t n, int64_t k, const float *x, int64_t m,
                                 const int64_t *xrows, const int64_t *rows, int64_t n_pairs, float *y, int threads,
                                 int vec) {
    int64_t rb = g3n_gguf_row_bytes(type, k);
    if (rb == 0) return -1;
    vec = vector_level(vec);
    float *xs, *xl;
    int64_t n_sums;
    if (gguf_prepare_x(type, x, m, k, vec, &xs, &xl, &n_sums)) return -2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < n_pairs; e++) {
        float buf[MAX_BLOCK];
        int64_t r = rows[e], i = xrows[e];
        if (r < 0 || r >= n || i < 0 || i >= m) continue;  /* the callers check; never read outside W or x */
        y[e] = gguf_row_dot(type, w + r * rb, x + i * k, xs ? xs + i * n_sums : NULL, xl ? xl + i * k : NULL, k,
                            vec, buf);
    }
    free(xs);
    free(xl);
    return 0;
}

/* out[r] = W[rows[r]] as floats (rows NULL: rows 0 .. n_rows-1). */
EXPORT int g3n_gguf_dequantize(int type, const uint8_t *w, int64_t n_rows, int64_t k, const int64_t *rows,
                               float *out, int threads, int vec) {
    int64_t rb = g3n_gguf_row_bytes(type, k);
    if (rb == 0) return -1;
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(static) if (n_rows * k > (1 << 16))
    for (int64_t r = 0; r < n_rows; r++) decode_row(type, w + (rows ? rows[r] : r) * rb, k, out + r * k, vec);
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* exported: int8, one scale per output row                                                                      */

/* row `r` of int8 W (one scale per row) times one activation row */
static float int8_row_dot(const int8_t *q, const void *scales, int scale_type, int64_t r, int64_t k, const float *x,
                          int vec) {
    const int8_t *w = q + r * k;
    float acc = 0.0f;
#ifdef G3N_X86
    if (vec) acc = dot_i8(w, x, k);
    else
#else
    (void)vec;
#endif
        for (int64_t j = 0; j < k; j++) acc += (float)w[j] * x[j];
    return acc * scale_at(scales, scale_type, r);
}

EXPORT int g3n_int8_matmul(const int8_t *q, const void *scales, int scale_type, int64_t n, int64_t k,
                           const int64_t *rows, const float *x, int64_t m, float *y, int threads, int vec) {
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        int64_t src = rows ? rows[r] : r, i = 0;
#ifdef G3N_X86
        if (vec) {  /* three activation rows per pass over the weight row; the same bits per row as one at a time */
            float s = scale_at(scales, scale_type, src), three[3];
            for (; i + 3 <= m; i += 3) {
                dot_i8_x3(q + src * k, x + i * k, x + (i + 1) * k, x + (i + 2) * k, k, three);
                for (int j = 0; j < 3; j++) y[(i + j) * n + r] = three[j] * s;
            }
        }
#endif
        for (; i < m; i++) y[i * n + r] = int8_row_dot(q, scales, scale_type, src, k, x + i * k, vec);
    }
    return 0;
}

/* y[e] = W[rows[e]] . x[xrows[e]] for e < n_pairs, W having n rows: as g3n_gguf_matmul_pairs, for int8 rows. */
EXPORT int g3n_int8_matmul_pairs(const int8_t *q, const void *scales, int scale_type, int64_t n, int64_t k,
                                 const float *x, int64_t m, const int64_t *xrows, const int64_t *rows, int64_t n_pairs,
                                 float *y, int threads, int vec) {
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < n_pairs; e++) {
        int64_t r = rows[e], i = xrows[e];
        if (r < 0 || r >= n || i < 0 || i >= m) continue;  /* the callers check; never read outside W or x */
        y[e] = int8_row_dot(q, scales, scale_type, r, k, x + i * k, vec);
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* exported: int4 in torch's CPU tile layout (gemma3n/quant/formats.py)                                          */
/*   qweight [n/64][k][32 bytes]: byte j of column k holds row j (low nibble) and row j + 32 (high nibble) of the   */
/*   tile; scales_and_zeros [k/g][n][2]; w = (q - 8) * scale + zero, so a group contributes                      */
/*   scale * sum(q x) + (zero - 8 * scale) * sum(x).                                                             */
/* `cols` (sorted ascending, n_cols of them) restricts the sum to those input columns: the others must be zero in  */
/* every activation row (activation sparsity), which gives the dense result while reading only their bytes.      */

#define TILE 64
/* Software prefetch distance in a tile's bytes (64 columns ahead): the hardware prefetcher alone left the tile
 * kernel short of the read bandwidth with both cores streaming. */
#define TILE_PREFETCH_BYTES 2048

/* The columns of one group: [*c, end) of `cols`, or the group's whole range when cols is NULL. Advances *c. */
static inline int64_t group_span(const int32_t *cols, int64_t n_cols, int64_t g, int64_t *c, int64_t *grp) {
    if (!cols) {
        *grp = *c / g;
        *c += g;
        return g;
    }
    *grp = cols[*c] / g;
    int64_t end = (*grp + 1) * g, start = *c;
    while (*c < n_cols && cols[*c] < end) (*c)++;
    return *c - start;
}

static void int4_tile_plain(const uint8_t *tile, const void *sz, int st, int64_t n, int64_t k, int64_t g,
                            int64_t row0, const int32_t *cols, int64_t n_cols, const float *x, int64_t m,
                            float *y) {
    int64_t total = cols ? n_cols : k;
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * k;
        float out[TILE] = {0};
        int64_t c = 0, grp;
        while (c < total) {
            int64_t first = c, span = group_span(cols, n_cols, g, &c, &grp);
            float part[TILE] = {0}, xsum = 0.0f;
            for (int64_t e = 0; e < span; e++) {
                int64_t col = cols ? cols[first + e] : first + e;
                const uint8_t *b = tile + col * 32;
                float xv = xi[col];
                xsum += xv;
                for (int j = 0; j < 32; j++) {
                    part[j] += (float)(b[j] & 0x0F) * xv;
                    part[j + 32] += (float)(b[j] >> 4) * xv;
                }
            }
            for (int j = 0; j < TILE; j++) {
                int64_t at = (grp * n + row0 + j) * 2;
                float s = scale_at(sz, st, at), z = scale_at(sz, st, at + 1);
                out[j] += s * part[j] + (z - 8.0f * s) * xsum;
            }
        }
        for (int j = 0; j < TILE; j++) y[i * n + row0 + j] = out[j];
    }
}

#ifdef G3N_X86
/* 8 rows' (scale, zero) pairs from `at` on, as two vectors. A bf16 pair is one 32-bit lane (scale in the low half),
 * so shifting the lane left by 16 bits gives the scale and masking its low half off the zero: no stores, no
 * gathers. */
AVX2 static inline void scales_zeros8(const void *sz, int st, int64_t at, __m256 *s, __m256 *z) {
    if (st == S_BF16) {
        __m256i pairs = _mm256_loadu_si256((const __m256i *)((const uint16_t *)sz + at));
        *s = _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16));
        *z = _mm256_castsi256_ps(_mm256_and_si256(pairs, _mm256_set1_epi32((int)0xFFFF0000u)));
        return;
    }
    __m256 a, b;  /* pairs 0-3 and 4-7 as (s, z, s, z, ...) */
    if (st == S_F16) {
        a = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)sz + at)));
        b = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)sz + at + 8)));
    } else {
        a = _mm256_loadu_ps((const float *)sz + at);
        b = _mm256_loadu_ps((const float *)sz + at + 8);
    }
    /* shuffle_ps picks (a0 a2 b0 b2 | a4 a6 b4 b6): pairs 0 1 4 5 | 2 3 6 7; the lane permute restores 0..7 */
    const __m256i order = _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7);
    *s = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, b, 0x88), order);
    *z = _mm256_permutevar8x32_ps(_mm256_shuffle_ps(a, b, 0xDD), order);
}

/* Four vectors whose lane L holds row 4 L + b of a 32-row half tile (b = 0..3, one vector each) -> the same
 * values in row order, 8 rows a vector. */
AVX2 static inline void rows_in_order(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 *r) {
    __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
    __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);  /* L = 0 | 4, 1 | 5 */
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);  /* L = 2 | 6, 3 | 7 */
    r[0] = _mm256_permute2f128_ps(u0, u1, 0x20);
    r[1] = _mm256_permute2f128_ps(u2, u3, 0x20);
    r[2] = _mm256_permute2f128_ps(u0, u1, 0x31);
    r[3] = _mm256_permute2f128_ps(u2, u3, 0x31);
}

/* The next group's scales lie n pairs further on, a stride no hardware prefetcher follows. */
static inline void int4_prefetch_next_scales(const void *sz, int st, int64_t n, int64_t grp, int64_t row0) {
    const char *next = (const char *)sz + ((grp + 1) * n + row0) * 2 * (st == S_F32 ? 4 : 2);
    for (int l = 0; l < (st == S_F32 ? 512 : 256); l += 64) _mm_prefetch(next + l, _MM_HINT_T0);
}

/* A group's end in the int4 tile kernels: p0 .. p7 its sums per mask (lane L: p0 row 4 L times 2^0, p1 row 4 L + 32
 * times 2^4, p2 row 4 L + 1 times 2^8, p3 row 4 L + 33 times 2^12, p4 .. p7 the same for rows 4 L + 2, + 34, + 3,
 * + 35), scaled back and put in row order; out[v] (rows 8 v ..) += s * part + (z - 8 s) * xsum. */
AVX2 static inline void int4_group_end(__m256 p0, __m256 p1, __m256 p2, __m256 p3, __m256 p4, __m256 p5, __m256 p6,
                                       __m256 p7, float xsum, const void *sz, int st, int64_t n, int64_t grp,
                                       int64_t row0, __m256 *out) {
    const __m256 back4 = _mm256_set1_ps(0x1p-4f), back8 = _mm256_set1_ps(0x1p-8f);
    const __m256 back12 = _mm256_set1_ps(0x1p-12f), eight = _mm256_set1_ps(8.0f);
    __m256 part[8];
    rows_in_order(p0, _mm256_mul_ps(p2, back8), p4, _mm256_mul_ps(p6, back8), part);
    rows_in_order(_mm256_mul_ps(p1, back4), _mm256_mul_ps(p3, back12), _mm256_mul_ps(p5, back4),
                  _mm256_mul_ps(p7, back12), part + 4);
    __m256 xs = _mm256_set1_ps(xsum);
    for (int v = 0; v < 8; v++) {
        __m256 s, z;
        scales_zeros8(sz, st, (grp * n + row0 + 8 * v) * 2, &s, &z);
        out[v] = _mm256_fmadd_ps(s, part[v], out[v]);
        out[v] = _mm256_fmadd_ps(_mm256_fnmadd_ps(eight, s, z), xs, out[v]);
    }
}

/* A column's 32 bytes are read as one vector and each nibble is masked where it lies: in 32-bit lane L, byte b
 * holds row 4 L + b (low nibble) and row 4 L + b + 32 (high nibble). Masking the upper half-lane after a 16-bit
 * shift, a nibble converts to q * 2^s with s in {0, 4, 8, 12}; its sum is 2^s times the sum of q x (a power of two
 * is exact, and 2^12 cannot overflow unless |x| nears 2^100) and is scaled back at the group's end, where the
 * rows are put back in order. Against widening each 8 bytes to lanes (a shuffle per 8 weights) this saves the
 * shuffles; the products and their order per row are the same. */
AVX2 static void int4_tile_avx2(const uint8_t *tile, const void *sz, int st, int64_t n, int64_t k, int64_t g,
                                int64_t row0, const int32_t *cols, int64_t n_cols, const float *x, int64_t m,
                                float *y) {
    const __m256i m0 = _mm256_set1_epi32(0x000F), m4 = _mm256_set1_epi32(0x00F0);
    const __m256i m8 = _mm256_set1_epi32(0x0F00), m12 = _mm256_set1_epi32(0xF000);
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * k;
        __m256 out[8];
        for (int v = 0; v < 8; v++) out[v] = _mm256_setzero_ps();
        int64_t c = 0, grp, total = cols ? n_cols : k;
        while (c < total) {
            int64_t first = c, span = group_span(cols, n_cols, g, &c, &grp);
            __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0, p4 = p0, p5 = p0, p6 = p0, p7 = p0;
            float xsum = 0.0f;
            int4_prefetch_next_scales(sz, st, n, grp, row0);
            for (int64_t e = 0; e < span; e++) {
                int64_t col = cols ? cols[first + e] : first + e;
                _mm_prefetch((const char *)(tile + col * 32) + TILE_PREFETCH_BYTES, _MM_HINT_T0);
                __m256i lo = _mm256_loadu_si256((const __m256i *)(tile + col * 32));
                __m256i hi = _mm256_srli_epi32(lo, 16);
                float xv = xi[col];
                xsum += xv;
                __m256 bx = _mm256_set1_ps(xv);
                p0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, m0)), bx, p0);   /* 4L,      2^0  */
                p1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, m4)), bx, p1);   /* 4L + 32, 2^4  */
                p2 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, m8)), bx, p2);   /* 4L + 1,  2^8  */
                p3 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(lo, m12)), bx, p3);  /* 4L + 33, 2^12 */
                p4 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, m0)), bx, p4);   /* 4L + 2,  2^0  */
                p5 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, m4)), bx, p5);   /* 4L + 34, 2^4  */
                p6 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, m8)), bx, p6);   /* 4L + 3,  2^8  */
                p7 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(hi, m12)), bx, p7);  /* 4L + 35, 2^12 */
            }
            int4_group_end(p0, p1, p2, p3, p4, p5, p6, p7, xsum, sz, st, n, grp, row0, out);
        }
        for (int v = 0; v < 8; v++) _mm256_storeu_ps(y + i * n + row0 + 8 * v, out[v]);
    }
}
#endif

#ifdef G3N_X86
/* int4_tile_avx2 with 512-bit vectors: two columns a vector (the first in the low half, the second in the high),
 * each half masked and converted as there; a row's sum over a group is then its sum over the group's 1st, 3rd, ...
 * columns plus its sum over the 2nd, 4th, ... (an odd last column meets x = 0 in the high half, adding zeros). The
 * same products, in another order of the float32 additions; each activation row alone, as there. */
AVX512 static void int4_tile_avx512(const uint8_t *tile, const void *sz, int st, int64_t n, int64_t k, int64_t g,
                                    int64_t row0, const int32_t *cols, int64_t n_cols, const float *x, int64_t m,
                                    float *y) {
    const __m512i m0 = _mm512_set1_epi32(0x000F), m4 = _mm512_set1_epi32(0x00F0);
    const __m512i m8 = _mm512_set1_epi32(0x0F00), m12 = _mm512_set1_epi32(0xF000);
    for (int64_t i = 0; i < m; i++) {
        const float *xi = x + i * k;
        __m256 out[8];
        for (int v = 0; v < 8; v++) out[v] = _mm256_setzero_ps();
        int64_t c = 0, grp, total = cols ? n_cols : k;
        while (c < total) {
            int64_t first = c, span = group_span(cols, n_cols, g, &c, &grp);
            __m512 p0 = _mm512_setzero_ps(), p1 = p0, p2 = p0, p3 = p0, p4 = p0, p5 = p0, p6 = p0, p7 = p0;
            float xsum = 0.0f;
            int4_prefetch_next_scales(sz, st, n, grp, row0);
            for (int64_t e = 0; e < span; e += 2) {
                int64_t ca = cols ? cols[first + e] : first + e, cb = ca;
                float xa = xi[ca], xb = 0.0f;
                xsum += xa;
                if (e + 1 < span) {
                    cb = cols ? cols[first + e + 1] : first + e + 1;
                    xb = xi[cb];
                    xsum += xb;
                }
                _mm_prefetch((const char *)(tile + ca * 32) + TILE_PREFETCH_BYTES, _MM_HINT_T0);
                __m512i lo = _mm512_inserti64x4(
                    _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(tile + ca * 32))),
                    _mm256_loadu_si256((const __m256i *)(tile + cb * 32)), 1);
                __m512i hi = _mm512_srli_epi32(lo, 16);
                __m512 bx = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_set1_ps(xa)),
                                                                _mm256_castps_pd(_mm256_set1_ps(xb)), 1));
                p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(lo, m0)), bx, p0);
                p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(lo, m4)), bx, p1);
                p2 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(lo, m8)), bx, p2);
                p3 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(lo, m12)), bx, p3);
                p4 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(hi, m0)), bx, p4);
                p5 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(hi, m4)), bx, p5);
                p6 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(hi, m8)), bx, p6);
                p7 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(hi, m12)), bx, p7);
            }
#define HALVES(v) _mm256_add_ps(_mm512_castps512_ps256(v), \
                                _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)))
            int4_group_end(HALVES(p0), HALVES(p1), HALVES(p2), HALVES(p3), HALVES(p4), HALVES(p5), HALVES(p6),
                           HALVES(p7), xsum, sz, st, n, grp, row0, out);
#undef HALVES
        }
        for (int v = 0; v < 8; v++) _mm256_storeu_ps(y + i * n + row0 + 8 * v, out[v]);
    }
}

/* The vectorised tile kernel this CPU runs best. */
static void int4_tile_vec(const uint8_t *tile, const void *sz, int st, int64_t n, int64_t k, int64_t g,
                          int64_t row0, const int32_t *cols, int64_t n_cols, const float *x, int64_t m, float *y) {
    if (have_avx512()) int4_tile_avx512(tile, sz, st, n, k, g, row0, cols, n_cols, x, m, y);
    else int4_tile_avx2(tile, sz, st, n, k, g, row0, cols, n_cols, x, m, y);
}
#endif

EXPORT int g3n_int4_matmul(const uint8_t *q, const void *sz, int scale_type, int64_t n, int64_t k, int64_t g,
                           const int32_t *cols, int64_t n_cols, const float *x, int64_t m, float *y,
                           int threads, int vec) {
    if (n % TILE || g <= 0 || k % g) return -1;
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n / TILE; t++) {
        const uint8_t *tile = q + t * TILE / 2 * k;
#ifdef G3N_X86
        if (vec) int4_tile_vec(tile, sz, scale_type, n, k, g, t * TILE, cols, n_cols, x, m, y);
        else
#endif
            int4_tile_plain(tile, sz, scale_type, n, k, g, t * TILE, cols, n_cols, x, m, y);
    }
    return 0;
}

/* y[i] = W x[i] for each activation row i < m whose only non-zero inputs are cols[offsets[i] .. offsets[i + 1])
 * (ascending): each row reads only its own columns of W (a sparse MLP's down projection over a prompt: each token's
 * active units). Each row is computed as g3n_int4_matmul computes it alone with those cols. */
EXPORT int g3n_int4_matmul_cols_per_row(const uint8_t *q, const void *sz, int scale_type, int64_t n, int64_t k,
                                        int64_t g, const int64_t *offsets, const int32_t *cols, const float *x,
                                        int64_t m, float *y, int threads, int vec) {
    if (n % TILE || g <= 0 || k % g) return -1;
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(dynamic, 4)
    for (int64_t i = 0; i < m; i++) {
        const int32_t *row_cols = cols + offsets[i];
        int64_t n_cols = offsets[i + 1] - offsets[i];
        for (int64_t t = 0; t < n / TILE; t++) {
            const uint8_t *tile = q + t * TILE / 2 * k;
#ifdef G3N_X86
            if (vec) int4_tile_vec(tile, sz, scale_type, n, k, g, t * TILE, row_cols, n_cols, x + i * k, 1, y + i * n);
            else
#endif
                int4_tile_plain(tile, sz, scale_type, n, k, g, t * TILE, row_cols, n_cols, x + i * k, 1, y + i * n);
        }
    }
    return 0;
}

/* ============================================================================================================ */
/* int8 activations: the fast decode path                                                                        */
/*                                                                                                              */
/* Converting every weight to float costs about one vector instruction per weight, which on cores with narrow or */
/* split 256-bit units (this project's AMD Zen machine) is slower than memory. Instead, as llama.cpp does, each  */
/* activation row is rounded to int8 per block of 32 (x ~ dx * xq, dx = max|x| / 127, ties to even) and weights   */
/* are multiplied as small integers (vpmaddubsw / vpmaddwd), scaled once per block. The result is the float32     */
/* product of the dequantised weight with that rounded x, up to the order of the additions: the tests compare    */
/* with exactly that, and measure its distance to the float path. Only AVX2 machines take it (else -1: callers   */
/* use the float kernels above).                                                                                */

#define XB 32  /* activation block */

typedef struct {
    int8_t *q;      /* [k] */
    float *d;       /* [k / 32] block scales */
    int32_t *s16;   /* [k / 16] sums of q per 16 */
    float *fsum;    /* [k / 32] d * sum(q) per block: the block's sum of the rounded x */
    uint16_t *pair; /* [k / 2] (q[2i], q[2i+1]) as one 16-bit pattern (the int4 tile kernel broadcasts it) */
    int8_t *halves; /* [k] per 128 values (four blocks): each block's first 16 q, then each block's last 16
                     * (the order q8_legacy_avx512 meets them); values past the last 128 as in q. Filled only
                     * where have_avx512_vnni(), where that kernel runs */
    int8_t *kquads; /* [k] per 256 values (a K-quant super-block, eight blocks): blocks 0, 2, 1, 3, 4, 6, 5, 7 (the
                     * order q8_q4_k_avx512 meets them); filled only where have_avx512_vnni() and 256 divides k */
} qx_t;

static void quantize_row(const float *x, int64_t k, qx_t *o) {
    for (int64_t b = 0; b < k / XB; b++) {
        const float *xb = x + b * XB;
        float amax = 0.0f;
        for (int j = 0; j < XB; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t s0 = 0, s1 = 0;
        for (int j = 0; j < XB; j++) {
            float v = nearbyintf(xb[j] * id);
            v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
            int8_t q = (int8_t)v;
            o->q[b * XB + j] = q;
            if (j < 16) s0 += q; else s1 += q;
        }
        o->d[b] = d;
        o->s16[2 * b] = s0;
        o->s16[2 * b + 1] = s1;
        o->fsum[b] = d * (float)(s0 + s1);
    }
    for (int64_t i = 0; i < k / 2; i++)
        o->pair[i] = (uint16_t)((uint8_t)o->q[2 * i] | ((uint16_t)(uint8_t)o->q[2 * i + 1] << 8));
    if (!have_avx512_vnni()) return;  /* the one reader of `halves` runs only there */
    int64_t whole = k / 128 * 128;
    for (int64_t g = 0; g < whole; g += 128)
        for (int h = 0; h < 2; h++)
            for (int b = 0; b < 4; b++) memcpy(o->halves + g + 64 * h + 16 * b, o->q + g + 32 * b + 16 * h, 16);
    memcpy(o->halves + whole, o->q + whole, (size_t)(k - whole));
    if (k % QKK) return;
    static const int kquad_order[8] = {0, 2, 1, 3, 4, 6, 5, 7};
    for (int64_t g = 0; g < k; g += QKK)
        for (int b = 0; b < 8; b++) memcpy(o->kquads + g + XB * b, o->q + g + XB * kquad_order[b], XB);
}

/* m rows of x -> one allocation holding their qx_t parts; free with free(blocks). */
static qx_t *quantize_rows(const float *x, int64_t m, int64_t k) {
    size_t per = (size_t)k + (size_t)(k / XB) * 8 + (size_t)(k / 16) * 4 + (size_t)k + (size_t)k + (size_t)k + 64;
    qx_t *v = (qx_t *)malloc(sizeof(qx_t) * (size_t)m + per * (size_t)m);
    if (!v) return NULL;
    uint8_t *mem = (uint8_t *)(v + m);
    for (int64_t i = 0; i < m; i++, mem += per) {
        uint8_t *p = (uint8_t *)(((uintptr_t)mem + 31) & ~(uintptr_t)31);
        v[i].pair = (uint16_t *)p; p += k;            /* k/2 uint16 = k bytes */
        v[i].d = (float *)p; p += (k / XB) * 4;
        v[i].fsum = (float *)p; p += (k / XB) * 4;
        v[i].s16 = (int32_t *)p; p += (k / 16) * 4;
        v[i].q = (int8_t *)p; p += k;
        v[i].halves = (int8_t *)p; p += k;
        v[i].kquads = (int8_t *)p;
        quantize_row(x + i * k, k, &v[i]);
    }
    return v;
}

EXPORT int g3n_round_activations(const float *x, int64_t m, int64_t k, float *out) {
    if (k % XB) return -1;
    qx_t *v = quantize_rows(x, m, k);
    if (!v) return -2;
    for (int64_t i = 0; i < m; i++)
        for (int64_t j = 0; j < k; j++) out[i * k + j] = v[i].d[j / XB] * (float)v[i].q[j];
    free(v);
    return 0;
}

#ifdef G3N_X86
AVX2 static inline __m256i dot_u8s8(__m256i u, __m256i s) {  /* 32 u8 x s8 -> 8 int32 sums of 4 */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

AVX2 static inline __m256i dot_s8s8(__m256i a, __m256i b) {
    return dot_u8s8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a));
}

AVX2 static inline __m256i load32(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* 32 bits -> 32 bytes, each 0x10 where its bit is set (the fifth bit of Q5 values) */
AVX2 static inline __m256i bits_to_0x10(uint32_t bits) {
    const __m256i shuf = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                          2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i mask = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, mask), mask);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x10));
}

/* One row against one rounded activation row; Q4_0 / Q5_0 from block `first_block` on (row pointing at it). */
AVX2 static float q8dot_gguf_from(int type, const uint8_t *row, const qx_t *x, int64_t k, int64_t first_block) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float corr = 0.0f;
    switch (type) {
    case T_Q8_0:
        for (int64_t b = 0; b < k / 32; b++, row += 34) {
            __m256i s = dot_s8s8(load32(row + 2), load32(x->q + 32 * b));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(h2f(rd16(row)) * x->d[b]), _mm256_cvtepi32_ps(s), acc);
        }
        break;
    case T_Q4_0: case T_Q5_0: {
        int five = type == T_Q5_0;
        for (int64_t b = first_block; b < k / 32; b++) {
            const uint8_t *qs = row + (five ? 6 : 2);
            __m128i raw = _mm_loadu_si128((const __m128i *)qs);
            __m256i q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), low);
            if (five) q = _mm256_or_si256(q, bits_to_0x10(rd32(row + 2)));
            float dd = h2f(rd16(row)) * x->d[b];
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(dot_u8s8(q, load32(x->q + 32 * b))), acc);
            corr += dd * (float)((five ? 16 : 8) * (x->s16[2 * b] + x->s16[2 * b + 1]));
            row += five ? 22 : 18;
        }
        break;
    }
    case T_Q6_K: {
        const __m256i m30 = _mm256_set1_epi8(0x30);
        for (int64_t i = 0; i < k / QKK; i++, row += 210) {
            const uint8_t *ql = row, *qh = row + 128;
            const int8_t *sc = (const int8_t *)(row + 192);
            float d = h2f(rd16(row + 208));
            for (int h = 0; h < 2; h++, ql += 64, qh += 32, sc += 8) {
                __m256i a = load32(ql), bq = load32(ql + 32), hb = load32(qh);
                __m256i q[4];
                q[0] = _mm256_or_si256(_mm256_and_si256(a, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
                q[1] = _mm256_or_si256(_mm256_and_si256(bq, low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
                q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low), _mm256_and_si256(hb, m30));
                q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(bq, 4), low),
                                       _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
                for (int j = 0; j < 4; j++) {
                    int64_t b = i * 8 + h * 4 + j;  /* x block: values 32 j .. 32 j + 31 of this half */
                    __m256i scales = _mm256_set_m128i(_mm_set1_epi16(sc[2 * j + 1]), _mm_set1_epi16(sc[2 * j]));
                    __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(q[j], load32(x->q + 32 * b)), scales);
                    float dd = d * x->d[b];
                    acc = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(s), acc);
                    corr += dd * 32.0f * (float)(sc[2 * j] * x->s16[2 * b] + sc[2 * j + 1] * x->s16[2 * b + 1]);
                }
            }
        }
        break;
    }
    default:
        return 0.0f;
    }
    return hsum8(acc) - corr;
}

/* Q4_0 / Q5_0 against int8 activations with 512-bit vectors and VNNI, four blocks at a time: the blocks' nibbles
 * side by side, masked once for each block's values 0-15 and once, after a shift, for its values 16-31 (Q5_0: each
 * fifth bit adds 16 under a byte mask), met by x's rounded values in that order (qx_t.halves) with vpdpbusd; lane
 * group b sums block b, scaled by the product of the two blocks' scales. The offset (8 or 16) is taken out per
 * block with x's block sum (qx_t.fsum). Integer sums are exact, so this is the AVX2 kernel's result up to the
 * order of the float additions. Blocks past the last four are the AVX2 kernel's. */
AVX512_VNNI static inline __attribute__((always_inline)) float q8_legacy_avx512_body(int five, const uint8_t *row,
                                                                                 const qx_t *x, int64_t k) {
    const int type = five ? T_Q5_0 : T_Q4_0, bytes = five ? 22 : 18, qs_at = five ? 6 : 2;
    const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(0x10);
    const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc = _mm512_setzero_ps();
    __m128 offsets = _mm_setzero_ps();
    int64_t nb = k / 32, b = 0;
    for (; b + 4 <= nb; b += 4, row += 4 * bytes) {
        const uint8_t *r[4] = {row, row + bytes, row + 2 * bytes, row + 3 * bytes};
        __m512i n = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(r[0] + qs_at)));
        n = _mm512_inserti32x4(n, _mm_loadu_si128((const __m128i *)(r[1] + qs_at)), 1);
        n = _mm512_inserti32x4(n, _mm_loadu_si128((const __m128i *)(r[2] + qs_at)), 2);
        n = _mm512_inserti32x4(n, _mm_loadu_si128((const __m128i *)(r[3] + qs_at)), 3);
        __m512i lo = _mm512_and_si512(n, nib), hi = _mm512_and_si512(_mm512_srli_epi16(n, 4), nib);
        uint64_t scales = 0;
        for (int j = 0; j < 4; j++) scales |= (uint64_t)rd16(r[j]) << (16 * j);
        if (five) {
            uint64_t low_bits = 0, high_bits = 0;
            for (int j = 0; j < 4; j++) {
                uint64_t h = rd32(r[j] + 2);
                low_bits |= (h & 0xFFFF) << (16 * j);
                high_bits |= (h >> 16) << (16 * j);
            }
            lo = _mm512_mask_add_epi8(lo, (__mmask64)low_bits, lo, sixteen);
            hi = _mm512_mask_add_epi8(hi, (__mmask64)high_bits, hi, sixteen);
        }
        const int8_t *xq = x->halves + 32 * b;
        __m512i sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xq));
        sums = _mm512_dpbusd_epi32(sums, hi, _mm512_loadu_si512((const void *)(xq + 64)));
        __m128 dw = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)scales));
        __m128 dd = _mm_mul_ps(dw, _mm_loadu_ps(x->d + b));
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(quads, _mm512_castps128_ps512(dd)), _mm512_cvtepi32_ps(sums), acc);
        offsets = _mm_fmadd_ps(dw, _mm_loadu_ps(x->fsum + b), offsets);
    }
    offsets = _mm_add_ps(offsets, _mm_movehl_ps(offsets, offsets));
    offsets = _mm_add_ss(offsets, _mm_movehdup_ps(offsets));
    float total = _mm512_reduce_add_ps(acc) - (five ? 16.0f : 8.0f) * _mm_cvtss_f32(offsets);
    if (b < nb) total += q8dot_gguf_from(type, row, x, k, b);
    return total;
}

/* compiled once per type, so that neither carries the other's branches in its loop */
AVX512_VNNI static float q8_legacy_avx512(int type, const uint8_t *row, const qx_t *x, int64_t k) {
    return type == T_Q5_0 ? q8_legacy_avx512_body(1, row, x, k) : q8_legacy_avx512_body(0, row, x, k);
}

AVX2 static inline __m256 kquant_header(const uint8_t *row, const float *xs, float dsc[8], __m256 macc);

/* Q4_K against int8 activations with 512-bit vectors and VNNI: a super-block's nibbles as two registers of 64 bytes
 * (chunks 0-1, then 2-3), masked for the low nibbles (sub-blocks 2c and 2c + 2 side by side) and shifted for the high
 * ones (2c + 1, 2c + 3), met by x's rounded values in that order (qx_t.kquads) with vpdpbusd; each half register
 * sums one sub-block, scaled by d*sc_j times x's block scale. The minimums are taken out per sub-block with x's block
 * sums (qx_t.fsum), as the float kernel takes them out with the sums of x. Integer sums are exact: this is the
 * dequantised row times the rounded x up to the float roundings of the scaling and the order of the additions. */
AVX512_VNNI static float q8_q4_k_avx512(const uint8_t *row, const qx_t *x, int64_t k) {
    const __m512i nib = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi32(1);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 macc = _mm256_setzero_ps();
    float dsc[8];
    for (int64_t i = 0; i < k / QKK; i++, row += 144) {
        macc = kquant_header(row, x->fsum + 8 * i, dsc, macc);
        const __m512 scales =
            _mm512_castps256_ps512(_mm256_mul_ps(_mm256_loadu_ps(dsc), _mm256_loadu_ps(x->d + 8 * i)));
        const int8_t *xq = x->kquads + QKK * i;
        for (int c = 0; c < 4; c += 2, xq += 128) {
            __m512i n = _mm512_loadu_si512((const void *)(row + 16 + 32 * c));
            __m512i lo = _mm512_and_si512(n, nib), hi = _mm512_and_si512(_mm512_srli_epi16(n, 4), nib);
            __m512i low_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512((const void *)xq));
            __m512i high_sums = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi,
                                                    _mm512_loadu_si512((const void *)(xq + 64)));
            __m512i low_subs = _mm512_add_epi32(halves, _mm512_set1_epi32(2 * c));
            acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(low_subs, scales), _mm512_cvtepi32_ps(low_sums), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_add_epi32(low_subs, one), scales),
                                   _mm512_cvtepi32_ps(high_sums), acc1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - hsum8(macc);
}

/* Q6_K against int8 activations with 512-bit vectors and VNNI: a half super-block's 128 six-bit values as two
 * registers of 64 bytes (q6_k_half_values, masked to six bits), met by x's rounded values in their own order with
 * vpdpbusd; each four lanes sum one 16-value group, scaled by d*sc_g times x's block scale. The offset of 32 is taken
 * out per group with x's sums per 16 (qx_t.s16). Integer sums are exact, as in q8_q4_k_avx512. */
AVX512_VNNI static float q8_q6_k_avx512(const uint8_t *row, const qx_t *x, int64_t k) {
    const __m512i six_bits = _mm512_set1_epi8(0x3F);
    const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512i next_quads = _mm512_add_epi32(quads, _mm512_set1_epi32(4));
    const __m256i pairs = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 offsets = _mm256_setzero_ps();
    for (int64_t i = 0; i < k / QKK; i++, row += 210) {
        const __m256 d = _mm256_set1_ps(h2f(rd16(row + 208)));
        for (int h = 0; h < 2; h++) {
            const int64_t b = 8 * i + 4 * h;  /* x's blocks b .. b + 3; its groups of 16, 2 b .. 2 b + 7 */
            const __m256 dx = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(x->d + b)), pairs);
            const __m256 sc =
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + 192 + 8 * h))));
            const __m256 group_scales = _mm256_mul_ps(_mm256_mul_ps(d, sc), dx);
            const __m256i group_sums = _mm256_loadu_si256((const __m256i *)(x->s16 + 2 * b));
            offsets = _mm256_fmadd_ps(group_scales, _mm256_cvtepi32_ps(group_sums), offsets);
            const __m512 scales = _mm512_castps256_ps512(group_scales);
            __m512i q[2];
            q6_k_half_values(row + 64 * h, row + 128 + 32 * h, q);
            const int8_t *xq = x->q + XB * b;
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(q[0], six_bits),
                                             _mm512_loadu_si512((const void *)xq));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(q[1], six_bits),
                                             _mm512_loadu_si512((const void *)(xq + 64)));
            acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(quads, scales), _mm512_cvtepi32_ps(s0), acc0);
            acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(next_quads, scales), _mm512_cvtepi32_ps(s1), acc1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - 32.0f * hsum8(offsets);
}

AVX2 static float q8dot_gguf(int type, const uint8_t *row, const qx_t *x, int64_t k) {
    if (type == T_Q4_K) return q8_q4_k_avx512(row, x, k);  /* only where q8_gguf_type admits it: VNNI */
    if (type == T_Q6_K && have_avx512_vnni()) return q8_q6_k_avx512(row, x, k);
    if ((type == T_Q4_0 || type == T_Q5_0) && have_avx512_vnni()) return q8_legacy_avx512(type, row, x, k);
    return q8dot_gguf_from(type, row, x, k, 0);
}

AVX2 static float q8dot_i8(const int8_t *w, const qx_t *x, int64_t k) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / 32; b++)
        acc = _mm256_fmadd_ps(_mm256_set1_ps(x->d[b]),
                              _mm256_cvtepi32_ps(dot_s8s8(load32(w + 32 * b), load32(x->q + 32 * b))), acc);
    return hsum8(acc);
}

/* int4 tile layout: two input columns at a time, bytes interleaved so that vpmaddubsw pairs (row r, k) with
 * (row r, k + 1); 16-bit sums of up to 8 column pairs cannot overflow (8 * 2 * 15 * 127 < 32767). Rows come out
 * in the order of the unpack instructions; TILE_ROW_BASE maps each 8-row vector back. */
static const int TILE_ROW_BASE[8] = {0, 16, 8, 24, 32, 48, 40, 56};

AVX2 static void q8_int4_tile(const uint8_t *tile, const void *sz, int st, int64_t n, int64_t k, int64_t g,
                              int64_t row0, const qx_t *x, float *y) {
    /* Two passes over the tile, low nibbles (its first 32 rows) then high ones, so that the accumulators of one
     * pass fit in the 16 vector registers (one pass over all 64 rows spilled them on every column pair). */
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256 eight = _mm256_set1_ps(8.0f);
    for (int high = 0; high < 2; high++) {
        __m256 out[4];
        for (int v = 0; v < 4; v++) out[v] = _mm256_setzero_ps();
        for (int64_t grp = 0; grp < k / g; grp++) {
            __m256 s[4], zc[4];
            for (int v = 0; v < 4; v++) {
                __m256 z;
                scales_zeros8(sz, st, (grp * n + row0 + TILE_ROW_BASE[4 * high + v]) * 2, &s[v], &z);
                zc[v] = _mm256_fnmadd_ps(eight, s[v], z);  /* (q - 8) s + z = q s + (z - 8 s) */
            }
            float xsum = 0.0f;
            for (int64_t kb = grp * g; kb < (grp + 1) * g; kb += 32) {
                __m256i acc32[4];
                for (int v = 0; v < 4; v++) acc32[v] = _mm256_setzero_si256();
                for (int64_t c0 = kb; c0 < kb + 32; c0 += 16) {
                    __m256i acc16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                    #pragma GCC unroll 2
                    for (int64_t col = c0; col < c0 + 16; col += 2) {
                        __m256i b0 = load32(tile + col * 32), b1 = load32(tile + (col + 1) * 32);
                        if (high) { b0 = _mm256_srli_epi16(b0, 4); b1 = _mm256_srli_epi16(b1, 4); }
                        b0 = _mm256_and_si256(b0, low);
                        b1 = _mm256_and_si256(b1, low);
                        __m256i xp = _mm256_set1_epi16((short)x->pair[(uint64_t)col >> 1]);
                        acc16[0] = _mm256_add_epi16(acc16[0], _mm256_maddubs_epi16(_mm256_unpacklo_epi8(b0, b1), xp));
                        acc16[1] = _mm256_add_epi16(acc16[1], _mm256_maddubs_epi16(_mm256_unpackhi_epi8(b0, b1), xp));
                    }
                    for (int v = 0; v < 2; v++) {
                        acc32[2 * v] = _mm256_add_epi32(acc32[2 * v],
                                                        _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc16[v])));
                        acc32[2 * v + 1] = _mm256_add_epi32(acc32[2 * v + 1],
                                                            _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc16[v], 1)));
                    }
                }
                __m256 d = _mm256_set1_ps(x->d[kb / 32]);
                for (int v = 0; v < 4; v++)
                    out[v] = _mm256_fmadd_ps(_mm256_mul_ps(s[v], d), _mm256_cvtepi32_ps(acc32[v]), out[v]);
                xsum += x->fsum[kb / 32];
            }
            __m256 xs = _mm256_set1_ps(xsum);
            for (int v = 0; v < 4; v++) out[v] = _mm256_fmadd_ps(zc[v], xs, out[v]);
        }
        for (int v = 0; v < 4; v++) _mm256_storeu_ps(y + row0 + TILE_ROW_BASE[4 * high + v], out[v]);
    }
}
#endif

/* The types with an int8-activation kernel. Q4_K has one only with VNNI: without it, its float32 kernel (gemv_f32.c,
 * scales and minimums factored out of the block) was faster than one that rounds x (24.9-25.3 against 15.7-18.0 G
 * weights/s a core, bench/RESULTS.md), so there a Q4_K product stays exact with int8 activations. */
static int q8_gguf_type(int type) {
    return type == T_Q8_0 || type == T_Q4_0 || type == T_Q5_0 || type == T_Q6_K
           || (type == T_Q4_K && have_avx512_vnni());
}

EXPORT int g3n_q8_supported(int type) { return have_avx2() && q8_gguf_type(type); }

EXPORT int g3n_gguf_matmul_q8(int type, const uint8_t *w, int64_t n_rows, int64_t k, const int64_t *rows,
                              const float *x, int64_t m, float *y, int threads) {
#ifdef G3N_X86
    int64_t rb = g3n_gguf_row_bytes(type, k);
    if (rb == 0 || !q8_gguf_type(type) || !have_avx2() || k % XB) return -1;
    qx_t *qx = quantize_rows(x, m, k);
    if (!qx) return -2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        const uint8_t *row = w + (rows ? rows[r] : r) * rb;
        for (int64_t i = 0; i < m; i++) y[i * n_rows + r] = q8dot_gguf(type, row, &qx[i], k);
    }
    free(qx);
    return 0;
#else
    (void)type; (void)w; (void)n_rows; (void)k; (void)rows; (void)x; (void)m; (void)y; (void)threads;
    return -1;
#endif
}

EXPORT int g3n_int8_matmul_q8(const int8_t *q, const void *scales, int scale_type, int64_t n, int64_t k,
                              const int64_t *rows, const float *x, int64_t m, float *y, int threads) {
#ifdef G3N_X86
    if (!have_avx2() || k % XB) return -1;
    qx_t *qx = quantize_rows(x, m, k);
    if (!qx) return -2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        int64_t src = rows ? rows[r] : r;
        float s = scale_at(scales, scale_type, src);
        for (int64_t i = 0; i < m; i++) y[i * n + r] = q8dot_i8(q + src * k, &qx[i], k) * s;
    }
    free(qx);
    return 0;
#else
    (void)q; (void)scales; (void)scale_type; (void)n; (void)k; (void)rows; (void)x; (void)m; (void)y; (void)threads;
    return -1;
#endif
}

EXPORT int g3n_int4_matmul_q8(const uint8_t *q, const void *sz, int scale_type, int64_t n, int64_t k, int64_t g,
                              const float *x, int64_t m, float *y, int threads) {
#ifdef G3N_X86
    if (!have_avx2() || n % TILE || g < 32 || g % 32 || k % g) return -1;
    if (have_avx512()) {
        /* the float kernel's 512-bit path on the rounded x: the same product (the dequantised W times that x, up to
         * the order of the additions), and on an AMD Zen 4 faster than the integer tiles below (E2B's int4 decode
         * step: MLP 28.9 against 34.6 ms) */
        float *rounded = (float *)malloc(sizeof(float) * (size_t)(m * k));
        if (!rounded) return -2;
        int rc = g3n_round_activations(x, m, k, rounded);
        if (rc == 0) rc = g3n_int4_matmul(q, sz, scale_type, n, k, g, NULL, 0, rounded, m, y, threads, 2);
        free(rounded);
        return rc;
    }
    qx_t *qx = quantize_rows(x, m, k);
    if (!qx) return -2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < n / TILE; t++)
        for (int64_t i = 0; i < m; i++)
            q8_int4_tile(q + t * TILE / 2 * k, sz, scale_type, n, k, g, t * TILE, &qx[i], y + i * n);
    free(qx);
    return 0;
#else
    (void)q; (void)sz; (void)scale_type; (void)n; (void)k; (void)g; (void)x; (void)m; (void)y; (void)threads;
    return -1;
#endif
}

/* ------------------------------------------------------------------------------------------------------------ */
/* exported: int4 tiles -> float32, transposed, for long prompts (dense GEMM on a cache-sized block)             */
/* out [k][n_tiles * 64]: column k of tiles tile0 .. tile0 + n_tiles - 1, i.e. W[rows, :]^T for those rows.       */

#ifdef G3N_X86
/* v rounded to the scale dtype (nearest even), 8 at a time: round_as. For bfloat16 this needs no guard for NaN (whose
 * payload a carry out of the low half could turn into an infinity): v is always a product or sum of bfloat16
 * values and small integers, so a NaN in it is one of theirs or the CPU's default NaN, both with a zero low half,
 * and an infinity has one too. */
AVX2 static inline __m256 round_as8(int type, __m256 v) {
    if (type == S_BF16) {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb));
        return _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32((int)0xFFFF0000u)));
    }
    if (type == S_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

/* One input's 32 bytes of a 64-row tile -> rows[v] = W[8 v .. 8 v + 7] at that input, with this group's scales sv
 * and zeros zv (8 rows a vector): the operations of formats.int4_dequantize, each rounded to the scale dtype */
AVX2 static inline void int4_column_values(const uint8_t *b, const __m256 *sv, const __m256 *zv, int st,
                                           __m256 *rows) {
    const __m256i low = _mm256_set1_epi32(0x0F), eight = _mm256_set1_epi32(8);
    for (int part = 0; part < 4; part++) {  /* bytes 8 part .. 8 part + 7: rows 8 part.. (low) and 32 + .. */
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + 8 * part)));
        __m256 lo = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(bytes, low), eight));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bytes, 4), eight));
        lo = round_as8(st, _mm256_mul_ps(lo, sv[part]));
        hi = round_as8(st, _mm256_mul_ps(hi, sv[part + 4]));
        rows[part] = round_as8(st, _mm256_add_ps(lo, zv[part]));
        rows[part + 4] = round_as8(st, _mm256_add_ps(hi, zv[part + 4]));
    }
}

/* columns c0 .. c1 - 1 of one 64-row tile -> out[col * width + j], with this group's scales s and zeros z */
AVX2 static void int4_dequantize_cols_avx2(const uint8_t *tile, const float *s, const float *z, int st, int64_t c0,
                                           int64_t c1, float *out, int64_t width) {
    __m256 sv[8], zv[8];
    for (int v = 0; v < 8; v++) { sv[v] = _mm256_loadu_ps(s + 8 * v); zv[v] = _mm256_loadu_ps(z + 8 * v); }
    for (int64_t col = c0; col < c1; col++) {
        __m256 rows[8];
        int4_column_values(tile + col * 32, sv, zv, st, rows);
        for (int v = 0; v < 8; v++) _mm256_storeu_ps(out + col * width + 8 * v, rows[v]);
    }
}
#endif

EXPORT int g3n_int4_dequantize_t(const uint8_t *q, const void *sz, int st, int64_t n, int64_t k, int64_t g,
                                 int64_t tile0, int64_t n_tiles, float *out, int threads, int vec) {
    if (n % TILE || g <= 0 || k % g || tile0 < 0 || (tile0 + n_tiles) * TILE > n) return -1;
    vec = vec && have_avx2();
    int64_t width = n_tiles * TILE;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2)
    for (int64_t t = 0; t < n_tiles; t++) {
        for (int64_t grp = 0; grp < k / g; grp++) {
            const uint8_t *tile = q + (tile0 + t) * TILE / 2 * k;
            float s[TILE], z[TILE];
            for (int j = 0; j < TILE; j++) {
                int64_t at = (grp * n + (tile0 + t) * TILE + j) * 2;
                s[j] = scale_at(sz, st, at);
                z[j] = scale_at(sz, st, at + 1);
            }
#ifdef G3N_X86
            if (vec) {
                int4_dequantize_cols_avx2(tile, s, z, st, grp * g, (grp + 1) * g, out + t * TILE, width);
                continue;
            }
#endif
            for (int64_t col = grp * g; col < (grp + 1) * g; col++) {
                const uint8_t *b = tile + col * 32;
                float *o = out + col * width + t * TILE;
                /* the operations of formats.int4_dequantize, each rounded to the scale dtype as PyTorch does */
                for (int j = 0; j < 32; j++) {
                    o[j] = round_as(st, round_as(st, (float)((b[j] & 0x0F) - 8) * s[j]) + z[j]);
                    o[j + 32] = round_as(st, round_as(st, (float)((b[j] >> 4) - 8) * s[j + 32]) + z[j + 32]);
                }
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------------------------------------------ */
/* exact matrix-vector products for decode, and a whole decode step (their own files, for size)               */
#include "gemv_f32.c"
#include "int4_rows.c"
#include "gemm_f32.c"
#include "decode_blocks.c"
#include "channel_norm.c"
#include "depthwise_conv.c"
#include "prompt_rows.c"
