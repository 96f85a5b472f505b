// The counter-based noise field against values numpy's esrdf.runtime.noise printed (bits and float32), and
// the property tiling relies on: a window of the field equals the same pixels of a larger field.
// (tests/test_cpp_runtime.py also compares whole fields bit for bit against numpy through test_parity.)
#include <cmath>
#include <cstring>
#include <vector>

#include "check.h"

namespace {

struct Golden {
  uint64_t seed, step, channel, y, x, bits;
  float value;
};

// Printed by esrdf.runtime.noise.noise_bits / noise_field (numpy 2.4) for these coordinates.
const Golden kGolden[] = {
    {0ULL, 0, 0, 0, 0, 0x78ae5a9a6b5fd45eULL, -0x1.1294b6p+0f},
    {7ULL, 3, 2, 31, 17, 0x5e8a4cbc53d75d11ULL, -0x1.522f46p-1f},
    {18446744073709551615ULL, 200, 1, 4095, 4094, 0xf0a96828cc787855ULL, 0x1.b1da02p-4f},
    {123456789ULL, 1, 0, 1000000, 3, 0xdba42f81f0895254ULL, 0x1.0739b4p-1f},
    {42ULL, 50, 2, 0, 0, 0x3cd9133002c329ddULL, 0x1.b0f76p+0f},
};

void golden_values() {
  for (const Golden& g : kGolden) {
    CHECK(esrdf::noise_bits(g.seed, g.step, g.channel, g.y, g.x) == g.bits);
    std::vector<float> field(3);
    esrdf::noise_field(g.seed, g.step, int64_t(g.y), int64_t(g.x), 1, 1, 3, field.data());
    CHECK(std::memcmp(&field[g.channel], &g.value, sizeof(float)) == 0);
  }
}

void windows_agree_with_the_full_field() {
  const int64_t c = 3, h = 40, w = 56;
  std::vector<float> full(c * h * w), window(c * 16 * 24);
  esrdf::noise_field(11, 4, 0, 0, h, w, c, full.data());
  esrdf::noise_field(11, 4, 20, 30, 16, 24, c, window.data());
  bool same = true;
  for (int64_t k = 0; k < c; ++k)
    for (int64_t y = 0; y < 16; ++y)
      for (int64_t x = 0; x < 24; ++x)
        same &= window[(k * 16 + y) * 24 + x] == full[(k * h + 20 + y) * w + 30 + x];
  CHECK(same);
}

void looks_standard_normal() {
  const int64_t n = 3 * 128 * 128;
  std::vector<float> z(n), other(n);
  esrdf::noise_field(5, 1, 0, 0, 128, 128, 3, z.data());
  esrdf::noise_field(5, 2, 0, 0, 128, 128, 3, other.data());  // another step index: another field
  double sum = 0, sq = 0, cross = 0;
  for (int64_t i = 0; i < n; ++i) {
    sum += z[i];
    sq += double(z[i]) * z[i];
    cross += double(z[i]) * other[i];
  }
  const double mean = sum / n, var = sq / n - mean * mean;
  CHECK_MSG(std::abs(mean) < 0.02 && std::abs(var - 1.0) < 0.03, std::to_string(mean) + " " + std::to_string(var));
  CHECK_MSG(std::abs(cross / n) < 0.02, std::to_string(cross / n));
}

}  // namespace

int main() {
  golden_values();
  windows_agree_with_the_full_field();
  looks_standard_normal();
  CHECK_ERROR(esrdf::noise_field(0, 0, -1, 0, 1, 1, 3, nullptr), esrdf::ErrorCode::kInvalidArgument, "non-negative");
  return check::finish("test_noise");
}
