// Argument checks and output allocation shared by the CPU and CUDA implementations of the masking ops.
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/Tensor.h>

#include <tuple>
#include <c10/util/Exception.h>

#include "hash_rng.h"

namespace masksc {

inline void check_random_masking_args(const at::Tensor& tokens, int64_t n_keep) {
  TORCH_CHECK_VALUE(tokens.dim() == 3, "random_masking: tokens must be 3-D [B, G, D], got shape ",
                    tokens.sizes(), "; reshape your tokens to [batch, tokens, dim].");
  const int64_t G = tokens.size(1);
  TORCH_CHECK_VALUE(n_keep >= 0 && n_keep <= G, "random_masking: n_keep must be in [0, G] = [0, ", G,
                    "], got ", n_keep, "; compute it as round(G * (1 - mask_ratio)).");
  TORCH_CHECK_VALUE(G <= kMaxTokens, "random_masking: at most ", kMaxTokens, " tokens per sample are supported, got G = ",
                    G, "; use larger patches.");
}

// (kept [B, U, D], ids_keep int64 [B, U], ids_restore int64 [B, G], mask bool [B, G]) for contiguous tokens.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> empty_masking_outputs(const at::Tensor& tokens,
                                                                                      int64_t n_keep) {
  const int64_t B = tokens.size(0), G = tokens.size(1), D = tokens.size(2);
  return {at::empty({B, n_keep, D}, tokens.options()), at::empty({B, n_keep}, tokens.options().dtype(at::kLong)),
          at::empty({B, G}, tokens.options().dtype(at::kLong)), at::empty({B, G}, tokens.options().dtype(at::kBool))};
}

inline void check_ids_keep(const at::Tensor& ids_keep, int64_t B, const char* op) {
  TORCH_CHECK_TYPE(ids_keep.scalar_type() == at::kLong, op, ": ids_keep must be int64, got ", ids_keep.scalar_type(),
                   "; pass the ids_keep returned by random_masking.");
  TORCH_CHECK_VALUE(ids_keep.dim() == 2 && ids_keep.size(0) == B, op, ": ids_keep must be [B, U] with B = ", B,
                    ", got shape ", ids_keep.sizes(), ".");
}

inline void check_unmask_args(const at::Tensor& kept, const at::Tensor& mask_token, const at::Tensor& ids_keep,
                              int64_t n_tokens) {
  TORCH_CHECK_VALUE(kept.dim() == 3, "unmask: kept must be 3-D [B, U, D], got shape ", kept.sizes(), ".");
  const int64_t B = kept.size(0), U = kept.size(1), D = kept.size(2);
  check_ids_keep(ids_keep, B, "unmask");
  TORCH_CHECK_VALUE(ids_keep.size(1) == U, "unmask: ids_keep has ", ids_keep.size(1), " ids per sample but kept has ",
                    U, " tokens; pass the ids_keep that produced kept.");
  TORCH_CHECK_VALUE(mask_token.dim() == 1 && mask_token.size(0) == D, "unmask: mask_token must be 1-D [D] with D = ",
                    D, ", got shape ", mask_token.sizes(), "; flatten it with mask_token.reshape(-1).");
  TORCH_CHECK_TYPE(mask_token.scalar_type() == kept.scalar_type(), "unmask: mask_token dtype ",
                   mask_token.scalar_type(), " differs from kept dtype ", kept.scalar_type(),
                   "; cast it with mask_token.to(kept.dtype).");
  TORCH_CHECK_VALUE(n_tokens >= U, "unmask: n_tokens (", n_tokens, ") must be >= the number of kept tokens (", U, ").");
  TORCH_CHECK_VALUE(n_tokens <= kMaxTokens, "unmask: at most ", kMaxTokens, " tokens are supported, got ", n_tokens, ".");
  TORCH_CHECK(kept.device() == ids_keep.device() && kept.device() == mask_token.device(),
              "unmask: kept, mask_token and ids_keep must be on one device, got ", kept.device(), ", ",
              mask_token.device(), ", ", ids_keep.device(), ".");
}

inline void check_unmask_backward_args(const at::Tensor& grad_out, const at::Tensor& ids_keep) {
  TORCH_CHECK_VALUE(grad_out.dim() == 3, "unmask_backward: grad_out must be 3-D [B, G, D], got shape ",
                    grad_out.sizes(), ".");
  check_ids_keep(ids_keep, grad_out.size(0), "unmask_backward");
  TORCH_CHECK_VALUE(ids_keep.size(1) <= grad_out.size(1), "unmask_backward: ids_keep has more ids (",
                    ids_keep.size(1), ") than there are tokens (", grad_out.size(1), ").");
  TORCH_CHECK_TYPE(at::isFloatingType(grad_out.scalar_type()), "unmask_backward: grad_out must be floating point, got ",
                   grad_out.scalar_type(), ".");
  TORCH_CHECK(grad_out.device() == ids_keep.device(), "unmask_backward: grad_out and ids_keep must be on one device.");
}

}  // namespace masksc
