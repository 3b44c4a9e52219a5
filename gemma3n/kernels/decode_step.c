/* One decode step of a whole Gemma 3 or Gemma 3n decoder stack in one call (included by native.c).
 *
 * The eager PyTorch layers (gemma3n/model) stay the reference; this file computes the same equations for a step
 * of one new token per row, so that a step costs one call instead of ~1,500 (Gemma 3 270M) to ~4,500 (E2B) small
 * PyTorch ops, each of which costs more than its arithmetic. The matrix products are the kernels above, on the
 * weights as stored (GGUF blocks, int8, int4 tiles, float rows); everything else is float32 here, whatever the
 * model's compute dtype (for a bfloat16 model that is more precise than the eager path, which rounds every
 * intermediate to bfloat16). Equations: shared/docs/gemma3n-architecture.md section 2, and model/gemma3.py.
 *
 * The caller (gemma3n/model/native_decode.py) keeps the embeddings, the per-layer inputs, the AltUp stream set-up
 * and collapse, the final norm and the head in PyTorch, and passes RoPE tables, masks and KV-cache cells as the
 * KVCache computed them, so positions, windows and padding mean exactly what they mean in the eager path.
 */

enum { L_NONE = 0, L_GGUF = 1, L_INT8 = 2, L_INT4 = 3, L_FLOAT_T = 4 };

/* A linear map y = W x: GGUF rows (any GGUF type, including F32 / F16 / BF16 for float weights), int8 rows with a
 * scale per row, int4 tiles, or a float weight stored transposed ([k][n], `type` a GGUF float type). */
typedef struct {
    int32_t kind, type;  /* L_*; the GGUF type, or the scale dtype (S_*) of int8 / int4 */
    const void *w, *s;   /* weights; int8 scales / int4 scales_and_zeros */
    int64_t n, k, g;     /* out features, in features, int4 group size */
    int32_t group;       /* the profile counter its time adds to (g3n_step.prof) */
} g3n_lin;

typedef struct {
    g3n_lin q, k, v, o, gate, up, down;
    g3n_lin laurel_left, laurel_right, router, pred, corr, ple_gate, ple_proj;  /* Gemma 3n */
    /* RMSNorm scales as multiplied (Gemma 3's 1 + w already added); k_norm NULL where the layer shares K/V */
    const float *in_norm, *post_attn_norm, *pre_ffw_norm, *post_ffw_norm, *q_norm, *k_norm;
    const float *laurel_norm, *router_norm, *out_scale, *ple_norm;  /* Gemma 3n; out_scale NULL: not applied */
    int32_t kind;         /* 0 sliding, 1 full: which RoPE table, mask and cache cell */
    int32_t slot;         /* the KV slot attended to (this layer's, or its producer's) */
    int32_t writes;       /* computes K/V and stores it in `slot` */
    int32_t sparse;       /* Gaussian top-k on the gate (mean + z * std cut-off) */
    int32_t sparse_skip;  /* up to this many rows, only the active units' up rows / down columns are computed */
    float z;
} g3n_layer;

typedef struct {
    int32_t arch;  /* 3: Gemma 3, 4: Gemma 3n */
    int32_t n_layers, d, heads, kv_heads, hd, streams, ple_dim;
    float eps, attn_scale, router_scale;
    const g3n_layer *layers;
} g3n_model;

typedef struct {
    int64_t batch;
    float *x;                      /* Gemma 3: [B][D]; Gemma 3n: the streams [S][B][D]; updated in place */
    const float *ple;              /* Gemma 3n: [B][L][P] */
    const float *cos[2], *sin[2];  /* per kind [B][hd]; sin with its first half negated (layers.rope_tables) */
    const uint8_t *mask[2];        /* per kind [B][tk]: 1 = may attend */
    int64_t tk[2];                 /* per kind: keys visible */
    const int64_t *cell[2];        /* per kind [B]: the cache cell each row's new K/V goes to */
    void *const *k, *const *v;     /* per slot [B][Hkv][cap][hd] */
    const int64_t *cap;            /* per slot */
    int32_t cache_type;            /* S_F32 or S_BF16 */
    int32_t threads, q8, vec;      /* OpenMP threads; int8 activations where a product has them; AVX2 allowed */
    double *prof;                  /* NULL, or seconds added per g3n_lin.group, then [PROF_ATTEND], [PROF_TOTAL] */
} g3n_step;

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
        if (rows) return -1;
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

static float kv_dot(const float *q, const void *base, int type, int64_t at, int64_t hd, int vec) {
#ifdef G3N_X86
    if (vec && type == S_F32 && have_avx2() && hd % 16 == 0) return dot_f32((const float *)base + at, q, hd);
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < hd; i++) s += q[i] * kv_at(base, type, at + i);
    return s;
}

/* Attention of one query row per (row, head) over the visible keys of a slot; out [B][H * hd]. */
static int attend(const g3n_model *M, const g3n_step *S, int slot, int kind, const float *q, float *out) {
    int64_t B = S->batch, H = M->heads, hd = M->hd, tk = S->tk[kind], cap = S->cap[slot];
    int64_t group = H / M->kv_heads;
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
            int64_t base = (b * M->kv_heads + kvh) * cap * hd;
            float mx = -INFINITY;
            for (int64_t j = 0; j < tk; j++) {
                p[j] = mask[j] ? kv_dot(qh, K, type, base + j * hd, hd, S->vec) * M->attn_scale : -INFINITY;
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
                float pj = p[j] / sum;
                int64_t at = base + j * hd;
                if (type == S_F32) {
                    const float *vr = (const float *)V + at;
                    for (int64_t i = 0; i < hd; i++) o[i] += pj * vr[i];
                } else {
                    for (int64_t i = 0; i < hd; i++) o[i] += pj * kv_at(V, type, at + i);
                }
            }
        }
    }
    free(scores);
    return 0;
}

/* ---- the two halves every layer has ---------------------------------------------------------------------------- */

typedef struct {
    float *a, *b, *c, *q, *kv, *attn, *f1, *f2, *f3, *xq;  /* scratch, sized in g3n_decode_step */
    int64_t *rows;
    int32_t *cols;
} scratch_t;

/* normed [B][D] -> attention output projected back [B][D] (in sc->a); K/V stored when the layer owns them */
static int attention(const g3n_model *M, const g3n_layer *L, const g3n_step *S, const float *normed, scratch_t *sc) {
    int64_t B = S->batch, H = M->heads, Hkv = M->kv_heads, hd = M->hd;
    int kind = L->kind, rc;
    if ((rc = lin_apply(&L->q, normed, B, sc->q, NULL, 0, S))) return rc;
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float *qh = sc->q + (b * H + h) * hd;
            rms_norm(qh, L->q_norm, hd, M->eps, qh);
            rope(qh, S->cos[kind] + b * hd, S->sin[kind] + b * hd, hd);
        }
    if (L->writes) {
        float *k = sc->kv, *v = sc->kv + B * Hkv * hd;
        if ((rc = lin_apply(&L->k, normed, B, k, NULL, 0, S))) return rc;
        if ((rc = lin_apply(&L->v, normed, B, v, NULL, 0, S))) return rc;
        int64_t cap = S->cap[L->slot];
        for (int64_t b = 0; b < B; b++)
            for (int64_t h = 0; h < Hkv; h++) {
                int64_t cell = S->cell[kind][b];
                float *kh = k + (b * Hkv + h) * hd, *vh = v + (b * Hkv + h) * hd;
                rms_norm(kh, L->k_norm, hd, M->eps, kh);
                rope(kh, S->cos[kind] + b * hd, S->sin[kind] + b * hd, hd);
                if (M->arch == 4) rms_norm(vh, NULL, hd, M->eps, vh);  /* Gemma 3n's weightless v_norm */
                int64_t at = ((b * Hkv + h) * cap + cell) * hd;
                kv_store(S->k[L->slot], S->cache_type, at, kh, hd);
                kv_store(S->v[L->slot], S->cache_type, at, vh, hd);
            }
    }
    double t0 = S->prof ? omp_get_wtime() : 0.0;
    if ((rc = attend(M, S, L->slot, kind, sc->q, sc->attn))) return rc;
    if (S->prof) S->prof[PROF_ATTEND] += omp_get_wtime() - t0;
    return lin_apply(&L->o, sc->attn, B, sc->a, NULL, 0, S);
}

/* h [B][D] -> MLP output [B][D] in `out` */
static int mlp(const g3n_model *M, const g3n_layer *L, const g3n_step *S, const float *h, float *out,
               scratch_t *sc) {
    int64_t B = S->batch, F = L->gate.n, D = M->d;
    float *gate = sc->f1, *up = sc->f2, *hidden = sc->f3;
    int rc;
    if ((rc = lin_apply(&L->gate, h, B, gate, NULL, 0, S))) return rc;
    if (L->sparse) {  /* layers.gaussian_topk: ReLU(x - (mean + z * population std)) */
        for (int64_t b = 0; b < B; b++) {
            float *g = gate + b * F;
            double mean = 0.0, var = 0.0;
            for (int64_t i = 0; i < F; i++) mean += g[i];
            mean /= (double)F;
            for (int64_t i = 0; i < F; i++) var += ((double)g[i] - mean) * ((double)g[i] - mean);
            float cut = (float)mean + (float)sqrt(var / (double)F) * L->z;
            for (int64_t i = 0; i < F; i++) g[i] = fmaxf(g[i] - cut, 0.0f);
        }
    }
    gelu_inplace(gate, B * F, S->vec);
    int64_t n_active = 0;
    int skip = L->sparse && B <= L->sparse_skip;  /* text.MLP.forward's rule (SPARSE_MAX_TOKENS) */
    if (skip) {
        for (int64_t i = 0; i < F; i++) {
            int any = 0;
            for (int64_t b = 0; b < B; b++) any |= gate[b * F + i] != 0.0f;
            if (any) { sc->rows[n_active] = i; sc->cols[n_active] = (int32_t)i; n_active++; }
        }
    }
    int sparse = skip && n_active * 2 <= F;  /* text.MLP.sparse_forward's rule */
    if (!sparse) {
        if ((rc = lin_apply(&L->up, h, B, up, NULL, 0, S))) return rc;
        for (int64_t i = 0; i < B * F; i++) hidden[i] = gate[i] * up[i];
        return lin_apply(&L->down, hidden, B, out, NULL, 0, S);
    }
    /* up: only the active rows where the format can read rows; else all, then keep the active ones */
    if (L->up.kind == L_GGUF || L->up.kind == L_INT8) {
        if ((rc = lin_apply(&L->up, h, B, up, sc->rows, n_active, S))) return rc;
    } else {
        if ((rc = lin_apply(&L->up, h, B, hidden, NULL, 0, S))) return rc;
        for (int64_t b = 0; b < B; b++)
            for (int64_t j = 0; j < n_active; j++) up[b * n_active + j] = hidden[b * F + sc->rows[j]];
    }
    /* the full-width hidden vector, zero outside the active units */
    memset(hidden, 0, (size_t)(B * F) * sizeof(float));
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < n_active; j++)
            hidden[b * F + sc->rows[j]] = gate[b * F + sc->rows[j]] * up[b * n_active + j];
    if (L->down.kind == L_INT4) {  /* read only the active columns (int4_matmul's cols) */
        const float *xin = hidden;
        if (S->q8 && F % XB == 0) {  /* the rounded activations, as the dense int8-activation product uses */
            if ((rc = g3n_round_activations(hidden, B, F, gate))) return rc;
            xin = gate;
        }
        double t0 = S->prof ? omp_get_wtime() : 0.0;
        rc = g3n_int4_matmul((const uint8_t *)L->down.w, L->down.s, L->down.type, D, F, L->down.g, sc->cols,
                             n_active, xin, B, out, S->threads, 1);
        if (S->prof) S->prof[L->down.group] += omp_get_wtime() - t0;
        return rc;
    }
    return lin_apply(&L->down, hidden, B, out, NULL, 0, S);  /* L_FLOAT_T skips zero inputs */
}

/* ---- the layers ----------------------------------------------------------------------------------------------- */

static int gemma3_layer(const g3n_model *M, const g3n_layer *L, const g3n_step *S, scratch_t *sc) {
    int64_t B = S->batch, D = M->d;
    float *x = S->x;
    int rc;
    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, L->in_norm, D, M->eps, sc->b + b * D);
    if ((rc = attention(M, L, S, sc->b, sc))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(sc->a + b * D, L->post_attn_norm, D, M->eps, sc->c + b * D);
        for (int64_t i = 0; i < D; i++) x[b * D + i] += sc->c[b * D + i];
        rms_norm(x + b * D, L->pre_ffw_norm, D, M->eps, sc->b + b * D);
    }
    if ((rc = mlp(M, L, S, sc->b, sc->a, sc))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(sc->a + b * D, L->post_ffw_norm, D, M->eps, sc->c + b * D);
        for (int64_t i = 0; i < D; i++) x[b * D + i] += sc->c[b * D + i];
    }
    return 0;
}

/* AltUp router: tanh(router(rms_norm(x) * 1/D)) -> r [B][S] */
static int altup_route(const g3n_model *M, const g3n_layer *L, const g3n_step *S, const float *x, float *r,
                       float *tmp) {
    int64_t B = S->batch, D = M->d;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(x + b * D, L->router_norm, D, M->eps, tmp + b * D);
        for (int64_t i = 0; i < D; i++) tmp[b * D + i] *= M->router_scale;
    }
    int rc = lin_apply(&L->router, tmp, B, r, NULL, 0, S);
    for (int64_t i = 0; i < B * M->streams; i++) r[i] = tanhf(r[i]);
    return rc;
}

static int gemma3n_layer(const g3n_model *M, const g3n_layer *L, int layer, const g3n_step *S, scratch_t *sc) {
    int64_t B = S->batch, D = M->d, NS = M->streams, P = M->ple_dim, BD = B * D;
    float *X = S->x;  /* [S][B][D] */
    float *pred = sc->xq;  /* predictions [S][B][D] */
    float r[16 * 16], coef[16 * 16 * 16];  /* B <= 16 rows, streams <= 16 (native_decode.py checks) */
    int rc;
    if (B > 16 || NS > 16) return -3;
    /* AltUp predict: P_q = X_q + sum_p c[q][p] X_p, c from the router on stream 0 */
    if ((rc = altup_route(M, L, S, X, r, sc->a))) return rc;
    if ((rc = lin_apply(&L->pred, r, B, coef, NULL, 0, S))) return rc;
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
    const float *active = pred;  /* P_0 */
    float *normed = sc->b, *laurel = sc->c;
    for (int64_t b = 0; b < B; b++) rms_norm(active + b * D, L->in_norm, D, M->eps, normed + b * D);
    /* LAuReL: normed + norm(right(left(normed))) */
    if ((rc = lin_apply(&L->laurel_left, normed, B, sc->f1, NULL, 0, S))) return rc;
    if ((rc = lin_apply(&L->laurel_right, sc->f1, B, sc->f2, NULL, 0, S))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(sc->f2 + b * D, L->laurel_norm, D, M->eps, laurel + b * D);
        for (int64_t i = 0; i < D; i++) laurel[b * D + i] += normed[b * D + i];
    }
    if ((rc = attention(M, L, S, normed, sc))) return rc;  /* -> sc->a */
    float *x = sc->kv;  /* (active + post_attn_norm(attn) + laurel) / sqrt(2); kv is free after attention */
    const float sqrt2 = 1.41421356237309504880f;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(sc->a + b * D, L->post_attn_norm, D, M->eps, sc->f1 + b * D);
        for (int64_t i = 0; i < D; i++) {
            int64_t at = b * D + i;
            x[at] = (active[at] + sc->f1[at] + laurel[at]) / sqrt2;
        }
        rms_norm(x + b * D, L->pre_ffw_norm, D, M->eps, sc->b + b * D);
    }
    float *out = sc->c;  /* laurel is no longer needed */
    if ((rc = mlp(M, L, S, sc->b, sc->a, sc))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(sc->a + b * D, L->post_ffw_norm, D, M->eps, out + b * D);
        for (int64_t i = 0; i < D; i++) out[b * D + i] += x[b * D + i];
    }
    /* AltUp correct: C_q = P_q + (k_q + 1) (out - P_0), k from the router on the layer output */
    if ((rc = altup_route(M, L, S, out, r, sc->a))) return rc;
    if ((rc = lin_apply(&L->corr, r, B, coef, NULL, 0, S))) return rc;
    for (int64_t q = 0; q < NS; q++)
        for (int64_t b = 0; b < B; b++) {
            float kq = coef[b * NS + q] + 1.0f;
            float *o = X + q * BD + b * D;
            const float *pq = pred + q * BD + b * D;
            for (int64_t i = 0; i < D; i++) o[i] = pq[i] + kq * (out[b * D + i] - active[b * D + i]);
        }
    /* per-layer input: norm(proj(gelu(gate(C_0 * scale)) * ple)) added to streams 1.. */
    float *g = sc->a;
    for (int64_t i = 0; i < BD; i++) g[i] = L->out_scale ? X[i] * L->out_scale[i % D] : X[i];
    if ((rc = lin_apply(&L->ple_gate, g, B, sc->f1, NULL, 0, S))) return rc;
    gelu_inplace(sc->f1, B * P, S->vec);
    for (int64_t b = 0; b < B; b++)
        for (int64_t i = 0; i < P; i++) sc->f1[b * P + i] *= S->ple[(b * M->n_layers + layer) * P + i];
    if ((rc = lin_apply(&L->ple_proj, sc->f1, B, sc->f2, NULL, 0, S))) return rc;
    for (int64_t b = 0; b < B; b++) {
        rms_norm(sc->f2 + b * D, L->ple_norm, D, M->eps, sc->b + b * D);
        for (int64_t q = 1; q < NS; q++)
            for (int64_t i = 0; i < D; i++) X[q * BD + b * D + i] += sc->b[b * D + i];
    }
    return 0;
}

EXPORT int g3n_decode_step(const g3n_model *M, const g3n_step *S) {
    if ((M->arch != 3 && M->arch != 4) || M->hd > 1024 || M->hd % 2) return -1;
    int64_t B = S->batch, widest = M->d;
    int64_t qdim = (int64_t)M->heads * M->hd, kvdim = (int64_t)M->kv_heads * M->hd;
    if (qdim > widest) widest = qdim;
    for (int i = 0; i < M->n_layers; i++) {
        const g3n_layer *L = &M->layers[i];
        if (L->gate.n > widest) widest = L->gate.n;
        if (L->laurel_left.n > widest) widest = L->laurel_left.n;
    }
    if (M->ple_dim > widest) widest = M->ple_dim;
    if (2 * kvdim > widest) widest = 2 * kvdim;
    int64_t n_bufs = 9, per = B * widest + 16;
    int64_t streams = M->arch == 4 ? M->streams : 1;
    float *mem = (float *)malloc(sizeof(float) * (size_t)(n_bufs * per + streams * B * M->d));
    int64_t *rows = (int64_t *)malloc(sizeof(int64_t) * (size_t)widest);
    int32_t *cols = (int32_t *)malloc(sizeof(int32_t) * (size_t)widest);
    if (!mem || !rows || !cols) { free(mem); free(rows); free(cols); return -2; }
    scratch_t sc = {mem, mem + per, mem + 2 * per, mem + 3 * per, mem + 4 * per, mem + 5 * per, mem + 6 * per,
                    mem + 7 * per, mem + 8 * per, mem + 9 * per, rows, cols};
    int rc = 0;
    double t0 = S->prof ? omp_get_wtime() : 0.0;
    for (int i = 0; i < M->n_layers && !rc; i++)
        rc = M->arch == 3 ? gemma3_layer(M, &M->layers[i], S, &sc) : gemma3n_layer(M, &M->layers[i], i, S, &sc);
    if (S->prof) S->prof[PROF_TOTAL] += omp_get_wtime() - t0;
    free(mem); free(rows); free(cols);
    return rc;
}
