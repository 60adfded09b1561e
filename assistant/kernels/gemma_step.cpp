// One Gemma 3 decoding step on a CPU with AVX2 and FMA, bf16 weights, for the fast decoder
// (assistant/fast_native.py builds this file and calls it through ctypes).
//
// Why hand-written: on AVX2 (no native bf16 arithmetic) neither torch's bf16 kernels nor the
// Inductor-generated reductions stream the weights at memory speed, and a compiled torch graph
// still pays a dispatcher call per operation. Here each weight row is read once, widened to fp32
// in registers (a bf16 value is the top half of an fp32 one) and multiplied into fp32 sums.
//
// The arithmetic is assistant/fast_math.py's, which is transformers' and peft's: every product
// sums in fp32 and is rounded to bf16 where the reference rounds (matrix products, norms, RoPE
// terms, residual sums, the LoRA term, attention probabilities); only the order of the fp32 sums
// differs. Threads: OpenMP (the libgomp torch itself loads): one team per token step, splitting
// each product's rows (gemma_step); the check and the screen split their rows likewise.

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

typedef uint16_t bf16;

// Threads per product: torch's setting, passed in by the caller (an OpenMP setting made in one
// Python thread does not reach the others, and requests arrive on the app's worker threads).
int thread_count = 1;

inline float bf16_to_float(bf16 value) {
    uint32_t bits = static_cast<uint32_t>(value) << 16;
    float out;
    std::memcpy(&out, &bits, 4);
    return out;
}

// Round to nearest even, as torch converts fp32 to bf16.
inline bf16 float_to_bf16(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<bf16>((bits >> 16) | 0x40);  // NaN stays NaN
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return static_cast<bf16>(bits >> 16);
}

inline float round_bf16(float value) { return bf16_to_float(float_to_bf16(value)); }

inline __m256 load_bf16x8(const bf16* source) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(source));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float horizontal_sum(__m256 v) {
    __m128 low = _mm256_castps256_ps128(v), high = _mm256_extractf128_ps(v, 1);
    __m128 sum = _mm_add_ps(low, high);
    sum = _mm_add_ps(sum, _mm_movehl_ps(sum, sum));
    sum = _mm_add_ss(sum, _mm_movehdup_ps(sum));
    return _mm_cvtss_f32(sum);
}

// Software prefetch distance, in bf16 values ahead of the row being read (8 KB): the hardware
// prefetcher alone left a 2-thread product at about 15 GB/s, this at about 20.
constexpr int64_t PREFETCH_AHEAD = 4096;

// Products read sixteen bf16 values per 32-byte load and widen them without a shuffle: in each
// 32-bit lane the even value is the low half (shifted up, it is that value's fp32) and the odd one
// the high half (masked, likewise). So x is laid out to match once per product (`interleave`):
// per 16 values, the eight even ones, then the eight odd ones.
constexpr int64_t BLOCK = 16;

void interleave(const float* x, int64_t cols, float* xp) {
    for (int64_t c = 0; c < cols; c += BLOCK)
        for (int64_t i = 0; i < BLOCK / 2; ++i) {
            xp[c + i] = x[c + 2 * i];
            xp[c + BLOCK / 2 + i] = x[c + 2 * i + 1];
        }
}

inline void widen16(const bf16* source, __m256& even, __m256& odd) {
    __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(source));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(raw, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Dot products of four consecutive bf16 rows (stride `cols`, a multiple of 16) with x laid out by
// `interleave` (xp).
inline void dot4(const bf16* rows, int64_t cols, const float* xp, float* out) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    const bf16* row[4] = {rows, rows + cols, rows + 2 * cols, rows + 3 * cols};
    for (int64_t c = 0; c < cols; c += BLOCK) {
        if (c % 32 == 0)  // one prefetch per 64-byte line of each row
            for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(row[i] + c + PREFETCH_AHEAD), _MM_HINT_T0);
        __m256 x_even = _mm256_loadu_ps(xp + c), x_odd = _mm256_loadu_ps(xp + c + BLOCK / 2);
        for (int i = 0; i < 4; ++i) {
            __m256 even, odd;
            widen16(row[i] + c, even, odd);
            acc[2 * i] = _mm256_fmadd_ps(even, x_even, acc[2 * i]);
            acc[2 * i + 1] = _mm256_fmadd_ps(odd, x_odd, acc[2 * i + 1]);
        }
    }
    for (int i = 0; i < 4; ++i) out[i] = horizontal_sum(_mm256_add_ps(acc[2 * i], acc[2 * i + 1]));
}

inline float dot1(const bf16* row, int64_t cols, const float* x) {
    int64_t c = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; c + 8 <= cols; c += 8) acc = _mm256_fmadd_ps(load_bf16x8(row + c), _mm256_loadu_ps(x + c), acc);
    float sum = horizontal_sum(acc);
    for (; c < cols; ++c) sum += bf16_to_float(row[c]) * x[c];
    return sum;
}

// out[r] = round_bf16(sum_c W[r, c] x[c]) for rows [begin, end): fp32 sums of exact bf16 products.
// `xp` is x laid out by `interleave` when cols is a multiple of 16, else x itself.
void matvec_rows(const bf16* weight, int64_t begin, int64_t end, int64_t cols, const float* x, const float* xp,
                 float* out) {
    int64_t r = begin;
    if (cols % BLOCK == 0) {
        float sums[4];
        for (; r + 4 <= end; r += 4) {
            dot4(weight + r * cols, cols, xp, sums);
            for (int i = 0; i < 4; ++i) out[r + i] = round_bf16(sums[i]);
        }
    }
    for (; r < end; ++r) out[r] = round_bf16(dot1(weight + r * cols, cols, x));
}

// CPUs with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and later) multiply bf16 pairs in
// hardware: vdpbf16ps adds two exact products into each fp32 lane, so weight rows are used as
// loaded, with no widening, in about half the instructions. The other operand must be bf16: the
// step's activations and hidden states are bf16 values, so converting them is exact (checked).
// set_features can turn this off (the tests compare both paths).
bool use_avx512_bf16 = true;

bool has_avx512_bf16() {
    static const bool present = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16");
    return present;
}

// x as bf16 when every value is one and the CPU multiplies bf16 pairs, else false.
bool paired_operand(const float* x, int64_t count, int64_t cols, std::vector<bf16>& out) {
    if (!use_avx512_bf16 || !has_avx512_bf16() || cols % 32) return false;
    out.resize(count);
    for (int64_t i = 0; i < count; ++i) {
        out[i] = float_to_bf16(x[i]);
        if (bf16_to_float(out[i]) != x[i]) return false;
    }
    return true;
}

// matvec_rows with bf16 pairs: four rows at a time, 32 columns per instruction (cols % 32 == 0).
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void matvec_rows_avx512_bf16(const bf16* weight, int64_t begin, int64_t end, int64_t cols, const bf16* x,
                             float* out) {
    for (int64_t r = begin; r < end; r += 4) {
        int64_t block = end - r < 4 ? end - r : 4;
        const bf16* row[4];
        for (int64_t i = 0; i < 4; ++i) row[i] = weight + (r + (i < block ? i : 0)) * cols;
        __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        for (int64_t c = 0; c < cols; c += 32) {
            for (int i = 0; i < 4; ++i) _mm_prefetch(reinterpret_cast<const char*>(row[i] + c + PREFETCH_AHEAD), _MM_HINT_T0);
            __m512i xv = _mm512_loadu_si512(x + c);
            for (int i = 0; i < 4; ++i)
                acc[i] = _mm512_dpbf16_ps(acc[i], (__m512bh)_mm512_loadu_si512(row[i] + c), (__m512bh)xv);
        }
        for (int64_t i = 0; i < block; ++i) out[r + i] = round_bf16(_mm512_reduce_add_ps(acc[i]));
    }
}

// This thread's share [begin, end) of `count` rows: a multiple of 4 rows (the kernels' row blocks),
// so a row is computed by the same kernel block however the rows are split.
void share_of(int64_t count, int id, int threads, int64_t& begin, int64_t& end) {
    int64_t per = ((count + threads - 1) / threads + 3) / 4 * 4;
    begin = id * per < count ? id * per : count;
    end = begin + per < count ? begin + per : count;
}

// Run rows_of(begin, end) on each thread's share of `rows` (share_of).
template <class Rows>
void split_rows(int64_t rows, Rows rows_of) {
#pragma omp parallel num_threads(thread_count)
    {
        int64_t begin, end;
        share_of(rows, omp_get_thread_num(), omp_get_num_threads(), begin, end);
        if (begin < end) rows_of(begin, end);
    }
}

struct Shape {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, layers, window, rank, norm_width;
    float eps, scaling;
    int64_t has_lora;  // unused by the step (per-layer pointers tell), kept for the ABI's alignment
};

// Gemma's RMSNorm of n values in fp32: x * rsqrt(mean(x^2) + eps) * scale, rounded to bf16.
void rms_norm(const float* x, int64_t n, const float* scale, float eps, float* out) {
    float squares = 0.f;
    for (int64_t i = 0; i < n; ++i) squares += x[i] * x[i];
    float inverse = 1.0f / std::sqrt(squares / static_cast<float>(n) + eps);
    for (int64_t i = 0; i < n; ++i) out[i] = round_bf16(x[i] * inverse * scale[i]);
}

// round_bf16 of eight values at once, bit for bit (NaN stays NaN as float_to_bf16 keeps it).
inline __m256 round_bf16x8(__m256 v) {
    const __m256i bits = _mm256_castps_si256(v), high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), high);
    __m256i quiet = _mm256_or_si256(_mm256_and_si256(bits, high), _mm256_set1_epi32(0x400000));
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// dot1 of eight consecutive rows (stride `cols`, a multiple of 8) with x: the same lane sums,
// then horizontal_sum's order ((v0+v4)+(v2+v6)) + ((v1+v5)+(v3+v7)) for all eight rows at once
// through a transpose, so each value is dot1's bit for bit without eight horizontal sums.
inline __m256 dot1_rows8(const bf16* rows, int64_t cols, const float* x) {
    __m256 acc[8];
    for (int i = 0; i < 8; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t c = 0; c < cols; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        for (int i = 0; i < 8; ++i) acc[i] = _mm256_fmadd_ps(load_bf16x8(rows + i * cols + c), xv, acc[i]);
    }
    __m256 t[8], u[8], lane[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(acc[i], acc[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(acc[i], acc[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int j = 0; j < 4; ++j) {  // lane[j][r] = acc[r][j]
        lane[j] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x20);
        lane[j + 4] = _mm256_permute2f128_ps(u[j], u[j + 4], 0x31);
    }
    return _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(lane[0], lane[4]), _mm256_add_ps(lane[2], lane[6])),
                         _mm256_add_ps(_mm256_add_ps(lane[1], lane[5]), _mm256_add_ps(lane[3], lane[7])));
}


// A product's other operand, prepared once for every row: bf16 pairs where the CPU multiplies them
// (paired_operand), else the fp32 values and their `interleave` layout.
struct Operand {
    const float* x = nullptr;
    int64_t cols = 0;
    bool paired = false;
    std::vector<bf16> xb;
    std::vector<float> xp;
    void prepare(const float* values, int64_t count) {
        x = values;
        cols = count;
        paired = paired_operand(values, count, count, xb);
        if (!paired && count % BLOCK == 0) {
            xp.resize(count);
            interleave(values, count, xp.data());
        }
    }
    void rows(const bf16* weight, int64_t begin, int64_t end, float* out) const {
        if (begin >= end) return;
        if (paired) matvec_rows_avx512_bf16(weight, begin, end, cols, xb.data(), out);
        else matvec_rows(weight, begin, end, cols, x, xp.data(), out);
    }
};

// One LoRA module's rows of a (fused) product: peft's term B (A x) for output rows
// [offset, offset + rows).
struct LoraPart {
    int module;
    int64_t offset, rows;
};

// A (fused) product in the step's team: each thread its share of the base rows and of the LoRA A
// rows (x A^T for every part, into mid), a barrier, then peft's term for its own share of the
// output rows: B (A x) rounded, times the scaling rounded, the sum rounded, as peft's bf16 module
// does. B's rows go eight at a time (dot1_rows8, dot1's values bit for bit). Ends at a barrier.
void team_product(const bf16* weight, int64_t rows, const Operand& x, const bf16* const* lora, const float* scalings,
                  const LoraPart* parts, int part_count, int64_t rank, float* mid, float* out, int id, int threads) {
    int64_t begin, end;
    share_of(rows, id, threads, begin, end);
    x.rows(weight, begin, end, out);
    if (lora) {  // A's rows in blocks of 4 within each part, as a product of A alone blocks them
        int64_t blocks = (rank + 3) / 4, u_begin, u_end;
        share_of(part_count * blocks * 4, id, threads, u_begin, u_end);
        for (int64_t u = u_begin / 4; u < u_end / 4; ++u) {
            int64_t p = u / blocks, first = u % blocks * 4, last = first + 4 < rank ? first + 4 : rank;
            x.rows(lora[2 * parts[p].module], first, last, mid + p * rank);
        }
    }
#pragma omp barrier
    if (!lora) return;
    for (int p = 0; p < part_count; ++p) {
        float scaling = scalings[parts[p].module];
        if (scaling == 0.f) continue;  // an adapter without LoRA here: B is zero, the term adds exactly 0
        const bf16* b = lora[2 * parts[p].module + 1];
        const float* a_x = mid + p * rank;
        int64_t first = begin > parts[p].offset ? begin - parts[p].offset : 0;
        int64_t last = end - parts[p].offset < parts[p].rows ? end - parts[p].offset : parts[p].rows;
        float* target = out + parts[p].offset;
        int64_t r = first;
        if (rank % 8 == 0) {
            const __m256 scale = _mm256_set1_ps(scaling);
            for (; r + 8 <= last; r += 8) {
                __m256 term = round_bf16x8(_mm256_mul_ps(round_bf16x8(dot1_rows8(b + r * rank, rank, a_x)), scale));
                _mm256_storeu_ps(target + r, round_bf16x8(_mm256_add_ps(_mm256_loadu_ps(target + r), term)));
            }
        }
        for (; r < last; ++r) {
            float term = round_bf16(round_bf16(dot1(b + r * rank, rank, a_x)) * scaling);
            target[r] = round_bf16(target[r] + term);
        }
    }
#pragma omp barrier
}

// Rotary embedding (rotate-half form) of one head in bf16 arithmetic: x cos + rotate(x) sin.
void rotate(float* x, int64_t dim, const bf16* cos, const bf16* sin) {
    int64_t half = dim / 2;
    std::vector<float> rotated(dim);
    for (int64_t i = 0; i < half; ++i) {
        rotated[i] = -x[half + i];
        rotated[half + i] = x[i];
    }
    for (int64_t i = 0; i < dim; ++i)
        x[i] = round_bf16(round_bf16(x[i] * bf16_to_float(cos[i])) + round_bf16(rotated[i] * bf16_to_float(sin[i])));
}

// Softmax attention of one query head over the visible cached slots of its kv head and the token
// itself; probabilities rounded to bf16 as the reference's `.to(q.dtype)` does.
void attend(const float* q, int64_t dim, const float* k, const float* v, const float* keys, const float* values,
            int64_t first, int64_t position, float scaling, float* out) {
    int64_t count = position - first + 1;  // visible slots [first, position) and the token itself
    std::vector<float> scores(count);
    float best = -INFINITY;
    for (int64_t s = 0; s < count; ++s) {
        const float* key = s + first < position ? keys + (s + first) * dim : k;
        __m256 acc = _mm256_setzero_ps();
        for (int64_t c = 0; c < dim; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), _mm256_loadu_ps(key + c), acc);
        scores[s] = horizontal_sum(acc) * scaling;
        best = scores[s] > best ? scores[s] : best;
    }
    float total = 0.f;
    for (int64_t s = 0; s < count; ++s) total += (scores[s] = std::exp(scores[s] - best));
    for (int64_t s = 0; s < count; ++s) scores[s] = round_bf16(scores[s] / total);
    for (int64_t c = 0; c < dim; c += 8) {  // eight output columns at a time over every slot
        __m256 acc = _mm256_setzero_ps();
        for (int64_t s = 0; s < count; ++s) {
            const float* value = s + first < position ? values + (s + first) * dim : v;
            acc = _mm256_fmadd_ps(_mm256_set1_ps(scores[s]), _mm256_loadu_ps(value + c), acc);
        }
        _mm256_storeu_ps(out + c, acc);
    }
    for (int64_t c = 0; c < dim; ++c) out[c] = round_bf16(out[c]);
}

// e^x for eight floats: Cephes' expf (2^n times a degree-7 polynomial on [-ln2/2, ln2/2]), within
// 2 ulp of libm's; the per-value libm call cost more than the rest of a layer's elementwise work.
inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

// transformers' gelu (tanh form) of eight floats: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))),
// tanh(u) as 1 - 2 / (e^(2u) + 1) (saturating to +-1 for large |u|).
inline __m256 gelu_tanh8(__m256 x) {
    __m256 cube = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, x));
    __m256 e = exp8(_mm256_add_ps(u, u));
    __m256 t = _mm256_sub_ps(_mm256_set1_ps(1.f), _mm256_div_ps(_mm256_set1_ps(2.f), _mm256_add_ps(e, _mm256_set1_ps(1.f))));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(_mm256_set1_ps(1.f), t));
}

// act = gelu(gate) * up in bf16 arithmetic (gelu in fp32, rounded; the product rounded).
void gated(const float* gate, const float* up, int64_t n, float* act) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(act + i, gelu_tanh8(_mm256_loadu_ps(gate + i)));
    for (; i < n; ++i) {
        const float k = 0.7978845608028654f;
        act[i] = 0.5f * gate[i] * (1.f + std::tanh(k * (gate[i] + 0.044715f * gate[i] * gate[i] * gate[i])));
    }
    for (i = 0; i < n; ++i) act[i] = round_bf16(round_bf16(act[i]) * up[i]);
}

// A 4-row x 3-state tile of the check: rows widened to fp32 (block <= 4 of them), states fp32,
// twelve sums in registers so each loaded vector serves three or four products.
inline void tile(const float* rows, int64_t block, const float* states, int64_t count, int64_t cols, float* out,
                 int64_t out_stride) {
    __m256 acc[4][3];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 3; ++j) acc[i][j] = _mm256_setzero_ps();
    const float* s1 = states + (count > 1 ? cols : 0);
    const float* s2 = states + (count > 2 ? 2 * cols : 0);
    const float* r1 = rows + (block > 1 ? cols : 0);
    const float* r2 = rows + (block > 2 ? 2 * cols : 0);
    const float* r3 = rows + (block > 3 ? 3 * cols : 0);
    for (int64_t c = 0; c < cols; c += 8) {
        __m256 v0 = _mm256_loadu_ps(states + c), v1 = _mm256_loadu_ps(s1 + c), v2 = _mm256_loadu_ps(s2 + c);
        const float* row[4] = {rows, r1, r2, r3};
        for (int i = 0; i < 4; ++i) {
            __m256 w = _mm256_loadu_ps(row[i] + c);
            acc[i][0] = _mm256_fmadd_ps(w, v0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(w, v1, acc[i][1]);
            acc[i][2] = _mm256_fmadd_ps(w, v2, acc[i][2]);
        }
    }
    for (int64_t i = 0; i < block; ++i)
        for (int64_t j = 0; j < count; ++j) out[i * out_stride + j] = round_bf16(horizontal_sum(acc[i][j]));
}

// The check with bf16 pairs (see matvec_rows_avx512_bf16): four rows x four states per tile.
__attribute__((target("avx512f,avx512bw,avx512bf16")))
void products_rows_avx512_bf16(const bf16* weight, int64_t begin, int64_t end, int64_t cols, const bf16* states,
                               int64_t n, float* out) {
    for (int64_t r = begin; r < end; r += 4) {
        int64_t block = end - r < 4 ? end - r : 4;
        const bf16* row[4];
        for (int64_t i = 0; i < 4; ++i) row[i] = weight + (r + (i < block ? i : 0)) * cols;
        for (int64_t j = 0; j < n; j += 4) {
            int64_t count = n - j < 4 ? n - j : 4;
            const bf16* state[4];
            for (int64_t k = 0; k < 4; ++k) state[k] = states + (j + (k < count ? k : 0)) * cols;
            __m512 acc[4][4];
            for (int i = 0; i < 4; ++i)
                for (int k = 0; k < 4; ++k) acc[i][k] = _mm512_setzero_ps();
            for (int64_t c = 0; c < cols; c += 32) {
                __m512i s[4];
                for (int k = 0; k < 4; ++k) s[k] = _mm512_loadu_si512(state[k] + c);
                for (int i = 0; i < 4; ++i) {
                    __m512i w = _mm512_loadu_si512(row[i] + c);
                    for (int k = 0; k < 4; ++k) acc[i][k] = _mm512_dpbf16_ps(acc[i][k], (__m512bh)w, (__m512bh)s[k]);
                }
            }
            for (int64_t i = 0; i < block; ++i)
                for (int64_t k = 0; k < count; ++k) out[(r + i) * n + j + k] = round_bf16(_mm512_reduce_add_ps(acc[i][k]));
        }
    }
}

bool products_avx512_bf16(const bf16* weight, int64_t rows, int64_t cols, const float* states, int64_t n, float* out) {
    std::vector<bf16> narrow;
    if (!paired_operand(states, n * cols, cols, narrow)) return false;
    split_rows(rows, [&](int64_t begin, int64_t end) {
        products_rows_avx512_bf16(weight, begin, end, cols, narrow.data(), n, out);
    });
    return true;
}

// ---- the check's int8 screen (assistant/fast_screen.py) ----------------------------------------
// Upper bounds on every row's logit from int8 copies of the rows (q, per-row scale) and of the
// states (7-bit codes stored as code + 64, so vpmaddubsw's unsigned operand; a pair of products
// is at most 2 x 127 x 127, no saturation): exact int32 sums, then the rigorous error terms the
// caller computed. A quarter of the fp32 check's instructions and half its bytes; only rows whose
// bound reaches the best logit get the exact check.
inline __m256i madd_u8s8(__m256i codes, __m256i rows, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(codes, rows), ones);
}

struct ScreenRows {
    const int8_t* codes;     // rows x cols
    const int32_t* sums;     // per row: the sum of its codes (the +64 offset's share)
    const float* scale;      // per row: value = scale x code + error
    const float* error;      // per row: the error vector's 2-norm
    const float* norm;       // per row: the row's 2-norm
};

struct ScreenStates {
    const uint8_t* codes;    // n x cols, code + 64
    const float* scale;      // per state
    const float* code_term;  // per state: scale x |codes|, multiplies a row's error norm
    const float* error;      // per state: the error vector's 2-norm, multiplies a row's norm
};

// Four int32 sums, one per accumulator: (sum a, sum b, sum c, sum d).
inline __m128i horizontal_sums4(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i sums = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(sums), _mm256_extracti128_si256(sums, 1));
}

// Row r's bounds for four states at once (the states' numbers padded to a multiple of four):
// approximation + |its error| + a margin for the float roundings of both and for the exact
// check's bf16 rounding of its logit (relative 2^-8): relative 2^-7 plus 0.01. (The state's error
// term also carries the exact check's fp32 summation error: fast_screen.ScreenedStates.)
inline __m128 upper_bounds4(const ScreenRows& rows, const ScreenStates& states, int64_t r, int64_t j, __m128i sums) {
    __m128i dots = _mm_sub_epi32(sums, _mm_set1_epi32(64 * rows.sums[r]));  // the codes' dot products
    __m128 approx = _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(dots), _mm_set1_ps(rows.scale[r])), _mm_loadu_ps(states.scale + j));
    __m128 error = _mm_add_ps(_mm_mul_ps(_mm_set1_ps(rows.error[r]), _mm_loadu_ps(states.code_term + j)),
                              _mm_mul_ps(_mm_set1_ps(rows.norm[r]), _mm_loadu_ps(states.error + j)));
    __m128 size = _mm_add_ps(_mm_andnot_ps(_mm_set1_ps(-0.f), approx), error);
    __m128 margin = _mm_add_ps(_mm_mul_ps(size, _mm_set1_ps(0.0078125f)), _mm_set1_ps(0.01f));
    return _mm_add_ps(_mm_add_ps(approx, error), margin);
}

// Two rows x four states per tile (eight accumulators, four state operands and a row in the
// sixteen registers; measured faster than 2x2, 4x2, 3x3 and 1x8 on Zen 3). `take(row, j, bounds)`
// receives the bounds of row `row` for states j..j+3 (the states' numbers padded to four), for
// j = 0, 4, ... in turn.
constexpr int SCREEN_ROWS = 2, SCREEN_STATES = 4;
static_assert(SCREEN_STATES == 4, "upper_bounds4 and horizontal_sums4 take four states");

template <typename Take>
void screen_rows(const ScreenRows& rows, const ScreenStates& states, int64_t begin, int64_t end, int64_t cols,
                 int64_t n, Take take) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t r = begin; r < end; r += SCREEN_ROWS) {
        const int8_t* row[SCREEN_ROWS];
        for (int i = 0; i < SCREEN_ROWS; ++i) row[i] = rows.codes + (r + i < end ? r + i : r) * cols;
        for (int64_t j = 0; j < n; j += SCREEN_STATES) {
            const uint8_t* state[SCREEN_STATES];
            for (int k = 0; k < SCREEN_STATES; ++k) state[k] = states.codes + (j + k < n ? j + k : j) * cols;
            __m256i acc[SCREEN_ROWS][SCREEN_STATES];
            for (int i = 0; i < SCREEN_ROWS; ++i)
                for (int k = 0; k < SCREEN_STATES; ++k) acc[i][k] = _mm256_setzero_si256();
            for (int64_t c = 0; c < cols; c += 32) {
                __m256i x[SCREEN_STATES];
                for (int k = 0; k < SCREEN_STATES; ++k) x[k] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(state[k] + c));
                for (int i = 0; i < SCREEN_ROWS; ++i) {
                    __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[i] + c));
                    for (int k = 0; k < SCREEN_STATES; ++k) acc[i][k] = _mm256_add_epi32(acc[i][k], madd_u8s8(x[k], w, ones));
                }
            }
            for (int i = 0; i < SCREEN_ROWS && r + i < end; ++i)
                take(r + i, j, upper_bounds4(rows, states, r + i, j,
                                             horizontal_sums4(acc[i][0], acc[i][1], acc[i][2], acc[i][3])));
        }
    }
}

// CPUs with AVX512-VNNI (every CPU with AVX512-BF16, and Intel's since Cascade Lake): vpdpbusd
// adds four exact u8 x s8 products into each int32 lane, one instruction where AVX2 takes three
// (vpmaddubsw, vpmaddwd, vpaddd) on half the width. The sums are the same exact integers, so the
// bounds are those of screen_rows bit for bit (tested); the screen is compute-bound on 2 cores.
// It runs where the AVX-512 paths are allowed (set_features bit 0).
bool has_avx512_vnni() {
    static const bool present = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vnni");
    return present;
}

// 64 codes from p, or the 32 at p zero-extended (the last block of a width that is 32 mod 64).
__attribute__((target("avx512f,avx512bw")))
inline __m512i load_codes64(const void* p, bool half) {
    return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                : _mm512_loadu_si512(p);
}

// screen_rows with vpdpbusd: four rows x four states per tile (16 accumulators of the 32 zmm
// registers; on a Xeon 2 rows were as fast, 6 slower).
constexpr int VNNI_ROWS = 4;

template <typename Take>
__attribute__((target("avx2,avx512f,avx512bw,avx512vnni")))
void screen_rows_vnni(const ScreenRows& rows, const ScreenStates& states, int64_t begin, int64_t end, int64_t cols,
                      int64_t n, Take take) {
    for (int64_t r = begin; r < end; r += VNNI_ROWS) {
        const int8_t* row[VNNI_ROWS];
        for (int i = 0; i < VNNI_ROWS; ++i) row[i] = rows.codes + (r + i < end ? r + i : r) * cols;
        for (int64_t j = 0; j < n; j += SCREEN_STATES) {
            const uint8_t* state[SCREEN_STATES];
            for (int k = 0; k < SCREEN_STATES; ++k) state[k] = states.codes + (j + k < n ? j + k : j) * cols;
            __m512i acc[VNNI_ROWS][SCREEN_STATES];
            for (int i = 0; i < VNNI_ROWS; ++i)
                for (int k = 0; k < SCREEN_STATES; ++k) acc[i][k] = _mm512_setzero_si512();
            for (int64_t c = 0; c < cols; c += 64) {
                bool half = cols - c < 64;
                __m512i x[SCREEN_STATES];
                for (int k = 0; k < SCREEN_STATES; ++k) x[k] = load_codes64(state[k] + c, half);
                for (int i = 0; i < VNNI_ROWS; ++i) {
                    __m512i w = load_codes64(row[i] + c, half);
                    for (int k = 0; k < SCREEN_STATES; ++k) acc[i][k] = _mm512_dpbusd_epi32(acc[i][k], x[k], w);
                }
            }
            for (int i = 0; i < VNNI_ROWS && r + i < end; ++i) {
                __m256i half_sums[SCREEN_STATES];
                for (int k = 0; k < SCREEN_STATES; ++k)
                    half_sums[k] = _mm256_add_epi32(_mm512_castsi512_si256(acc[i][k]), _mm512_extracti64x4_epi64(acc[i][k], 1));
                take(r + i, j, upper_bounds4(rows, states, r + i, j,
                                             horizontal_sums4(half_sums[0], half_sums[1], half_sums[2], half_sums[3])));
            }
        }
    }
}

// CPUs with AMX (Intel Sapphire Rapids and later): one tdpbsud multiplies a 16-row x 64-code tile
// of the rows by the states' 64 codes of 16 states, 16,384 exact s8 x u8 products, so the screen
// reads the int8 rows at memory speed instead of being bound by vpdpbusd's sums. The int32 sums
// are the same integers and go through upper_bounds4 as above: the same bounds bit for bit
// (tested). Linux hands out the tile registers per process on request (arch_prctl); where the
// request fails, the CPU or the width does not fit (widths a multiple of 64, at most 16 states),
// the VNNI screen runs. Set_features bit 1 turns it off (to compare).
bool use_amx = true;

bool has_amx_int8() {
    static const bool usable = [] {
        unsigned eax, ebx, ecx, edx;
        if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !(edx & (1u << 24)) || !(edx & (1u << 25)))
            return false;  // AMX-TILE (bit 24) and AMX-INT8 (bit 25)
        constexpr long request_permission = 0x1023, tile_data = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        return syscall(SYS_arch_prctl, request_permission, tile_data) == 0;
    }();
    return usable;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
};

constexpr int AMX_STATES = 16, AMX_BLOCK = 64;  // four 16-row accumulator tiles per block of rows

// The states' codes in the tiles' layout for tdpbsud's second operand: per 64-code chunk, 16 tile
// rows of (state, 4 consecutive codes) for 16 states, the missing states zero.
std::vector<uint8_t> amx_state_tiles(const ScreenStates& states, int64_t cols, int64_t n) {
    std::vector<uint8_t> tiles(cols / 64 * 1024, 0);
    for (int64_t chunk = 0; chunk < cols / 64; ++chunk)
        for (int64_t quad = 0; quad < 16; ++quad)
            for (int64_t j = 0; j < n; ++j)
                std::memcpy(&tiles[chunk * 1024 + quad * 64 + j * 4], states.codes + j * cols + chunk * 64 + quad * 4, 4);
    return tiles;
}

template <typename Take>
__attribute__((target("avx2,avx512f,avx512bw,avx512vnni,amx-tile,amx-int8")))
void screen_rows_amx(const ScreenRows& rows, const ScreenStates& states, int64_t begin, int64_t end, int64_t cols,
                     int64_t n, Take take) {
    const std::vector<uint8_t> tiles = amx_state_tiles(states, cols, n);
    TileConfig config;
    for (int t = 0; t < 7; ++t) config.bytes_per_row[t] = 64, config.rows[t] = 16;  // 0-3 sums, 4-5 rows, 6 states
    _tile_loadconfig(&config);
    alignas(64) int32_t sums[AMX_BLOCK][AMX_STATES];
    int64_t r = begin;
    for (; r + AMX_BLOCK <= end; r += AMX_BLOCK) {
        const int8_t* block = rows.codes + r * cols;
        _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
        for (int64_t c = 0; c < cols; c += 64) {
            _tile_loadd(6, tiles.data() + c / 64 * 1024, 64);
            _tile_loadd(4, block + c, cols);
            _tile_dpbsud(0, 4, 6);
            _tile_loadd(5, block + 16 * cols + c, cols);
            _tile_dpbsud(1, 5, 6);
            _tile_loadd(4, block + 32 * cols + c, cols);
            _tile_dpbsud(2, 4, 6);
            _tile_loadd(5, block + 48 * cols + c, cols);
            _tile_dpbsud(3, 5, 6);
        }
        _tile_stored(0, sums[0], 64);
        _tile_stored(1, sums[16], 64);
        _tile_stored(2, sums[32], 64);
        _tile_stored(3, sums[48], 64);
        for (int64_t i = 0; i < AMX_BLOCK; ++i)
            for (int64_t j = 0; j < n; j += SCREEN_STATES)
                take(r + i, j, upper_bounds4(rows, states, r + i, j, _mm_load_si128(reinterpret_cast<const __m128i*>(&sums[i][j]))));
    }
    _tile_release();
    if (r < end) screen_rows_vnni(rows, states, r, end, cols, n, take);
}

// The screen on this CPU's widest integer products.
template <typename Take>
void screen_rows_best(const ScreenRows& rows, const ScreenStates& states, int64_t begin, int64_t end, int64_t cols,
                      int64_t n, Take take) {
    if (use_avx512_bf16 && use_amx && cols % 64 == 0 && n <= AMX_STATES && has_avx512_vnni() && has_amx_int8())
        screen_rows_amx(rows, states, begin, end, cols, n, take);
    else if (use_avx512_bf16 && has_avx512_vnni()) screen_rows_vnni(rows, states, begin, end, cols, n, take);
    else screen_rows(rows, states, begin, end, cols, n, take);
}

// The states' per-state numbers, padded with zeros to whole vectors of four.
struct PaddedStates {
    std::vector<float> scale, code_term, error;
    ScreenStates view;
    PaddedStates(const uint8_t* codes, const float* state_scale, const float* state_code_term,
                 const float* state_error, int64_t n)
        : scale(padded_count(n), 0.f), code_term(padded_count(n), 0.f), error(padded_count(n), 0.f) {
        std::memcpy(scale.data(), state_scale, n * sizeof(float));
        std::memcpy(code_term.data(), state_code_term, n * sizeof(float));
        std::memcpy(error.data(), state_error, n * sizeof(float));
        view = ScreenStates{codes, scale.data(), code_term.data(), error.data()};
    }
    PaddedStates(const PaddedStates&) = delete;  // `view` points into this object's own vectors
    static int64_t padded_count(int64_t n) { return (n + SCREEN_STATES - 1) / SCREEN_STATES * SCREEN_STATES; }
};

}  // namespace

extern "C" {

// Widened weights: `weights` is DecoderWeights.tensors() as data pointers (embed, final norm, then
// per layer qkv, o, gate_up, down, norms and, on LoRA layers, 14 factors and the scalings).
// `lora_layers[i]` tells whether layer i carries LoRA tensors. The token's keys and values go
// straight into the cache (layers, kv_heads, cache_positions, head_dim) at `position`.
int gemma_step(const Shape* shape, const void* const* weights, const uint8_t* lora_layers, const uint8_t* sliding,
               const bf16* head, int64_t head_rows, int64_t token, int64_t position, float* keys, float* values,
               int64_t cache_positions, const bf16* cos, const bf16* sin, int64_t table_positions,
               const uint8_t* seen, float penalty, float embed_scale, float* logits, int64_t* best,
               bf16* hidden_out) {
    const Shape& s = *shape;
    if (position >= cache_positions || position >= table_positions || s.head_dim % 8) return 1;
    const int64_t q_size = s.heads * s.head_dim, kv_size = s.kv_heads * s.head_dim;
    const int64_t group = s.heads / s.kv_heads;
    std::vector<float> h(s.hidden), x(s.hidden), mixed(q_size + 2 * kv_size), attended(q_size),
        projected(s.hidden), gate_up(2 * s.intermediate), act(s.intermediate), down(s.hidden),
        normed(s.hidden), mid(s.rank > 0 ? 3 * s.rank : 1);
    const LoraPart qkv_parts[3] = {{0, 0, q_size}, {1, q_size, kv_size}, {2, q_size + kv_size, kv_size}};
    const LoraPart o_part[1] = {{3, 0, s.hidden}}, down_part[1] = {{6, 0, s.hidden}};
    const LoraPart gate_up_parts[2] = {{4, 0, s.intermediate}, {5, s.intermediate, s.intermediate}};
    Operand operand;
    const bf16* embed = static_cast<const bf16*>(weights[0]);
    for (int64_t i = 0; i < s.hidden; ++i) h[i] = round_bf16(bf16_to_float(embed[token * s.hidden + i]) * embed_scale);
    // One team for the whole token: a fork and join per product, with the norms, heads and
    // attention between them on one thread while the other waited, cost a tenth of the step.
    // Between the products, the team splits the heads and the activation; the 640-value norms and
    // residual sums stay on one thread (`single`, whose end is a barrier).
#pragma omp parallel num_threads(thread_count)
    {
        const int threads = omp_get_num_threads(), id = omp_get_thread_num();
        std::vector<float> head_vector(s.head_dim);
        int64_t cursor = 2;
#pragma omp single
        {
            rms_norm(h.data(), s.hidden, static_cast<const float*>(weights[2 + 4]), s.eps, x.data());
            operand.prepare(x.data(), s.hidden);
        }
        for (int64_t layer = 0; layer < s.layers; ++layer) {
            const bf16* qkv = static_cast<const bf16*>(weights[cursor]);
            const bf16* o = static_cast<const bf16*>(weights[cursor + 1]);
            const bf16* gu = static_cast<const bf16*>(weights[cursor + 2]);
            const bf16* dn = static_cast<const bf16*>(weights[cursor + 3]);
            const float* norms = static_cast<const float*>(weights[cursor + 4]);
            const bf16* const* lora = lora_layers[layer] ? reinterpret_cast<const bf16* const*>(weights + cursor + 5) : nullptr;
            const float* scalings = lora ? static_cast<const float*>(weights[cursor + 5 + 14]) : nullptr;
            cursor += 5 + (lora ? 15 : 0);

            team_product(qkv, q_size + 2 * kv_size, operand, lora, scalings, qkv_parts, 3, s.rank, mid.data(),
                         mixed.data(), id, threads);
            float *q = mixed.data(), *k = q + q_size, *v = k + kv_size;
            int64_t table = sliding[layer] ? 0 : 1;
            const bf16* c = cos + (table * table_positions + position) * s.head_dim;
            const bf16* sn = sin + (table * table_positions + position) * s.head_dim;
            for (int64_t head_index = id; head_index < s.heads + s.kv_heads; head_index += threads) {
                bool is_query = head_index < s.heads;
                float* vector = is_query ? q + head_index * s.head_dim : k + (head_index - s.heads) * s.head_dim;
                rms_norm(vector, s.head_dim, norms + (is_query ? 4 : 5) * s.norm_width, s.eps, head_vector.data());
                std::memcpy(vector, head_vector.data(), s.head_dim * sizeof(float));
                rotate(vector, s.head_dim, c, sn);
            }
#pragma omp barrier
            int64_t first = sliding[layer] ? (position - s.window + 1 > 0 ? position - s.window + 1 : 0) : 0;
            for (int64_t query = id; query < s.heads; query += threads) {  // each head's softmax on its own
                int64_t kv = query / group;
                const float* key_slots = keys + ((layer * s.kv_heads + kv) * cache_positions) * s.head_dim;
                const float* value_slots = values + ((layer * s.kv_heads + kv) * cache_positions) * s.head_dim;
                attend(q + query * s.head_dim, s.head_dim, k + kv * s.head_dim, v + kv * s.head_dim, key_slots,
                       value_slots, first, position, s.scaling, attended.data() + query * s.head_dim);
            }
#pragma omp barrier
#pragma omp single
            {  // the token's own key and value join the cache (attend read them from k and v)
                for (int64_t kv = 0; kv < s.kv_heads; ++kv) {
                    int64_t slot = ((layer * s.kv_heads + kv) * cache_positions + position) * s.head_dim;
                    std::memcpy(keys + slot, k + kv * s.head_dim, s.head_dim * sizeof(float));
                    std::memcpy(values + slot, v + kv * s.head_dim, s.head_dim * sizeof(float));
                }
                operand.prepare(attended.data(), q_size);
            }
            team_product(o, s.hidden, operand, lora, scalings, o_part, 1, s.rank, mid.data(), projected.data(), id,
                         threads);
#pragma omp single
            {
                rms_norm(projected.data(), s.hidden, norms + 1 * s.norm_width, s.eps, normed.data());
                for (int64_t i = 0; i < s.hidden; ++i) h[i] = round_bf16(h[i] + normed[i]);
                rms_norm(h.data(), s.hidden, norms + 2 * s.norm_width, s.eps, x.data());
                operand.prepare(x.data(), s.hidden);
            }
            team_product(gu, 2 * s.intermediate, operand, lora, scalings, gate_up_parts, 2, s.rank, mid.data(),
                         gate_up.data(), id, threads);
            int64_t begin, end;  // gated's vector path takes whole groups of 8 (shares are multiples of 4)
            share_of((s.intermediate + 7) / 8, id, threads, begin, end);
            begin *= 8;
            end = end * 8 < s.intermediate ? end * 8 : s.intermediate;
            if (begin < end) gated(gate_up.data() + begin, gate_up.data() + s.intermediate + begin, end - begin, act.data() + begin);
#pragma omp barrier
#pragma omp single
            operand.prepare(act.data(), s.intermediate);
            team_product(dn, s.hidden, operand, lora, scalings, down_part, 1, s.rank, mid.data(), down.data(), id,
                         threads);
#pragma omp single
            {
                rms_norm(down.data(), s.hidden, norms + 3 * s.norm_width, s.eps, normed.data());
                for (int64_t i = 0; i < s.hidden; ++i) h[i] = round_bf16(h[i] + normed[i]);
                bool last = layer + 1 == s.layers;  // the next layer's input norm, or the final norm
                const float* next_norm = static_cast<const float*>(last ? weights[1] : weights[cursor + 4]);
                rms_norm(h.data(), s.hidden, next_norm, s.eps, x.data());
                operand.prepare(x.data(), s.hidden);
            }
        }
        team_product(head, head_rows, operand, nullptr, nullptr, nullptr, 0, s.rank, nullptr, logits, id, threads);
    }
    for (int64_t i = 0; i < s.hidden; ++i) hidden_out[i] = float_to_bf16(x[i]);
    int64_t top = 0;
    for (int64_t r = 0; r < head_rows; ++r) {
        if (seen[r]) logits[r] = logits[r] < 0 ? logits[r] * penalty : logits[r] / penalty;
        if (logits[r] > logits[top]) top = r;  // the first of equal maxima, as torch's argmax
    }
    *best = top;
    return 0;
}

// The whole-vocabulary check: out (rows, n) = W (rows, cols) states^T for n fp32 states (n, cols),
// each logit rounded to bf16 as transformers' lm_head rounds it. Each row is widened once for
// all the states.
void bf16_products(const bf16* weight, int64_t rows, int64_t cols, const float* states, int64_t n, float* out) {
    if (products_avx512_bf16(weight, rows, cols, states, n, out)) return;
    if (cols % 8) {
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t j = 0; j < n; ++j) out[r * n + j] = round_bf16(dot1(weight + r * cols, cols, states + j * cols));
        return;
    }
    split_rows(rows, [&](int64_t begin, int64_t end) {
        std::vector<float> widened(4 * cols);  // this thread's rows, widened once for all the states
        for (int64_t r = begin; r < end; r += 4) {
            int64_t block = end - r < 4 ? end - r : 4;
            for (int64_t i = 0; i < block; ++i)
                for (int64_t c = 0; c < cols; c += 8)
                    _mm256_storeu_ps(widened.data() + i * cols + c, load_bf16x8(weight + (r + i) * cols + c));
            for (int64_t j = 0; j < n; j += 3) tile(widened.data(), block, states + j * cols, n - j < 3 ? n - j : 3,
                                                     cols, out + r * n + j, n);
        }
    });
}

// The screen's upper bounds: out (n, rows), out[j, r] >= row r's check logit for state j (see
// screen_rows). cols % 32 == 0.
void screen_bounds(const int8_t* row_codes, const int32_t* row_sums, const float* row_scale, const float* row_error,
                   const float* row_norm, int64_t rows, int64_t cols, const uint8_t* state_codes,
                   const float* state_scale, const float* state_code_term, const float* state_error, int64_t n,
                   float* out) {
    ScreenRows r{row_codes, row_sums, row_scale, row_error, row_norm};
    PaddedStates s(state_codes, state_scale, state_code_term, state_error, n);
    auto store = [&](int64_t row, int64_t j, __m128 bounds) {
        alignas(16) float values[SCREEN_STATES];
        _mm_store_ps(values, bounds);
        for (int k = 0; k < SCREEN_STATES && j + k < n; ++k) out[(j + k) * rows + row] = values[k];
    };
    split_rows(rows, [&](int64_t begin, int64_t end) { screen_rows_best(r, s.view, begin, end, cols, n, store); });
}

// The screen's verdicts: left[r] = 1 where row r's bound reaches floors[j] for some state j (it
// may be the greedy token of state j), else 0. A byte per row instead of n floats: no 16 MB
// bounds array written and read back per check.
void screen_rows_left(const int8_t* row_codes, const int32_t* row_sums, const float* row_scale, const float* row_error,
                      const float* row_norm, int64_t rows, int64_t cols, const uint8_t* state_codes,
                      const float* state_scale, const float* state_code_term, const float* state_error, int64_t n,
                      const float* floors, uint8_t* left) {
    ScreenRows r{row_codes, row_sums, row_scale, row_error, row_norm};
    PaddedStates s(state_codes, state_scale, state_code_term, state_error, n);
    std::vector<float> padded_floors(PaddedStates::padded_count(n), INFINITY);  // a padding state keeps nothing
    std::memcpy(padded_floors.data(), floors, n * sizeof(float));
    auto mark = [&](int64_t row, int64_t j, __m128 bounds) {
        int reaches = _mm_movemask_ps(_mm_cmpge_ps(bounds, _mm_loadu_ps(padded_floors.data() + j))) != 0;
        left[row] = j == 0 ? reaches : (left[row] | reaches);
    };
    split_rows(rows, [&](int64_t begin, int64_t end) { screen_rows_best(r, s.view, begin, end, cols, n, mark); });
}

void set_threads(int threads) { thread_count = threads > 0 ? threads : 1; }

// Which optional instruction sets the kernels may use (bit 0: AVX-512, i.e. AVX512-BF16 for the
// step's products and the check, AVX512-VNNI for the screen; bit 1: AMX for the screen, with bit
// 0), and which ones they do use on this CPU (bit 0: AVX512-BF16 products, bit 1: the AVX512-VNNI
// screen, bit 2: the AMX screen where its shapes fit).
void set_features(int allowed) {
    use_avx512_bf16 = allowed & 1;
    use_amx = allowed & 2;
}

int features() {
    bool vnni = use_avx512_bf16 && has_avx512_vnni();
    return (use_avx512_bf16 && has_avx512_bf16() ? 1 : 0) | (vnni ? 2 : 0) | (vnni && use_amx && has_amx_int8() ? 4 : 0);
}

}  // extern "C"
