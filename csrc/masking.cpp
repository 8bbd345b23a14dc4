// masksc::random_masking, masksc::unmask and masksc::unmask_backward: schemas and CPU kernels.
//
// Fake (meta) kernels and autograd are registered from Python (masksc/masking.py) through
// torch.library; the CUDA kernels live in masking_cuda.cu.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <tuple>
#include <vector>

#include "hash_rng.h"
#include "masking_checks.h"

namespace masksc {
namespace {

// Samples per parallel task: selection costs O(G) and the gather O(U * D), so small chunks
// already amortise the scheduling.
constexpr int64_t kSampleGrain = 4;

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> random_masking_cpu(const at::Tensor& tokens_in,
                                                                              int64_t n_keep, int64_t seed) {
  check_random_masking_args(tokens_in, n_keep);
  const at::Tensor tokens = tokens_in.contiguous();
  const int64_t B = tokens.size(0), G = tokens.size(1), D = tokens.size(2), U = n_keep;
  at::Tensor kept, ids_keep, ids_restore, mask;
  std::tie(kept, ids_keep, ids_restore, mask) = empty_masking_outputs(tokens, U);

  const uint64_t seed_st = seed_state(static_cast<uint64_t>(seed));
  const size_t row_bytes = static_cast<size_t>(D) * tokens.element_size();
  const char* src = static_cast<const char*>(tokens.data_ptr());
  char* dst = static_cast<char*>(kept.data_ptr());
  int64_t* keep_ptr = ids_keep.data_ptr<int64_t>();
  int64_t* restore_ptr = ids_restore.data_ptr<int64_t>();
  bool* mask_ptr = mask.data_ptr<bool>();

  at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> keys(G);
    for (int64_t b = begin; b < end; ++b) {
      bool* m = mask_ptr + b * G;
      int64_t* ik = keep_ptr + b * U;
      int64_t* ir = restore_ptr + b * G;
      std::fill(m, m + G, true);
      if (U == G) {
        std::fill(m, m + G, false);
      } else if (U > 0) {
        const uint64_t st = sample_state(seed_st, b);
        for (int64_t j = 0; j < G; ++j) keys[j] = token_key(st, j);
        std::nth_element(keys.begin(), keys.begin() + (U - 1), keys.end());
        for (int64_t k = 0; k < U; ++k) m[keys[k] & kIndexMask] = false;
      }
      int64_t n_kept = 0;
      for (int64_t j = 0; j < G; ++j) {
        if (m[j]) {
          ir[j] = U + (j - n_kept);
        } else {
          ik[n_kept] = j;
          ir[j] = n_kept++;
        }
      }
      for (int64_t k = 0; k < U; ++k) {
        std::memcpy(dst + (b * U + k) * row_bytes, src + (b * G + ik[k]) * row_bytes, row_bytes);
      }
    }
  });
  return {kept, ids_keep, ids_restore, mask};
}

at::Tensor unmask_cpu(const at::Tensor& kept_in, const at::Tensor& mask_token_in, const at::Tensor& ids_in,
                      int64_t n_tokens) {
  check_unmask_args(kept_in, mask_token_in, ids_in, n_tokens);
  const at::Tensor kept = kept_in.contiguous(), mask_token = mask_token_in.contiguous(), ids = ids_in.contiguous();
  const int64_t B = kept.size(0), U = kept.size(1), D = kept.size(2), G = n_tokens;
  at::Tensor out = at::empty({B, G, D}, kept.options());
  const size_t row_bytes = static_cast<size_t>(D) * kept.element_size();
  const char* kept_ptr = static_cast<const char*>(kept.data_ptr());
  const char* token_ptr = static_cast<const char*>(mask_token.data_ptr());
  const int64_t* ids_ptr = ids.data_ptr<int64_t>();
  char* out_ptr = static_cast<char*>(out.data_ptr());

  at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> source(G);  // kept row feeding each position, -1 for the mask token
    for (int64_t b = begin; b < end; ++b) {
      std::fill(source.begin(), source.end(), -1);
      for (int64_t k = 0; k < U; ++k) {
        const int64_t j = ids_ptr[b * U + k];
        TORCH_CHECK_INDEX(j >= 0 && j < G, "unmask: ids_keep holds ", j, ", outside [0, n_tokens) = [0, ", G, ").");
        source[j] = k;
      }
      for (int64_t j = 0; j < G; ++j) {
        const char* row = source[j] < 0 ? token_ptr : kept_ptr + (b * U + source[j]) * row_bytes;
        std::memcpy(out_ptr + (b * G + j) * row_bytes, row, row_bytes);
      }
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> unmask_backward_cpu(const at::Tensor& grad_in, const at::Tensor& ids_in) {
  check_unmask_backward_args(grad_in, ids_in);
  const at::Tensor grad = grad_in.contiguous(), ids = ids_in.contiguous();
  const int64_t B = grad.size(0), G = grad.size(1), D = grad.size(2), U = ids.size(1);
  at::Tensor grad_kept = at::empty({B, U, D}, grad.options());
  // masked[b * G + j]: position j of sample b took the mask token.
  std::vector<uint8_t> masked(static_cast<size_t>(B * G), 1);
  const int64_t* ids_ptr = ids.data_ptr<int64_t>();
  const size_t row_bytes = static_cast<size_t>(D) * grad.element_size();
  const char* grad_bytes = static_cast<const char*>(grad.data_ptr());
  char* kept_bytes = static_cast<char*>(grad_kept.data_ptr());

  at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t k = 0; k < U; ++k) {
        const int64_t j = ids_ptr[b * U + k];
        TORCH_CHECK_INDEX(j >= 0 && j < G, "unmask_backward: ids_keep holds ", j, ", outside [0, ", G, ").");
        masked[b * G + j] = 0;
        std::memcpy(kept_bytes + (b * U + k) * row_bytes, grad_bytes + (b * G + j) * row_bytes, row_bytes);
      }
    }
  });

  at::Tensor grad_token;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "unmask_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> acc(static_cast<size_t>(D), acc_t(0));
    const scalar_t* g = grad.data_ptr<scalar_t>();
    // Split over feature columns so every thread owns its slice of the sum.
    at::parallel_for(0, D, 64, [&](int64_t d0, int64_t d1) {
      for (int64_t r = 0; r < B * G; ++r) {
        if (!masked[r]) continue;
        const scalar_t* row = g + r * D;
        for (int64_t d = d0; d < d1; ++d) acc[d] += static_cast<acc_t>(row[d]);
      }
    });
    grad_token = at::empty({D}, grad.options());
    scalar_t* out = grad_token.data_ptr<scalar_t>();
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<scalar_t>(acc[d]);
  });
  return {grad_kept, grad_token};
}

}  // namespace

TORCH_LIBRARY(masksc, m) {
  m.def("random_masking(Tensor tokens, int n_keep, int seed) -> (Tensor kept, Tensor ids_keep, Tensor ids_restore, Tensor mask)");
  m.def("unmask(Tensor kept, Tensor mask_token, Tensor ids_keep, int n_tokens) -> Tensor");
  m.def("unmask_backward(Tensor grad_out, Tensor ids_keep) -> (Tensor grad_kept, Tensor grad_mask_token)");
}

TORCH_LIBRARY_IMPL(masksc, CPU, m) {
  m.impl("random_masking", &random_masking_cpu);
  m.impl("unmask", &unmask_cpu);
  m.impl("unmask_backward", &unmask_backward_cpu);
}

}  // namespace masksc

// An importable, empty Python module: importing masksc._C runs the registrations above.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "masksc C++/CUDA ops (torch.ops.masksc)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
