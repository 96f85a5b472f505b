// ESRDF C++ runtime: load an exported bundle and upscale images with the same algorithm as the Python
// runtime (esrdf.runtime): predictor, N step-graph calls, fixed-shape tiles, smooth blending.
//
//   esrdf::Upscaler upscaler("bundle/", {.backend = "openvino"});
//   std::vector<uint8_t> hr = upscaler.upscale_rgb8(rgb, width, height, {.steps = 20, .seed = 7});
//
// The pieces are public too, so a service or a test can use them alone: the bundle reader (hash checks),
// the per-step coefficients (paper Eq. 1-7, as esrdf/runtime/sampling.py), the counter-based noise field
// (bit-identical to esrdf/runtime/noise.py), and the tile plan with its blend weights (tiling.py).
// Errors are esrdf::Error exceptions carrying an ErrorCode; the C API (esrdf_c.h) turns them into codes.
#pragma once

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace esrdf {

// Values match esrdf_status in esrdf_c.h.
enum class ErrorCode : int {
  kInvalidArgument = 1,     // a caller's value is out of range (steps, eta, sizes, sampler name)
  kNotFound = 2,            // a file or directory is missing
  kBadBundle = 3,           // manifest unreadable, wrong format version, or inconsistent with itself
  kHashMismatch = 4,        // a file's sha256 differs from the manifest / aoti.json: modified or corrupted
  kStale = 5,               // an artifact built for another torch/TensorRT/GPU/weights: rebuild it
  kBackendUnavailable = 6,  // the backend is not compiled in, or its library/device is missing
  kBackendFailure = 7,      // the engine failed while running
  kOutOfMemory = 8,
  kInternal = 9,
};

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const noexcept { return code_; }

 private:
  ErrorCode code_;
};

// ---------------------------------------------------------------- bundle (esrdf/runtime/bundle.py)

struct FileEntry {
  std::string role;       // "predictor" | "step"
  std::string precision;  // "fp32" | "fp16"
  std::string file;       // relative to the bundle root
  std::string sha256;
};

struct EngineKey {  // what a TensorRT plan depends on
  std::string tensorrt_version, gpu_name, compute_capability, precision, onnx_sha256;
  std::map<std::string, std::map<std::string, int64_t>> profile;  // {"min"|"opt"|"max": {axis: size}}
};

struct EngineEntry : FileEntry {
  EngineKey key;
};

struct ExportSettings {  // manifest "export": how the bundle was exported (esrdf/runtime/bundle.py)
  std::string checkpoint;  // the checkpoint directory exported; quoted in re-export hints
  int tile = 0;            // LR tile size export measured parity at; the default tile
  int batch = 1;           // tiles per engine call export targeted; the default batch
};

struct WeightsEntry {  // manifest "torch_weights": the eager weights in the bundle, hash-checked
  std::string file;    // relative to the bundle root
  std::string sha256;
};

enum class Sampler { kDdim, kDdpm };
Sampler parse_sampler(const std::string& name);  // "ddim" | "ddpm"

// Where x_T starts: the paper's N(0, I), or the matched N(0, (1 - alpha_bar_{T-1}) I) training ended at.
enum class Prior { kPaper, kMatched };
Prior parse_prior(const std::string& name);  // "paper" | "matched"
// std of x_T under prior: 1, or sqrt(1 - alpha_bar_{T-1}) in float64 (esrdf.runtime.sampling.init_noise_std)
double init_noise_std(const std::vector<double>& alphas_cumprod, Prior prior);

struct SamplingDefaults {  // manifest "sampling": what a request that says nothing runs (bundle.py)
  Sampler sampler = Sampler::kDdim;
  int steps = 0;
  double eta = 0.0;
  Prior prior = Prior::kMatched;
  double init_noise_std = 1.0;  // x_T's std under prior, checked against the schedule when read
};

struct Manifest {
  int format_version = 0;
  std::string model_name;
  int scale = 0;
  int channels = 0;
  int hr_multiple_of = 1;
  std::vector<double> value_range;
  std::string schedule_kind;
  std::vector<double> alphas_cumprod;  // float64, index 0..T-1 (paper Eq. 1-3)
  std::vector<FileEntry> graphs;
  std::vector<EngineEntry> engines;
  ExportSettings exported;
  std::optional<WeightsEntry> torch_weights;  // empty: exported with --no-torch-weights
  // empty: a bundle exported before the section existed; sampling_defaults() then gives the built-in rule
  std::optional<SamplingDefaults> sampling;
  // "parity", "provenance" and "model_config" are checked to be present and otherwise not read.

  int lr_multiple_of() const;  // hr_multiple_of / gcd(hr_multiple_of, scale)
  const FileEntry* graph(const std::string& role, const std::string& precision) const;
  // The "sampling" section, or without one the built-in rule: DDIM, min(50, T) steps, eta 0, matched prior.
  SamplingDefaults sampling_defaults() const;
};

constexpr int kFormatVersion = 2;
constexpr int kBuiltinSteps = 50;  // DDIM steps of the built-in defaults (capped at T), as esrdf.config

// Parse manifest.json text; Error(kBadBundle) naming the key on any missing/mistyped/unknown field.
Manifest parse_manifest(const std::string& json_text);

struct Bundle {
  std::string root;
  Manifest manifest;
};

// Read <dir>/manifest.json; with verify, check the sha256 of every graph, engine and the torch weights.
// A manifest without a "sampling" section loads, with one line on stderr naming the built-in defaults.
Bundle load_bundle(const std::string& dir, bool verify = true);

std::string sha256_file(const std::string& path);  // lowercase hex, streamed
std::string reexport_hint(const Bundle& bundle, const std::string& extra_flags = "");

// ---------------------------------------------------------------- sampling (esrdf/runtime/sampling.py)

struct StepPlan {  // one row per step-graph call, highest t first
  Sampler sampler = Sampler::kDdim;
  double eta = 0.0;
  std::vector<int64_t> timesteps;
  std::vector<float> t;                      // timestep index as float32
  std::vector<std::array<float, 3>> coefs;   // (c_xt, c_eps, c_noise), float32 from float64 formulas
  double init_noise_std = 1.0;               // x_T = init_noise_std * noise field 0 (float32 multiply)
  int num_steps() const { return static_cast<int>(t.size()); }
};

std::vector<int64_t> ddim_timesteps(int64_t num_timesteps, int64_t steps);
// steps <= 0: all T (ddpm requires that). Float64 arithmetic in numpy's order, then float32.
StepPlan plan_steps(const std::vector<double>& alphas_cumprod, Sampler sampler, int steps, double eta,
                    Prior prior = Prior::kPaper);

// ---------------------------------------------------------------- noise (esrdf/runtime/noise.py)

uint64_t noise_bits(uint64_t seed, uint64_t step_index, uint64_t channel, uint64_t y, uint64_t x);
// float32 [channels, height, width] standard normal noise of field step_index at HR (y0, x0).
void noise_field(uint64_t seed, uint64_t step_index, int64_t y0, int64_t x0, int64_t height, int64_t width,
                 int64_t channels, float* out);

// ---------------------------------------------------------------- tiling (esrdf/runtime/tiling.py)

struct Tile {
  int y0 = 0, x0 = 0;  // top-left LR corner in the padded canvas
};

struct TilePlan {
  int height = 0, width = 0;                // LR image
  int padded_height = 0, padded_width = 0;  // LR canvas the tiles cover
  int tile_height = 0, tile_width = 0, overlap = 0;
  std::vector<Tile> tiles;
};

TilePlan plan_tiles(int height, int width, int tile, int overlap, int multiple_of = 1);
// (C, h, w) -> (C, padded_h, padded_w), numpy 'edge' padding on the bottom/right.
std::vector<float> pad_edge(const TilePlan& plan, const float* chw, int channels);
std::vector<float> tile_weights(const TilePlan& plan, const Tile& tile, int scale);  // (th*s, tw*s)

class Blender {  // float32 accumulation in the same order as tiling.Blender
 public:
  Blender(const TilePlan& plan, int scale, int channels);
  void add(const Tile& tile, const float* hr_tile);  // (C, th*s, tw*s)
  std::vector<float> result() const;                 // (C, s*h, s*w), sum(w x) / sum(w)

 private:
  TilePlan plan_;
  int scale_, channels_;
  std::vector<float> sum_, weight_;
};

// ---------------------------------------------------------------- images (esrdf/runtime/images.py)

std::vector<float> rgb8_to_model_range(const uint8_t* rgb, int width, int height);  // HWC -> CHW [-1,1]
std::vector<uint8_t> model_range_to_rgb8(const float* chw, int width, int height);  // clip, round half-even

// ---------------------------------------------------------------- backends

struct BatchShape {
  int batch = 1, channels = 3, lr_height = 0, lr_width = 0, scale = 1;
  int64_t lr_numel() const { return int64_t(batch) * channels * lr_height * lr_width; }
  int64_t hr_numel() const { return lr_numel() * scale * scale; }
};

// Fills the batch's noise of field k (0 = x_T, k >= 1 the k-th update), (B, C, H, W) float32.
using NoiseFill = std::function<void(int k, float* out)>;

// One engine behind the sampler. The runtime does not know which backend it drives.
class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;
  virtual int fixed_batch() const { return 0; }  // 0: any batch; else the driver pads to it
  virtual int fixed_tile() const { return 0; }   // 0: any LR tile; else the only tile size

  // One batch through the whole loop (paper Section 3 with the residual of Section 4):
  //   c = predictor(lr); x = s z_0; x = step(x, c, t_k, coefs_k, z_{k+1}) for k < N; hr = c + x,
  // with s = plan.init_noise_std (scale_initial_noise).
  // The default runs predictor()/step(); TensorRT replays it as one CUDA graph.
  virtual void sample_batch(const BatchShape& shape, const float* lr, const StepPlan& plan,
                            const NoiseFill& noise, float* hr);

 protected:
  virtual void predictor(const BatchShape& shape, const float* lr, float* coarse) = 0;
  // t: [B]; coefs: [B, 3]; x_t, cond, noise, x_prev: (B, C, H, W).
  virtual void step(const BatchShape& shape, const float* x_t, const float* cond, const float* t,
                    const float* coefs, const float* noise, float* x_prev) = 0;
};

// x_T in place: field 0 (n floats) times plan.init_noise_std, in float32 like the Python driver.
void scale_initial_noise(const StepPlan& plan, float* x, size_t n);

// Backends, by name:
//   "openvino[:options]"  the bundle's fp32 ONNX graphs on OpenVINO's CPU plugin, fp32 or bf16 per graph:
//                         "openvino" (= "openvino:fp32"), "openvino:bf16", "openvino:auto" (bf16 where
//                         the CPU has it), "openvino:predictor=fp32,step=bf16"; ",threads=N" caps threads
//   "aoti"                libtorch + the bundle's AOTInductor packages (esrdf-export --aoti), CPU fp32
//   "tensorrt"            the bundle's TensorRT plans, the whole loop as one CUDA graph
std::vector<std::string> available_backends();  // compiled in, of "openvino", "aoti", "tensorrt"
std::string default_backend();  // "openvino" where OpenVINO was found at configure time, else "aoti"
// An empty name opens default_backend().
std::unique_ptr<Backend> open_backend(const Bundle& bundle, const std::string& name);

// ---------------------------------------------------------------- the embeddable API

struct UpscalerOptions {
  std::string backend;  // empty: default_backend()
  int tile = -1;     // LR tile; -1: the backend's fixed tile, else the manifest's export.tile; 0: untiled
  int overlap = -1;  // LR pixels; -1: tile / 8 (as the Python Upscaler)
  int batch = -1;    // tiles per call; -1: the backend's fixed batch, else the manifest's export.batch
  bool verify = true;
};

// What one request asks for; each field left empty (steps 0) is the bundle's default (its manifest's
// "sampling" section, Manifest::sampling_defaults). A sampler other than the default's does not take the
// default's steps: DDPM then runs all T, DDIM min(50, T).
struct SampleOptions {
  int steps = 0;  // 0: the bundle's default; else DDIM 1..T, DDPM T
  std::optional<Sampler> sampler;
  std::optional<double> eta;
  std::optional<Prior> prior;
  uint64_t seed = 0;
};

class Upscaler {
 public:
  explicit Upscaler(const std::string& bundle_dir, const UpscalerOptions& options = {});
  ~Upscaler();
  Upscaler(const Upscaler&) = delete;
  Upscaler& operator=(const Upscaler&) = delete;

  int scale() const { return bundle_.manifest.scale; }
  int tile() const { return tile_; }
  int overlap() const { return overlap_; }
  int batch() const { return batch_; }
  const Bundle& bundle() const { return bundle_; }
  std::string backend_name() const { return backend_->name(); }
  StepPlan step_plan(const SampleOptions& options) const;

  // (C, h, w) float32 in [-1, 1] -> (C, s*h, s*w) float32 in [-1, 1]. Calls are serialised.
  std::vector<float> upscale_chw(const float* chw, int height, int width, const SampleOptions& options);
  // HxWx3 uint8 -> (s*H)x(s*W)x3 uint8.
  std::vector<uint8_t> upscale_rgb8(const uint8_t* rgb, int width, int height, const SampleOptions& options);

 private:
  Bundle bundle_;
  std::unique_ptr<Backend> backend_;
  int tile_ = 0, overlap_ = 0, batch_ = 1;
  std::mutex mutex_;  // backends keep I/O buffers per instance
};

}  // namespace esrdf
