// Step coefficients against float32 values esrdf.runtime.sampling.plan_steps printed, bit for bit, plus the
// project's DDIM timestep rule (round half to even) and the argument checks. tests/test_cpp_runtime.py
// compares full plans on the exported bundle's schedule too.
#include <cstring>

#include "check.h"

namespace {

using esrdf::Sampler;
using Rows = std::vector<std::array<float, 3>>;

bool same_bits(const Rows& got, const Rows& want) {
  return got.size() == want.size() && std::memcmp(got.data(), want.data(), sizeof(float) * 3 * got.size()) == 0;
}

void timesteps_follow_the_project_rule() {
  using V = std::vector<int64_t>;
  CHECK((esrdf::ddim_timesteps(200, 3) == V{199, 100, 0}));  // 99.5 rounds to even
  CHECK((esrdf::ddim_timesteps(200, 7) == V{199, 166, 133, 100, 66, 33, 0}));
  CHECK((esrdf::ddim_timesteps(1000, 13) == V{999, 916, 832, 749, 666, 583, 500, 416, 333, 250, 166, 83, 0}));
  CHECK((esrdf::ddim_timesteps(10, 10) == V{9, 8, 7, 6, 5, 4, 3, 2, 1, 0}));
  CHECK((esrdf::ddim_timesteps(5, 1) == V{4}));
  const auto fifty = esrdf::ddim_timesteps(200, 50);
  CHECK(fifty.size() == 50 && fifty[8] == 167 && fifty[9] == 162 && fifty[25] == 97 && fifty[41] == 32);
}

void coefficients_match_python() {
  const std::vector<double> ab{0.9, 0.5, 0.1};
  const Rows ddpm{{0x1.1e377ap+1f, -0x1.e2b7dep+0f, 0x1.555556p-1f},
                  {0x1.5775c6p+0f, -0x1.afc19ep-1f, 0x1.314c3ep-2f},
                  {0x1.0dd902p+0f, -0x1.555556p-2f, 0.0f}};
  const auto half = esrdf::plan_steps(ab, Sampler::kDdim, 2, 0.5);
  CHECK((half.timesteps == std::vector<int64_t>{2, 0}));
  CHECK(same_bits(half.coefs, Rows{{0x1.8p+1f, -0x1.492b08p+1f, 0x1.41cfeap-3f}, ddpm[2]}));
  CHECK(same_bits(esrdf::plan_steps(ab, Sampler::kDdpm, 0, 0.0).coefs, ddpm));
  // DDIM with eta = 1 over every index is DDPM ancestral sampling (Song et al. 2021, Section 4.1).
  CHECK(same_bits(esrdf::plan_steps(ab, Sampler::kDdim, 3, 1.0).coefs, ddpm));
  CHECK((half.t == std::vector<float>{2.0f, 0.0f}));
}

void zero_terminal_snr_takes_x0_hat_zero() {
  const std::vector<double> ab{0.99, 0.7, 0.3, 0.0};
  const auto ddim = esrdf::plan_steps(ab, Sampler::kDdim, 4, 0.3);
  CHECK(same_bits(ddim.coefs, Rows{{0.0f, 0x1.98a38ep-1f, 0x1.0105ap-2f},
                                   {0x1.870be4p+0f, -0x1.8068fcp-1f, 0x1.300c94p-3f},
                                   {0x1.3071dep+0f, -0x1.1c9a9ep-1f, 0x1.e5b172p-6f},
                                   {0x1.014a28p+0f, -0x1.9ba9dap-4f, 0.0f}}));
  const auto ddpm = esrdf::plan_steps(ab, Sampler::kDdpm, 4, 0.0);
  CHECK(same_bits(Rows{ddpm.coefs[0], ddpm.coefs[1]},
                  Rows{{0.0f, 0.0f, 0x1.ac5eb4p-1f}, {0x1.870be4p+0f, -0x1.0b1478p+0f, 0x1.fabfa2p-2f}}));
}

void bad_arguments_are_refused() {
  const std::vector<double> ab{0.9, 0.5, 0.1};
  using esrdf::ErrorCode;
  CHECK_ERROR(esrdf::plan_steps(ab, Sampler::kDdim, 4, 0.0), ErrorCode::kInvalidArgument, "steps must be in 1..3");
  CHECK_ERROR(esrdf::plan_steps(ab, Sampler::kDdim, 2, 1.5), ErrorCode::kInvalidArgument, "eta must be in [0, 1]");
  CHECK_ERROR(esrdf::plan_steps(ab, Sampler::kDdpm, 2, 0.0), ErrorCode::kInvalidArgument, "use ddim to skip");
  CHECK_ERROR(esrdf::plan_steps({0.5, 0.0, 0.0}, Sampler::kDdim, 2, 0.0), ErrorCode::kBadBundle, "only its last");
  CHECK_ERROR(esrdf::parse_sampler("euler"), ErrorCode::kInvalidArgument, "unknown sampler 'euler'");
}

}  // namespace

int main() {
  timesteps_follow_the_project_rule();
  coefficients_match_python();
  zero_terminal_snr_takes_x0_hat_zero();
  bad_arguments_are_refused();
  return check::finish("test_sampling");
}
