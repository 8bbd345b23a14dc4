// Counter-based hash RNG shared by the CPU and CUDA kernels of the masking op.
//
// Every token gets a 64-bit key that depends only on (seed, sample, token index), so the
// same seed gives the same masks on CPU, CUDA and in the torch reference
// (masksc/masking.py implements the identical arithmetic in int64 tensors). A sample keeps
// the n_keep tokens with the smallest keys. The low kIndexBits bits of a key hold the token
// index, so keys are unique and ties in the hash are broken by index.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define MASKSC_HD __host__ __device__ __forceinline__
#else
#define MASKSC_HD inline
#endif

namespace masksc {

constexpr uint64_t kGammaSample = 0x9E3779B97F4A7C15ULL;  // splitmix64 increment
constexpr uint64_t kGammaToken = 0xD1B54A32D192ED03ULL;   // a second odd constant for tokens
constexpr uint64_t kMix1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMix2 = 0x94D049BB133111EBULL;
constexpr int kIndexBits = 20;
constexpr int64_t kMaxTokens = int64_t(1) << kIndexBits;
constexpr uint64_t kIndexMask = (uint64_t(1) << kIndexBits) - 1;
// Bit 63 cleared so a key is a non-negative int64 and signed/unsigned orders agree.
constexpr uint64_t kHashMask = 0x7FFFFFFFFFFFFFFFULL & ~kIndexMask;

// splitmix64 finaliser: a bijective 64-bit mix.
MASKSC_HD uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * kMix1;
  z = (z ^ (z >> 27)) * kMix2;
  return z ^ (z >> 31);
}

// Per-seed state; computed once per call.
MASKSC_HD uint64_t seed_state(uint64_t seed) { return mix64(seed + kGammaSample); }

// Per-sample stream state.
MASKSC_HD uint64_t sample_state(uint64_t seed_st, int64_t b) {
  return mix64(seed_st + uint64_t(b + 1) * kGammaSample);
}

// Key of token j of the sample whose stream state is `sample_st`.
MASKSC_HD uint64_t token_key(uint64_t sample_st, int64_t j) {
  return (mix64(sample_st + uint64_t(j + 1) * kGammaToken) & kHashMask) | uint64_t(j);
}

}  // namespace masksc
