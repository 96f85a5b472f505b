// The driver (esrdf/runtime/driver.py and upscaler.py): tiles -> predictor -> N steps -> blend -> clip.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "esrdf/esrdf.h"

namespace esrdf {
namespace {

constexpr int kDefaultTile = 64;   // LR pixels, when neither the caller, the backend nor the bundle says

int first_positive(int a, int b, int c) { return a > 0 ? a : (b > 0 ? b : c); }

// (C, tile_h, tile_w) window of the (C, ph, pw) canvas at LR corner (y0, x0).
void cut(const std::vector<float>& canvas, const TilePlan& p, const Tile& tile, int channels, float* out) {
  for (int c = 0; c < channels; ++c) {
    for (int y = 0; y < p.tile_height; ++y) {
      const float* src =
          canvas.data() + (static_cast<size_t>(c) * p.padded_height + tile.y0 + y) * p.padded_width + tile.x0;
      std::memcpy(out + (static_cast<size_t>(c) * p.tile_height + y) * p.tile_width, src,
                  sizeof(float) * static_cast<size_t>(p.tile_width));
    }
  }
}

}  // namespace

std::vector<float> rgb8_to_model_range(const uint8_t* rgb, int width, int height) {
  const size_t plane = static_cast<size_t>(width) * height;
  std::vector<float> chw(3 * plane);
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) chw[c * plane + i] = static_cast<float>(rgb[i * 3 + c]) / 127.5f - 1.0f;
  }
  return chw;
}

std::vector<uint8_t> model_range_to_rgb8(const float* chw, int width, int height) {
  const size_t plane = static_cast<size_t>(width) * height;
  std::vector<uint8_t> rgb(3 * plane);
  for (size_t i = 0; i < plane; ++i) {
    for (int c = 0; c < 3; ++c) {
      const float v = (std::clamp(chw[c * plane + i], -1.0f, 1.0f) + 1.0f) * 127.5f;
      rgb[i * 3 + c] = static_cast<uint8_t>(std::nearbyint(v));  // numpy's rint: half to even
    }
  }
  return rgb;
}

Upscaler::Upscaler(const std::string& bundle_dir, const UpscalerOptions& options)
    : bundle_(load_bundle(bundle_dir, options.verify)) {
  const Manifest& m = bundle_.manifest;
  if (m.channels != 3 || m.value_range != std::vector<double>{-1.0, 1.0}) {
    throw Error(ErrorCode::kBadBundle, bundle_dir + ": graphs for " + std::to_string(m.channels) +
                                           " channels; this runtime upscales RGB images in [-1, 1]");
  }
  backend_ = open_backend(bundle_, options.backend);
  const int fixed_tile = backend_->fixed_tile(), fixed_batch = backend_->fixed_batch();
  tile_ = options.tile >= 0 ? options.tile : first_positive(fixed_tile, m.exported.tile, kDefaultTile);
  batch_ = first_positive(options.batch, fixed_batch, m.exported.batch);
  if (fixed_tile > 0 && tile_ != fixed_tile) {
    throw Error(ErrorCode::kInvalidArgument, "the " + backend_->name() + " backend runs " +
                                                 std::to_string(fixed_tile) + "-pixel LR tiles only; got tile=" +
                                                 std::to_string(tile_));
  }
  if (fixed_batch > 0 && batch_ != fixed_batch) {
    throw Error(ErrorCode::kInvalidArgument, "the " + backend_->name() + " backend runs batches of " +
                                                 std::to_string(fixed_batch) + " tiles; got batch=" +
                                                 std::to_string(batch_));
  }
  // Default seam: 1/8 of the tile, as the Python Upscaler.
  overlap_ = tile_ == 0 ? 0 : (options.overlap < 0 ? tile_ / 8 : options.overlap);
  if (tile_ > 0 && (overlap_ < 0 || overlap_ >= tile_)) {
    throw Error(ErrorCode::kInvalidArgument, "overlap must be in [0, tile=" + std::to_string(tile_) + ")");
  }
}

Upscaler::~Upscaler() = default;

// What the request leaves out comes from the bundle's defaults (SamplingOptions.resolve in esrdf/config.py).
StepPlan Upscaler::step_plan(const SampleOptions& options) const {
  const auto& ab = bundle_.manifest.alphas_cumprod;
  const SamplingDefaults d = bundle_.manifest.sampling_defaults();
  const Sampler sampler = options.sampler.value_or(d.sampler);
  int steps = options.steps;
  if (steps <= 0 && sampler == d.sampler) steps = d.steps;  // another sampler does not take the default's steps
  if (steps <= 0 && sampler == Sampler::kDdim) steps = std::min<int>(kBuiltinSteps, int(ab.size()));
  return plan_steps(ab, sampler, steps, options.eta.value_or(d.eta), options.prior.value_or(d.prior));
}

std::vector<float> Upscaler::upscale_chw(const float* chw, int height, int width, const SampleOptions& options) {
  const StepPlan plan = step_plan(options);
  const int channels = bundle_.manifest.channels, scale = bundle_.manifest.scale;
  const TilePlan tiles = plan_tiles(height, width, tile_, overlap_, bundle_.manifest.lr_multiple_of());
  const std::vector<float> canvas = pad_edge(tiles, chw, channels);
  const bool pad_batch = backend_->fixed_batch() > 0;
  Blender blender(tiles, scale, channels);
  std::lock_guard<std::mutex> lock(mutex_);
  for (size_t first = 0; first < tiles.tiles.size(); first += static_cast<size_t>(batch_)) {
    const size_t end = std::min(tiles.tiles.size(), first + static_cast<size_t>(batch_));
    std::vector<Tile> group(tiles.tiles.begin() + static_cast<std::ptrdiff_t>(first),
                            tiles.tiles.begin() + static_cast<std::ptrdiff_t>(end));
    const size_t real = group.size();
    // A fixed-shape engine gets the last batch padded with repeats of its last tile; extra outputs drop.
    while (pad_batch && group.size() < static_cast<size_t>(batch_)) group.push_back(group.back());
    BatchShape shape{static_cast<int>(group.size()), channels, tiles.tile_height, tiles.tile_width, scale};
    const size_t lr_tile = static_cast<size_t>(shape.lr_numel()) / group.size();
    const size_t hr_tile = lr_tile * scale * scale;
    std::vector<float> lr(static_cast<size_t>(shape.lr_numel())), hr(static_cast<size_t>(shape.hr_numel()));
    for (size_t i = 0; i < group.size(); ++i) cut(canvas, tiles, group[i], channels, lr.data() + i * lr_tile);
    // Tiles are cut from one full-image noise field: noise depends only on global HR coordinates.
    const NoiseFill noise = [&](int k, float* out) {
      for (size_t i = 0; i < group.size(); ++i) {
        noise_field(options.seed, static_cast<uint64_t>(k), int64_t(group[i].y0) * scale,
                    int64_t(group[i].x0) * scale, int64_t(tiles.tile_height) * scale,
                    int64_t(tiles.tile_width) * scale, channels, out + i * hr_tile);
      }
    };
    backend_->sample_batch(shape, lr.data(), plan, noise, hr.data());
    for (size_t i = 0; i < real; ++i) blender.add(group[i], hr.data() + i * hr_tile);
  }
  std::vector<float> out = blender.result();
  for (float& v : out) v = std::clamp(v, -1.0f, 1.0f);
  return out;
}

std::vector<uint8_t> Upscaler::upscale_rgb8(const uint8_t* rgb, int width, int height,
                                            const SampleOptions& options) {
  const std::vector<float> lr = rgb8_to_model_range(rgb, width, height);
  const std::vector<float> hr = upscale_chw(lr.data(), height, width, options);
  return model_range_to_rgb8(hr.data(), width * scale(), height * scale());
}

}  // namespace esrdf
