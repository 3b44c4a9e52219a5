/* Long prompts over quantised weights: y = x W^T as one float32 GEMM that unpacks W as it goes (included by
 * native.c), for the project's int4 tiles and int8 rows and for GGUF blocks.
 *
 * The dense path used to unpack a 4 MB block of W^T to float32 and hand it to PyTorch's GEMM, which packed it
 * again into its own panels. Here W is unpacked straight into those panels: for each 64 output rows and each run of
 * GEMM_KC inputs, W's values (exactly those of int4_dequantize_t / formats.int8_dequantize / g3n_gguf_dequantize)
 * are written as four strips of 16 output columns, each GEMM_KC x 16 floats, small enough to stay in L1 while every
 * 6-row panel of x passes over it (gemm_block: 6 x 16 sums in 12 registers, one FMA per product). No float32 copy of
 * W reaches memory.
 *
 * Each output is summed in one fixed order: over k within a run of GEMM_KC inputs, one FMA after another, then the
 * runs added in order. That order depends on neither the number of rows of x nor the threads, so a prompt's outputs
 * are the same bits however it is batched or split; they differ from PyTorch's GEMM only in the order of the
 * float32 additions.
 *
 * x may be float32, bfloat16 or float16: a half-precision model's activations are read as the floats they are (the
 * widening is exact) while x is packed, instead of from a float32 copy of x made first.
 *
 * Inputs that are zero in all six rows of a panel are skipped (their products are zeros, which add nothing): Gemma
 * 3n's sparse MLP layers keep 5% of the down projection's inputs per token, so about three quarters of each panel's
 * inputs drop out there. A skipped input could change a sum only from -0 to +0, or hide 0 x inf = NaN; so inputs are
 * skipped only where the run's packed weights are all finite, and the test for sameness across batches and threads
 * compares values (-0 == +0).
 */
#ifdef G3N_X86

#define GEMM_KC 512  /* inputs per packed strip: 16 KB of floats, held in L1 while x's rows stream past */
#define GEMM_MC 96   /* rows of x per pass over a tile's strips (a multiple of 6): 96 KB of x, held in L2 */
#define GEMM_ROWS 64  /* output rows packed at once: four strips (one int4 tile) */
#define GEMM_STRIPS (GEMM_ROWS / 16)
/* x's panels for this many bytes of runs are worked through by every tile of W before the next runs: a slice that
 * stays in the caches while W streams past. With all runs of a tile done before the next tile (the former order),
 * a wide x (a 512-token prompt against E2B's 8192-wide down projection: 16 MB of panels) was read from memory once
 * per tile, and products with many inputs and few outputs ran at three quarters of the rate of the others. */
#define GEMM_X_CHUNK_BYTES (2 << 20)

/* c[i][j] (+)= sum_p a[p][i] * b[p][j] for i < mr (mr <= 6) and j < nc (nc <= 16): a a packed panel of x (6
 * floats a p, rows past the end of x zero), b a packed strip (16 floats a p), c's rows `ldc` apart; `accumulate`
 * adds to what c holds (the earlier runs of k), else overwrites it. With `live`, p runs over its kc entries (in
 * ascending order) instead of 0 .. kc - 1. Named accumulators, not arrays: GCC kept arrays of vectors in memory as
 * well, a store per FMA. */
AVX2 static void gemm_block(int mr, int nc, int64_t kc, const uint16_t *live, const float *a, const float *b,
                            float *c, int64_t ldc, int accumulate) {
    __m256 l0 = _mm256_setzero_ps(), h0 = l0, l1 = l0, h1 = l0, l2 = l0, h2 = l0, l3 = l0, h3 = l0, l4 = l0, h4 = l0,
           l5 = l0, h5 = l0;
#define GEMM_STEP(ap, bp)                                                                                            \
    do {                                                                                                             \
        __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps((bp) + 8), ai;                                          \
        GEMM_ROW(ap, 0) GEMM_ROW(ap, 1) GEMM_ROW(ap, 2) GEMM_ROW(ap, 3) GEMM_ROW(ap, 4) GEMM_ROW(ap, 5)              \
    } while (0)
#define GEMM_ROW(ap, i)                                                                                              \
        ai = _mm256_broadcast_ss((ap) + i);                                                                         \
        l##i = _mm256_fmadd_ps(ai, b0, l##i);                                                                       \
        h##i = _mm256_fmadd_ps(ai, b1, h##i);
    if (live)
        for (int64_t j = 0; j < kc; j++) GEMM_STEP(a + 6 * live[j], b + 16 * live[j]);
    else
        for (int64_t p = 0; p < kc; p++) GEMM_STEP(a + 6 * p, b + 16 * p);
#undef GEMM_ROW
#undef GEMM_STEP
    __m256 lo[6] = {l0, l1, l2, l3, l4, l5}, hi[6] = {h0, h1, h2, h3, h4, h5};
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (nc < 16) {  /* the last strip of a weight whose rows are not a multiple of 16 */
            float sums[16];
            _mm256_storeu_ps(sums, lo[i]);
            _mm256_storeu_ps(sums + 8, hi[i]);
            for (int j = 0; j < nc; j++) ci[j] = accumulate ? ci[j] + sums[j] : sums[j];
            continue;
        }
        if (accumulate) {
            lo[i] = _mm256_add_ps(_mm256_loadu_ps(ci), lo[i]);
            hi[i] = _mm256_add_ps(_mm256_loadu_ps(ci + 8), hi[i]);
        }
        _mm256_storeu_ps(ci, lo[i]);
        _mm256_storeu_ps(ci + 8, hi[i]);
    }
}

/* gemm_block with one 512-bit vector per row of the 6 x 16 block: half the FMA instructions for the same products,
 * where the CPU runs 512-bit operations at full width. Each output is the same chain of FMAs over p as there, so
 * the same bits: the vector width spans outputs, never a sum. */
AVX512 static void gemm_block_avx512(int mr, int nc, int64_t kc, const uint16_t *live, const float *a, const float *b,
                                     float *c, int64_t ldc, int accumulate) {
    __m512 c0 = _mm512_setzero_ps(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
#define GEMM_STEP(ap, bp)                                                                                            \
    do {                                                                                                             \
        __m512 bv = _mm512_load_ps(bp);                                                                             \
        c0 = _mm512_fmadd_ps(_mm512_set1_ps((ap)[0]), bv, c0);                                                      \
        c1 = _mm512_fmadd_ps(_mm512_set1_ps((ap)[1]), bv, c1);                                                      \
        c2 = _mm512_fmadd_ps(_mm512_set1_ps((ap)[2]), bv, c2);                                                      \
        c3 = _mm512_fmadd_ps(_mm512_set1_ps((ap)[3]), bv, c3);                                                      \
        c4 = _mm512_fmadd_ps(_mm512_set1_ps((ap)[4]), bv, c4);                                                      \
        c5 = _mm512_fmadd_ps(_mm512_set1_ps((ap)[5]), bv, c5);                                                      \
    } while (0)
    if (live)
        for (int64_t j = 0; j < kc; j++) GEMM_STEP(a + 6 * live[j], b + 16 * live[j]);
    else
        for (int64_t p = 0; p < kc; p++) GEMM_STEP(a + 6 * p, b + 16 * p);
#undef GEMM_STEP
    __m512 rows[6] = {c0, c1, c2, c3, c4, c5};
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (nc < 16) {  /* the last strip of a weight whose rows are not a multiple of 16 */
            float sums[16];
            _mm512_storeu_ps(sums, rows[i]);
            for (int j = 0; j < nc; j++) ci[j] = accumulate ? ci[j] + sums[j] : sums[j];
            continue;
        }
        _mm512_storeu_ps(ci, accumulate ? _mm512_add_ps(_mm512_loadu_ps(ci), rows[i]) : rows[i]);
    }
}

/* gemm_block_avx512 over two full strips at once (6 x 32 outputs, 12 accumulators): each broadcast of x feeds two
 * FMAs, so the loads per FMA fall from 7/6 to 8/12. The same chains of FMAs per output: the same bits. */
AVX512 static void gemm_block2_avx512(int mr, int64_t kc, const uint16_t *live, const float *a, const float *b,
                                      const float *b2, float *c, int64_t ldc, int accumulate) {
    __m512 l0 = _mm512_setzero_ps(), l1 = l0, l2 = l0, l3 = l0, l4 = l0, l5 = l0;
    __m512 r0 = l0, r1 = l0, r2 = l0, r3 = l0, r4 = l0, r5 = l0;
#define GEMM_ROW2(ap, i)                                                                                             \
        ai = _mm512_set1_ps((ap)[i]);                                                                               \
        l##i = _mm512_fmadd_ps(ai, bl, l##i);                                                                       \
        r##i = _mm512_fmadd_ps(ai, br, r##i);
#define GEMM_STEP2(ap, p)                                                                                            \
    do {                                                                                                             \
        __m512 bl = _mm512_load_ps(b + 16 * (p)), br = _mm512_load_ps(b2 + 16 * (p)), ai;                           \
        GEMM_ROW2(ap, 0) GEMM_ROW2(ap, 1) GEMM_ROW2(ap, 2) GEMM_ROW2(ap, 3) GEMM_ROW2(ap, 4) GEMM_ROW2(ap, 5)        \
    } while (0)
    if (live)
        for (int64_t j = 0; j < kc; j++) GEMM_STEP2(a + 6 * live[j], live[j]);
    else
        for (int64_t p = 0; p < kc; p++) GEMM_STEP2(a + 6 * p, p);
#undef GEMM_STEP2
#undef GEMM_ROW2
    __m512 left[6] = {l0, l1, l2, l3, l4, l5}, right[6] = {r0, r1, r2, r3, r4, r5};
    for (int i = 0; i < mr; i++) {
        float *ci = c + i * ldc;
        if (accumulate) {
            left[i] = _mm512_add_ps(_mm512_loadu_ps(ci), left[i]);
            right[i] = _mm512_add_ps(_mm512_loadu_ps(ci + 16), right[i]);
        }
        _mm512_storeu_ps(ci, left[i]);
        _mm512_storeu_ps(ci + 16, right[i]);
    }
}

/* x [m, k] (float32, float16 or bfloat16: xt) -> panels of 6 rows, each k x 6 floats (row i of the panel at p * 6 + i;
 * rows past m zero): the GEMM reads six rows' values at each k from one cache line, where six rows of x lie k floats
 * apart (with k a multiple of 1024 they all fall in the same L1 sets). For each panel and each run of GEMM_KC
 * inputs, the inputs (from the run's start) at which some row is non-zero go to live[ip * k + run start ...], their
 * count to live_count[ip * runs + run]. */
static void pack_rows_of_six(const void *x, int xt, int64_t m, int64_t k, float *panels, uint16_t *live,
                             int *live_count, int threads) {
    const int64_t runs = (k + GEMM_KC - 1) / GEMM_KC;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t ip = 0; ip < (m + 5) / 6; ip++) {
        float *out = panels + ip * k * 6;
        for (int i = 0; i < 6; i++) {
            int64_t r = 6 * ip + i;
            if (r < m && xt == S_F32)  /* the towers' float32 maps: a plain copy, no per-value type switch */
                for (int64_t p = 0; p < k; p++) out[p * 6 + i] = ((const float *)x)[r * k + p];
            else if (r < m)
                for (int64_t p = 0; p < k; p++) out[p * 6 + i] = scale_at(x, xt, r * k + p);
            else
                for (int64_t p = 0; p < k; p++) out[p * 6 + i] = 0.0f;
        }
        for (int64_t run = 0; run < runs; run++) {
            int64_t pc = run * GEMM_KC, kc = k - pc < GEMM_KC ? k - pc : GEMM_KC;
            uint16_t *list = live + ip * k + pc;
            int count = 0;
            for (int64_t p = 0; p < kc; p++) {
                const float *v = out + (pc + p) * 6;
                if (v[0] != 0.0f || v[1] != 0.0f || v[2] != 0.0f || v[3] != 0.0f || v[4] != 0.0f || v[5] != 0.0f)
                    list[count++] = (uint16_t)p;
            }
            live_count[ip * runs + run] = count;
        }
    }
}

/* whether n floats (n a multiple of 8) are all finite: skipping a zero input is exact only then */
AVX2 static int all_finite(const float *v, int64_t n) {
    const __m256i exponent = _mm256_set1_epi32(0x7F800000);
    __m256i seen = _mm256_setzero_si256();
    for (int64_t i = 0; i < n; i += 8) {
        __m256i e = _mm256_and_si256(_mm256_castps_si256(_mm256_load_ps(v + i)), exponent);
        seen = _mm256_or_si256(seen, _mm256_cmpeq_epi32(e, exponent));
    }
    return _mm256_testz_si256(seen, seen);
}

/* A source of W for the GEMM: writes W[row0 .. row0 + 63, c0 .. c1 - 1] as four strips (strip s: rows 16 s ..
 * 16 s + 15, 16 floats per input, c1 - c0 inputs a strip; rows past the weight's end zero), using `scratch`
 * (GEMM_ROWS * GEMM_KC floats) as it likes. */
typedef struct {
    void (*pack)(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips, float *scratch);
    const void *source;
} gemm_weights;

typedef struct { const uint8_t *q; const void *sz; int st; int64_t n, k, g; } int4_source;

/* int4 tiles: in a tile, row r < 32 is the low nibble of byte r of each input's 32 bytes and row r + 32 its high
 * nibble (formats.py), so each strip is one half of 16 consecutive bytes. */
AVX2 static void int4_pack_strips(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips,
                                  float *scratch) {
    const int4_source *w = source;
    const uint8_t *tile = w->q + row0 / 2 * w->k;
    const int64_t kc = c1 - c0;
    (void)scratch;
    for (int64_t col = c0; col < c1;) {
        int64_t grp = col / w->g, end = (grp + 1) * w->g < c1 ? (grp + 1) * w->g : c1;
        __m256 sv[8], zv[8];
        for (int v = 0; v < 8; v++) scales_zeros8(w->sz, w->st, (grp * w->n + row0 + 8 * v) * 2, &sv[v], &zv[v]);
        for (; col < end; col++) {
            __m256 rows[8];  /* rows 8 v .. 8 v + 7 */
            int4_column_values(tile + col * 32, sv, zv, w->st, rows);
            float *o = strips + (col - c0) * 16;
            for (int v = 0; v < 8; v++) _mm256_store_ps(o + (v / 2) * kc * 16 + (v % 2) * 8, rows[v]);
        }
    }
}

/* round_as8 for 16 values */
AVX512 static inline __m512 round_as16(int type, __m512 v) {
    if (type == S_BF16) {
        __m512i u = _mm512_castps_si512(v);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
        return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u)));
    }
    if (type == S_F16) return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    return v;
}

/* int4_pack_strips with 512-bit vectors: a strip's 16 rows at an input are one vector (bytes 0-15 give rows 0-15
 * and 32-47, bytes 16-31 rows 16-31 and 48-63). The same operations per value (formats.int4_dequantize, each
 * rounded to the scale dtype), so the same values. */
AVX512 static void int4_pack_strips_avx512(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips,
                                           float *scratch) {
    const int4_source *w = source;
    const uint8_t *tile = w->q + row0 / 2 * w->k;
    const int64_t kc = c1 - c0;
    const __m512i low = _mm512_set1_epi32(0x0F), eight = _mm512_set1_epi32(8);
    (void)scratch;
    for (int64_t col = c0; col < c1;) {
        int64_t grp = col / w->g, end = (grp + 1) * w->g < c1 ? (grp + 1) * w->g : c1;
        __m512 sv[4], zv[4];  /* strip s: rows 16 s .. 16 s + 15 */
        for (int v = 0; v < 4; v++) {
            __m256 s0, z0, s1, z1;
            scales_zeros8(w->sz, w->st, (grp * w->n + row0 + 16 * v) * 2, &s0, &z0);
            scales_zeros8(w->sz, w->st, (grp * w->n + row0 + 16 * v + 8) * 2, &s1, &z1);
            sv[v] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(s0)),
                                                        _mm256_castps_pd(s1), 1));
            zv[v] = _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(z0)),
                                                        _mm256_castps_pd(z1), 1));
        }
        for (; col < end; col++) {
            float *o = strips + (col - c0) * 16;
            for (int half = 0; half < 2; half++) {  /* bytes 16 half ..: rows 16 half .. (low), 32 + 16 half .. */
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(tile + col * 32 + 16 * half)));
                __m512 lo = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(bytes, low), eight));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(bytes, 4), eight));
                lo = round_as16(w->st, _mm512_mul_ps(lo, sv[half]));
                hi = round_as16(w->st, _mm512_mul_ps(hi, sv[half + 2]));
                _mm512_store_ps(o + half * kc * 16, round_as16(w->st, _mm512_add_ps(lo, zv[half])));
                _mm512_store_ps(o + (half + 2) * kc * 16, round_as16(w->st, _mm512_add_ps(hi, zv[half + 2])));
            }
        }
    }
}

/* Weights stored a row at a time (GGUF blocks, int8 rows): `decode` writes row r's values for inputs c0 .. c0 + kc - 1
 * to out, as the format's dequantisation gives them. */
typedef struct {
    void (*decode)(const void *format, int64_t r, int64_t c0, int64_t kc, float *out);
    const void *format;
    int64_t n;
} row_source;

typedef struct { int type; const uint8_t *w; int64_t row_bytes; } gguf_rows;

/* c0 and kc are whole blocks (GEMM_KC is a multiple of every block size): g3n_gguf_dequantize's decoding */
AVX2 static void gguf_decode(const void *format, int64_t r, int64_t c0, int64_t kc, float *out) {
    const gguf_rows *w = format;
    const int64_t values = block_values(w->type), bytes = block_bytes(w->type);
    const int64_t skip = values == 1 ? c0 * bytes : c0 / values * bytes;  /* float rows: a value a "block" */
    decode_row(w->type, w->w + r * w->row_bytes + skip, kc, out, 1);
}

typedef struct { const int8_t *q; const void *scales; int st; int64_t k; } int8_rows;

/* q * s rounded to the scale dtype: formats.int8_dequantize (kc a multiple of 8) */
AVX2 static void int8_decode(const void *format, int64_t r, int64_t c0, int64_t kc, float *out) {
    const int8_rows *w = format;
    const __m256 s = _mm256_set1_ps(scale_at(w->scales, w->st, r));
    const uint8_t *q = (const uint8_t *)(w->q + r * w->k + c0);
    for (int64_t c = 0; c < kc; c += 8)
        _mm256_storeu_ps(out + c, round_as8(w->st, _mm256_mul_ps(_mm256_cvtepi32_ps(load8_i8(q + c)), s)));
}

/* 8 registers of 8 floats (8 rows) -> 8 columns, each 8 floats, `out_ld` apart */
AVX2 static inline void transpose8_registers(__m256 r[8], float *out, int64_t out_ld) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        _mm256_storeu_ps(out + i * out_ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(out + (i + 4) * out_ld, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

/* 8 rows of 8 floats (rows `ld` apart) -> 8 columns, each 8 floats, `out_ld` apart */
AVX2 static inline void transpose8(const float *in, int64_t ld, float *out, int64_t out_ld) {
    __m256 r[8];
    for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(in + i * ld);
    transpose8_registers(r, out, out_ld);
}

/* Row-stored weights (a row_source): each row's values for these inputs decoded into scratch, then turned into
 * strips 8 x 8 at a time. */
AVX2 static void rows_pack_strips(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips,
                                  float *scratch) {
    const row_source *rows = source;
    const int64_t kc = c1 - c0;
    for (int64_t r = 0; r < GEMM_ROWS; r++) {
        if (row0 + r < rows->n) rows->decode(rows->format, row0 + r, c0, kc, scratch + r * kc);
        else memset(scratch + r * kc, 0, sizeof(float) * (size_t)kc);
    }
    for (int64_t r = 0; r < GEMM_ROWS; r += 8)
        for (int64_t p = 0; p < kc; p += 8)
            transpose8(scratch + r * kc + p, kc, strips + (r / 16) * kc * 16 + p * 16 + r % 16, 16);
}

/* 16 registers of 16 + 16 bytes (rows 0, 8, 4, 12, 2, ... 15 in that order, the bit-reversed row numbers) ->
 * register i holds byte i of rows 0-15 in its low half and byte 16 + i in its high half: four rounds of unpacks
 * (bytes, pairs, quads, eights), each interleaving register j with j + 8, both halves alike. */
AVX2 static inline void transpose_bytes16(__m256i v[16]) {
    __m256i t[16];
    for (int round = 0; round < 4; round++) {
        for (int j = 0; j < 8; j++) {
            __m256i a = v[j], b = v[j + 8];
            switch (round) {
            case 0: t[2 * j] = _mm256_unpacklo_epi8(a, b); t[2 * j + 1] = _mm256_unpackhi_epi8(a, b); break;
            case 1: t[2 * j] = _mm256_unpacklo_epi16(a, b); t[2 * j + 1] = _mm256_unpackhi_epi16(a, b); break;
            case 2: t[2 * j] = _mm256_unpacklo_epi32(a, b); t[2 * j + 1] = _mm256_unpackhi_epi32(a, b); break;
            default: t[2 * j] = _mm256_unpacklo_epi64(a, b); t[2 * j + 1] = _mm256_unpackhi_epi64(a, b);
            }
        }
        memcpy(v, t, sizeof t);
    }
}

/* The 32 bytes at each of 16 rows' pointers, transposed: v[i] holds byte i of rows 0-15 (low half) and byte 16 + i
 * (high half). */
AVX2 static inline void rows_bytes_transposed(const uint8_t *const at[16], __m256i v[16]) {
    static const int bit_reversed[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    for (int i = 0; i < 16; i++) v[i] = _mm256_loadu_si256((const __m256i *)at[bit_reversed[i]]);
    transpose_bytes16(v);
}

/* Byte l (0-31) of rows_bytes_transposed's registers */
AVX2 static inline __m128i byte_column(const __m256i v[16], int l) {
    return l < 16 ? _mm256_castsi256_si128(v[l]) : _mm256_extracti128_si256(v[l - 16], 1);
}

/* 16 signed bytes (one per row of a strip) times the rows' scales, rounded to the scale type st (int8 rows'
 * formats.int8_dequantize; S_F32 for Q8_0's float32 products): the strip's 16 floats at an input */
AVX2 static inline void int8_column(__m128i q, const float *scales, int st, float *out) {
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(q, 8)));
    _mm256_store_ps(out, round_as8(st, _mm256_mul_ps(lo, _mm256_load_ps(scales))));
    _mm256_store_ps(out + 8, round_as8(st, _mm256_mul_ps(hi, _mm256_load_ps(scales + 8))));
}

/* 16 nibbles (one per row of a strip) -> d*sc*q - dmin*m for each row, stored as the strip's 16 floats at an input */
AVX2 static inline void q4_k_column(__m128i q, const float *dsc, const float *mins, float *out) {
    __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(q));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(q, 8)));
    _mm256_store_ps(out, _mm256_fmsub_ps(_mm256_load_ps(dsc), lo, _mm256_load_ps(mins)));
    _mm256_store_ps(out + 8, _mm256_fmsub_ps(_mm256_load_ps(dsc + 8), hi, _mm256_load_ps(mins + 8)));
}

/* Q4_K rows straight into a tile's strips, without rows_pack_strips' float rows in scratch and their transpose: per
 * strip of 16 rows and each 64 inputs of a super-block, the 16 rows' 32 bytes of nibbles are transposed as bytes, and
 * each byte position gives two inputs' 16 values at once (low and high nibbles). The values are decode_row's: d*sc
 * and d*sc*q are exact in float32 (11 x 6 x 4 significant bits at most) and so is dmin*m, so the fused multiply-
 * subtract rounds once, where decode_row's multiply then subtract does. */
AVX2 static void q4_k_strips(const gguf_rows *w, int64_t row0, int64_t c0, int64_t kc, float *strips) {
    const __m128i nibble = _mm_set1_epi8(0x0F);
    float dsc[8][16] __attribute__((aligned(32))), mins[8][16] __attribute__((aligned(32)));
    for (int s = 0; s < GEMM_STRIPS; s++) {
        for (int64_t b = 0; b < kc / QKK; b++) {
            const uint8_t *block[16];
            for (int r = 0; r < 16; r++) {
                block[r] = w->w + (row0 + 16 * s + r) * w->row_bytes + (c0 / QKK + b) * 144;
                const float d = h2f(rd16(block[r])), dmin = h2f(rd16(block[r] + 2));
                for (int j = 0; j < 8; j++) {
                    int sc, mn;
                    kquant_scale_min(j, block[r] + 4, &sc, &mn);
                    dsc[j][r] = d * (float)sc;
                    mins[j][r] = dmin * (float)mn;
                }
            }
            float *out = strips + s * kc * 16 + b * QKK * 16;
            for (int c = 0; c < 4; c++, out += 64 * 16) {  /* inputs 64 c ..: low nibbles of 32 bytes, then high */
                const uint8_t *at[16];
                __m256i v[16];
                for (int r = 0; r < 16; r++) at[r] = block[r] + 16 + 32 * c;
                rows_bytes_transposed(at, v);
                for (int l = 0; l < 32; l++) {
                    __m128i q = byte_column(v, l);
                    q4_k_column(_mm_and_si128(q, nibble), dsc[2 * c], mins[2 * c], out + l * 16);
                    q4_k_column(_mm_and_si128(_mm_srli_epi16(q, 4), nibble), dsc[2 * c + 1], mins[2 * c + 1],
                                out + (32 + l) * 16);
                }
            }
        }
    }
}

/* Q8_0 rows straight into a tile's strips, as q4_k_strips: per strip and block of 32 inputs, the 16 rows' 32 bytes
 * transposed, each byte position one input's 16 values q*d (decode_row's one rounded product). */
AVX2 static void q8_0_strips(const gguf_rows *w, int64_t row0, int64_t c0, int64_t kc, float *strips) {
    float d[16] __attribute__((aligned(32)));
    for (int s = 0; s < GEMM_STRIPS; s++)
        for (int64_t b = 0; b < kc / QK; b++) {
            const uint8_t *at[16];
            __m256i v[16];
            for (int r = 0; r < 16; r++) {
                const uint8_t *block = w->w + (row0 + 16 * s + r) * w->row_bytes + (c0 / QK + b) * 34;
                d[r] = h2f(rd16(block));
                at[r] = block + 2;
            }
            rows_bytes_transposed(at, v);
            float *out = strips + s * kc * 16 + b * QK * 16;
            for (int l = 0; l < 32; l++) int8_column(byte_column(v, l), d, S_F32, out + l * 16);
        }
}

/* Q6_K rows straight into a tile's strips, as q4_k_strips: per strip and half super-block (128 inputs), the 16 rows'
 * low nibbles (two runs of 32 bytes) and high bits (32 bytes) transposed, each byte position then giving four
 * inputs' six-bit values; each is (q - 32) * (d*sc), decode_row's one rounded product (d*sc is exact). */
AVX2 static void q6_k_strips(const gguf_rows *w, int64_t row0, int64_t c0, int64_t kc, float *strips) {
    const __m128i nibble = _mm_set1_epi8(0x0F), two_bits = _mm_set1_epi8(0x30), offset = _mm_set1_epi8(32);
    float dsc[16][16] __attribute__((aligned(32)));  /* [scale][row] */
    for (int s = 0; s < GEMM_STRIPS; s++)
        for (int64_t b = 0; b < kc / QKK; b++) {
            const uint8_t *block[16];
            for (int r = 0; r < 16; r++) {
                block[r] = w->w + (row0 + 16 * s + r) * w->row_bytes + (c0 / QKK + b) * 210;
                const float d = h2f(rd16(block[r] + 208));
                for (int j = 0; j < 16; j++) dsc[j][r] = d * (float)(int8_t)block[r][192 + j];
            }
            for (int h = 0; h < 2; h++) {
                const uint8_t *at[16];
                __m256i low[16], low2[16], high[16];  /* ql bytes 0-31 and 32-63 of this half, qh bytes 0-31 */
                for (int r = 0; r < 16; r++) at[r] = block[r] + 64 * h;
                rows_bytes_transposed(at, low);
                for (int r = 0; r < 16; r++) at[r] = block[r] + 64 * h + 32;
                rows_bytes_transposed(at, low2);
                for (int r = 0; r < 16; r++) at[r] = block[r] + 128 + 32 * h;
                rows_bytes_transposed(at, high);
                float *out = strips + s * kc * 16 + (b * QKK + 128 * h) * 16;
                for (int l = 0; l < 32; l++) {
                    const __m128i a = byte_column(low, l), c = byte_column(low2, l), hb = byte_column(high, l);
                    const __m128i q[4] = {
                        _mm_or_si128(_mm_and_si128(a, nibble), _mm_and_si128(_mm_slli_epi16(hb, 4), two_bits)),
                        _mm_or_si128(_mm_and_si128(c, nibble), _mm_and_si128(_mm_slli_epi16(hb, 2), two_bits)),
                        _mm_or_si128(_mm_and_si128(_mm_srli_epi16(a, 4), nibble), _mm_and_si128(hb, two_bits)),
                        _mm_or_si128(_mm_and_si128(_mm_srli_epi16(c, 4), nibble),
                                     _mm_and_si128(_mm_srli_epi16(hb, 2), two_bits))};
                    for (int j = 0; j < 4; j++)  /* inputs 32 j + l of this half; scale 2 j + l / 16 */
                        int8_column(_mm_sub_epi8(q[j], offset), dsc[8 * h + 2 * j + l / 16], S_F32,
                                    out + (32 * j + l) * 16);
                }
            }
        }
}

/* F16 / BF16 rows straight into a tile's strips: 8 rows of 8 values widened into registers (exactly, as the row
 * decoders do) and transposed there, without the float rows in scratch. */
AVX2 static void half_strips(const gguf_rows *w, int64_t row0, int64_t c0, int64_t kc, float *strips) {
    for (int64_t r = 0; r < GEMM_ROWS; r += 8) {
        const uint8_t *first = w->w + (row0 + r) * w->row_bytes + 2 * c0;
        float *out = strips + (r / 16) * kc * 16 + r % 16;
        for (int64_t p = 0; p < kc; p += 8, out += 8 * 16) {
            __m256 v[8];
            for (int i = 0; i < 8; i++) {
                const uint8_t *at = first + i * w->row_bytes + 2 * p;
                v[i] = w->type == T_BF16 ? load8_bf16(at) : _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)at));
            }
            transpose8_registers(v, out, 16);
        }
    }
}

/* GGUF rows into strips: a whole tile of a type above straight from its bytes, else through rows_pack_strips */
AVX2 static void gguf_pack_strips(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips,
                                  float *scratch) {
    const row_source *rows = source;
    const gguf_rows *w = rows->format;
    if (row0 + GEMM_ROWS <= rows->n) {
        switch (w->type) {
        case T_Q4_K: q4_k_strips(w, row0, c0, c1 - c0, strips); return;
        case T_Q6_K: q6_k_strips(w, row0, c0, c1 - c0, strips); return;
        case T_Q8_0: q8_0_strips(w, row0, c0, c1 - c0, strips); return;
        case T_F16: case T_BF16: half_strips(w, row0, c0, c1 - c0, strips); return;
        }
    }
    rows_pack_strips(source, row0, c0, c1, strips, scratch);
}

/* int8 rows (one scale a row) straight into strips, as q8_0_strips, 32 inputs at a time: formats.
 * int8_dequantize's q*s rounded to the scale dtype. A run whose inputs are not a multiple of 32, or a tile that ends
 * past the last row, is left to rows_pack_strips. */
AVX2 static void int8_pack_strips(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips,
                                  float *scratch) {
    const row_source *rows = source;
    const int8_rows *w = rows->format;
    const int64_t kc = c1 - c0;
    if (row0 + GEMM_ROWS > rows->n || kc % 32) {
        rows_pack_strips(source, row0, c0, c1, strips, scratch);
        return;
    }
    float scales[16] __attribute__((aligned(32)));
    for (int s = 0; s < GEMM_STRIPS; s++) {
        for (int r = 0; r < 16; r++) scales[r] = scale_at(w->scales, w->st, row0 + 16 * s + r);
        for (int64_t p = 0; p < kc; p += 32) {
            const uint8_t *at[16];
            __m256i v[16];
            for (int r = 0; r < 16; r++) at[r] = (const uint8_t *)(w->q + (row0 + 16 * s + r) * w->k + c0 + p);
            rows_bytes_transposed(at, v);
            float *out = strips + s * kc * 16 + p * 16;
            for (int l = 0; l < 32; l++) int8_column(byte_column(v, l), scales, w->st, out + l * 16);
        }
    }
}

typedef struct { const float *w; int64_t n, k; } f32_rows;

/* float32 rows (an encoder tower's own weights): turned into strips 8 x 8 straight from W, no copy first; rows past
 * the weight's end come from a zero-padded copy in scratch. */
AVX2 static void f32_pack_strips(const void *source, int64_t row0, int64_t c0, int64_t c1, float *strips,
                                 float *scratch) {
    const f32_rows *w = source;
    const int64_t kc = c1 - c0;
    for (int64_t r = 0; r < GEMM_ROWS; r += 8) {
        const float *from = w->w + (row0 + r) * w->k + c0;
        int64_t ld = w->k;
        if (row0 + r + 8 > w->n) {
            for (int64_t i = 0; i < 8; i++) {
                if (row0 + r + i < w->n) memcpy(scratch + i * kc, from + i * w->k, sizeof(float) * (size_t)kc);
                else memset(scratch + i * kc, 0, sizeof(float) * (size_t)kc);
            }
            from = scratch, ld = kc;
        }
        for (int64_t p = 0; p < kc; p += 8)
            transpose8(from + p, ld, strips + (r / 16) * kc * 16 + p * 16 + r % 16, 16);
    }
}

/* One run of inputs (GEMM_KC of them) for one tile of W (GEMM_ROWS outputs): the tile's strips packed, then the
 * panels of x's rows first .. end - 1 (first a multiple of 6) through them, added to what the earlier runs left in
 * y (the first run overwrites). */
AVX2 static void gemm_tile_run(gemm_weights weights, int64_t n, int64_t k, int64_t m, int64_t first, int64_t end,
                               int64_t row0, int64_t run, const float *panels, const uint16_t *live,
                               const int *live_count, int64_t runs, int run_sparse, float *strips, float *y) {
    const int64_t pc = run * GEMM_KC, kc = k - pc < GEMM_KC ? k - pc : GEMM_KC;
    weights.pack(weights.source, row0, pc, pc + kc, strips, strips + GEMM_ROWS * GEMM_KC);
    const int may_skip = run_sparse && all_finite(strips, GEMM_ROWS * kc), wide = have_avx512();
    for (int64_t ic = first; ic < end; ic += GEMM_MC) {
        int64_t mc = end - ic < GEMM_MC ? end - ic : GEMM_MC;
        for (int s = 0; s < GEMM_STRIPS && row0 + 16 * s < n; s++) {
            int nc = n - row0 - 16 * s < 16 ? (int)(n - row0 - 16 * s) : 16;
            const int pair = wide && s + 1 < GEMM_STRIPS && row0 + 16 * (s + 2) <= n;  /* two full strips at once */
            for (int64_t ir = ic; ir < ic + mc; ir += 6) {
                int64_t ip = ir / 6, count = live_count[ip * runs + run];
                const uint16_t *list = may_skip && count < kc ? live + ip * k + pc : NULL;
                int mr = m - ir < 6 ? (int)(m - ir) : 6;
                const float *a = panels + (ir * k + pc * 6), *b = strips + s * kc * 16;
                float *c = y + ir * n + row0 + 16 * s;
                if (pair) gemm_block2_avx512(mr, list ? count : kc, list, a, b, b + kc * 16, c, n, pc > 0);
                else (wide ? gemm_block_avx512 : gemm_block)(mr, nc, list ? count : kc, list, a, b, c, n, pc > 0);
            }
            s += pair;
        }
    }
}

/* The calling thread's workspace for x's panels and their lists of live inputs, kept between calls up to
 * GEMM_KEEP_BYTES: a block that large freed and allocated again per product comes back as fresh pages, and the first
 * touch of each page (a fault, and with several threads a TLB shootdown when it is unmapped) cost more than packing
 * it did on large prompts and feature maps. Larger requests are allocated for the call and freed. */
#define GEMM_KEEP_BYTES ((size_t)64 << 20)
static _Thread_local void *gemm_kept;
static _Thread_local size_t gemm_kept_bytes;

static void *gemm_workspace(size_t bytes) {
    if (bytes > GEMM_KEEP_BYTES) return aligned_alloc(64, bytes);
    if (bytes > gemm_kept_bytes) {
        free(gemm_kept);
        gemm_kept = aligned_alloc(64, bytes);
        gemm_kept_bytes = gemm_kept ? bytes : 0;
    }
    return gemm_kept;
}

static void gemm_workspace_done(void *block, size_t bytes) {
    if (bytes > GEMM_KEEP_BYTES) free(block);
}

/* y [m, n] = x [m, k] W^T, W from `weights`, x of type xt (S_F32, S_F16, S_BF16); 0, or -2: out of memory */
AVX2 static int gemm_packed(gemm_weights weights, int64_t n, int64_t k, const void *x, int xt, int64_t m, float *y,
                            int threads) {
    const int64_t n_panels = (m + 5) / 6, runs = (k + GEMM_KC - 1) / GEMM_KC;
    /* one block: panels (64-byte aligned, a multiple of 64 bytes long), live lists, live counts, sparse flags */
    const size_t panel_bytes = sizeof(float) * (size_t)(n_panels * 6 * k), live_bytes = sizeof(uint16_t) *
        (size_t)(n_panels * k), count_bytes = sizeof(int) * (size_t)(n_panels * runs);
    const size_t panels_end = (panel_bytes + 63) / 64 * 64, live_end = (panels_end + live_bytes + 63) / 64 * 64;
    const size_t bytes = (live_end + count_bytes + (size_t)runs + 63) / 64 * 64;
    char *block = gemm_workspace(bytes);
    if (!block) return -2;
    float *panels = (float *)block;
    uint16_t *live = (uint16_t *)(block + panels_end);
    int *live_count = (int *)(block + live_end);
    char *run_sparse = block + live_end + count_bytes;
    pack_rows_of_six(x, xt, m, k, panels, live, live_count, threads);
    /* a run is sparse where some panel has inputs to skip in it; worked out once, not per tile of W */
    for (int64_t run = 0; run < runs; run++) {
        int64_t kc = k - run * GEMM_KC < GEMM_KC ? k - run * GEMM_KC : GEMM_KC;
        int sparse = 0;
        for (int64_t ip = 0; ip < n_panels && !sparse; ip++) sparse = live_count[ip * runs + run] < kc;
        run_sparse[run] = (char)sparse;
    }
    int failed = 0;
    /* runs are taken a chunk at a time, every tile of W passing over one chunk's slice of the panels before the
     * next chunk starts (see GEMM_X_CHUNK_BYTES); each output still adds its runs in ascending order. Where one run
     * of all the rows is larger than a chunk (a feature map of tens of thousands of pixels), the rows are taken a
     * block at a time as well, each tile packed again per block (a small cost beside the block's products). */
    const int64_t run_bytes = n_panels * 6 * GEMM_KC * (int64_t)sizeof(float);
    const int64_t chunk_runs = run_bytes >= GEMM_X_CHUNK_BYTES ? 1 : GEMM_X_CHUNK_BYTES / run_bytes;
    int64_t block_rows = GEMM_X_CHUNK_BYTES / (GEMM_KC * (int64_t)sizeof(float)) / GEMM_MC * GEMM_MC;
    if (run_bytes <= GEMM_X_CHUNK_BYTES || block_rows < GEMM_MC) block_rows = m;
    /* A narrow W (LAuReL's 64 outputs, a per-layer gate's 256) has too few tiles to keep every thread busy: each
     * tile's rows of x are then split into parts too, every part packing the tile's strips for itself (a cost
     * small beside its products). An output's sums do not depend on the split. */
    const int64_t tiles = (n + GEMM_ROWS - 1) / GEMM_ROWS;
    int64_t parts = tiles >= 2 * threads ? 1 : (2 * threads + tiles - 1) / tiles;
    if (parts > (block_rows + 5) / 6) parts = (block_rows + 5) / 6;
    const int64_t part_rows = ((block_rows + parts - 1) / parts + 5) / 6 * 6;
    #pragma omp parallel num_threads(threads)
    {
        float *strips = aligned_alloc(64, sizeof(float) * GEMM_ROWS * GEMM_KC * 2);  /* strips, then scratch */
        if (!strips) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int64_t rows = 0; rows < m; rows += block_rows) {
            const int64_t rows_end = rows + block_rows < m ? rows + block_rows : m;
            for (int64_t first = 0; first < runs; first += chunk_runs) {
                const int64_t last = first + chunk_runs < runs ? first + chunk_runs : runs;
                #pragma omp for schedule(dynamic)
                for (int64_t unit = 0; unit < tiles * parts; unit++) {
                    const int64_t row0 = unit / parts * GEMM_ROWS, from = rows + unit % parts * part_rows;
                    const int64_t to = from + part_rows < rows_end ? from + part_rows : rows_end;
                    if (!strips || from >= to) continue;
                    for (int64_t run = first; run < last; run++)
                        gemm_tile_run(weights, n, k, m, from, to, row0, run, panels, live, live_count, runs,
                                      run_sparse[run], strips, y);
                }
            }
        }
        free(strips);
    }
    gemm_workspace_done(block, bytes);
    return failed ? -2 : 0;
}

/* y [m, n] = x [m, k] W^T for W in int4 tiles (n a multiple of 64, k of g); -1: not done here (no AVX2, or a shape
 * it does not take; the caller has its own path), -2: out of memory. */
EXPORT int g3n_int4_gemm(const uint8_t *q, const void *sz, int st, int64_t n, int64_t k, int64_t g, const void *x,
                         int xt, int64_t m, float *y, int threads) {
    if (!have_avx2() || n % TILE || g <= 0 || k % g || m <= 0) return -1;
    int4_source source = {q, sz, st, n, k, g};
    return gemm_packed((gemm_weights){have_avx512() ? int4_pack_strips_avx512 : int4_pack_strips, &source}, n, k, x,
                       xt, m, y, threads);
}

/* y [m, n] = x [m, k] W^T for W the n GGUF rows at w (k a multiple of 8 and of the type's block): as above. */
EXPORT int g3n_gguf_gemm(int type, const uint8_t *w, int64_t n, int64_t k, const void *x, int xt, int64_t m,
                         float *y, int threads) {
    int64_t row_bytes = g3n_gguf_row_bytes(type, k);
    if (!have_avx2() || row_bytes == 0 || k % 8 || GEMM_KC % block_values(type) || m <= 0 || n <= 0) return -1;
    gguf_rows format = {type, w, row_bytes};
    row_source rows = {gguf_decode, &format, n};
    return gemm_packed((gemm_weights){gguf_pack_strips, &rows}, n, k, x, xt, m, y, threads);
}

/* y [m, n] = x [m, k] W^T for W float32 rows [n, k] (k a multiple of 8): as above. */
EXPORT int g3n_f32_gemm(const float *w, int64_t n, int64_t k, const void *x, int xt, int64_t m, float *y,
                        int threads) {
    if (!have_avx2() || k % 8 || k <= 0 || m <= 0 || n <= 0) return -1;
    f32_rows rows = {w, n, k};
    return gemm_packed((gemm_weights){f32_pack_strips, &rows}, n, k, x, xt, m, y, threads);
}

/* y [m, n] = x [m, k] W^T for W int8 rows [n, k] with one scale per row (k a multiple of 8): as above. */
EXPORT int g3n_int8_gemm(const int8_t *q, const void *scales, int st, int64_t n, int64_t k, const void *x, int xt,
                         int64_t m, float *y, int threads) {
    if (!have_avx2() || k % 8 || k <= 0 || m <= 0 || n <= 0) return -1;
    int8_rows format = {q, scales, st, k};
    row_source rows = {int8_decode, &format, n};
    return gemm_packed((gemm_weights){int8_pack_strips, &rows}, n, k, x, xt, m, y, threads);
}

#else
EXPORT int g3n_int4_gemm(const uint8_t *q, const void *sz, int st, int64_t n, int64_t k, int64_t g, const void *x,
                         int xt, int64_t m, float *y, int threads) {
    (void)q; (void)sz; (void)st; (void)n; (void)k; (void)g; (void)x; (void)xt; (void)m; (void)y;
    (void)threads;
    return -1;
}

EXPORT int g3n_gguf_gemm(int type, const uint8_t *w, int64_t n, int64_t k, const void *x, int xt, int64_t m,
                         float *y, int threads) {
    (void)type; (void)w; (void)n; (void)k; (void)x; (void)xt; (void)m; (void)y; (void)threads;
    return -1;
}

EXPORT int g3n_f32_gemm(const float *w, int64_t n, int64_t k, const void *x, int xt, int64_t m, float *y,
                        int threads) {
    (void)w; (void)n; (void)k; (void)x; (void)xt; (void)m; (void)y; (void)threads;
    return -1;
}

EXPORT int g3n_int8_gemm(const int8_t *q, const void *scales, int st, int64_t n, int64_t k, const void *x, int xt,
                         int64_t m, float *y, int threads) {
    (void)q; (void)scales; (void)st; (void)n; (void)k; (void)x; (void)xt; (void)m; (void)y; (void)threads;
    return -1;
}
#endif
