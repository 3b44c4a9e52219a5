/* Per-pixel RMS norm of a channels-last feature map (MobileNet-V5's RMSNorm2d), fused with what follows it in the
 * vision blocks: GELU-tanh, a per-channel layer scale and a residual, each optional.
 *
 * Why: on a 768 px image the maps are tens of MB, and the PyTorch form (pow, mean, add, rsqrt, mul, mul, gelu,
 * mul, add) reads and writes each map seven to nine times; this reads it once (twice with a residual) and writes it
 * once. With channels last, one pixel's channels are one contiguous row, so the norm is the text decoder's row norm.
 *
 * The arithmetic is the reference's, in float32: r = 1 / sqrt(sum(x^2) / C + eps), y = (x * r) * w, then
 * gelu_tanh(y), then y * gamma + residual, each product rounded as PyTorch rounds it; only the order of the
 * additions in sum(x^2) differs (vectorised lanes). Included by native.c after decode_blocks.c (GELU, exp). */

#ifdef G3N_X86
AVX2 static float sum_squares_avx2(const float *x, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m256 a = _mm256_loadu_ps(x + i), b = _mm256_loadu_ps(x + i + 8);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
    }
    for (; i + 8 <= n; i += 8) {
        __m256 a = _mm256_loadu_ps(x + i);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float ss = _mm_cvtss_f32(s);
    for (; i < n; i++) ss += x[i] * x[i];
    return ss;
}
#endif

static float sum_squares(const float *x, int64_t n, int vec) {
#ifdef G3N_X86
    if (vec && have_avx2()) return sum_squares_avx2(x, n);
#endif
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    return ss;
}

/* x, out: [rows][c] (out may be x); w, gamma: [c] (gamma NULL: none); residual: [rows][c] or NULL; act: GELU */
EXPORT int g3n_channel_rms_norm(const float *x, const float *w, const float *gamma, const float *residual,
                                float *out, int64_t rows, int64_t c, float eps, int act, int threads, int vec) {
    if (rows < 0 || c <= 0) return -1;
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows * c > (1 << 15))
    for (int64_t p = 0; p < rows; p++) {
        const float *xp = x + p * c;
        float *yp = out + p * c;
        float r = 1.0f / sqrtf(sum_squares(xp, c, vec) / (float)c + eps);
        for (int64_t i = 0; i < c; i++) yp[i] = (xp[i] * r) * w[i];
        if (act) gelu_inplace(yp, c, vec);
        if (gamma) for (int64_t i = 0; i < c; i++) yp[i] *= gamma[i];
        if (residual) {
            const float *rp = residual + p * c;
            for (int64_t i = 0; i < c; i++) yp[i] += rp[i];
        }
    }
    return 0;
}
