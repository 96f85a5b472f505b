// Per-step coefficients of the reverse process in the step graph's affine form (esrdf/runtime/sampling.py):
//
//   x_prev = c_xt * x_t + c_eps * eps_theta(concat[c, x_t], t) + c_noise * z        (paper Eq. 6-7)
//
// DDIM (Song et al. 2021, Eq. 12) with eta, and DDPM ancestral with the posterior variance (paper Eq. 6-7),
// from alphas_cumprod (paper Eq. 1-3) in float64, cast to float32 at the end. Every operation is the one
// numpy performs, in the same order (CMake builds this file with -ffp-contract=off: no fused multiply-add),
// and sqrt/+/-/*// are correctly rounded IEEE operations, so the float32 results equal Python's bit for bit.
// Zero terminal SNR (alpha_bar == 0 at the last index): x0_hat = 0 there, as the Python runtime does.
#include <algorithm>
#include <cmath>
#include <set>

#include "esrdf/esrdf.h"

namespace esrdf {
namespace {

using Row = std::array<double, 3>;

void alpha_bars(const std::vector<double>& ab, const std::vector<int64_t>& ts, size_t k, double& ab_t,
                double& ab_p) {
  ab_t = ab[static_cast<size_t>(ts[k])];
  ab_p = k + 1 < ts.size() ? ab[static_cast<size_t>(ts[k + 1])] : 1.0;  // alpha_bar_prev = 1 after the last
}

Row ddim_row(double ab_t, double ab_p, double eta) {
  const double sigma = eta * std::sqrt((1.0 - ab_p) / (1.0 - ab_t)) * std::sqrt(1.0 - ab_t / ab_p);
  const double bracket = 1.0 - ab_p - sigma * sigma;  // numpy's x**2 is x*x
  const double direction = std::sqrt(std::isnan(bracket) ? bracket : std::max(bracket, 0.0));
  // x0_hat = a x_t - b eps (inverting paper Eq. 3); (0, 0) at zero SNR.
  const bool zero_snr = ab_t == 0.0;
  const double safe = zero_snr ? 1.0 : ab_t;
  const double a = zero_snr ? 0.0 : 1.0 / std::sqrt(safe);
  const double b = zero_snr ? 0.0 : std::sqrt((1.0 - safe) / safe);
  return {std::sqrt(ab_p) * a, direction - std::sqrt(ab_p) * b, sigma};
}

Row ddpm_row(double ab_t, double ab_p) {
  const double alpha_t = ab_t / ab_p;
  const double beta_t = 1.0 - alpha_t;
  const bool zero_snr = ab_t == 0.0;
  const double safe_alpha = zero_snr ? 1.0 : alpha_t;
  const double c_xt = zero_snr ? 0.0 : 1.0 / std::sqrt(safe_alpha);
  const double c_eps = zero_snr ? 0.0 : -beta_t / (std::sqrt(safe_alpha) * std::sqrt(1.0 - ab_t));
  const double posterior_variance = beta_t * (1.0 - ab_p) / (1.0 - ab_t);
  const double clamped = std::isnan(posterior_variance) ? posterior_variance : std::max(posterior_variance, 0.0);
  return {c_xt, c_eps, std::sqrt(clamped)};
}

void check_schedule(const std::vector<double>& ab) {
  bool ok = !ab.empty() && ab.back() >= 0.0;
  for (size_t i = 0; ok && i < ab.size(); ++i) ok = ab[i] <= 1.0 && (i + 1 == ab.size() || ab[i] > 0.0);
  if (!ok) {
    throw Error(ErrorCode::kBadBundle, "alphas_cumprod must be a 1-D array in (0, 1], only its last value may be 0");
  }
}

}  // namespace

Sampler parse_sampler(const std::string& name) {
  if (name == "ddim") return Sampler::kDdim;
  if (name == "ddpm") return Sampler::kDdpm;
  throw Error(ErrorCode::kInvalidArgument, "unknown sampler '" + name + "'; expected ddim or ddpm");
}

Prior parse_prior(const std::string& name) {
  if (name == "matched") return Prior::kMatched;
  if (name == "paper") return Prior::kPaper;
  throw Error(ErrorCode::kInvalidArgument, "unknown prior '" + name + "'; expected matched or paper");
}

double init_noise_std(const std::vector<double>& alphas_cumprod, Prior prior) {
  if (prior == Prior::kPaper || alphas_cumprod.empty()) return 1.0;
  return std::sqrt(1.0 - alphas_cumprod.back());  // correctly rounded, as numpy's float64 sqrt
}

// np.unique(np.linspace(T-1, 0, steps).round().astype(np.int64))[::-1], with numpy's linspace arithmetic:
// y_i = i * ((stop - start) / (steps - 1)) + start, the last value set to stop; round half to even.
std::vector<int64_t> ddim_timesteps(int64_t num_timesteps, int64_t steps) {
  if (steps < 1 || steps > num_timesteps) {
    throw Error(ErrorCode::kInvalidArgument, "steps must be in 1.." + std::to_string(num_timesteps) +
                                                 " (the schedule's T), got " + std::to_string(steps));
  }
  const double start = static_cast<double>(num_timesteps - 1), stop = 0.0;
  const double delta = stop - start;
  const int64_t div = steps - 1;
  std::set<int64_t> unique;
  for (int64_t i = 0; i < steps; ++i) {
    double y = 0.0;
    if (div == 0) {
      y = static_cast<double>(i) * delta + start;
    } else if (delta / static_cast<double>(div) == 0.0) {  // numpy's denormal-step branch
      y = static_cast<double>(i) / static_cast<double>(div) * delta + start;
    } else {
      y = static_cast<double>(i) * (delta / static_cast<double>(div)) + start;
    }
    if (div > 0 && i == steps - 1) y = stop;
    unique.insert(static_cast<int64_t>(std::nearbyint(y)));  // default rounding mode: half to even
  }
  return {unique.rbegin(), unique.rend()};
}

StepPlan plan_steps(const std::vector<double>& alphas_cumprod, Sampler sampler, int steps, double eta,
                    Prior prior) {
  check_schedule(alphas_cumprod);
  const auto num_timesteps = static_cast<int64_t>(alphas_cumprod.size());
  StepPlan plan;
  plan.sampler = sampler;
  plan.eta = eta;
  plan.init_noise_std = init_noise_std(alphas_cumprod, prior);
  std::vector<Row> rows;
  if (sampler == Sampler::kDdim) {
    if (!(eta >= 0.0 && eta <= 1.0)) {
      // Past 1, 1 - ab_p - sigma^2 goes negative: the DDIM family is only defined up to eta = 1.
      throw Error(ErrorCode::kInvalidArgument, "eta must be in [0, 1], got " + std::to_string(eta));
    }
    plan.timesteps = ddim_timesteps(num_timesteps, steps <= 0 ? num_timesteps : steps);
  } else {
    if (steps > 0 && steps != num_timesteps) {
      throw Error(ErrorCode::kInvalidArgument, "ddpm samples all T=" + std::to_string(num_timesteps) +
                                                   " steps; got steps=" + std::to_string(steps) +
                                                   " (use ddim to skip)");
    }
    for (int64_t t = num_timesteps - 1; t >= 0; --t) plan.timesteps.push_back(t);
  }
  for (size_t k = 0; k < plan.timesteps.size(); ++k) {
    double ab_t = 0.0, ab_p = 0.0;
    alpha_bars(alphas_cumprod, plan.timesteps, k, ab_t, ab_p);
    const Row row = sampler == Sampler::kDdim ? ddim_row(ab_t, ab_p, eta) : ddpm_row(ab_t, ab_p);
    for (double c : row) {
      if (!std::isfinite(c)) throw Error(ErrorCode::kBadBundle, "schedule gives non-finite step coefficients");
    }
    plan.t.push_back(static_cast<float>(plan.timesteps[k]));
    plan.coefs.push_back({static_cast<float>(row[0]), static_cast<float>(row[1]), static_cast<float>(row[2])});
  }
  return plan;
}

}  // namespace esrdf
