// Fused compatibility scores for (query, candidate) pairs on the GPU: one thread per pair,
// categorical, numeric and embedding keys in one pass over registers instead of one CuPy
// kernel launch (and one (B, C) temporary) per key. Same formula and rounding as
// kernels/compat.py::pair_scores, which is the reference; multi-value keys stay on that path.
#include <math.h>

extern "C" __global__ void pair_scores_fused(
    const long long* q, const long long* c, const int B, const int C, const int n_nodes,
    const int* cat_codes, const float* cat_weight, const unsigned char* cat_required, const int n_cat,
    const float* num_values, const float* num_scale, const float* num_weight,
    const unsigned char* num_required, const int n_num,
    const float* emb, const unsigned char* emb_has, const float emb_weight, const int dim,
    const float total_weight, float* out)
{
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * C) return;
    const long long a = q[idx / C];
    const long long b = c[idx];
    float num = 0.0f, den = 0.0f;
    bool ok = true;
    for (int k = 0; k < n_cat; ++k) {
        const int x = cat_codes[(long long)k * n_nodes + a], y = cat_codes[(long long)k * n_nodes + b];
        const bool both = x >= 0 && y >= 0;
        const float s = (x == y) ? 1.0f : 0.0f;
        if (both) { num += s * cat_weight[k]; den += cat_weight[k]; }
        if (cat_required[k] && !(both && s > 0.0f)) ok = false;
    }
    for (int k = 0; k < n_num; ++k) {
        const float x = num_values[(long long)k * n_nodes + a], y = num_values[(long long)k * n_nodes + b];
        const bool both = !isnan(x) && !isnan(y);
        const float s = both ? fmaxf(0.0f, 1.0f - fabsf(x - y) / num_scale[k]) : 0.0f;
        if (both) { num += s * num_weight[k]; den += num_weight[k]; }
        if (num_required[k] && !(both && s > 0.0f)) ok = false;
    }
    if (dim > 0 && emb_has[a] && emb_has[b]) {
        float dot = 0.0f;
        for (int d = 0; d < dim; ++d) dot += emb[a * dim + d] * emb[b * dim + d];
        num += (1.0f + dot) / 2.0f * emb_weight;
        den += emb_weight;
    }
    if (!(den > 0.0f)) ok = false;  // no key in common: not compared, not a candidate
    if (total_weight > 0.0f) den = total_weight;  // missing: zero: every key counts, had or not
    const double score = den > 0.0f ? (double)(num / den) : 0.0;
    out[idx] = ok ? (float)(rint(score * 1e6) / 1e6) : -INFINITY;
}
