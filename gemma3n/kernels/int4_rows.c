/* int4 weights as rows, for products that read only some rows of W (included by native.c).
 *
 * The int4 tile layout (native.c) interleaves 64 output rows column by column, so reading one row reads its
 * whole tile. A sparse MLP's up projection needs only the rows of the units its gate activates (about 5% in
 * Gemma 3n's first layers), so for it the decode step and a prompt's per-token products read a copy of the
 * weights one row after another (Int4Linear.rows_layout makes and keeps it):
 *   qrows [n][k / 2]: per 32 columns, 16 bytes; byte i holds column i (low nibble) and column 16 + i (high);
 *   srows [n][k / g][2]: each row's (scale, zero) pairs, in the tiles' scale dtype;
 * with the same values: w = (q - 8) * scale + zero, so a group contributes scale * sum(q x) + (zero - 8 * scale)
 * * sum(x). g3n_int4_tiles_to_rows makes the copy from the tiles. */

#ifdef G3N_X86
/* row `src` of W times x (xs: its group sums): per group, the sum of q x over 32 columns (16 bytes) a step in two
 * vectors, scaled into one vector accumulator; one horizontal sum per row (one per group was half the time on
 * 64-value groups) */
AVX2 static float int4_row_dot_avx2(const uint8_t *q, const void *srows, int scale_type, int64_t src, int64_t k,
                                    int64_t g, const float *x, const float *xs) {
    const __m128i nib = _mm_set1_epi8(0x0F);
    int64_t n_groups = k / g;
    __m256 acc = _mm256_setzero_ps();
    float offsets = 0.0f;
    for (int64_t grp = 0; grp < n_groups; grp++) {
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        const uint8_t *b = q + grp * (g / 2);
        const float *xg = x + grp * g;
        for (int64_t c = 0; c < g; c += 32, b += 16, xg += 32) {
            __m128i v = _mm_loadu_si128((const __m128i *)b);
            __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(xg), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                                 _mm256_loadu_ps(xg + 8), a1);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(xg + 16), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                                 _mm256_loadu_ps(xg + 24), a1);
        }
        float sc = scale_at(srows, scale_type, (src * n_groups + grp) * 2);
        float z = scale_at(srows, scale_type, (src * n_groups + grp) * 2 + 1);
        acc = _mm256_fmadd_ps(_mm256_set1_ps(sc), _mm256_add_ps(a0, a1), acc);
        offsets += (z - 8.0f * sc) * xs[grp];
    }
    return hsum8(acc) + offsets;
}
#endif

static float int4_row_group_dot_plain(const uint8_t *b, const float *x, int64_t g) {
    float s = 0.0f;
    for (int64_t c = 0; c < g; c += 32, b += 16, x += 32)
        for (int i = 0; i < 16; i++) s += (float)(b[i] & 0x0F) * x[i] + (float)(b[i] >> 4) * x[16 + i];
    return s;
}

/* sums of x per group of g, for each of m rows: the zeros' factor (free with free()) */
static float *int4_group_sums(const float *x, int64_t m, int64_t k, int64_t g) {
    int64_t n_groups = k / g;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m * n_groups));
    if (!xs) return NULL;
    for (int64_t i = 0; i < m; i++)
        for (int64_t grp = 0; grp < n_groups; grp++) {
            float s = 0.0f;
            for (int64_t c = 0; c < g; c++) s += x[i * k + grp * g + c];
            xs[i * n_groups + grp] = s;
        }
    return xs;
}

/* row `src` of W times one activation row x (xs: its group sums) */
static float int4_row_dot(const uint8_t *qrows, const void *srows, int scale_type, int64_t src, int64_t k,
                          int64_t g, const float *x, const float *xs, int vec) {
#ifdef G3N_X86
    if (vec) return int4_row_dot_avx2(qrows + src * (k / 2), srows, scale_type, src, k, g, x, xs);
#else
    (void)vec;
#endif
    int64_t n_groups = k / g;
    const uint8_t *q = qrows + src * (k / 2);
    float acc = 0.0f;
    for (int64_t grp = 0; grp < n_groups; grp++) {
        float s = scale_at(srows, scale_type, (src * n_groups + grp) * 2);
        float z = scale_at(srows, scale_type, (src * n_groups + grp) * 2 + 1);
        acc += s * int4_row_group_dot_plain(q + grp * (g / 2), x + grp * g, g) + (z - 8.0f * s) * xs[grp];
    }
    return acc;
}

/* y[m, r] = W[rows[r]] . x[m] for r < n_rows (rows NULL: rows 0 .. n_rows-1), W as qrows / srows above. */
EXPORT int g3n_int4_rows_matmul(const uint8_t *qrows, const void *srows, int scale_type, int64_t n, int64_t k,
                                int64_t g, const int64_t *rows, int64_t n_rows, const float *x, int64_t m, float *y,
                                int threads, int vec) {
    if (g <= 0 || g % 32 || k % g) return -1;
    vec = vec && have_avx2();
    float *xs = int4_group_sums(x, m, k, g);
    if (!xs) return -2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        int64_t src = rows ? rows[r] : r;
        if (src < 0 || src >= n) continue;  /* the callers check; never read outside W */
        for (int64_t i = 0; i < m; i++)
            y[i * n_rows + r] = int4_row_dot(qrows, srows, scale_type, src, k, g, x + i * k, xs + i * (k / g), vec);
    }
    free(xs);
    return 0;
}

/* y[e] = W[rows[e]] . x[xrows[e]] for e < n_pairs: each activation row against its own rows of W (a sparse MLP's
 * up projection over a prompt: each token's active units). Pairs sorted by xrows keep each x row in L1 while its
 * rows of W stream past. Each product is computed as g3n_int4_rows_matmul computes it. */
EXPORT int g3n_int4_rows_matmul_pairs(const uint8_t *qrows, const void *srows, int scale_type, int64_t n,
                                      int64_t k, int64_t g, const float *x, int64_t m, const int64_t *xrows,
                                      const int64_t *rows, int64_t n_pairs, float *y, int threads, int vec) {
    if (g <= 0 || g % 32 || k % g) return -1;
    vec = vec && have_avx2();
    float *xs = int4_group_sums(x, m, k, g);
    if (!xs) return -2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t e = 0; e < n_pairs; e++) {
        int64_t src = rows[e], i = xrows[e];
        if (src < 0 || src >= n || i < 0 || i >= m) continue;  /* the callers check; never read outside W or x */
        y[e] = int4_row_dot(qrows, srows, scale_type, src, k, g, x + i * k, xs + i * (k / g), vec);
    }
    free(xs);
    return 0;
}

/* qrows / srows (layout above) from int4 tiles q [n/64][k][32 bytes] with scales_and_zeros [k/g][n][2]. */
EXPORT int g3n_int4_tiles_to_rows(const uint8_t *q, const void *sz, int scale_type, int64_t n, int64_t k, int64_t g,
                                  uint8_t *qrows, void *srows, int threads) {
    if (n % TILE || g <= 0 || g % 32 || k % g) return -1;
    int64_t n_groups = k / g;
    size_t esize = scale_type == S_F32 ? 4 : 2;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *tile = q + (r / TILE) * (TILE / 2) * k;
        int byte = (int)(r % 32), shift = (r % TILE) < 32 ? 0 : 4;
        uint8_t *out = qrows + r * (k / 2);
        for (int64_t c = 0; c < k; c += 32, out += 16)
            for (int i = 0; i < 16; i++) {
                uint8_t lo = (tile[(c + i) * 32 + byte] >> shift) & 0x0F;
                uint8_t hi = (tile[(c + 16 + i) * 32 + byte] >> shift) & 0x0F;
                out[i] = (uint8_t)(lo | (hi << 4));
            }
        for (int64_t grp = 0; grp < n_groups; grp++)
            memcpy((char *)srows + (r * n_groups + grp) * 2 * esize, (const char *)sz + (grp * n + r) * 2 * esize,
                   2 * esize);
    }
    return 0;
}
