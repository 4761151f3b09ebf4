/* Native kernels of exact mode (pipeline/exact/native.py builds and loads
 * them): the same IEEE-754 operations, in the same order, as the torch
 * implementations they replace (docs/exact-spec.md, sections 12 and 14), run
 * in one pass over the data instead of one pass per operation. Bit for bit
 * equal to those implementations by construction, by a self-test before
 * every use of a build, and by tests/test_native.py.
 *
 * Rules that keep them exact (native.py compiles with -std=c11
 * -ffp-contract=off and never with -ffast-math):
 * - every + - * / is one rounded binary64 or binary32 operation: no
 *   contraction to fused multiply-add, no reassociation;
 * - no libm: exp is the spec's polynomial, rounding to an integer the
 *   (v + 1.5 * 2^52) - 1.5 * 2^52 trick, powers of two built from bits;
 * - elementwise work only, split over threads by element or row: the thread
 *   count changes which core computes an element, never how.
 * native.py prepends the spec's constants (#define PX_...), written from the
 * Python constants with float.hex(): one source of truth.
 */
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#define PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(nt) if(nt > 1)")
#define PARALLEL_FOR_DYNAMIC \
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nt) if(nt > 1)")
#else
#define PARALLEL_FOR
#define PARALLEL_FOR_DYNAMIC
#endif

static inline uint64_t bits64(double x) { uint64_t u; memcpy(&u, &x, 8); return u; }
static inline double from64(uint64_t u) { double x; memcpy(&x, &u, 8); return x; }

#define RND 0x1.8p52 /* (v + RND) - RND: v rounded to an integer, half to even, |v| < 2^51 */

static const double EXP_C[12] = PX_EXP_C;    /* 1/n!, n = 0..11 */
static const double ERFC_C[10] = PX_ERFC_C;  /* Numerical Recipes' erfcc, C0..C9 */

/* ops.exp64: clamp to [-110, 90] (NaN passes), k = round(d log2 e),
 * Cody-Waite reduction, 11th-degree Taylor by Horner, q * 2^k. */
static inline double exp64(double d) {
    d = d < -110.0 ? -110.0 : (d > 90.0 ? 90.0 : d);
    double k = (d * PX_LOG2E + RND) - RND;
    double r = (d - k * PX_LN2_HI) - k * PX_LN2_LO;
    double q = r * EXP_C[11] + EXP_C[10];
    for (int n = 9; n >= 0; n--) q = q * r + EXP_C[n];
    /* 2^k for integral k in [-160, 130]: k + 2^52 + 1023 holds k + 1023 in
     * its low mantissa bits, which become the exponent field. (A NaN k
     * gives some power of two; q is NaN then, and so is the product.) */
    uint64_t e = bits64(k + (0x1p52 + 1023.0)) & 0x7FF;
    return q * from64(e << 52);
}

/* ---------------------------------------------------------------- GELU */
/* refs.gelu_parts_torch, erf form: Phi(d) from the erfcc approximation. */
static inline double gelu_phi(double d) {
    double a = __builtin_fabs(d * -PX_SQRT_HALF);
    double t = 1.0 / (a * 0.5 + 1.0);
    double w = t * ERFC_C[9] + ERFC_C[8];
    for (int n = 7; n >= 0; n--) w = w * t + ERFC_C[n];
    double half = exp64(w - a * a) * t * 0.5;
    return d <= 0 ? half : 1.0 - half;
}

/* refs.gelu_parts_torch over x[i0:i1], erf
 * form; dy (the derivative) only if asked, in its own loop (a branch inside
 * the loop would keep it from vectorising). */
static void gelu_erf_span(const float *restrict x, float *restrict y, float *restrict dy,
                          int64_t i0, int64_t i1) {
    if (!dy) {
        for (int64_t i = i0; i < i1; i++) {
            double d = (double)x[i];
            y[i] = (float)(d * gelu_phi(d));
        }
        return;
    }
    for (int64_t i = i0; i < i1; i++) {
        double d = (double)x[i];
        double phi = gelu_phi(d);
        y[i] = (float)(d * phi);
        double dens = exp64(-((d * d) * 0.5)) * PX_INV_SQRT_2PI;
        dy[i] = (float)(dens * d + phi);
    }
}

/* The same, tanh form: sg = 1 / (exp(-2u) + 1) with u = sqrt(2/pi) (d + 0.044715 d^3). */
static inline double gelu_tanh_sg(double d) {
    double u = ((d * d) * d * 0.044715 + d) * PX_SQRT_2_PI;
    return 1.0 / (exp64(u * -2.0) + 1.0);
}

static void gelu_tanh_span(const float *restrict x, float *restrict y, float *restrict dy,
                           int64_t i0, int64_t i1) {
    if (!dy) {
        for (int64_t i = i0; i < i1; i++) {
            double d = (double)x[i];
            y[i] = (float)(d * gelu_tanh_sg(d));
        }
        return;
    }
    for (int64_t i = i0; i < i1; i++) {
        double d = (double)x[i];
        double sg = gelu_tanh_sg(d);
        y[i] = (float)(d * sg);
        double du = ((d * d) * 0.134145 + 1.0) * PX_SQRT_2_PI;
        dy[i] = (float)((d * 2.0) * du * ((1.0 - sg) * sg) + sg);
    }
}

#define CHUNK 4096 /* elements per parallel work item */

/* GELU of n elements (tanh: the tanh form, else erf), dy may be NULL. */
void px_gelu(const float *restrict x, float *restrict y, float *restrict dy, int64_t n,
             int tanh, int nt) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i0 = c * CHUNK, i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        if (tanh)
            gelu_tanh_span(x, y, dy, i0, i1);
        else
            gelu_erf_span(x, y, dy, i0, i1);
    }
}

/* ---------------------------------------------------------------- SiLU, sigmoid, tanh */
/* activations.activation_parts_torch (docs/exact-spec.md, section 20). */
static const double TANH_C[8] = PX_TANH_C;

/* One span per kind, every branch computed and selected (a select picks one
 * value, so the results are those of the torch code), dy in its own loop: no
 * branch inside a loop, which vectorises. The body sets yv and dv from d. */
#define ACT_SPAN(name, ...)                                                           \
    static void name(const float *restrict x, float *restrict y, float *restrict dy, \
                     int64_t i0, int64_t i1) {                                        \
        if (!dy) {                                                                    \
            for (int64_t i = i0; i < i1; i++) {                                       \
                double d = (double)x[i], yv, dv;                                      \
                __VA_ARGS__                                                           \
                (void)dv;                                                             \
                y[i] = (float)yv;                                                     \
            }                                                                         \
            return;                                                                   \
        }                                                                             \
        for (int64_t i = i0; i < i1; i++) {                                           \
            double d = (double)x[i], yv, dv;                                          \
            __VA_ARGS__                                                               \
            y[i] = (float)yv;                                                         \
            dy[i] = (float)dv;                                                        \
        }                                                                             \
    }

ACT_SPAN(silu_span, {
    double e = exp64(-__builtin_fabs(d)), t = e + 1.0;
    double p = 1.0 / t, q = e / t;
    double sg = d >= 0 ? p : q, sc = d >= 0 ? q : p;
    yv = d * sg;
    dv = (d * sc + 1.0) * sg;
})

ACT_SPAN(sigmoid_span, {
    double e = exp64(-__builtin_fabs(d)), t = e + 1.0;
    double p = 1.0 / t, q = e / t;
    yv = d >= 0 ? p : q;
    dv = p * q;
})

ACT_SPAN(tanh_span, {
    double a = __builtin_fabs(d), z = d * d;
    double w = z * TANH_C[7] + TANH_C[6];
    for (int n = 5; n >= 0; n--) w = w * z + TANH_C[n];
    double th_s = d * w;
    double e = exp64(a * -2.0), u = e + 1.0;
    double th_b = (1.0 - e) / u;
    th_b = d < 0 ? -th_b : th_b;
    int small = a < PX_TANH_SMALL;
    yv = small ? th_s : th_b;
    dv = small ? 1.0 - th_s * th_s : (e * 4.0) / (u * u);
})

/* kind 0 SiLU, 1 sigmoid, 2 tanh of n elements; dy may be NULL. */
void px_activation(const float *restrict x, float *restrict y, float *restrict dy, int64_t n,
                   int kind, int nt) {
    int64_t chunks = (n + CHUNK - 1) / CHUNK;
    PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++) {
        int64_t i0 = c * CHUNK, i1 = i0 + CHUNK < n ? i0 + CHUNK : n;
        if (kind == 0)
            silu_span(x, y, dy, i0, i1);
        else if (kind == 1)
            sigmoid_span(x, y, dy, i0, i1);
        else
            tanh_span(x, y, dy, i0, i1);
    }
}

/* ---------------------------------------------------------------- xmmb's quantisation */
/* product._magic: 1.5 * 2^(52 + e - p) from the block maximum r (f32 >= 0,
 * or NaN/inf: the same bit arithmetic, wrapping as int64 does). */
static inline double magic(float r, int p) {
    uint64_t b = bits64((double)r) & 0x7FF0000000000000ULL;
    return from64(b + (((uint64_t)(53 - p) << 52) | (1ULL << 51)));
}

/* |v|'s bits: for f32 magnitudes the bit patterns order as the values do,
 * with inf and NaN above every finite value, so an integer maximum is the
 * largest magnitude (torch's abs().amax()); a NaN maximum has the exponent
 * bits of inf, which are all that magic() reads. */
static inline uint32_t absbits(float v) {
    uint32_t u;
    memcpy(&u, &v, 4);
    return u & 0x7FFFFFFFu;
}
static inline float from32(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

/* One entry's two slices (product._quantised_torch): hi rounded to the
 * block's magic mg, the remainder (exact) rounded to mg * 2^-23. */
static inline void slices(double v, double mg, double *hi, double *lo) {
    double h = (v + mg) - mg, mg2 = mg * 0x1p-23;
    *hi = h;
    *lo = ((v - h) + mg2) - mg2;
}

/* product.quantise_a: rows of x (R x K, row stride ld) -> out (R x 2K),
 * each block of 64 along the row (the last one shorter) split into its two
 * slices at p bits of its largest magnitude, laid out [lo | hi] (lo_first)
 * or [hi | lo], block after block. */
void px_quantise_rows(const float *restrict x, int64_t rows, int64_t k, int64_t ld,
                      double *restrict out, int p, int lo_first, int nt) {
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * ld;
        double *o = out + r * 2 * k;
        for (int64_t j0 = 0; j0 < k; j0 += 64) {
            int64_t j1 = j0 + 64 < k ? j0 + 64 : k, len = j1 - j0;
            uint32_t m = 0;
            for (int64_t j = j0; j < j1; j++) {
                uint32_t a = absbits(xr[j]);
                m = a > m ? a : m;
            }
            double mg = magic(from32(m), p);
            double *ohi = o + 2 * j0 + (lo_first ? len : 0);
            double *olo = o + 2 * j0 + (lo_first ? 0 : len);
            for (int64_t j = j0; j < j1; j++)
                slices((double)xr[j], mg, &ohi[j - j0], &olo[j - j0]);
        }
    }
}

/* product.quantise_b: columns of x (batch x K x N, row stride ld, batch
 * stride bs) -> out (batch x 2K x N), each block of 64 rows (the last one
 * shorter) split per column at p bits of that column's largest magnitude
 * in the block, its rows laid out [hi ; lo] (or [lo ; hi] with lo_first). */
#define COLS 256
void px_quantise_cols(const float *restrict x, int64_t batch, int64_t k, int64_t n, int64_t ld,
                      int64_t bs, double *restrict out, int p, int lo_first, int nt) {
    int64_t blocks = (k + 63) / 64, cchunks = (n + COLS - 1) / COLS;
    int64_t items = batch * blocks * cchunks;
    PARALLEL_FOR
    for (int64_t it = 0; it < items; it++) {
        int64_t bt = it / (blocks * cchunks), rest = it % (blocks * cchunks);
        int64_t i0 = (rest / cchunks) * 64, c0 = (rest % cchunks) * COLS;
        int64_t c1 = c0 + COLS < n ? c0 + COLS : n, i1 = i0 + 64 < k ? i0 + 64 : k;
        int64_t len = i1 - i0;
        const float *xb = x + bt * bs;
        double *ob = out + bt * 2 * k * n;
        double *ohi = ob + (2 * i0 + (lo_first ? len : 0)) * n;
        double *olo = ob + (2 * i0 + (lo_first ? 0 : len)) * n;
        uint32_t m[COLS];
        double mg[COLS];
        for (int64_t c = c0; c < c1; c++) m[c - c0] = 0;
        for (int64_t i = i0; i < i1; i++)
            for (int64_t c = c0; c < c1; c++) {
                uint32_t a = absbits(xb[i * ld + c]);
                m[c - c0] = a > m[c - c0] ? a : m[c - c0];
            }
        for (int64_t c = c0; c < c1; c++) mg[c - c0] = magic(from32(m[c - c0]), p);
        for (int64_t i = i0; i < i1; i++)
            for (int64_t c = c0; c < c1; c++)
                slices((double)xb[i * ld + c], mg[c - c0], &ohi[(i - i0) * n + c],
                       &olo[(i - i0) * n + c]);
    }
}

/* ---------------------------------------------------------------- attention's softmax */
/* ops.tree_sum over one row of s f32 values: padded with -0 to a power of
 * two, neighbours (2i, 2i+1) added level by level. buf holds 2^ceil(log2 s). */
static inline float tree_row(float *buf, int64_t s) {
    int64_t m = 1;
    while (m < s) m <<= 1;
    for (int64_t j = s; j < m; j++) buf[j] = -0.0f;
    for (; m > 1; m >>= 1)
        for (int64_t j = 0; j < m / 2; j++) buf[j] = buf[2 * j] + buf[2 * j + 1];
    return buf[0];
}

/* attention._softmax on rows of z (rows x s, contiguous; row r is query
 * r % t of its matrix): the maximum over allowed keys (j <= query when
 * causal; NaN propagates), xexp(z - max) in f32 -> f64 -> f32, +0 where not
 * allowed, the fixed tree, a division. buf: s_pow2 floats per thread. */
#define MAXS 4096
void px_softmax(const float *restrict z, float *restrict p, int64_t rows, int64_t s, int64_t t,
                int causal, int nt) {
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAXS];
        const float *zr = z + r * s;
        float *pr = p + r * s;
        int64_t lim = causal ? (r % t) + 1 : s;
        if (lim > s) lim = s;
        float m = -__builtin_inff();
        for (int64_t j = 0; j < lim; j++) m = (zr[j] > m || zr[j] != zr[j]) ? zr[j] : m;
        for (int64_t j = 0; j < s; j++)
            buf[j] = j < lim ? (float)exp64((double)(zr[j] - m)) : 0.0f;
        for (int64_t j = 0; j < s; j++) pr[j] = buf[j];
        float sum = tree_row(buf, s);
        for (int64_t j = 0; j < s; j++) pr[j] = pr[j] / sum;
    }
}

/* attention._softmax_grad: gz = (gp - tree_sum(gp * p)) * p per row, +0
 * where not allowed. */
void px_softmax_grad(const float *restrict gp, const float *restrict p, float *restrict gz,
                     int64_t rows, int64_t s, int64_t t, int causal, int nt) {
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAXS];
        const float *gr = gp + r * s, *pr = p + r * s;
        float *zr = gz + r * s;
        int64_t lim = causal ? (r % t) + 1 : s;
        if (lim > s) lim = s;
        for (int64_t j = 0; j < s; j++) buf[j] = gr[j] * pr[j];
        float sum = tree_row(buf, s);
        for (int64_t j = 0; j < s; j++) zr[j] = j < lim ? (gr[j] - sum) * pr[j] : 0.0f;
    }
}

/* ---------------------------------------------------------------- fixed trees */
/* ops.tree_sum along the last dim of x (rows x s, contiguous) -> out (rows). */
void px_tree_rows(const float *restrict x, float *restrict out, int64_t rows, int64_t s,
                  int nt) {
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAXS];
        for (int64_t j = 0; j < s; j++) buf[j] = x[r * s + j];
        out[r] = tree_row(buf, s);
    }
}

/* ops.tree_sum along dim 0 of x (rows x n, contiguous) -> out (n): the same
 * neighbour pairing, whole rows at a time, over column chunks of COLS.
 * work: ceil(rows / 2) x n floats (the first level reads x); the chunk of w
 * columns from c0 uses ceil(rows / 2) x w of them, from offset c0 x ceil(rows / 2). */
void px_tree_cols(const float *restrict x, float *restrict out, int64_t rows, int64_t n,
                  float *restrict work, int nt) {
    int64_t cchunks = (n + COLS - 1) / COLS, half = (rows + 1) / 2;
    PARALLEL_FOR
    for (int64_t cc = 0; cc < cchunks; cc++) {
        int64_t c0 = cc * COLS, w = (c0 + COLS < n ? c0 + COLS : n) - c0;
        float *buf = work + c0 * half;
        /* level 1 from x: pairs (2i, 2i+1); an odd last row pairs with -0 */
        for (int64_t i = 0; i < half; i++)
            for (int64_t c = 0; c < w; c++)
                buf[i * w + c] = x[(2 * i) * n + c0 + c]
                                    + (2 * i + 1 < rows ? x[(2 * i + 1) * n + c0 + c] : -0.0f);
        int64_t len = half;
        while (len > 1) {
            int64_t next = (len + 1) / 2;
            for (int64_t i = 0; i < next; i++)
                for (int64_t c = 0; c < w; c++)
                    buf[i * w + c] = buf[(2 * i) * w + c]
                                     + (2 * i + 1 < len ? buf[(2 * i + 1) * w + c] : -0.0f);
            len = next;
        }
        for (int64_t c = 0; c < w; c++) out[c0 + c] = buf[c];
    }
}

/* ---------------------------------------------------------------- LayerNorm */
/* functional._LayerNorm.forward per row of x (rows x d): mean and variance
 * by the fixed tree and an f32 division by d, s = sqrt32(var + eps), xh =
 * (x - mean) / s, y = xh * w + b (w, b optional). Writes y, xh, s. */
void px_layer_norm(const float *restrict x, const float *restrict w, const float *restrict b,
                   float eps, float *restrict y, float *restrict xh, float *restrict s,
                   int64_t rows, int64_t d, int nt) {
    float fd = (float)d;
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAXS];
        const float *xr = x + r * d;
        float *yr = y + r * d, *hr = xh + r * d;
        for (int64_t j = 0; j < d; j++) buf[j] = xr[j];
        float mean = tree_row(buf, d) / fd;
        for (int64_t j = 0; j < d; j++) {
            float dv = xr[j] - mean;
            hr[j] = dv;
            buf[j] = dv * dv;
        }
        float var = tree_row(buf, d) / fd;
        float sr = __builtin_sqrtf(var + eps);
        s[r] = sr;
        for (int64_t j = 0; j < d; j++) {
            float v = hr[j] / sr;
            hr[j] = v;
            if (w) v = v * w[j];
            if (b) v = v + b[j];
            yr[j] = v;
        }
    }
}

/* functional._LayerNorm.backward's gx per row: gxh = g * w (or g), m1 =
 * tree(gxh) / d, m2 = tree(gxh * xh) / d, gx = ((gxh - m1) - xh * m2) / s. */
void px_layer_norm_grad(const float *restrict g, const float *restrict xh,
                        const float *restrict s, const float *restrict w, float *restrict gx,
                        int64_t rows, int64_t d, int nt) {
    float fd = (float)d;
    PARALLEL_FOR
    for (int64_t r = 0; r < rows; r++) {
        float buf[MAXS], gxh[MAXS];
        const float *gr = g + r * d, *hr = xh + r * d;
        for (int64_t j = 0; j < d; j++) gxh[j] = w ? gr[j] * w[j] : gr[j];
        for (int64_t j = 0; j < d; j++) buf[j] = gxh[j];
        float m1 = tree_row(buf, d) / fd;
        for (int64_t j = 0; j < d; j++) buf[j] = gxh[j] * hr[j];
        float m2 = tree_row(buf, d) / fd;
        for (int64_t j = 0; j < d; j++) gx[r * d + j] = ((gxh[j] - m1) - hr[j] * m2) / s[r];
    }
}

/* ---------------------------------------------------------------- Embedding's gradient */
/* refs.index_tree_sum_torch: for each index v, the neighbour-pairing tree
 * over the positions holding v (nodes 2i and 2i+1 of a level pair as left +
 * right into node i of the next; a node without its neighbour passes up
 * unchanged) -> out[v]. nodes: the positions grouped by v, ascending within a
 * group (a stable argsort of the indices); vals: the gradient's rows in that
 * order (n x d, contiguous); both are work space, overwritten group by group.
 * ends[v]: the end of v's group (cumulative counts, rows entries). out: rows
 * x d, +0 already; rows of indices that do not occur stay so. Groups are
 * independent, so threads take them one at a time (dynamic: sizes differ). */
void px_index_tree(int64_t *restrict nodes, float *restrict vals,
                   const int64_t *restrict ends, int64_t rows, int64_t d,
                   float *restrict out, int nt) {
    PARALLEL_FOR_DYNAMIC
    for (int64_t v = 0; v < rows; v++) {
        int64_t lo = v ? ends[v - 1] : 0, c = ends[v] - lo;
        if (c <= 0) continue;
        int64_t *nd = nodes + lo;
        float *vl = vals + lo * d;
        while (c > 1) {
            int64_t m = 0;
            for (int64_t i = 0; i < c; m++) {
                int64_t parent = nd[i] >> 1;  /* positions are >= 0 */
                if (i + 1 < c && nd[i + 1] >> 1 == parent) {
                    for (int64_t e = 0; e < d; e++)
                        vl[m * d + e] = vl[i * d + e] + vl[(i + 1) * d + e];
                    i += 2;
                } else {
                    if (m != i) memmove(vl + m * d, vl + i * d, (size_t)d * sizeof(float));
                    i += 1;
                }
                nd[m] = parent;
            }
            c = m;
        }
        memcpy(out + v * d, vl, (size_t)d * sizeof(float));
    }
}
