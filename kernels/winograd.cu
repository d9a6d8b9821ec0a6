// winograd.cu -- Winograd F(2x2, 3x3) transforms (Lavin & Gray 2016) for 3x3, stride 1,
// dilation 1 convolutions: fprop, and dgrad (for stride 1 a 3x3 conv of dy with the mirrored,
// channel-transposed kernel).
//
//   Y = A^T [ (G g G^T) .* (B^T d B) ] A   per 4x4 input tile d (stride 2) -> 2x2 output tile
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]   G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]
//   A^T = [1 1 1 0; 0 1 -1 -1]
// The same matrices, and the same tile algorithm in NumPy, are in gpuconv/engines/cuda_igemm.py
// (WINO_BT, WINO_G, WINO_AT, winograd_f2x3_numpy), tested against the NumPy engine.
//
// Pipeline (host: cuda_igemm.winograd_*): wino_filter U (16, G, Ko, Ci), wino_input
// V (16, G, Ci, T), 16*G batched GEMMs M = U @ V (cupy.matmul, in the accumulation type Acc),
// wino_output y. T = N * tiles_h * tiles_w. One thread per filter / input tile / output tile.
// Input tile (th, tw) of image n covers input rows 2*th - off_h .. +3 (zero outside): off = pad
// for fprop, off = 2 - pad for dgrad. Variants: T in {float, double, ig_f16, ig_bf16}.
#include "igemm_common.cuh"

struct WinoArgs {
    int N, G, Ci, Ko;          // per-group input / output channels
    int Hin, Win, Hout, Wout;  // input and output planes
    int tiles_h, tiles_w, off_h, off_w;
    int flip, has_bias;        // flip: dgrad (g[ko][ci] = w[ci][ko] rotated 180 degrees)
};

// U[xi, g, ko, ci] = (G g G^T)[xi]; fprop g = w[g*Ko + ko, ci], dgrad g = rot180(w[g*Ci + ci, ko]).
template <typename T, typename Acc>
__global__ void wino_filter(const T* __restrict__ w, Acc* __restrict__ U, const WinoArgs a) {
    const long long total = (long long)a.G * a.Ko * a.Ci;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const int ci = (int)(i % a.Ci);
        const int ko = (int)((i / a.Ci) % a.Ko);
        const int g = (int)(i / ((long long)a.Ci * a.Ko));
        Acc f[3][3];
        if (a.flip) {
            const T* src = w + ((long long)(g * a.Ci + ci) * a.Ko + ko) * 9;
            for (int r = 0; r < 3; ++r)
                for (int s = 0; s < 3; ++s) f[r][s] = IgNum<T>::to_acc(src[(2 - r) * 3 + (2 - s)]);
        } else {
            const T* src = w + ((long long)(g * a.Ko + ko) * a.Ci + ci) * 9;
            for (int r = 0; r < 3; ++r)
                for (int s = 0; s < 3; ++s) f[r][s] = IgNum<T>::to_acc(src[r * 3 + s]);
        }
        const Acc h = Acc(0.5);
        Acc t[4][3];   // G f
        for (int s = 0; s < 3; ++s) {
            t[0][s] = f[0][s];
            t[1][s] = h * (f[0][s] + f[1][s] + f[2][s]);
            t[2][s] = h * (f[0][s] - f[1][s] + f[2][s]);
            t[3][s] = f[2][s];
        }
        const long long plane = (long long)a.G * a.Ko * a.Ci;
        for (int r = 0; r < 4; ++r) {   // (G f) G^T
            const Acc u[4] = {t[r][0], h * (t[r][0] + t[r][1] + t[r][2]),
                              h * (t[r][0] - t[r][1] + t[r][2]), t[r][2]};
            for (int s = 0; s < 4; ++s) U[(r * 4 + s) * plane + i] = u[s];
        }
    }
}

// V[xi, g, ci, t] = (B^T d B)[xi] of input tile t of channel g*Ci + ci.
template <typename T, typename Acc>
__global__ void wino_input(const T* __restrict__ in, Acc* __restrict__ V, const WinoArgs a) {
    const long long tiles = (long long)a.N * a.tiles_h * a.tiles_w;
    const long long total = tiles * a.G * a.Ci;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i % tiles;
        const long long c = i / tiles;   // g * Ci + ci
        const int tw = (int)(t % a.tiles_w);
        const int th = (int)((t / a.tiles_w) % a.tiles_h);
        const long long n = t / ((long long)a.tiles_w * a.tiles_h);
        const T* src = in + (n * a.G * a.Ci + c) * a.Hin * a.Win;
        Acc d[4][4];
        for (int r = 0; r < 4; ++r) {
            const int h = 2 * th - a.off_h + r;
            for (int s = 0; s < 4; ++s) {
                const int w = 2 * tw - a.off_w + s;
                d[r][s] = ((unsigned)h < (unsigned)a.Hin && (unsigned)w < (unsigned)a.Win)
                              ? IgNum<T>::to_acc(src[(long long)h * a.Win + w]) : Acc(0);
            }
        }
        Acc b[4][4];   // B^T d
        for (int s = 0; s < 4; ++s) {
            b[0][s] = d[0][s] - d[2][s];
            b[1][s] = d[1][s] + d[2][s];
            b[2][s] = d[2][s] - d[1][s];
            b[3][s] = d[1][s] - d[3][s];
        }
        const long long plane = total;   // G * Ci * tiles
        for (int r = 0; r < 4; ++r) {   // (B^T d) B
            const Acc v[4] = {b[r][0] - b[r][2], b[r][1] + b[r][2], b[r][2] - b[r][1],
                              b[r][1] - b[r][3]};
            for (int s = 0; s < 4; ++s) V[(r * 4 + s) * plane + c * tiles + t] = v[s];
        }
    }
}

// out[n, g*Ko + ko, 2*th + i, 2*tw + j] = (A^T M A)[i][j] (+ bias), M[xi, g, ko, t].
template <typename T, typename Acc>
__global__ void wino_output(const Acc* __restrict__ M, const T* __restrict__ bias,
                            T* __restrict__ out, const WinoArgs a) {
    const long long tiles = (long long)a.N * a.tiles_h * a.tiles_w;
    const long long total = tiles * a.G * a.Ko;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        const long long t = i % tiles;
        const long long k = i / tiles;   // g * Ko + ko
        const int tw = (int)(t % a.tiles_w);
        const int th = (int)((t / a.tiles_w) % a.tiles_h);
        const long long n = t / ((long long)a.tiles_w * a.tiles_h);
        Acc m[4][4];
        for (int xi = 0; xi < 16; ++xi) m[xi / 4][xi % 4] = M[xi * total + i];
        Acc u[2][4];   // A^T m
        for (int s = 0; s < 4; ++s) {
            u[0][s] = m[0][s] + m[1][s] + m[2][s];
            u[1][s] = m[1][s] - m[2][s] - m[3][s];
        }
        const Acc b0 = a.has_bias ? IgNum<T>::to_acc(bias[k]) : Acc(0);
        T* dst = out + (n * a.G * a.Ko + k) * a.Hout * a.Wout;
        for (int r = 0; r < 2; ++r) {   // (A^T m) A
            const int h = 2 * th + r;
            if (h >= a.Hout) continue;
            const Acc y[2] = {u[r][0] + u[r][1] + u[r][2], u[r][1] - u[r][2] - u[r][3]};
            for (int s = 0; s < 2; ++s) {
                const int w = 2 * tw + s;
                if (w < a.Wout) dst[(long long)h * a.Wout + w] = IgNum<T>::from_acc(y[s] + b0);
            }
        }
    }
}
