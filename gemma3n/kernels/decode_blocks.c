/* The block kernels of a decode step, and the plan that runs them (included by native.c).
 *
 * A decoder layer's order of operations is written once, as a tuple of blocks in its Python class
 * (gemma3n/model/blocks.py). For a step of one new token per row, model/native_decode.py turns the blocks of every
 * layer into a plan: an array of g3n_op, each naming one of the kernels below by its address, with the registers
 * it reads and writes and the weights of its module. g3n_run_plan runs them in order in one call, so that a step
 * costs one call instead of ~1,500 (Gemma 3 270M) to ~4,500 (E2B) small PyTorch ops, each of which costs more
 * than its arithmetic. Each kernel is the twin of one PyTorch function (blocks.EAGER) and is tested against it on
 * its own (tests/model/test_native_blocks.py). Nothing here knows which model it runs: what differs between
 * Gemma 3 and Gemma 3n is which blocks a layer lists and the data of each (norm offsets folded into the scales,
 * value norms, scales, KV slots, sparsity).
 *
 * The matrix products are the kernels of native.c, on the weights as stored (GGUF blocks, int8, int4 tiles, float
 * rows); everything else is float32 here, whatever the model's compute dtype (for a bfloat16 model that is more
 * precise than the eager path, which rounds every intermediate to bfloat16). RoPE tables, masks and KV-cache cells
 * come from the KVCache, so positions, windows and padding mean exactly what they mean in the eager path.
 */

enum { L_NONE = 0, L_GGUF = 1, L_INT8 = 2, L_INT4 = 3, L_FLOAT_T = 4 };

/* A linear map y = W x: GGUF rows (any GGUF type, including F32 / F16 / BF16 for float weights), int8 rows with a
 * scale per row, int4 tiles, or a float weight stored transposed ([k][n], `type` a GGUF float type). */
typedef struct {
    int32_t kind, type;  /* L_*; the GGUF type, or the scale dtype (S_*) of int8 / int4 */
    const void *w, *s;   /* weights; int8 scales / int4 scales_and_zeros */
    int64_t n, k, g;     /* out features, in features, int4 group size */
    int32_t group;       /* the profile counter its time adds to (g3n_step.prof) */
    const void *rows_w, *rows_s;  /* int4: NULL, or the same weights as rows (int4_rows.c), to read some rows */
} g3n_lin;

typedef struct g3n_op g3n_op;
typedef struct g3n_ctx g3n_ctx;
typedef int (*g3n_block_fn)(const g3n_op *op, const g3n_ctx *C);

/* One block of a plan: a kernel below (g3n_block_*) with its registers and its weights. What each slot of lin,
 * vec, opt and val means is the kernel's own (listed above each kernel); model/native_decode.py fills them from
 * the module the block names. */
struct g3n_op {
    g3n_block_fn run;
    int32_t in[3], out;   /* registers read (-1: none), register written (may be one of in) */
    g3n_lin lin[4];       /* linear maps */
    const float *vec[2];  /* float32 vectors (RMSNorm scales as multiplied: Gemma 3's 1 + w already added) */
    int32_t opt[8];       /* integer options */
    float val[2];         /* float constants, as the eager module holds them */
};

typedef struct {
    int32_t n_ops, n_regs;
    const g3n_op *ops;
    const int64_t *width;  /* per register: floats per batch row (a streams register holds [S][B][D]: S * D) */
} g3n_plan;

typedef struct {
    int64_t batch;
    float *const *reg;             /* per register, [B][width] ([S][B][D] for streams) */
    const float *ple;              /* Gemma 3n: [B][L][P] */
    const float *const *cos[2];    /* per attention kind [B]: each row's cos (hd floats) */
    const float *const *sin[2];    /* and its sin, with the first half negated (rope_tables) */
    const uint8_t *mask[2];        /* per kind [B][tk]: 1 = may attend */
    int64_t tk[2];                 /* per kind: keys visible */
    const int64_t *cell[2];        /* per kind [B]: the cache cell each row's new K/V goes to */
    void *const *k, *const *v;     /* per slot [B][Hkv][cap][hd] */
    const int64_t *cap;            /* per slot */
    int32_t cache_type;            /* S_F32 or S_BF16 */
    int32_t threads, q8, vec;      /* OpenMP threads; int8 activations where a product has them; AVX2 allowed */
    double *prof;                  /* NULL, or seconds added per g3n_lin.group, then [PROF_ATTEND], [PROF_TOTAL] */
} g3n_step;

/* What a kernel sees: the plan, the step, and scratch of 4 slices of B * widest floats (widest: the widest input
 * or output of any linear map in the plan), plus index lists of `widest` entries. */
struct g3n_ctx {
    const g3n_plan *P;
    const g3n_step *S;
    float *scratch[4];
    int64_t *rows;
    int32_t *cols;
};

enum { PROF_GROUPS = 3, PROF_ATTEND = 3, PROF_TOTAL = 4 };

static int lin_run(const g3n_lin *L, const float *x, int64_t m, float *y, const int64_t *rows, int64_t n_rows,
                   int threads, int q8, int vec) {
    int64_t n = rows ? n_rows : L->n;
    int rc;
    switch (L->kind) {
    case L_GGUF:
        if (q8 && L->k % XB == 0 && g3n_q8_supported(L->type))
            return g3n_gguf_matmul_q8(L->type, (const uint8_t *)L->w, n, L->k, rows, x, m, y, threads);
        return g3n_gguf_matmul(L->type, (const uint8_t *)L->w, n, L->k, rows, x, m, y, threads, vec);
    case L_INT8:
        if (q8 && L->k % XB == 0) {
            rc = g3n_int8_matmul_q8((const int8_t *)L->w, L->s, L->type, n, L->k, rows, x, m, y, threads);
            if (rc != -1) return rc;
        }
        return g3n_int8_matmul((const int8_t *)L->w, L->s, L->type, n, L->k, rows, x, m, y, threads, vec);
    case L_INT4:
        if (rows)
            return L->rows_w ? g3n_int4_rows_matmul((const uint8_t *)L->rows_w, L->rows_s, L->type, L->n, L->k, L->g,
                                                    rows, n_rows, x, m, y, threads, vec)
                             : -1;
        if (q8 && L->k % XB == 0) {
            rc = g3n_int4_matmul_q8((const uint8_t *)L->w, L->s, L->type, L->n, L->k, L->g, x, m, y, threads);
            if (rc != -1) return rc;
        }
        return g3n_int4_matmul((const uint8_t *)L->w, L->s, L->type, L->n, L->k, L->g, NULL, 0, x, m, y,
                               threads, vec);
    case L_FLOAT_T: {  /* y[i] = sum_j x[i][j] W^T[j] over the non-zero x[i][j]; threads split the outputs */
        if (rows) return -1;
        int64_t rb = g3n_gguf_row_bytes(L->type, L->n), esize = rb / (L->n ? L->n : 1);
        if (!rb) return -1;
        int64_t chunk = 256, n_chunks = (L->n + chunk - 1) / chunk;
        for (int64_t i = 0; i < m; i++) memset(y + i * L->n, 0, (size_t)L->n * sizeof(float));
        #pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t ch = 0; ch < n_chunks; ch++) {
            float part[256];
            int64_t c0 = ch * chunk, width = L->n - c0 < chunk ? L->n - c0 : chunk;
            for (int64_t j = 0; j < L->k; j++) {
                int any = 0;
                for (int64_t i = 0; i < m; i++) any |= x[i * L->k + j] != 0.0f;
                if (!any) continue;
                decode_row(L->type, (const uint8_t *)L->w + j * rb + c0 * esize, width, part, vec);
                for (int64_t i = 0; i < m; i++) {
                    float xj = x[i * L->k + j];
                    float *yi = y + i * L->n + c0;
                    for (int64_t c = 0; c < width; c++) yi[c] += xj * part[c];
                }
            }
        }
        return 0;
    }
    default:
        return -1;
    }
}

static int lin_apply(const g3n_lin *L, const float *x, int64_t m, float *y, const int64_t *rows, int64_t n_rows,
                     const g3n_step *S) {
    double t0 = S->prof ? omp_get_wtime() : 0.0;
    int rc = lin_run(L, x, m, y, rows, n_rows, S->threads, S->q8, S->vec);
    if (S->prof && L->group >= 0 && L->group < PROF_GROUPS) S->prof[L->group] += omp_get_wtime() - t0;
    return rc;
}

/* ---- small float32 pieces (one row of `n` values) ------------------------------------------------------------ */

/* x / sqrt(mean(x^2) + eps) * w (w NULL: no scale), as layers._normalise computes it */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = powf(ss / (float)n + eps, -0.5f);
    for (int64_t i = 0; i < n; i++) out[i] = w ? (x[i] * r) * w[i] : x[i] * r;
}

static inline float gelu_tanh(float x) {
    const float k = 0.7978845608028654f;  /* sqrt(2 / pi) */
    return 0.5f * x * (1.0f + tanhf(k * (x + 0.044715f * x * x * x)));
}

#ifdef G3N_X86
/* e^x for x in [-88, 88], 8 at a time: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 polynomial (~2 ulp) */
AVX2 static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln 2 in two parts */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_add_ps(_mm256_fmadd_ps(y, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* gelu_tanh as x * sigmoid(2u) = x / (1 + e^(-2u)), the same function as 0.5 x (1 + tanh u), u = k (x + c x^3) */
AVX2 static void gelu_tanh_avx2(float *x, int64_t n) {
    const __m256 k2 = _mm256_set1_ps(-2.0f * 0.7978845608028654f), c = _mm256_set1_ps(0.044715f);
    const __m256 one = _mm256_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        __m256 u = _mm256_mul_ps(k2, _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v));
        _mm256_storeu_ps(x + i, _mm256_div_ps(v, _mm256_add_ps(one, exp8(u))));
    }
    for (; i < n; i++) x[i] = gelu_tanh(x[i]);
}
#endif

static void gelu_inplace(float *x, int64_t n, int vec) {
#ifdef G3N_X86
    if (vec && have_avx2()) { gelu_tanh_avx2(x, n); return; }
#endif
    for (int64_t i = 0; i < n; i++) x[i] = gelu_tanh(x[i]);
}

/* x * cos + roll(x, hd/2) * signed_sin (layers.rotate) */
static void rope(float *x, const float *cos_, const float *ssin, int64_t hd) {
    float tmp[1024];
    int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) tmp[i] = x[i] * cos_[i] + x[(i + half) % hd] * ssin[i];
    memcpy(x, tmp, (size_t)hd * sizeof(float));
}

static inline float kv_at(const void *base, int type, int64_t i) {
    return type == S_BF16 ? bf16_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline uint16_t float_to_bf16(float f) {  /* round to nearest even, as PyTorch converts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static void kv_store(void *base, int type, int64_t at, const float *src, int64_t n) {
    if (type == S_BF16)
        for (int64_t i = 0; i < n; i++) ((uint16_t *)base)[at + i] = float_to_bf16(src[i]);
    else
        memcpy((float *)base + at, src, (size_t)n * sizeof(float));
}

/* q . (cache cells at .. at + hd - 1). A bfloat16 cell is widened exactly, so both cache types give the same bits
 * for the same values (dot_bf16 and dot_f32 add in the same order). */
static float kv_dot(const float *q, const void *base, int type, int64_t at, int64_t hd, int vec) {
#ifdef G3N_X86
    if (vec && have_avx2() && hd % 16 == 0) {
        if (type == S_F32) return dot_f32((const float *)base + at, q, hd);
        return dot_bf16((const uint8_t *)((const uint16_t *)base + at), q, hd);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < hd; i++) s += q[i] * kv_at(base, type, at + i);
    return s;
}

#ifdef G3N_X86
/* o += p * (cache cells at .. at + hd - 1) for the largest multiple of 8 elements, which it returns: a multiply then
 * an add per element, as the portable loop of kv_axpy rounds them (no fused multiply-add), so both give the same
 * bits. */
AVX2 static int64_t kv_axpy_avx2(float *o, float p, const void *base, int type, int64_t at, int64_t hd) {
    __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8) {
        __m256 v = type == S_F32 ? _mm256_loadu_ps((const float *)base + at + i)
                                 : load8_bf16((const uint16_t *)base + at + i);
        _mm256_storeu_ps(o + i, _mm256_add_ps(_mm256_loadu_ps(o + i), _mm256_mul_ps(pv, v)));
    }
    return i;
}
#endif

static void kv_axpy(float *o, float p, const void *base, int type, int64_t at, int64_t hd, int vec) {
    int64_t i = 0;
#ifdef G3N_X86
    if (vec && have_avx2()) i = kv_axpy_avx2(o, p, base, type, at, hd);
#endif
    for (; i < hd; i++) o[i] += p * kv_at(base, type, at + i);
}

/* Attention of one query row per (row, head) over the visible keys of a slot; out [B][H * hd]. */
static int attend(const g3n_step *S, int64_t H, int64_t Hkv, int64_t hd, float scale, int slot, int kind,
                  const float *q, float *out) {
    int64_t B = S->batch, tk = S->tk[kind], cap = S->cap[slot];
    int64_t group = H / Hkv;
    const void *K = S->k[slot], *V = S->v[slot];
    int type = S->cache_type;
    int threads = tk * hd * B * H > (1 << 16) ? S->threads : 1;
    float *scores = (float *)malloc((size_t)tk * sizeof(float) * (size_t)threads);
    if (!scores) return -2;
    #pragma omp parallel num_threads(threads)
    {
        float *p = scores + (size_t)tk * (size_t)omp_get_thread_num();
        #pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H, kvh = h / group;
            const float *qh = q + (b * H + h) * hd;
            const uint8_t *mask = S->mask[kind] + b * tk;
            int64_t base = (b * Hkv + kvh) * cap * hd;
            float mx = -INFINITY;
            for (int64_t j = 0; j < tk; j++) {
                p[j] = mask[j] ? kv_dot(qh, K, type, base + j * hd, hd, S->vec) * scale : -INFINITY;
                mx = fmaxf(mx, p[j]);
            }
            float sum = 0.0f;
            for (int64_t j = 0; j < tk; j++) {
                p[j] = mask[j] ? expf(p[j] - mx) : 0.0f;
                sum += p[j];
            }
            float *o = out + (b * H + h) * hd;
            memset(o, 0, (size_t)hd * sizeof(float));
            for (int64_t j = 0; j < tk; j++) {
                if (p[j] == 0.0f) continue;
                kv_axpy(o, p[j] / sum, V, type, base + j * hd, hd, S->vec);
            }
        }
    }
    free(scores);
    return 0;
}

/* ---- the block kernels: each the twin of one PyTorch function of model/blocks.py's EAGER ------------------------
 *
 * Every kernel reads its input registers and writes its output register for the B rows of the step (one new token
 * each), float32 throughout. Unless a kernel says otherwise its registers are [B][D]. */

#define REG(i) (C->S->reg[op->in[i]])
#define OUT (C->S->reg[op->out])

/* rms_norm: out = in / sqrt(mean(in^2) + eps) * vec[0] (no scale where vec[0] is NULL); val[0] eps. */
EXPORT int g3n_block_rms_norm(const g3n_op *op, const g3n_ctx *C) {
    int64_t B = C->S->batch, n = C->P->width[op->in[0]];
    const float *x = REG(0);
    float *y = OUT;
    for (int64_t b = 0; b < B; b++) rms_norm(x + b * n, op->vec[0], n, op->val[0], y + b * n);
    return 0;
}

/* add: out = ((in0 + in1) + in2) / val[0], left to right; in[2] -1: two terms; val[0] 0: no division. */
EXPORT int g3n_block_add(const g3n_op *op, const g3n_ctx *C) {
    int64_t n = C->S->batch * C->P->width[op->out];
    const float *a = REG(0), *b = REG(1), *c = op->in[2] >= 0 ? REG(2) : NULL;
    float *y = OUT, d = op->val[0];
    for (int64_t i = 0; i < n; i++) {
        float s = a[i] + b[i];
        if (c) s += c[i];
        y[i] = d != 0.0f ? s / d : s;
    }
    return 0;
}

/* first_stream: out [B][D] = stream 0 of in [S][B][D]. */
EXPORT int g3n_block_first_stream(const g3n_op *op, const g3n_ctx *C) {
    memcpy(OUT, REG(0), sizeof(float) * (size_t)(C->S->batch * C->P->width[op->out]));
    return 0;
}

/* laurel: out = in + rms_norm(right(left(in))); lin left, right; vec[0] the norm's scale; val[0] eps. */
EXPORT int g3n_block_laurel(const g3n_op *op, const g3n_ctx *C) {
    const g3n_step *S = C->S;
    int64_t B = S->batch, D = op->lin[1].n;
    const float *x = REG(0);
    float *y = OUT, *low = C->scratch[0], *back = C->scratch[1];
    int rc;
    if ((rc = lin_apply(&op->lin[0], x, B, low, NULL, 0, S))) return rc;
    if ((rc = lin_apply(&op->lin[1], low, B, back, NULL, 0, S))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(back + b * D, op->vec[0], D, op->val[0], back + b * D);
        for (int64_t i = 0; i < D; i++) y[b * D + i] = x[b * D + i] + back[b * D + i];
    }
    return 0;
}

/* attention: out = o(softmax(q k^T * scale) v) with q = rope(q_norm(q(in))) per head, over the visible keys of the
 * K/V slot; a layer that writes K/V first computes rope(k_norm(k(in))) and v(in) (then a weightless RMSNorm on v
 * where it normalises values) and stores them in the step's cell of its slot.
 * lin q, k, v, o; vec q_norm, k_norm; opt kind (0 sliding, 1 full), slot, writes, normalises values, heads,
 * kv heads, head dim; val scale, eps. */
EXPORT int g3n_block_attention(const g3n_op *op, const g3n_ctx *C) {
    const g3n_step *S = C->S;
    int64_t B = S->batch, H = op->opt[4], Hkv = op->opt[5], hd = op->opt[6];
    int kind = op->opt[0], slot = op->opt[1], rc;
    float eps = op->val[1];
    const float *x = REG(0);
    float *q = C->scratch[0], *attn = C->scratch[3];
    if (hd > 1024 || hd % 2 || kind < 0 || kind > 1) return -1;  /* rope's buffer */
    if ((rc = lin_apply(&op->lin[0], x, B, q, NULL, 0, S))) return rc;
    const float *const *cos_ = S->cos[kind], *const *sin_ = S->sin[kind];
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float *qh = q + (b * H + h) * hd;
            rms_norm(qh, op->vec[0], hd, eps, qh);
            rope(qh, cos_[b], sin_[b], hd);
        }
    if (op->opt[2]) {
        float *k = C->scratch[1], *v = C->scratch[2];
        if ((rc = lin_apply(&op->lin[1], x, B, k, NULL, 0, S))) return rc;
        if ((rc = lin_apply(&op->lin[2], x, B, v, NULL, 0, S))) return rc;
        int64_t cap = S->cap[slot];
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < Hkv; h++) {
                float *kh = k + (b * Hkv + h) * hd, *vh = v + (b * Hkv + h) * hd;
                rms_norm(kh, op->vec[1], hd, eps, kh);
                rope(kh, cos_[b], sin_[b], hd);
                if (op->opt[3]) rms_norm(vh, NULL, hd, eps, vh);
                int64_t at = ((b * Hkv + h) * cap + S->cell[kind][b]) * hd;
                kv_store(S->k[slot], S->cache_type, at, kh, hd);
                kv_store(S->v[slot], S->cache_type, at, vh, hd);
            }
    }
    double t0 = S->prof ? omp_get_wtime() : 0.0;
    if ((rc = attend(S, H, Hkv, hd, op->val[0], slot, kind, q, attn))) return rc;
    if (S->prof) S->prof[PROF_ATTEND] += omp_get_wtime() - t0;
    return lin_apply(&op->lin[3], attn, B, OUT, NULL, 0, S);
}

/* The x a float-activation kernel multiplies where the dense product would take int8 activations (S->q8): x
 * rounded as that product rounds it, into `scratch`, so that the sparse paths compute what it computes; else x. */
static int int8_activations_as_floats(const g3n_step *S, const float *x, int64_t B, int64_t k, float *scratch,
                                      const float **out) {
    *out = x;
    if (!S->q8 || k % XB) return 0;
    *out = scratch;
    return g3n_round_activations(x, B, k, scratch);
}

/* mlp: out = down(gelu(gate(in)) * up(in)); a sparse MLP first applies Gaussian top-k to the gate (ReLU(g - (mean
 * + z * population std)) per row), and up to opt[1] rows computes only the up rows / down columns of the units some
 * row activates (text.MLP.sparse_forward, when at most half are active).
 * lin gate, up, down; opt sparse, rows up to which the skip applies (0: never); val z. */
EXPORT int g3n_block_mlp(const g3n_op *op, const g3n_ctx *C) {
    const g3n_step *S = C->S;
    const g3n_lin *Lgate = &op->lin[0], *Lup = &op->lin[1], *Ldown = &op->lin[2];
    int64_t B = S->batch, F = Lgate->n, D = Ldown->n;
    const float *h = REG(0);
    float *out = OUT, *gate = C->scratch[0], *up = C->scratch[1], *hidden = C->scratch[2];
    int64_t *rows = C->rows;
    int32_t *cols = C->cols;
    int sparse_layer = op->opt[0], rc;
    if ((rc = lin_apply(Lgate, h, B, gate, NULL, 0, S))) return rc;
    if (sparse_layer) {
        for (int64_t b = 0; b < B; b++) {
            float *g = gate + b * F;
            double mean = 0.0, var = 0.0;
            for (int64_t i = 0; i < F; i++) mean += g[i];
            mean /= (double)F;
            for (int64_t i = 0; i < F; i++) var += ((double)g[i] - mean) * ((double)g[i] - mean);
            float cut = (float)mean + (float)sqrt(var / (double)F) * op->val[0];
            for (int64_t i = 0; i < F; i++) g[i] = fmaxf(g[i] - cut, 0.0f);
        }
    }
    gelu_inplace(gate, B * F, S->vec);
    int64_t n_active = 0;
    int skip = sparse_layer && B <= op->opt[1];
    if (skip) {
        for (int64_t i = 0; i < F; i++) {
            int any = 0;
            for (int64_t b = 0; b < B; b++) any |= gate[b * F + i] != 0.0f;
            if (any) { rows[n_active] = i; cols[n_active] = (int32_t)i; n_active++; }
        }
    }
    if (!(skip && n_active * 2 <= F)) {
        if ((rc = lin_apply(Lup, h, B, up, NULL, 0, S))) return rc;
        for (int64_t i = 0; i < B * F; i++) hidden[i] = gate[i] * up[i];
        return lin_apply(Ldown, hidden, B, out, NULL, 0, S);
    }
    /* up: only the active rows where the format can read rows; else all, then keep the active ones */
    if (Lup->kind == L_GGUF || Lup->kind == L_INT8) {
        if ((rc = lin_apply(Lup, h, B, up, rows, n_active, S))) return rc;
    } else if (Lup->kind == L_INT4 && Lup->rows_w) {
        const float *xin;
        if ((rc = int8_activations_as_floats(S, h, B, Lup->k, C->scratch[3], &xin))) return rc;
        if ((rc = lin_apply(Lup, xin, B, up, rows, n_active, S))) return rc;
    } else {
        if ((rc = lin_apply(Lup, h, B, hidden, NULL, 0, S))) return rc;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < n_active; j++) up[b * n_active + j] = hidden[b * F + rows[j]];
    }
    /* the full-width hidden vector, zero outside the active units */
    memset(hidden, 0, (size_t)(B * F) * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < n_active; j++)
            hidden[b * F + rows[j]] = gate[b * F + rows[j]] * up[b * n_active + j];
    if (Ldown->kind == L_INT4) {  /* read only the active columns (int4_matmul's cols) */
        const float *xin;
        if ((rc = int8_activations_as_floats(S, hidden, B, F, gate, &xin))) return rc;
        double t0 = S->prof ? omp_get_wtime() : 0.0;
        rc = g3n_int4_matmul((const uint8_t *)Ldown->w, Ldown->s, Ldown->type, D, F, Ldown->g, cols, n_active, xin,
                             B, out, S->threads, S->vec);
        if (S->prof) S->prof[Ldown->group] += omp_get_wtime() - t0;
        return rc;
    }
    return lin_apply(Ldown, hidden, B, out, NULL, 0, S);  /* L_FLOAT_T skips zero inputs */
}

/* AltUp router: r [B][S] = tanh(router(rms_norm(x) * val[1])), with lin[0] the router, vec[0] its norm, val[0] eps */
static int altup_route(const g3n_op *op, const g3n_ctx *C, const float *x, float *r, float *tmp) {
    int64_t B = C->S->batch, D = op->lin[0].k;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(x + b * D, op->vec[0], D, op->val[0], tmp + b * D);
        for (int64_t i = 0; i < D; i++) tmp[b * D + i] *= op->val[1];
    }
    int rc = lin_apply(&op->lin[0], tmp, B, r, NULL, 0, C->S);
    for (int64_t i = 0; i < B * op->lin[0].n; i++) r[i] = tanhf(r[i]);
    return rc;
}

/* altup_predict: in the streams X [S][B][D] -> out the predictions [S][B][D], P_q = X_q + sum_p c[q][p] X_p with
 * c = pred(route(X_0)). lin router, pred; vec[0] the router's norm; val eps, router input scale. */
EXPORT int g3n_block_altup_predict(const g3n_op *op, const g3n_ctx *C) {
    int64_t B = C->S->batch, D = op->lin[0].k, NS = op->lin[0].n, BD = B * D;
    const float *X = REG(0);
    float *pred = OUT, *r = C->scratch[1], *coef = C->scratch[2];
    int rc;
    if ((rc = altup_route(op, C, X, r, C->scratch[0]))) return rc;
    if ((rc = lin_apply(&op->lin[1], r, B, coef, NULL, 0, C->S))) return rc;
    for (int64_t q = 0; q < NS; q++)
        for (int64_t b = 0; b < B; b++) {
            const float *c = coef + b * NS * NS + q * NS;
            float *o = pred + q * BD + b * D;
            for (int64_t i = 0; i < D; i++) {
                float s = 0.0f;
                for (int64_t p = 0; p < NS; p++) s += X[p * BD + b * D + i] * c[p];
                o[i] = s + X[q * BD + b * D + i];
            }
        }
    return 0;
}

/* altup_correct: in0 the predictions P [S][B][D], in1 the layer output y [B][D] -> out the streams [S][B][D],
 * C_q = P_q + (k_q + 1) (y - P_0) with k = corr(route(y)). lin router, corr; vec[0] the router's norm; val eps,
 * router input scale. */
EXPORT int g3n_block_altup_correct(const g3n_op *op, const g3n_ctx *C) {
    int64_t B = C->S->batch, D = op->lin[0].k, NS = op->lin[0].n, BD = B * D;
    const float *pred = REG(0), *y = REG(1);
    float *X = OUT, *r = C->scratch[1], *coef = C->scratch[2];
    int rc;
    if ((rc = altup_route(op, C, y, r, C->scratch[0]))) return rc;
    if ((rc = lin_apply(&op->lin[1], r, B, coef, NULL, 0, C->S))) return rc;
    for (int64_t q = 0; q < NS; q++)
        for (int64_t b = 0; b < B; b++) {
            float kq = coef[b * NS + q] + 1.0f;
            float *o = X + q * BD + b * D;
            const float *pq = pred + q * BD + b * D, *p0 = pred + b * D, *yb = y + b * D;
            for (int64_t i = 0; i < D; i++) o[i] = pq[i] + kq * (yb[i] - p0[i]);
        }
    return 0;
}

/* per_layer_input: in the streams [S][B][D] -> out the streams with norm(proj(gelu(gate(X_0 * vec[0])) * ple))
 * added to streams 1.., ple this layer's slice of the step's per-layer inputs. lin gate, proj; vec output scale
 * (NULL: not applied), the norm's scale; opt layer, number of layers; val[0] eps. */
EXPORT int g3n_block_per_layer_input(const g3n_op *op, const g3n_ctx *C) {
    const g3n_step *S = C->S;
    int64_t B = S->batch, D = op->lin[1].n, P = op->lin[0].n, BD = B * D, NS = C->P->width[op->out] / D;
    int64_t layer = op->opt[0], n_layers = op->opt[1];
    float *X = OUT, *g = C->scratch[0], *gated = C->scratch[1], *back = C->scratch[2];
    const float *scale = op->vec[0];
    int rc;
    if (!S->ple) return -4;
    if (op->in[0] != op->out) memcpy(X, REG(0), sizeof(float) * (size_t)(NS * BD));
    for (int64_t i = 0; i < BD; i++) g[i] = scale ? X[i] * scale[i % D] : X[i];
    if ((rc = lin_apply(&op->lin[0], g, B, gated, NULL, 0, S))) return rc;
    gelu_inplace(gated, B * P, S->vec);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < P; i++) gated[b * P + i] *= S->ple[(b * n_layers + layer) * P + i];
    if ((rc = lin_apply(&op->lin[1], gated, B, back, NULL, 0, S))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(back + b * D, op->vec[1], D, op->val[0], back + b * D);
        for (int64_t q = 1; q < NS; q++)
            for (int64_t i = 0; i < D; i++) X[q * BD + b * D + i] += back[b * D + i];
    }
    return 0;
}

/* altup_expand: in x0 [B][D] -> out the streams [S][B][D]: X_0 = x0 and, for q = 1 .. S - 1, e_q(x0) rescaled to
 * x0's RMS: e_q(x0) * rms(x0) / sqrt(max(mean(e_q(x0)^2), 1e-5)) (text.expand). lin the S - 1 projections. */
EXPORT int g3n_block_altup_expand(const g3n_op *op, const g3n_ctx *C) {
    const g3n_step *S = C->S;
    int64_t B = S->batch, D = C->P->width[op->in[0]], NS = C->P->width[op->out] / D, BD = B * D;
    const float *x = REG(0);
    float *X = OUT;
    int rc;
    if (NS < 1 || NS > 5 || NS * D != C->P->width[op->out]) return -1;
    memmove(X, x, sizeof(float) * (size_t)BD);
    for (int64_t q = 1; q < NS; q++) {
        float *e = X + q * BD;
        if ((rc = lin_apply(&op->lin[q - 1], X, B, e, NULL, 0, S))) return rc;
        for (int64_t b = 0; b < B; b++) {
            const float *x0 = X + b * D;
            float *eb = e + b * D, s0 = 0.0f, se = 0.0f;
            for (int64_t i = 0; i < D; i++) { s0 += x0[i] * x0[i]; se += eb[i] * eb[i]; }
            float target = sqrtf(s0 / (float)D), mean_e = se / (float)D;
            float den = sqrtf(mean_e > 1e-5f ? mean_e : 1e-5f);
            for (int64_t i = 0; i < D; i++) eb[i] = eb[i] * target / den;
        }
    }
    return 0;
}

/* altup_collapse: in the streams X [S][B][D] -> out [B][D], the mean of X_0 and of u_q(X_q) for q = 1 .. S - 1, each
 * rescaled to X_0's RMS: u_q(X_q) * rms(X_0) / sqrt(max(mean(u_q(X_q)^2), 1e-5)) (text.collapse). lin the S - 1
 * unembedding projections. */
EXPORT int g3n_block_altup_collapse(const g3n_op *op, const g3n_ctx *C) {
    const g3n_step *S = C->S;
    int64_t B = S->batch, D = C->P->width[op->out], NS = C->P->width[op->in[0]] / D, BD = B * D;
    const float *X = REG(0);
    float *y = OUT, *u = C->scratch[0];
    int rc;
    if (NS < 1 || NS > 5 || NS * D != C->P->width[op->in[0]]) return -1;
    memcpy(y, X, sizeof(float) * (size_t)BD);
    for (int64_t q = 1; q < NS; q++) {
        if ((rc = lin_apply(&op->lin[q - 1], X + q * BD, B, u, NULL, 0, S))) return rc;
        for (int64_t b = 0; b < B; b++) {
            const float *x0 = X + b * D, *ub = u + b * D;
            float s0 = 0.0f, su = 0.0f;
            for (int64_t i = 0; i < D; i++) { s0 += x0[i] * x0[i]; su += ub[i] * ub[i]; }
            float target = sqrtf(s0 / (float)D), mean_u = su / (float)D;
            float den = sqrtf(mean_u > 1e-5f ? mean_u : 1e-5f);
            for (int64_t i = 0; i < D; i++) y[b * D + i] += ub[i] * target / den;
        }
    }
    for (int64_t i = 0; i < BD; i++) y[i] /= (float)NS;
    return 0;
}

#undef REG
#undef OUT

/* Run a plan's blocks in order: a whole decode step of the layers (or, in the tests, one block). */
EXPORT int g3n_run_plan(const g3n_plan *P, const g3n_step *S) {
    int64_t B = S->batch, widest = 1;
    for (int32_t i = 0; i < P->n_ops; i++)
        for (int l = 0; l < 4; l++) {
            const g3n_lin *L = &P->ops[i].lin[l];
            if (L->kind == L_NONE) continue;
            if (L->n > widest) widest = L->n;
            if (L->k > widest) widest = L->k;
        }
    int64_t per = B * widest + 16;
    float *mem = (float *)malloc(sizeof(float) * (size_t)(4 * per));
    int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)widest);
    int32_t *cols = (int32_t *)malloc(sizeof(int32_t) * (size_t)widest);
    if (!mem || !rows || !cols) { free(mem); free(rows); free(cols); return -2; }
    g3n_ctx C = {P, S, {mem, mem + per, mem + 2 * per, mem + 3 * per}, rows, cols};
    int rc = 0;
    double t0 = S->prof ? omp_get_wtime() : 0.0;
    for (int32_t i = 0; i < P->n_ops && !rc; i++) rc = P->ops[i].run(&P->ops[i], &C);
    if (S->prof) S->prof[PROF_TOTAL] += omp_get_wtime() - t0;
    free(mem); free(rows); free(cols);
    return rc;
}
