// CUDA kernels of masksc::random_masking, masksc::unmask and masksc::unmask_backward.
//
// random_masking: one block per sample. For G <= kMaxSharedTokens the keys of the sample are
// bitonic-sorted in shared memory to find the n_keep-th smallest key (the threshold); for
// larger G the keys go to global memory and at::kthvalue finds the thresholds. A compaction
// pass (warp ballots) then writes ids_keep / ids_restore / mask, recomputing each key from the
// hash, and a row-copy kernel gathers the kept tokens. Keys are those of csrc/hash_rng.h, so
// the result equals the CPU op and the torch reference bit for bit.
#ifdef MASKSC_WITH_CUDA

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "hash_rng.h"
#include "masking_checks.h"

namespace masksc {
namespace {

constexpr int kMaxSharedTokens = 4096;  // 32 KiB of uint64 keys per block
constexpr int kCompactThreads = 256;

int next_pow2(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Writes ids_keep / ids_restore / mask of sample b: token j is kept iff key(j) <= thr
// (exactly n_keep tokens, keys being unique). Ascending order of ids_keep comes from a
// block-wide running count of kept tokens, chunk by chunk, via warp ballots.
__device__ void compact_sample(uint64_t sample_st, uint64_t thr, bool keep_none, int64_t b, int64_t G, int64_t U,
                               int64_t* ids_keep, int64_t* ids_restore, bool* mask) {
  __shared__ int warp_counts[32];
  __shared__ int64_t base;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = blockDim.x >> 5;
  if (tid == 0) base = 0;
  __syncthreads();
  for (int64_t start = 0; start < G; start += blockDim.x) {
    const int64_t j = start + tid;
    const bool keep = j < G && !keep_none && token_key(sample_st, j) <= thr;
    const unsigned ballot = __ballot_sync(0xffffffffu, keep);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int64_t before = base + __popc(ballot & ((1u << lane) - 1u));
    for (int w = 0; w < warp; ++w) before += warp_counts[w];
    if (j < G) {
      if (keep) {
        ids_keep[b * U + before] = j;
        ids_restore[b * G + j] = before;
      } else {
        ids_restore[b * G + j] = U + (j - before);
      }
      mask[b * G + j] = !keep;
    }
    __syncthreads();
    if (tid == 0) {
      for (int w = 0; w < n_warps; ++w) base += warp_counts[w];
    }
    __syncthreads();
  }
}

// G <= kMaxSharedTokens: keys padded to n_pow2 with UINT64_MAX, bitonic sort, threshold = key[U-1].
__global__ void select_shared_kernel(uint64_t seed_st, int64_t G, int64_t U, int n_pow2, int64_t* ids_keep,
                                     int64_t* ids_restore, bool* mask) {
  extern __shared__ uint64_t keys[];
  const int64_t b = blockIdx.x;
  const uint64_t st = sample_state(seed_st, b);
  for (int i = threadIdx.x; i < n_pow2; i += blockDim.x) keys[i] = i < G ? token_key(st, i) : ~uint64_t(0);
  __syncthreads();
  for (int k = 2; k <= n_pow2; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n_pow2; i += blockDim.x) {
        const int partner = i ^ j;
        if (partner > i) {
          const uint64_t a = keys[i], c = keys[partner];
          const bool ascending = (i & k) == 0;
          if ((a > c) == ascending) {
            keys[i] = c;
            keys[partner] = a;
          }
        }
      }
      __syncthreads();
    }
  }
  const uint64_t thr = U > 0 ? keys[U - 1] : 0;
  __syncthreads();
  compact_sample(st, thr, U == 0, b, G, U, ids_keep, ids_restore, mask);
}

__global__ void keys_kernel(uint64_t seed_st, int64_t B, int64_t G, int64_t* keys) {
  const int64_t n = B * G;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    keys[i] = static_cast<int64_t>(token_key(sample_state(seed_st, i / G), i % G));
  }
}

__global__ void select_threshold_kernel(uint64_t seed_st, const int64_t* thr, int64_t G, int64_t U,
                                        int64_t* ids_keep, int64_t* ids_restore, bool* mask) {
  const int64_t b = blockIdx.x;
  const uint64_t st = sample_state(seed_st, b);
  compact_sample(st, U > 0 ? static_cast<uint64_t>(thr[b]) : 0, U == 0, b, G, U, ids_keep, ids_restore, mask);
}

// Copies rows of `row_vecs` elements of V. Output row r (of n_rows) takes source row
// src_row(r), or `fill` when that is negative. Rows are contiguous in both tensors.
template <typename V, typename RowMap>
__global__ void copy_rows_kernel(const V* src, const V* fill, V* dst, int64_t n_rows, int64_t row_vecs, RowMap src_row) {
  for (int64_t r = blockIdx.x * int64_t(blockDim.y) + threadIdx.y; r < n_rows; r += int64_t(gridDim.x) * blockDim.y) {
    const int64_t s = src_row(r);
    const V* in = s >= 0 ? src + s * row_vecs : fill;
    V* out = dst + r * row_vecs;
    for (int64_t c = threadIdx.x; c < row_vecs; c += blockDim.x) out[c] = in[c];
  }
}

// gather: output row (b, k) <- input row (b, ids[b, k]); input has G rows per sample.
struct GatherMap {
  const int64_t* ids;
  int64_t U, G;
  __device__ int64_t operator()(int64_t r) const {
    const int64_t j = ids[r];
    CUDA_KERNEL_ASSERT(j >= 0 && j < G && "ids_keep out of range");
    return (r / U) * G + j;
  }
};

// unmask: output row (b, j) <- kept row (b, source[b, j]), or the mask token when it is -1.
struct UnmaskMap {
  const int32_t* source;
  int64_t U, G;
  __device__ int64_t operator()(int64_t r) const {
    const int32_t k = source[r];
    return k < 0 ? -1 : (r / G) * U + k;
  }
};

template <typename RowMap>
void launch_copy_rows(const void* src, const void* fill, void* dst, int64_t n_rows, int64_t row_bytes, RowMap map) {
  if (n_rows == 0 || row_bytes == 0) return;
  const auto addr_bits = reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(fill) |
                         reinterpret_cast<uintptr_t>(dst) | static_cast<uintptr_t>(row_bytes);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  auto run = [&](auto vec_tag) {
    using V = decltype(vec_tag);
    const int64_t row_vecs = row_bytes / int64_t(sizeof(V));
    const int tx = static_cast<int>(std::min<int64_t>(32, row_vecs)), ty = std::max(1, 256 / tx);
    const int64_t blocks = std::min<int64_t>((n_rows + ty - 1) / ty, 65535LL * 8);
    copy_rows_kernel<V, RowMap><<<static_cast<unsigned>(blocks), dim3(tx, ty), 0, stream>>>(
        static_cast<const V*>(src), static_cast<const V*>(fill), static_cast<V*>(dst), n_rows, row_vecs, map);
  };
  // Widest vector that divides the row and every base address.
  if (addr_bits % 16 == 0) run(uint4{});
  else if (addr_bits % 8 == 0) run(uint2{});
  else if (addr_bits % 4 == 0) run(uint32_t{});
  else if (addr_bits % 2 == 0) run(uint16_t{});
  else run(uint8_t{});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// source[b * G + j] = k where ids[b, k] == j, else -1.
__global__ void source_kernel(const int64_t* ids, int64_t B, int64_t U, int64_t G, int32_t* source) {
  const int64_t n = B * U;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = ids[i];
    CUDA_KERNEL_ASSERT(j >= 0 && j < G && "ids_keep out of range");
    source[(i / U) * G + j] = static_cast<int32_t>(i % U);
  }
}

at::Tensor source_map(const at::Tensor& ids, int64_t B, int64_t U, int64_t G) {
  at::Tensor source = at::full({B, G}, -1, ids.options().dtype(at::kInt));
  if (B * U > 0) {
    const int64_t blocks = std::min<int64_t>((B * U + 255) / 256, 4096);
    source_kernel<<<static_cast<unsigned>(blocks), 256, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ids.data_ptr<int64_t>(), B, U, G, source.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return source;
}

// acc[d] += sum of grad[r, d] over rows r with source[r] < 0 (masked positions).
template <typename scalar_t, typename acc_t>
__global__ void masked_sum_kernel(const scalar_t* grad, const int32_t* source, int64_t n_rows, int64_t D, acc_t* acc) {
  __shared__ acc_t partial[8][32];
  const int64_t d = blockIdx.x * 32 + threadIdx.x;
  acc_t sum = 0;
  if (d < D) {
    for (int64_t r = blockIdx.y * 8 + threadIdx.y; r < n_rows; r += int64_t(gridDim.y) * 8) {
      if (source[r] < 0) sum += static_cast<acc_t>(grad[r * D + d]);
    }
  }
  partial[threadIdx.y][threadIdx.x] = sum;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    for (int y = 1; y < 8; ++y) sum += partial[y][threadIdx.x];
    atomicAdd(acc + d, sum);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_cuda(const at::Tensor& tokens_in,
                                                                               int64_t n_keep, int64_t seed) {
  check_random_masking_args(tokens_in, n_keep);
  const c10::cuda::CUDAGuard guard(tokens_in.device());
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t B = tokens.size(0), G = tokens.size(1), D = tokens.size(2), U = n_keep;
  at::Tensor kept, ids_keep, ids_restore, mask;
  std::tie(kept, ids_keep, ids_restore, mask) = empty_masking_outputs(tokens, U);
  if (B == 0 || G == 0) return {kept, ids_keep, ids_restore, mask};

  const uint64_t seed_st = seed_state(static_cast<uint64_t>(seed));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (G <= kMaxSharedTokens) {
    const int n_pow2 = next_pow2(G);
    const int threads = std::max(32, std::min(1024, n_pow2 / 2));
    select_shared_kernel<<<static_cast<unsigned>(B), threads, n_pow2 * sizeof(uint64_t), stream>>>(
        seed_st, G, U, n_pow2, ids_keep.data_ptr<int64_t>(), ids_restore.data_ptr<int64_t>(), mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    at::Tensor keys = at::empty({B, G}, tokens.options().dtype(at::kLong));
    const int64_t blocks = std::min<int64_t>((B * G + 255) / 256, 8192);
    keys_kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(seed_st, B, G, keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    at::Tensor thr = U > 0 ? std::get<0>(at::kthvalue(keys, U, 1)).contiguous() : at::zeros({B}, keys.options());
    select_threshold_kernel<<<static_cast<unsigned>(B), kCompactThreads, 0, stream>>>(
        seed_st, thr.data_ptr<int64_t>(), G, U, ids_keep.data_ptr<int64_t>(), ids_restore.data_ptr<int64_t>(),
        mask.data_ptr<bool>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  launch_copy_rows(tokens.data_ptr(), tokens.data_ptr(), kept.data_ptr(), B * U, D * tokens.element_size(),
                   GatherMap{ids_keep.data_ptr<int64_t>(), U, G});
  return {kept, ids_keep, ids_restore, mask};
}

at::Tensor unmask_cuda(const at::Tensor& kept_in, const at::Tensor& mask_token_in, const at::Tensor& ids_in,
                       int64_t n_tokens) {
  check_unmask_args(kept_in, mask_token_in, ids_in, n_tokens);
  const c10::cuda::CUDAGuard guard(kept_in.device());
  const at::Tensor kept = kept_in.contiguous(), mask_token = mask_token_in.contiguous(), ids = ids_in.contiguous();
  const int64_t B = kept.size(0), U = kept.size(1), D = kept.size(2), G = n_tokens;
  at::Tensor out = at::empty({B, G, D}, kept.options());
  if (B * G == 0) return out;
  const at::Tensor source = source_map(ids, B, U, G);
  launch_copy_rows(kept.data_ptr(), mask_token.data_ptr(), out.data_ptr(), B * G, D * kept.element_size(),
                   UnmaskMap{source.data_ptr<int32_t>(), U, G});
  return out;
}

std::tuple<at::Tensor, at::Tensor> unmask_backward_cuda(const at::Tensor& grad_in, const at::Tensor& ids_in) {
  check_unmask_backward_args(grad_in, ids_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), ids = ids_in.contiguous();
  const int64_t B = grad.size(0), G = grad.size(1), D = grad.size(2), U = ids.size(1);
  at::Tensor grad_kept = at::empty({B, U, D}, grad.options());
  launch_copy_rows(grad.data_ptr(), grad.data_ptr(), grad_kept.data_ptr(), B * U, D * grad.element_size(),
                   GatherMap{ids.data_ptr<int64_t>(), U, G});
  at::Tensor grad_token;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unmask_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor acc = at::zeros({D}, grad.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    if (B * G > 0 && D > 0) {
      const at::Tensor source = source_map(ids, B, U, G);
      const int64_t row_blocks = std::min<int64_t>((B * G + 63) / 64, 1024);
      if (row_blocks > 1) {  // the row blocks' partial sums meet in atomicAdd, in no fixed order
        at::globalContext().alertNotDeterministic("masksc::unmask_backward (CUDA): the mask token's gradient");
      }
      const dim3 grid(static_cast<unsigned>((D + 31) / 32), static_cast<unsigned>(row_blocks));
      masked_sum_kernel<scalar_t, acc_t><<<grid, dim3(32, 8), 0, c10::cuda::getCurrentCUDAStream()>>>(
          grad.data_ptr<scalar_t>(), source.data_ptr<int32_t>(), B * G, D, acc.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    grad_token = acc.to(grad.scalar_type());
  });
  return {grad_kept, grad_token};
}

}  // namespace

TORCH_LIBRARY_IMPL(masksc, CUDA, m) {
  m.impl("random_masking", &random_masking_cuda);
  m.impl("unmask", &unmask_cuda);
  m.impl("unmask_backward", &unmask_backward_cuda);
}

}  // namespace masksc

#endif  // MASKSC_WITH_CUDA
