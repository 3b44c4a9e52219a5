/* Exact (float32-activation) products of one weight row with one activation row (included by native.c).
 *
 * The result is what the one-row dot products above compute: the dequantised weight times x in float32, with each
 * block's scale and minimum factored out of its inner loop (sum w x = d * sum q x - m * sum x per block), up to
 * the order of the float32 additions. What these kernels change, for speed, is the work per weight:
 *   - the per-block sums of x (the minimums' factor) are computed once per call, not once per weight row;
 *   - the 6-bit K-quant scales and minimums of a super-block are unpacked eight at a time, in integer registers,
 *     and scaled as one vector;
 *   - Q5_0, Q5_1, Q4_K, Q5_K and Q6_K read x in "lane order" (x_lane_order below, once per call): a 32-byte
 *     register of weight bytes is eight 32-bit lanes, and byte j of every lane is taken in place with one AND, as its
 *     value times 2^8j, against a copy of x scaled by 2^-8j. Scaling by a power of two is exact, so each product is
 *     the same float as the byte's value times x (for |x| >= 2^-98, below which x * 2^-28 would lose bits as a
 *     subnormal). This does without the shuffles and shifts that spread bytes to 32-bit lanes, which were the
 *     bottleneck on AMD Zen 3 (two of its four vector pipes do all shuffles and shifts);
 *   - the weights are prefetched ahead of use (below).
 * Weight rows are read one after another, each from start to end: on the AMD machines this was measured on, four
 * rows read in interleaved blocks (to share the loads of x) streamed from memory two to three times slower than
 * sequential rows, so that is not done.
 */
#ifdef G3N_X86
/* PREFETCH (native.c): weights are read ahead of use, non-temporally, so that they do not push x out of L1. */

/* sums of x per block of `block` values (the factor of a block's minimum or offset; block a multiple of 8) */
AVX2 static void block_sums(const float *x, int64_t k, int block, float *xs) {
    for (int64_t b = 0; b < k / block; b++) {
        const float *p = x + block * b;
        __m256 s = _mm256_loadu_ps(p);
        for (int i = 8; i < block; i += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(p + i));
        xs[b] = hsum8(s);
    }
}

/* Q5_0 / Q5_1, x in lane order: a block's 32 five-bit values as bytes (value i in byte i: the nibbles of both halves
 * from one 16-byte load, the fifth bits spread to bit 4 of each byte), each byte masked in place as the K-quants'
 * are. The offset of Q5_0 (16) and the minimum of Q5_1 are factored out of the block with the block's sum of x:
 * d * sum q x - 16 d * sum x, or d * sum q x + m * sum x. This replaced a form that widened the bytes from memory
 * and took the fifth bits as lane masks (Q5_0: eight shuffles and sixteen integer operations per block) or
 * sign-extended bytes (Q5_1): on one AMD Zen 4 core, rows of 640 to 2560 values, from cache and from memory, Q5_0
 * ran 1.10-1.17x and Q5_1 1.19-1.22x as fast. */
AVX2 static float dot_q5_exact(int type, const uint8_t *row, const float *xl, const float *xs, int64_t nb) {
    const int has_min = type == T_Q5_1, bytes = has_min ? 24 : 22, bits_at = has_min ? 4 : 2;
    const __m256i nib = _mm256_set1_epi8(0x0F), high_half_nibbles = _mm256_setr_epi64x(0, 0, 4, 4);
    const __m256i k0 = _mm256_set1_epi32(0x1F), k1 = _mm256_set1_epi32(0x1F00), k2 = _mm256_set1_epi32(0x1F0000);
    const __m256i k3 = _mm256_set1_epi32(0x1F000000);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float offsets = 0.0f;
    for (int64_t i = 0; i < nb; i++, row += bytes, xl += QK) {
        if ((i & 1) == 0) PREFETCH(row);
        __m256i q = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + bits_at + 4)));
        q = _mm256_and_si256(_mm256_srlv_epi64(q, high_half_nibbles), nib);  /* values 0-15 low, 16-31 high */
        q = _mm256_or_si256(q, bits_to_0x10(rd32(row + bits_at)));
#define TERM(k, xv) _mm256_cvtepi32_ps(_mm256_and_si256(q, k)), _mm256_loadu_ps(xv)
        __m256 s = _mm256_mul_ps(TERM(k0, xl)), t = _mm256_mul_ps(TERM(k1, xl + 8));
        s = _mm256_fmadd_ps(TERM(k2, xl + 16), s);
        t = _mm256_fmadd_ps(TERM(k3, xl + 24), t);
#undef TERM
        float d = h2f(rd16(row));
        __m256 dv = _mm256_set1_ps(d);
        if (i & 1) acc1 = _mm256_fmadd_ps(dv, _mm256_add_ps(s, t), acc1);
        else acc0 = _mm256_fmadd_ps(dv, _mm256_add_ps(s, t), acc0);
        offsets += (has_min ? h2f(rd16(row + 2)) : -16.0f * d) * xs[i];
    }
    return hsum8(_mm256_add_ps(acc0, acc1)) + offsets;
}

/* dot_q5_exact with 512-bit vectors, four blocks a register pair: the blocks' 16 bytes of nibbles side by side,
 * masked once for the low nibbles (values 0-15 of each block) and once, after a shift, for the high ones (16-31);
 * each fifth bit adds 16 to its byte under a byte mask made from the four blocks' bit fields. The bytes are then
 * masked in place, as the AVX2 kernel's are, against x in the matching lane order (x_lane_order, vec 2: per 128
 * values, low then high nibbles, byte 0..3, 16 lanes of four blocks). Against two blocks a register, widened from
 * one copy of the nibbles per half, this takes half the shuffles and one vector of scales per four blocks; on an
 * AMD Zen 4 core rows of 640 / 2048 values ran 1.3x / 1.4x as fast. The blocks past the last four are the AVX2
 * kernel's. The same products, summed in another order. */
AVX512 static inline __attribute__((always_inline)) float q5_exact_avx512(int has_min, const uint8_t *row,
                                                                        const float *xp, const float *xs, int64_t nb) {
    const int type = has_min ? T_Q5_1 : T_Q5_0, bytes = has_min ? 24 : 22, bits_at = has_min ? 4 : 2;
    const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(0x10);
    const __m512i k0 = _mm512_set1_epi32(0x1F), k1 = _mm512_set1_epi32(0x1F00), k2 = _mm512_set1_epi32(0x1F0000);
    const __m512i k3 = _mm512_set1_epi32(0x1F000000);
    const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc = _mm512_setzero_ps();
    __m128 offsets = _mm_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= nb; i += 4, row += 4 * bytes, xp += 4 * QK) {
        PREFETCH(row);
        PREFETCH(row + 64);
        const uint8_t *b[4] = {row, row + bytes, row + 2 * bytes, row + 3 * bytes};
        __m512i n = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(b[0] + bits_at + 4)));
        n = _mm512_inserti32x4(n, _mm_loadu_si128((const __m128i *)(b[1] + bits_at + 4)), 1);
        n = _mm512_inserti32x4(n, _mm_loadu_si128((const __m128i *)(b[2] + bits_at + 4)), 2);
        n = _mm512_inserti32x4(n, _mm_loadu_si128((const __m128i *)(b[3] + bits_at + 4)), 3);
        uint64_t low_bits = 0, high_bits = 0, scales = 0, mins = 0;
        for (int j = 0; j < 4; j++) {
            uint64_t h = rd32(b[j] + bits_at);
            low_bits |= (h & 0xFFFF) << (16 * j);
            high_bits |= (h >> 16) << (16 * j);
            scales |= (uint64_t)rd16(b[j]) << (16 * j);
            if (has_min) mins |= (uint64_t)rd16(b[j] + 2) << (16 * j);
        }
        __m512i lo = _mm512_and_si512(n, nib), hi = _mm512_and_si512(_mm512_srli_epi16(n, 4), nib);
        lo = _mm512_mask_add_epi8(lo, (__mmask64)low_bits, lo, sixteen);
        hi = _mm512_mask_add_epi8(hi, (__mmask64)high_bits, hi, sixteen);
#define TERM(q, k, xv) _mm512_cvtepi32_ps(_mm512_and_si512(q, k)), _mm512_loadu_ps(xv)
        __m512 s = _mm512_mul_ps(TERM(lo, k0, xp)), t = _mm512_mul_ps(TERM(hi, k0, xp + 64));
        s = _mm512_fmadd_ps(TERM(lo, k1, xp + 16), s);
        t = _mm512_fmadd_ps(TERM(hi, k1, xp + 80), t);
        s = _mm512_fmadd_ps(TERM(lo, k2, xp + 32), s);
        t = _mm512_fmadd_ps(TERM(hi, k2, xp + 96), t);
        s = _mm512_fmadd_ps(TERM(lo, k3, xp + 48), s);
        t = _mm512_fmadd_ps(TERM(hi, k3, xp + 112), t);
#undef TERM
        __m128 d4 = _mm_cvtph_ps(_mm_cvtsi64_si128((long long)scales));
        acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(quads, _mm512_castps128_ps512(d4)), _mm512_add_ps(s, t), acc);
        /* Q5_1: + m * sum x per block; Q5_0: - 16 d * sum x, the -16 applied once at the end (exact) */
        __m128 per_block = has_min ? _mm_cvtph_ps(_mm_cvtsi64_si128((long long)mins)) : d4;
        offsets = _mm_fmadd_ps(per_block, _mm_loadu_ps(xs + i), offsets);
    }
    offsets = _mm_add_ps(offsets, _mm_movehl_ps(offsets, offsets));
    offsets = _mm_add_ss(offsets, _mm_movehdup_ps(offsets));
    float total = _mm512_reduce_add_ps(acc) + (has_min ? 1.0f : -16.0f) * _mm_cvtss_f32(offsets);
    if (i < nb) total += dot_q5_exact(type, row, xp, xs + i, nb - i);
    return total;
}

/* q5_exact_avx512 compiled once per type, so that neither carries the other's branches in its loop */
AVX512 static float dot_q5_exact_avx512(int type, const uint8_t *row, const float *xp, const float *xs, int64_t nb) {
    return type == T_Q5_1 ? q5_exact_avx512(1, row, xp, xs, nb) : q5_exact_avx512(0, row, xp, xs, nb);
}

/* The eight 6-bit scales and minimums of a Q4_K / Q5_K super-block (kquant_scale_min, eight at a time), as bytes. */
static inline void kquant_scales_mins8(const uint8_t *q, uint64_t *sc, uint64_t *mn) {
    uint32_t u0 = rd32(q), u1 = rd32(q + 4), u2 = rd32(q + 8);
    uint32_t sc_hi = (u2 & 0x0F0F0F0Fu) | (((u0 >> 6) & 0x03030303u) << 4);
    uint32_t mn_hi = ((u2 >> 4) & 0x0F0F0F0Fu) | (((u1 >> 6) & 0x03030303u) << 4);
    *sc = (u0 & 0x3F3F3F3Fu) | ((uint64_t)sc_hi << 32);
    *mn = (u1 & 0x3F3F3F3Fu) | ((uint64_t)mn_hi << 32);
}

AVX2 static inline __m256 u8x8_to_ps(uint64_t v) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)v)));
}

/* A Q4_K / Q5_K super-block's header: d * sc_j into dsc[8]; returns macc plus dmin * m_j * (sum of x over sub-block
 * j) for its eight sub-blocks. d and dmin are converted together, as the two halves of one 32-bit load. */
AVX2 static inline __m256 kquant_header(const uint8_t *row, const float *xs, float dsc[8], __m256 macc) {
    uint64_t sc, mn;
    kquant_scales_mins8(row + 4, &sc, &mn);
    __m128 d_dmin = _mm_cvtph_ps(_mm_cvtsi32_si128((int)rd32(row)));
    __m256 d = _mm256_broadcastss_ps(d_dmin), dmin = _mm256_broadcastss_ps(_mm_movehdup_ps(d_dmin));
    _mm256_storeu_ps(dsc, _mm256_mul_ps(d, u8x8_to_ps(sc)));
    return _mm256_fmadd_ps(_mm256_mul_ps(dmin, u8x8_to_ps(mn)), _mm256_loadu_ps(xs), macc);
}

/* The Q4_K / Q5_K kernels read super-block i's scales while the header of i + 1 is worked out into the other half of
 * a double buffer: broadcasting a scale from the store just made stalled the sums that wait on it. */
#define KQUANT_HEADER_AHEAD(row, bytes, xs, i, nb, dsc, macc) \
    do { \
        if ((i) == 0) (macc) = kquant_header(row, xs, (dsc)[0], macc); \
        if ((i) + 1 < (nb)) (macc) = kquant_header((row) + (bytes), (xs) + 8, (dsc)[((i) + 1) & 1], macc); \
    } while (0)

/* Two groups of 32 values -> 64: 8 of the first, 8 of the second, in turn (the order a 512-bit register of two
 * groups' weights meets them). */
static inline void interleave_groups(const float *a, const float *b, float *out) {
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 8; i++) {
            out[16 * j + i] = a[8 * j + i];
            out[16 * j + 8 + i] = b[8 * j + i];
        }
}

/* x in lane order, per group of 32: xl[8 j + i] = x[4 i + j] * 2^-8j, the value that meets byte j of lane i of a
 * 32-byte register of weights (masked in place: its value times 2^8j). Q4_K's odd groups are its high nibbles,
 * worth a further 2^4 in place, except the top one of a lane, which the kernel shifts down to its value (Q5_K
 * shifts all its high nibbles down, to put the fifth bits above them). */
AVX2 static void x_lane_order(int type, const float *x, int64_t k, float *xl, int vec) {
    for (int64_t g = 0; g < k; g += 32) {
        int high_nibbles = type == T_Q4_K && (g / 32) % 2;
        for (int j = 0; j < 4; j++) {
            float scale = 1.0f / (float)(1u << (8 * j + 4 * high_nibbles));
            if (high_nibbles && j == 3) scale = 1.0f;
            for (int i = 0; i < 8; i++) xl[g + 8 * j + i] = x[g + 4 * i + j] * scale;
        }
    }
    if (vec != 2) return;
    /* the 512-bit kernels. Q5_x: per 128 values (four groups), the order dot_q5_exact_avx512 meets them; groups
     * past the last 128 stay in the order above. Q6_K pairs groups of 32, 8 values of each in turn, neighbours (0
     * with 1, 2 with 3); Q4_K pairs within 128 values the low nibbles of two chunks (0 with 2) and their high ones
     * (1 with 3) */
    float order[128];
    if (type == T_Q5_0 || type == T_Q5_1) {  /* per 128 values: low nibbles then high, byte j, block b, lane i */
        for (int64_t g = 0; g + 128 <= k; g += 128) {
            for (int half = 0; half < 2; half++)
                for (int j = 0; j < 4; j++)
                    for (int b = 0; b < 4; b++)
                        for (int i = 0; i < 4; i++)
                            order[(4 * half + j) * 16 + 4 * b + i] = xl[g + 32 * b + 8 * j + 4 * half + i];
            memcpy(xl + g, order, sizeof order);
        }
    } else if (type == T_Q6_K) {
        for (int64_t g = 0; g + 64 <= k; g += 64) {
            interleave_groups(xl + g, xl + g + 32, order);
            memcpy(xl + g, order, 64 * sizeof(float));
        }
    } else if (type == T_Q4_K) {
        for (int64_t g = 0; g < k; g += 128) {
            interleave_groups(xl + g, xl + g + 64, order);
            interleave_groups(xl + g + 32, xl + g + 96, order + 64);
            memcpy(xl + g, order, sizeof order);
        }
    }
}

/* Q4_K, x in lane order: per 64 values, 32 bytes of nibbles (low: sub-block 2c, high: 2c + 1), each nibble masked
 * in place; d*sc_j * sum(q x) - dmin*m_j * sum(x) per sub-block */
AVX2 static float dot_q4_k_exact(const uint8_t *row, const float *xl, const float *xs, int64_t nb) {
    const __m256i l0 = _mm256_set1_epi32(0x0F), l1 = _mm256_set1_epi32(0x0F00), l2 = _mm256_set1_epi32(0x0F0000);
    const __m256i l3 = _mm256_set1_epi32(0x0F000000), h0 = _mm256_set1_epi32(0xF0), h1 = _mm256_set1_epi32(0xF000);
    const __m256i h2 = _mm256_set1_epi32(0xF00000);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    float scales[2][8];
    for (int64_t i = 0; i < nb; i++, row += 144, xl += QKK, xs += 8) {
        KQUANT_HEADER_AHEAD(row, 144, xs, i, nb, scales, macc);
        const float *dsc = scales[i & 1];
        const uint8_t *qs = row + 16;
        for (int line = 0; line < 144; line += 64) PREFETCH(row + line);
        for (int c = 0; c < 4; c++) {
            const float *xa = xl + 64 * c, *xb = xa + 32;
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
#define TERM(q, xv) _mm256_cvtepi32_ps(q), _mm256_loadu_ps(xv)
            __m256 s0 = _mm256_mul_ps(TERM(_mm256_and_si256(v, l0), xa));
            __m256 s1 = _mm256_mul_ps(TERM(_mm256_and_si256(v, h0), xb));
            s0 = _mm256_fmadd_ps(TERM(_mm256_and_si256(v, l1), xa + 8), s0);
            s1 = _mm256_fmadd_ps(TERM(_mm256_and_si256(v, h1), xb + 8), s1);
            s0 = _mm256_fmadd_ps(TERM(_mm256_and_si256(v, l2), xa + 16), s0);
            s1 = _mm256_fmadd_ps(TERM(_mm256_and_si256(v, h2), xb + 16), s1);
            s0 = _mm256_fmadd_ps(TERM(_mm256_and_si256(v, l3), xa + 24), s0);
            /* in place, the top nibble would be the sign bit */
            s1 = _mm256_fmadd_ps(TERM(_mm256_srli_epi32(v, 28), xb + 24), s1);
#undef TERM
            acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dsc[2 * c]), s0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dsc[2 * c + 1]), s1, acc1);
        }
    }
    return hsum8(_mm256_sub_ps(_mm256_add_ps(acc0, acc1), macc));
}

/* dot_q4_k_exact with 512-bit vectors: two 32-byte chunks of a super-block a register (chunks 0 and 1, then 2 and
 * 3), x in lane order with its groups paired to match (x_lane_order, vec 2): the low nibbles of both chunks meet
 * one register of x, their high nibbles another; each half of a register meets its own sub-block's scale. The
 * same products, summed in another order. */
AVX512 static float dot_q4_k_exact_avx512(const uint8_t *row, const float *xp, const float *xs, int64_t nb) {
    const __m512i l0 = _mm512_set1_epi32(0x0F), l1 = _mm512_set1_epi32(0x0F00), l2 = _mm512_set1_epi32(0x0F0000);
    const __m512i l3 = _mm512_set1_epi32(0x0F000000), h0 = _mm512_set1_epi32(0xF0), h1 = _mm512_set1_epi32(0xF000);
    const __m512i h2 = _mm512_set1_epi32(0xF00000);
    const __m512i halves = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m256 macc = _mm256_setzero_ps();
    float scales[2][8];
    for (int64_t i = 0; i < nb; i++, row += 144, xp += QKK, xs += 8) {
        KQUANT_HEADER_AHEAD(row, 144, xs, i, nb, scales, macc);
        __m512 dsc = _mm512_castps256_ps512(_mm256_loadu_ps(scales[i & 1]));
        const uint8_t *qs = row + 16;
        for (int line = 0; line < 144; line += 64) PREFETCH(row + line);
        for (int c = 0; c < 4; c += 2) {
            const float *xa = xp + 64 * c, *xb = xa + 64;
            __m512i v = _mm512_loadu_si512((const void *)(qs + 32 * c));
#define TERM(q, xv) _mm512_cvtepi32_ps(q), _mm512_loadu_ps(xv)
            __m512 s0 = _mm512_mul_ps(TERM(_mm512_and_si512(v, l0), xa));
            __m512 s1 = _mm512_mul_ps(TERM(_mm512_and_si512(v, h0), xb));
            s0 = _mm512_fmadd_ps(TERM(_mm512_and_si512(v, l1), xa + 16), s0);
            s1 = _mm512_fmadd_ps(TERM(_mm512_and_si512(v, h1), xb + 16), s1);
            s0 = _mm512_fmadd_ps(TERM(_mm512_and_si512(v, l2), xa + 32), s0);
            s1 = _mm512_fmadd_ps(TERM(_mm512_and_si512(v, h2), xb + 32), s1);
            s0 = _mm512_fmadd_ps(TERM(_mm512_and_si512(v, l3), xa + 48), s0);
            s1 = _mm512_fmadd_ps(TERM(_mm512_srli_epi32(v, 28), xb + 48), s1);  /* in place: the sign bit */
#undef TERM
            /* sub-blocks 2c, 2c + 2 (low nibbles) and 2c + 1, 2c + 3 (high) */
            __m512i low_subs = _mm512_add_epi32(halves, _mm512_set1_epi32(2 * c));
            acc0 = _mm512_fmadd_ps(_mm512_permutexvar_ps(low_subs, dsc), s0, acc0);
            acc1 = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_add_epi32(low_subs, _mm512_set1_epi32(1)), dsc),
                                   s1, acc1);
        }
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - hsum8(macc);
}

/* Q5_K, x in lane order: as Q4_K, with the fifth bits (bit 2c of qh byte l for the low nibbles of chunk c, bit
 * 2c + 1 for its high ones) placed above the nibbles as bytes first; the high nibbles are shifted down, so every
 * byte is a 5-bit value masked in place */
AVX2 static float dot_q5_k_exact(const uint8_t *row, const float *xl, const float *xs, int64_t nb) {
    const __m256i nib = _mm256_set1_epi8(0x0F), fifth = _mm256_set1_epi8(0x10);
    const __m256i k0 = _mm256_set1_epi32(0x1F), k1 = _mm256_set1_epi32(0x1F00), k2 = _mm256_set1_epi32(0x1F0000);
    const __m256i k3 = _mm256_set1_epi32(0x1F000000);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), macc = _mm256_setzero_ps();
    float scales[2][8];
    for (int64_t i = 0; i < nb; i++, row += 176, xl += QKK, xs += 8) {
        KQUANT_HEADER_AHEAD(row, 176, xs, i, nb, scales, macc);
        const float *dsc = scales[i & 1];
        const uint8_t *qs = row + 48;
        const __m256i h = _mm256_loadu_si256((const __m256i *)(row + 16));
        /* bit b of every qh byte moved to bit 4 (16-bit shifts; what crosses into the next byte is masked off) */
        const __m256i up4 = _mm256_slli_epi16(h, 4), up3 = _mm256_slli_epi16(h, 3), up2 = _mm256_slli_epi16(h, 2);
        const __m256i up1 = _mm256_slli_epi16(h, 1), dn1 = _mm256_srli_epi16(h, 1), dn2 = _mm256_srli_epi16(h, 2);
        const __m256i dn3 = _mm256_srli_epi16(h, 3);
        const __m256i bits[8] = {up4, up3, up2, up1, h, dn1, dn2, dn3};
        for (int line = 0; line < 176; line += 64) PREFETCH(row + line);
        for (int c = 0; c < 4; c++) {
            const float *xa = xl + 64 * c, *xb = xa + 32;
            __m256i v = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
            __m256i lo = _mm256_or_si256(_mm256_and_si256(v, nib), _mm256_and_si256(bits[2 * c], fifth));
            __m256i hi = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib),
                                         _mm256_and_si256(bits[2 * c + 1], fifth));
#define TERM(q, k, xv) _mm256_cvtepi32_ps(_mm256_and_si256(q, k)), _mm256_loadu_ps(xv)
            __m256 s0 = _mm256_mul_ps(TERM(lo, k0, xa)), s1 = _mm256_mul_ps(TERM(hi, k0, xb));
            s0 = _mm256_fmadd_ps(TERM(lo, k1, xa + 8), s0);
            s1 = _mm256_fmadd_ps(TERM(hi, k1, xb + 8), s1);
            s0 = _mm256_fmadd_ps(TERM(lo, k2, xa + 16), s0);
            s1 = _mm256_fmadd_ps(TERM(hi, k2, xb + 16), s1);
            s0 = _mm256_fmadd_ps(TERM(lo, k3, xa + 24), s0);
            s1 = _mm256_fmadd_ps(TERM(hi, k3, xb + 24), s1);
#undef TERM
            acc0 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dsc[2 * c]), s0, acc0);
            acc1 = _mm256_fmadd_ps(_mm256_broadcast_ss(&dsc[2 * c + 1]), s1, acc1);
        }
    }
    return hsum8(_mm256_sub_ps(_mm256_add_ps(acc0, acc1), macc));
}

/* Q6_K, x in lane order: 16 values share a signed 8-bit scale. The 6-bit values are assembled as bytes, 32 values
 * (two sub-blocks: lanes 0-3 and 4-7) per register; each byte is masked in place and the sums of the two
 * sub-blocks meet their scales as one vector. The values' offset of 32 is factored out, as Q4_K's minimums are:
 * sum (q - 32) x = sum q x - 32 sum x per 16 values (xs16), a vector per half super-block, instead of one integer
 * subtraction per 8 weights. */
AVX2 static float dot_q6_k_exact(const uint8_t *row, const float *xl, const float *xs16, int64_t nb) {
    const __m256i low = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    const __m256i k0 = _mm256_set1_epi32(0xFF), k1 = _mm256_set1_epi32(0xFF00), k2 = _mm256_set1_epi32(0xFF0000);
    const __m256i k3 = _mm256_set1_epi32((int)0xFF000000u);  /* a top byte of at most 63: positive in place */
    const __m256i pair0 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), two = _mm256_set1_epi32(2);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), offsets = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += 210, xl += QKK, xs16 += 16) {
        const uint8_t *ql = row, *qh = row + 128;
        for (int line = 0; line < 210; line += 64) PREFETCH(row + line);
        __m256 d = _mm256_set1_ps(h2f(rd16(row + 208)));
        __m128i scb = _mm_loadu_si128((const __m128i *)(row + 192));
        __m256 dsc[2] = {_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(scb))),
                         _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(scb, 8))))};
        offsets = _mm256_fmadd_ps(dsc[0], _mm256_loadu_ps(xs16), offsets);
        offsets = _mm256_fmadd_ps(dsc[1], _mm256_loadu_ps(xs16 + 8), offsets);
        for (int h = 0; h < 2; h++, ql += 64, qh += 32) {
            __m256i a = _mm256_loadu_si256((const __m256i *)ql), b = _mm256_loadu_si256((const __m256i *)(ql + 32));
            __m256i hb = _mm256_loadu_si256((const __m256i *)qh);
            __m256i q[4];  /* values 32 j .. 32 j + 31 of this half, 0..63 */
            q[0] = _mm256_or_si256(_mm256_and_si256(a, low), _mm256_and_si256(_mm256_slli_epi16(hb, 4), m30));
            q[1] = _mm256_or_si256(_mm256_and_si256(b, low), _mm256_and_si256(_mm256_slli_epi16(hb, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), low), _mm256_and_si256(hb, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(b, 4), low),
                                   _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
            __m256i pair = pair0;  /* scales 2 j and 2 j + 1 of this half, each over four lanes */
            for (int j = 0; j < 4; j++, pair = _mm256_add_epi32(pair, two)) {
                const float *xj = xl + 128 * h + 32 * j;
#define TERM(k, xv) _mm256_cvtepi32_ps(_mm256_and_si256(q[j], k)), _mm256_loadu_ps(xv)
                __m256 s = _mm256_mul_ps(TERM(k0, xj));
                s = _mm256_fmadd_ps(TERM(k1, xj + 8), s);
                s = _mm256_fmadd_ps(TERM(k2, xj + 16), s);
                s = _mm256_fmadd_ps(TERM(k3, xj + 24), s);
#undef TERM
                __m256 scales = _mm256_permutevar8x32_ps(dsc[h], pair);
                if (j & 1) acc1 = _mm256_fmadd_ps(scales, s, acc1);
                else acc0 = _mm256_fmadd_ps(scales, s, acc0);
            }
        }
    }
    return hsum8(_mm256_fnmadd_ps(_mm256_set1_ps(32.0f), offsets, _mm256_add_ps(acc0, acc1)));
}

/* dot_q6_k_exact with 512-bit vectors: a half super-block's 128 values as two registers of 64 bytes (values 0-63,
 * then 64-127: the AVX2 kernel's q[0] and q[1], then q[2] and q[3], side by side: q6_k_half_values); x in lane
 * order with its groups of 32 in pairs (x_lane_order, vec 2); each 16-value scale picked for its four lanes by one
 * permute. The same products, summed in another order. */
AVX512 static float dot_q6_k_exact_avx512(const uint8_t *row, const float *xp, const float *xs16, int64_t nb) {
    /* each byte's six bits masked in place: bits 6-7 of a byte may hold stray fifth / sixth bits (q6_k_half_values) */
    const __m512i k0 = _mm512_set1_epi32(0x3F), k1 = _mm512_set1_epi32(0x3F00), k2 = _mm512_set1_epi32(0x3F0000);
    const __m512i k3 = _mm512_set1_epi32(0x3F000000);
    const __m512i quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), offsets = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += 210, xp += QKK, xs16 += 16) {
        const uint8_t *ql = row, *qh = row + 128;
        for (int line = 0; line < 210; line += 64) PREFETCH(row + line);
        __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 192)));
        __m512 dsc = _mm512_mul_ps(_mm512_set1_ps(h2f(rd16(row + 208))), _mm512_cvtepi32_ps(sc));
        offsets = _mm512_fmadd_ps(dsc, _mm512_loadu_ps(xs16), offsets);
        for (int h = 0; h < 2; h++, ql += 64, qh += 32) {
            __m512i q[2];  /* values 0-63 and 64-127 of this half, 0..63 each */
            q6_k_half_values(ql, qh, q);
            for (int j = 0; j < 2; j++) {
                const float *xj = xp + 128 * h + 64 * j;
#define TERM(k, xv) _mm512_cvtepi32_ps(_mm512_and_si512(q[j], k)), _mm512_loadu_ps(xv)
                __m512 s = _mm512_mul_ps(TERM(k0, xj));
                s = _mm512_fmadd_ps(TERM(k1, xj + 16), s);
                s = _mm512_fmadd_ps(TERM(k2, xj + 32), s);
                s = _mm512_fmadd_ps(TERM(k3, xj + 48), s);
#undef TERM
                __m512 scales = _mm512_permutexvar_ps(_mm512_add_epi32(quads, _mm512_set1_epi32(8 * h + 4 * j)), dsc);
                if (j) acc1 = _mm512_fmadd_ps(scales, s, acc1);
                else acc0 = _mm512_fmadd_ps(scales, s, acc0);
            }
        }
    }
    return _mm512_reduce_add_ps(_mm512_fnmadd_ps(_mm512_set1_ps(32.0f), offsets, _mm512_add_ps(acc0, acc1)));
}

/* Q8_0 with 512-bit vectors: a block's 32 bytes widened 16 at a time, each half block against its 16 values of x.
 * On an AMD Zen 4 core, rows of 640 values (Gemma 3 270M's LM head) ran ~1.1x as fast as the AVX2 kernel, longer
 * rows the same. The same products, summed in another order. */
AVX512 static float dot_q8_0_avx512(const uint8_t *row, const float *x, int64_t nb) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t i = 0; i < nb; i++, row += 34, x += 32) {
        if ((i & 1) == 0) PREFETCH(row);
        __m512 s = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 2)))),
                                 _mm512_loadu_ps(x));
        s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(row + 18)))),
                            _mm512_loadu_ps(x + 16), s);
        __m512 d = _mm512_set1_ps(h2f(rd16(row)));
        if (i & 1) acc1 = _mm512_fmadd_ps(d, s, acc1);
        else acc0 = _mm512_fmadd_ps(d, s, acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* The block of the per-block sums of x (block_sums) that the kernel of `type` takes, or 0 for none. */
static int exact_sum_block(int type) {
    if (type == T_Q6_K) return 16;
    return type == T_Q5_0 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K ? 32 : 0;
}

/* Whether the kernel of `type` takes x in lane order (x_lane_order) as well as x. */
static int exact_needs_lanes(int type) {
    return type == T_Q5_0 || type == T_Q5_1 || type == T_Q4_K || type == T_Q5_K || type == T_Q6_K;
}

/* One weight row times one activation row with the kernels above: 1 and *out set when this file has the type
 * (Q4_0 / Q4_1: the plain kernel above was as fast), 0 otherwise. */
AVX2 static int exact_dot(int type, const uint8_t *row, const float *x, const float *xs, const float *xl, int64_t k,
                          int vec, float *out) {
    switch (type) {
    case T_Q5_0: case T_Q5_1:
        *out = vec == 2 ? dot_q5_exact_avx512(type, row, xl, xs, k / QK) : dot_q5_exact(type, row, xl, xs, k / QK);
        return 1;
    case T_Q4_K:
        *out = vec == 2 ? dot_q4_k_exact_avx512(row, xl, xs, k / QKK) : dot_q4_k_exact(row, xl, xs, k / QKK);
        return 1;
    case T_Q5_K: *out = dot_q5_k_exact(row, xl, xs, k / QKK); return 1;
    case T_Q6_K:
        *out = vec == 2 ? dot_q6_k_exact_avx512(row, xl, xs, k / QKK) : dot_q6_k_exact(row, xl, xs, k / QKK);
        return 1;
    case T_Q8_0: *out = vec == 2 ? dot_q8_0_avx512(row, x, k / QK) : dot_q8_0(row, x, k / QK); return 1;
    }
    return 0;
}

#endif

