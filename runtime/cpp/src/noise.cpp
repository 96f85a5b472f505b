// Counter-based Gaussian noise, the algorithm of esrdf/runtime/noise.py reproduced bit for bit:
//
//   mix(z) = splitmix64 output function; h = mix(seed); h = mix(h ^ step); h = mix(h ^ channel);
//   h = mix(h ^ y); bits = mix(h ^ x)
//   u1 = ((bits >> 32) + 0.5) * 2^-32,  u2 = (bits & 0xFFFFFFFF) * 2^-32
//   z  = float32(sqrt(-2 ln u1) * cos(2 pi u2))            (Box-Muller in float64)
//
// The integer part is exact. The float64 log/cos come from the C library here and from numpy there; both
// are within an ulp, and such a difference survives the float32 rounding only in rare ties (the tests
// compare against numpy over whole fields). Each value depends only on its global coordinates, so tiles cut
// from one image see the same noise in their overlaps.
#include <cmath>

#include "esrdf/esrdf.h"

namespace esrdf {
namespace {

constexpr uint64_t kGamma = 0x9E3779B97F4A7C15ULL;
constexpr uint64_t kMul1 = 0xBF58476D1CE4E5B9ULL;
constexpr uint64_t kMul2 = 0x94D049BB133111EBULL;
constexpr double kTwoPowM32 = 1.0 / 4294967296.0;
constexpr double kPi = 3.141592653589793;  // numpy's np.pi

inline uint64_t mix(uint64_t z) {  // unsigned arithmetic wraps mod 2^64, as numpy's uint64 does
  z += kGamma;
  z = (z ^ (z >> 30)) * kMul1;
  z = (z ^ (z >> 27)) * kMul2;
  return z ^ (z >> 31);
}

inline float gaussian(uint64_t bits) {
  const double u1 = (static_cast<double>(bits >> 32) + 0.5) * kTwoPowM32;
  const double u2 = static_cast<double>(bits & 0xFFFFFFFFULL) * kTwoPowM32;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * kPi * u2));
}

}  // namespace

uint64_t noise_bits(uint64_t seed, uint64_t step_index, uint64_t channel, uint64_t y, uint64_t x) {
  return mix(mix(mix(mix(mix(seed) ^ step_index) ^ channel) ^ y) ^ x);
}

void noise_field(uint64_t seed, uint64_t step_index, int64_t y0, int64_t x0, int64_t height, int64_t width,
                 int64_t channels, float* out) {
  if (y0 < 0 || x0 < 0 || height < 0 || width < 0 || channels < 0) {
    throw Error(ErrorCode::kInvalidArgument, "noise window must be non-negative");
  }
  const uint64_t h = mix(mix(seed) ^ step_index);
  for (int64_t c = 0; c < channels; ++c) {
    const uint64_t per_channel = mix(h ^ static_cast<uint64_t>(c));
    for (int64_t y = 0; y < height; ++y) {
      const uint64_t per_row = mix(per_channel ^ static_cast<uint64_t>(y0 + y));
      float* row = out + (c * height + y) * width;
      for (int64_t x = 0; x < width; ++x) row[x] = gaussian(mix(per_row ^ static_cast<uint64_t>(x0 + x)));
    }
  }
}

}  // namespace esrdf
