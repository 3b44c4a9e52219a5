/* Depthwise 2-D convolution of a channels-last feature map (MobileNet-V5's depthwise convs), with its zero padding
 * implicit: any top / left padding (the bottom and right follow from the output size), so TensorFlow's "SAME" padding
 * of a stride-2 conv, one pixel more on the right and bottom than on the left and top, needs no padded copy.
 *
 * Why: PyTorch's conv takes only symmetric padding, so the reference pads the map first: on a 768 px image that is
 * a copy of up to 114 MB per strided conv, freshly allocated (its first touch of each page costs more than the
 * copy). Here the map is read where it lies.
 *
 * Each output is bias (or 0) plus, for each tap in row-major order (ky, then kx) that falls inside the map, one
 * fused multiply-add of input and weight: taps in the padding add nothing, as zeros do. Vectors span channels, never
 * a sum, and the portable loop uses fmaf: both give the same bits. PyTorch's kernels sum the taps in an order of
 * their own, so the outputs differ from theirs in float32 rounding only. Included by native.c. */

#define DW_CHANNELS 32  /* channels a pass keeps in registers: four 8-wide accumulators */

/* The taps [*lo, *hi) of a k-tap kernel at output o (stride s, `before` padding) that read inside [0, size): tap t
 * reads o * s - before + t. Empty (hi <= lo) where none does. */
static inline void taps_inside(int64_t o, int s, int before, int k, int64_t size, int *lo, int *hi) {
    int64_t first = o * s - before;
    *lo = first < 0 ? (int)(-first < k ? -first : k) : 0;
    *hi = first + k > size ? (int)(size - first > 0 ? size - first : 0) : k;
}

/* out pixel (oy, ox), channels c_from .. c - 1: the portable sum, and the vector loop's channels past its last
 * multiple of 8 */
static void depthwise_pixel_portable(const float *x, const float *w, const float *bias, float *o, int64_t h,
                                     int64_t wd, int64_t c, int64_t c_from, int kh, int kw, int sh, int sw, int top,
                                     int left, int64_t oy, int64_t ox) {
    int ky0, ky1, kx0, kx1;
    taps_inside(oy, sh, top, kh, h, &ky0, &ky1);
    taps_inside(ox, sw, left, kw, wd, &kx0, &kx1);
    for (int64_t ch = c_from; ch < c; ch++) o[ch] = bias ? bias[ch] : 0.0f;
    for (int ky = ky0; ky < ky1; ky++)
        for (int kx = kx0; kx < kx1; kx++) {
            const float *xp = x + ((oy * sh - top + ky) * wd + ox * sw - left + kx) * c;
            const float *wp = w + ((int64_t)ky * kw + kx) * c;
            for (int64_t ch = c_from; ch < c; ch++) o[ch] = fmaf(xp[ch], wp[ch], o[ch]);
        }
}

#ifdef G3N_X86
/* out row oy, every channel: DW_CHANNELS at a time in registers */
AVX2 static void depthwise_row_avx2(const float *x, const float *w, const float *bias, float *out, int64_t h,
                                    int64_t wd, int64_t c, int kh, int kw, int sh, int sw, int top, int left,
                                    int64_t oy, int64_t ow) {
    const int64_t full = c / 8 * 8;
    int ky0, ky1;
    taps_inside(oy, sh, top, kh, h, &ky0, &ky1);
    for (int64_t ox = 0; ox < ow; ox++) {
        float *o = out + ox * c;
        int kx0, kx1;
        taps_inside(ox, sw, left, kw, wd, &kx0, &kx1);
        for (int64_t c0 = 0; c0 < full; c0 += DW_CHANNELS) {
            const int vecs = full - c0 >= DW_CHANNELS ? DW_CHANNELS / 8 : (int)((full - c0) / 8);
            __m256 acc[DW_CHANNELS / 8];
            for (int v = 0; v < vecs; v++) acc[v] = bias ? _mm256_loadu_ps(bias + c0 + 8 * v) : _mm256_setzero_ps();
            for (int ky = ky0; ky < ky1; ky++)
                for (int kx = kx0; kx < kx1; kx++) {
                    const float *xp = x + ((oy * sh - top + ky) * wd + ox * sw - left + kx) * c + c0;
                    const float *wp = w + ((int64_t)ky * kw + kx) * c + c0;
                    for (int v = 0; v < vecs; v++)
                        acc[v] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + 8 * v), _mm256_loadu_ps(wp + 8 * v), acc[v]);
                }
            for (int v = 0; v < vecs; v++) _mm256_storeu_ps(o + c0 + 8 * v, acc[v]);
        }
        if (full < c) depthwise_pixel_portable(x, w, bias, o, h, wd, c, full, kh, kw, sh, sw, top, left, oy, ox);
    }
}
#endif

/* x [n][h][wd][c] (channels last), w [kh][kw][c], bias [c] or NULL -> out [n][oh][ow][c]; tap (ky, kx) of output
 * (oy, ox) reads input (oy * sh - top + ky, ox * sw - left + kx), zero outside the map. 0, or -1: bad arguments. */
EXPORT int g3n_depthwise_conv(const float *x, const float *w, const float *bias, float *out, int64_t n, int64_t h,
                              int64_t wd, int64_t c, int kh, int kw, int sh, int sw, int top, int left, int64_t oh,
                              int64_t ow, int threads, int vec) {
    if (n < 0 || h <= 0 || wd <= 0 || c <= 0 || kh <= 0 || kw <= 0 || sh <= 0 || sw <= 0 || top < 0 || left < 0 ||
        oh < 0 || ow < 0)
        return -1;
    vec = vec && have_avx2();
    #pragma omp parallel for num_threads(threads) schedule(static) if (n * oh * ow * c > (1 << 14))
    for (int64_t row = 0; row < n * oh; row++) {
        const int64_t b = row / oh, oy = row % oh;
        const float *xb = x + b * h * wd * c;
        float *o = out + row * ow * c;
#ifdef G3N_X86
        if (vec) {
            depthwise_row_avx2(xb, w, bias, o, h, wd, c, kh, kw, sh, sw, top, left, oy, ow);
            continue;
        }
#endif
        for (int64_t ox = 0; ox < ow; ox++)
            depthwise_pixel_portable(xb, w, bias, o + ox * c, h, wd, c, 0, kh, kw, sh, sw, top, left, oy, ox);
    }
    return 0;
}
