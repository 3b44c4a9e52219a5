/* Two per-token steps of a Gemma 3n layer over a prompt, each in one pass over its rows (included by native.c).
 *
 * Why: a prompt runs the layers eagerly, and in a half-precision model these two steps were chains of PyTorch ops
 * whose cost was out of proportion to their arithmetic: on a 512-token E2B prompt the sparse layers' torch.std
 * alone (a Welford update, with a division, per value) took as long as a tenth of the prompt's matrix products, and
 * AltUp's prediction (a 4 x 4 mix of the streams per token) went through a float32 copy of all four streams, a
 * batched GEMM of 4-wide matrices and two more conversions. Values are read and written in the model's dtype
 * (float32, float16 or bfloat16: xt); each result is rounded to it where the PyTorch expression rounds.
 */

/* value i of a row of type xt, and v (already representable in xt: round_as) stored as type xt */
static inline float row_at(const void *x, int xt, int64_t i) { return scale_at(x, xt, i); }

static inline void row_store(void *y, int xt, int64_t i, float v) {
    if (xt == S_F32) {
        ((float *)y)[i] = v;
        return;
    }
    uint32_t u;
    memcpy(&u, &v, 4);
    if (xt == S_BF16) {
        ((uint16_t *)y)[i] = (uint16_t)(v != v ? 0x7FC0u : u >> 16);  /* v is a bfloat16 value: its top half */
        return;
    }
#ifdef __FLT16_MAX__
    _Float16 h = (_Float16)v;
    memcpy((uint16_t *)y + i, &h, 2);
#endif
}

/* ReLU of d, keeping a NaN (what the vector path's max(0, d) gives, -0 included) */
static inline float relu_keep_nan(float d) { return 0.0f > d ? 0.0f : d; }

/* one row of g3n_gaussian_topk, value by value */
static void topk_row(const void *x, void *y, int xt, int64_t at, int64_t n, float z) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};  /* four chains: a double sum of at most 2^20 values loses nothing */
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) s[j] += row_at(x, xt, at + i + j);
    for (; i < n; i++) s[0] += row_at(x, xt, at + i);
    const double mean = (s[0] + s[1] + s[2] + s[3]) / (double)n;
    double v[4] = {0.0, 0.0, 0.0, 0.0};
    for (i = 0; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) {
            double d = row_at(x, xt, at + i + j) - mean;
            v[j] += d * d;
        }
    for (; i < n; i++) {
        double d = row_at(x, xt, at + i) - mean;
        v[0] += d * d;
    }
    const float m = round_as(xt, (float)mean);
    const float sd = round_as(xt, (float)sqrt((v[0] + v[1] + v[2] + v[3]) / (double)n));
    const float cut = round_as(xt, m + round_as(xt, sd * z));
    for (i = 0; i < n; i++) row_store(y, xt, at + i, relu_keep_nan(round_as(xt, row_at(x, xt, at + i) - cut)));
}

#ifdef G3N_X86
/* 8 values of a row of type xt from i, as floats */
AVX2 static inline __m256 row_load8(const void *x, int xt, int64_t i) {
    if (xt == S_F32) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    if (xt == S_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* 8 values representable in type xt (round_as8) stored from i */
AVX2 static inline void row_store8(void *y, int xt, int64_t i, __m256 v) {
    if (xt == S_F32) {
        _mm256_storeu_ps((float *)y + i, v);
        return;
    }
    __m128i h;
    if (xt == S_F16) {
        h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
        __m256i top = _mm256_srli_epi32(_mm256_castps_si256(v), 16);  /* exact: v is a bfloat16 value */
        h = _mm_packus_epi32(_mm256_castsi256_si128(top), _mm256_extracti128_si256(top, 1));
    }
    _mm_storeu_si128((__m128i *)((uint16_t *)y + i), h);
}

AVX2 static inline __m256d lo_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_castps256_ps128(v)); }
AVX2 static inline __m256d hi_pd(__m256 v) { return _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)); }
AVX2 static inline double hsum_pd(__m256d v) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* topk_row, 8 values a step (rows whose width is a multiple of 8): the same sums in other chains, the same
 * roundings */
AVX2 static void topk_row_avx2(const void *x, void *y, int xt, int64_t at, int64_t n, float z) {
    __m256d s0 = _mm256_setzero_pd(), s1 = s0;
    for (int64_t i = 0; i < n; i += 8) {
        __m256 v = row_load8(x, xt, at + i);
        s0 = _mm256_add_pd(s0, lo_pd(v));
        s1 = _mm256_add_pd(s1, hi_pd(v));
    }
    const double mean = hsum_pd(_mm256_add_pd(s0, s1)) / (double)n;
    const __m256d mv = _mm256_set1_pd(mean);
    s0 = s1 = _mm256_setzero_pd();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 v = row_load8(x, xt, at + i);
        __m256d d0 = _mm256_sub_pd(lo_pd(v), mv), d1 = _mm256_sub_pd(hi_pd(v), mv);
        s0 = _mm256_fmadd_pd(d0, d0, s0);  /* d * d added with one rounding: in double, nothing a float sees */
        s1 = _mm256_fmadd_pd(d1, d1, s1);
    }
    const float m = round_as(xt, (float)mean);
    const float sd = round_as(xt, (float)sqrt(hsum_pd(_mm256_add_pd(s0, s1)) / (double)n));
    const __m256 cut = _mm256_set1_ps(round_as(xt, m + round_as(xt, sd * z))), zero = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8)
        row_store8(y, xt, at + i, _mm256_max_ps(zero, round_as8(xt, _mm256_sub_ps(row_load8(x, xt, at + i), cut))));
}
#endif

/* Gaussian top-k (layers.gaussian_topk) of `rows` rows of n values: y = ReLU(x - (mean + std * z)) per row, with
 * the row's mean and population std summed in double (two passes: the mean, then the squared deviations from it)
 * and each rounded once to the dtype, as PyTorch's mean and std give them for these dtypes (float32 sums, one
 * rounding) up to the float32 rounding of those sums; then std * z, mean + that and x - the cut-off each rounded to
 * the dtype, as the PyTorch expression rounds them. z must be representable in the dtype (the reference rounds it
 * first). x and y may be the same rows. */
EXPORT int g3n_gaussian_topk(const void *x, void *y, int xt, int64_t rows, int64_t n, float z, int threads) {
    if (n <= 0 || rows < 0 || (xt != S_F32 && xt != S_BF16 && xt != S_F16)) return -1;
#ifndef __FLT16_MAX__
    if (xt == S_F16) return -1;
#endif
    const int vector = have_avx2() && n % 8 == 0;
    (void)vector;  /* (no vector path off x86) */
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
#ifdef G3N_X86
        if (vector) {
            topk_row_avx2(x, y, xt, r * n, n, z);
            continue;
        }
#endif
        topk_row(x, y, xt, r * n, n, z);
    }
    return 0;
}

/* one token's streams of g3n_altup_mix, value by value: values i0 .. D - 1 */
static void mix_token(const void *x, const float *ct, void *y, int xt, int64_t S, int64_t stream, int64_t at,
                      int64_t i0, int64_t D) {
    for (int64_t q = 0; q < S; q++)
        for (int64_t i = i0; i < D; i++) {
            double s = 0.0;
            for (int64_t p = 0; p < S; p++) s += (double)ct[q * S + p] * row_at(x, xt, p * stream + at + i);
            float mixed = round_as(xt, (float)s);
            row_store(y, xt, q * stream + at + i, round_as(xt, mixed + row_at(x, xt, q * stream + at + i)));
        }
}

#ifdef G3N_X86
/* mix_token, 8 values a step (the products are exact in double, and the sum of S of them the same in any order
 * but for its last rounding); returns how many values it did */
AVX2 static int64_t mix_token_avx2(const void *x, const float *ct, void *y, int xt, int64_t S, int64_t stream,
                                   int64_t at, int64_t D) {
    int64_t i = 0;
    for (; i + 8 <= D; i += 8) {
        __m256 v[16];
        for (int64_t p = 0; p < S; p++) v[p] = row_load8(x, xt, p * stream + at + i);
        for (int64_t q = 0; q < S; q++) {
            __m256d s0 = _mm256_setzero_pd(), s1 = s0;
            for (int64_t p = 0; p < S; p++) {
                __m256d c = _mm256_set1_pd((double)ct[q * S + p]);
                s0 = _mm256_fmadd_pd(c, lo_pd(v[p]), s0);
                s1 = _mm256_fmadd_pd(c, hi_pd(v[p]), s1);
            }
            __m256 mixed = round_as8(xt, _mm256_set_m128(_mm256_cvtpd_ps(s1), _mm256_cvtpd_ps(s0)));
            row_store8(y, xt, q * stream + at + i, round_as8(xt, _mm256_add_ps(mixed, v[q])));
        }
    }
    return i;
}
#endif

/* AltUp's prediction (text.AltUp.predict) over a prompt: streams x [S][T][D] of type xt (stream q at x + q * T * D),
 * coefs c [T][S][S] float32 (c[t][q][p]) -> y [S][T][D] of type xt, y_q = (sum_p c[q][p] x_p, rounded to the dtype)
 * + x_q, rounded to the dtype. The sum of S products is taken in double and rounded once to float32, then to the
 * dtype: the float32 sums and one rounding the reference's matmul gives, up to the order of its float32 additions.
 * y must not overlap x. */
EXPORT int g3n_altup_mix(const void *x, const float *c, void *y, int xt, int64_t S, int64_t T, int64_t D,
                         int threads) {
    if (S <= 0 || S > 16 || T < 0 || D <= 0 || (xt != S_F32 && xt != S_BF16 && xt != S_F16)) return -1;
#ifndef __FLT16_MAX__
    if (xt == S_F16) return -1;
#endif
    const int64_t stream = T * D;
    const int vector = have_avx2();
    (void)vector;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) {
        int64_t done = 0;
#ifdef G3N_X86
        if (vector) done = mix_token_avx2(x, c + t * S * S, y, xt, S, stream, t * D, D);
#endif
        mix_token(x, c + t * S * S, y, xt, S, stream, t * D, done, D);
    }
    return 0;
}

/* whether value i of a row of type xt is other than zero (-0 is zero, NaN is not) */
static inline int row_nonzero(const void *x, int xt, int64_t i) {
    if (xt == S_F32) {
        uint32_t u;
        memcpy(&u, (const float *)x + i, 4);
        return (u & 0x7FFFFFFFu) != 0;
    }
    return (((const uint16_t *)x)[i] & 0x7FFF) != 0;
}

/* The (row, column) pairs at which x [rows][n] (type xt) is not zero, row by row, columns ascending: what
 * torch.nonzero gives for a sparse layer's activations, without its pass over all the values per call of its own.
 * With `rows_at` only: rows_at[r] = the pairs before row r (rows + 1 entries), the total returned. With `cols` too
 * (as many entries as that total): the pairs' columns in order, and their rows in `pair_rows` when not NULL. */
EXPORT int64_t g3n_nonzero_rows(const void *x, int xt, int64_t rows, int64_t n, int64_t *rows_at, int64_t *pair_rows,
                                int64_t *cols, int threads) {
    if (rows < 0 || n < 0 || (xt != S_F32 && xt != S_BF16 && xt != S_F16)) return -1;
    if (!cols) {
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            int64_t count = 0;
            for (int64_t i = 0; i < n; i++) count += row_nonzero(x, xt, r * n + i);
            rows_at[r + 1] = count;
        }
        rows_at[0] = 0;
        for (int64_t r = 0; r < rows; r++) rows_at[r + 1] += rows_at[r];
        return rows_at[rows];
    }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int64_t at = rows_at[r];
        for (int64_t i = 0; i < n; i++)
            if (row_nonzero(x, xt, r * n + i)) {
                if (pair_rows) pair_rows[at] = r;
                cols[at++] = i;
            }
    }
    return rows_at[rows];
}
