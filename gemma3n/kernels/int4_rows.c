/* int4 weights as rows, for products that read only some rows of W (included by native.c).
 *
 * The int4 tile layout (native.c) interleaves 64 output rows column by column, so reading one row reads its
 * whole tile. A sparse MLP's up projection needs only the rows of the units its gate activates (about 5% in
 * Gemma 3n's first layers), so for it the decode step reads a copy of the weights one row after another
 * (Int4Linear.rows_layout makes and keeps it):
 *   qrows [n][k / 2]: per 32 columns, 16 bytes; byte i holds column i (low nibble) and column 16 + i (high);
 *   srows [n][k / g][2]: each row's (scale, zero) pairs, in the tiles' scale dtype;
 * with the same values: w = (q - 8) * scale + zero, so a group contributes scale * sum(q x) + (zero - 8 * scale)
 * * sum(x). g3n_int4_tiles_to_rows makes the copy from the tiles. */

#ifdef G3N_X86
/* sum over one group of q x, 32 columns (16 bytes) a step */
AVX2 static float int4_row_group_dot(const uint8_t *b, const float *x, int64_t g) {
    const __m128i nib = _mm_set1_epi8(0x0F);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int64_t c = 0; c < g; c += 32, b += 16, x += 32) {
        __m128i v = _mm_loadu_si128((const __m128i *)b);
        __m128i lo = _mm_and_si128(v, nib), hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), _mm256_loadu_ps(x), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))),
                             _mm256_loadu_ps(x + 8), a1);
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), _mm256_loadu_ps(x + 16), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))),
                             _mm256_loadu_ps(x + 24), a1);
    }
    return hsum8(_mm256_add_ps(a0, a1));
}
#endif

static float int4_row_group_dot_plain(const uint8_t *b, const float *x, int64_t g) {
    float s = 0.0f;
    for (int64_t c = 0; c < g; c += 32, b += 16, x += 32)
        for (int i = 0; i < 16; i++) s += (float)(b[i] & 0x0F) * x[i] + (float)(b[i] >> 4) * x[16 + i];
    return s;
}

/* y[m, r] = W[rows[r]] . x[m] for r < n_rows (rows NULL: rows 0 .. n_rows-1), W as qrows / srows above. */
EXPORT int g3n_int4_rows_matmul(const uint8_t *qrows, const void *srows, int scale_type, int64_t n, int64_t k,
                                int64_t g, const int64_t *rows, int64_t n_rows, const float *x, int64_t m, float *y,
                                int threads, int vec) {
    if (g <= 0 || g % 32 || k % g) return -1;
    vec = vec && have_avx2();
    int64_t n_groups = k / g;
    float *xs = (float *)malloc(sizeof(float) * (size_t)(m * n_groups));  /* sum of x per group */
    if (!xs) return -2;
    for (int64_t i = 0; i < m; i++)
        for (int64_t grp = 0; grp < n_groups; grp++) {
            float s = 0.0f;
            for (int64_t c = 0; c < g; c++) s += x[i * k + grp * g + c];
            xs[i * n_groups + grp] = s;
        }
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < n_rows; r++) {
        int64_t src = rows ? rows[r] : r;
        if (src < 0 || src >= n) continue;  /* the callers check; never read outside W */
        const uint8_t *q = qrows + src * (k / 2);
        for (int64_t i = 0; i < m; i++) {
            float acc = 0.0f;
            for (int64_t grp = 0; grp < n_groups; grp++) {
                const uint8_t *b = q + grp * (g / 2);
                const float *xg = x + i * k + grp * g;
#ifdef G3N_X86
                float dot = vec ? int4_row_group_dot(b, xg, g) : int4_row_group_dot_plain(b, xg, g);
#else
                float dot = int4_row_group_dot_plain(b, xg, g);
#endif
                float s = scale_at(srows, scale_type, (src * n_groups + grp) * 2);
                float z = scale_at(srows, scale_type, (src * n_groups + grp) * 2 + 1);
                acc += s * dot + (z - 8.0f * s) * xs[i * n_groups + grp];
            }
            y[i * n_rows + r] = acc;
        }
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
