// The extern "C" API (esrdf_c.h): every entry point catches everything, so no exception crosses it.
#include "esrdf/esrdf_c.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <new>

#include "esrdf/esrdf.h"

struct esrdf_handle {
  std::unique_ptr<esrdf::Upscaler> upscaler;
  std::string backend;  // backend_name(), kept for esrdf_backend's pointer
};

namespace {

void write_error(char* buf, size_t len, const std::string& message) {
  if (buf == nullptr || len == 0) return;
  std::snprintf(buf, len, "%s", message.c_str());  // truncates and always NUL-terminates
}

// Runs body, mapping each exception to a status and a message; ESRDF_OK clears err_buf.
template <typename Body>
int guarded(char* err_buf, size_t err_len, Body&& body) {
  try {
    body();
    write_error(err_buf, err_len, "");
    return ESRDF_OK;
  } catch (const esrdf::Error& exc) {
    write_error(err_buf, err_len, exc.what());
    return static_cast<int>(exc.code());
  } catch (const std::bad_alloc&) {
    write_error(err_buf, err_len, "out of memory");
    return ESRDF_ERR_OUT_OF_MEMORY;
  } catch (const std::exception& exc) {
    write_error(err_buf, err_len, std::string("internal error: ") + exc.what());
    return ESRDF_ERR_INTERNAL;
  } catch (...) {
    write_error(err_buf, err_len, "internal error: unknown exception");
    return ESRDF_ERR_INTERNAL;
  }
}

void require(bool ok, const char* what) {
  if (!ok) throw esrdf::Error(esrdf::ErrorCode::kInvalidArgument, what);
}

// 0 / NULL / NaN: the bundle's default (esrdf_c.h).
esrdf::SampleOptions sample_options(int steps, const char* sampler, double eta, const char* prior, uint64_t seed) {
  require(steps >= 0, "steps must be >= 0 (0: the bundle's default)");
  esrdf::SampleOptions options;
  options.steps = steps;
  if (sampler != nullptr) options.sampler = esrdf::parse_sampler(sampler);
  if (!std::isnan(eta)) options.eta = eta;
  if (prior != nullptr) options.prior = esrdf::parse_prior(prior);
  options.seed = seed;
  return options;
}

void check_image_args(const esrdf_handle* handle, const void* in, int w, int h, const void* out) {
  require(handle != nullptr && handle->upscaler != nullptr, "handle is NULL (open it with esrdf_open)");
  require(in != nullptr && out != nullptr, "input and output buffers must not be NULL");
  require(w > 0 && h > 0, "image width and height must be positive");
}

}  // namespace

extern "C" {

const char* esrdf_status_name(int status) {
  static const char* const names[] = {
      "ESRDF_OK",          "ESRDF_ERR_INVALID_ARGUMENT", "ESRDF_ERR_NOT_FOUND",
      "ESRDF_ERR_BAD_BUNDLE", "ESRDF_ERR_HASH_MISMATCH", "ESRDF_ERR_STALE",
      "ESRDF_ERR_BACKEND_UNAVAILABLE", "ESRDF_ERR_BACKEND_FAILURE", "ESRDF_ERR_OUT_OF_MEMORY",
      "ESRDF_ERR_INTERNAL"};
  return status >= 0 && status <= ESRDF_ERR_INTERNAL ? names[status] : "ESRDF_ERR_UNKNOWN";
}

int esrdf_open(const char* bundle_dir, const char* backend, esrdf_handle** out, char* err_buf, size_t err_len) {
  return guarded(err_buf, err_len, [&] {
    require(out != nullptr, "out must not be NULL");
    *out = nullptr;
    require(bundle_dir != nullptr, "bundle_dir must not be NULL");
    esrdf::UpscalerOptions options;
    options.backend = backend == nullptr ? "" : backend;
    auto handle = std::make_unique<esrdf_handle>();
    handle->upscaler = std::make_unique<esrdf::Upscaler>(bundle_dir, options);
    handle->backend = handle->upscaler->backend_name();
    *out = handle.release();
  });
}

int esrdf_scale(const esrdf_handle* handle) {
  return handle == nullptr || handle->upscaler == nullptr ? 0 : handle->upscaler->scale();
}

const char* esrdf_backend(const esrdf_handle* handle) {
  return handle == nullptr || handle->upscaler == nullptr ? "" : handle->backend.c_str();
}

int esrdf_upscale(esrdf_handle* handle, const uint8_t* rgb_in, int w, int h, int steps, const char* sampler,
                  double eta, const char* prior, uint64_t seed, uint8_t* rgb_out, char* err_buf,
                  size_t err_len) {
  return guarded(err_buf, err_len, [&] {
    check_image_args(handle, rgb_in, w, h, rgb_out);
    const auto options = sample_options(steps, sampler, eta, prior, seed);
    const auto hr = handle->upscaler->upscale_rgb8(rgb_in, w, h, options);
    std::memcpy(rgb_out, hr.data(), hr.size());
  });
}

int esrdf_upscale_f32(esrdf_handle* handle, const float* chw_in, int w, int h, int steps, const char* sampler,
                      double eta, const char* prior, uint64_t seed, float* chw_out, char* err_buf,
                      size_t err_len) {
  return guarded(err_buf, err_len, [&] {
    check_image_args(handle, chw_in, w, h, chw_out);
    const auto options = sample_options(steps, sampler, eta, prior, seed);
    const auto hr = handle->upscaler->upscale_chw(chw_in, h, w, options);
    std::memcpy(chw_out, hr.data(), hr.size() * sizeof(float));
  });
}

void esrdf_close(esrdf_handle* handle) { delete handle; }  // destructors are noexcept: nothing escapes

int esrdf_noise_field(uint64_t seed, uint64_t step_index, int64_t y0, int64_t x0, int64_t height, int64_t width,
                      int64_t channels, float* out, char* err_buf, size_t err_len) {
  return guarded(err_buf, err_len, [&] {
    require(out != nullptr || height * width * channels == 0, "out must not be NULL");
    esrdf::noise_field(seed, step_index, y0, x0, height, width, channels, out);
  });
}

}  // extern "C"
