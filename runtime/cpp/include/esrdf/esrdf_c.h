/* ESRDF C API: the C++ runtime behind plain functions, for embedding from C, Go, Rust, Python (ctypes)...
 *
 *   char err[512];
 *   esrdf_handle* h = NULL;
 *   if (esrdf_open("bundle/", NULL, &h, err, sizeof err) != ESRDF_OK) { puts(err); return 1; }
 *   uint8_t* out = malloc((size_t)w * esrdf_scale(h) * h_px * esrdf_scale(h) * 3);
 *   int rc = esrdf_upscale(h, rgb, w, h_px, 0, NULL, ESRDF_DEFAULT_ETA, NULL, 7, out, err, sizeof err);
 *   esrdf_close(h);
 *
 * Every function returns an esrdf_status; on failure a one-line message (what failed, which file, what to
 * do) is written to err_buf, always NUL-terminated and truncated to err_len. No C++ exception crosses
 * this boundary. Images are interleaved RGB, 8 bits per channel, rows top to bottom, no padding.
 * A handle may be used from several threads; its calls take turns.
 */
#ifndef ESRDF_C_H
#define ESRDF_C_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

/* eta argument meaning "the bundle's default eta" */
#define ESRDF_DEFAULT_ETA ((double)NAN)

#ifdef __cplusplus
extern "C" {
#endif

typedef enum esrdf_status {
  ESRDF_OK = 0,
  ESRDF_ERR_INVALID_ARGUMENT = 1,
  ESRDF_ERR_NOT_FOUND = 2,
  ESRDF_ERR_BAD_BUNDLE = 3,
  ESRDF_ERR_HASH_MISMATCH = 4, /* a bundle file was modified or corrupted */
  ESRDF_ERR_STALE = 5,         /* built for another torch/TensorRT/GPU/weights: rebuild it */
  ESRDF_ERR_BACKEND_UNAVAILABLE = 6,
  ESRDF_ERR_BACKEND_FAILURE = 7,
  ESRDF_ERR_OUT_OF_MEMORY = 8,
  ESRDF_ERR_INTERNAL = 9
} esrdf_status;

typedef struct esrdf_handle esrdf_handle;

/* Short name of a status, e.g. "ESRDF_ERR_HASH_MISMATCH"; never NULL. */
const char* esrdf_status_name(int status);

/* Open a bundle with a backend: "openvino" (fp32), "openvino:bf16", "openvino:auto" (bf16 where the CPU
 * has it), "openvino:predictor=fp32,step=bf16", "aoti" or "tensorrt"; NULL or "" means the library's default ("openvino" where it was built with
 * OpenVINO, else "aoti"). Verifies every sha256. */
int esrdf_open(const char* bundle_dir, const char* backend, esrdf_handle** out, char* err_buf, size_t err_len);

/* The backend a handle runs, with its options spelled out (e.g. "openvino:predictor=fp32,step=bf16");
 * "" for a NULL handle. Valid until the handle is closed. */
const char* esrdf_backend(const esrdf_handle* handle);

/* Scale factor of the bundle's model (output is scale*w x scale*h); 0 for a NULL handle. */
int esrdf_scale(const esrdf_handle* handle);

/* Upscale rgb_in (w x h x 3) into rgb_out (scale*w x scale*h x 3, caller-allocated).
 * Each sampling argument can say "the bundle's default" (its manifest's sampling section):
 *   steps: 0 = default, else DDIM 1..T, DDPM T;   sampler: "ddim" | "ddpm", NULL = default;
 *   eta in [0, 1] (DDIM), ESRDF_DEFAULT_ETA (NaN) = default;
 *   prior: "matched" (x_T ~ N(0, (1 - alpha_bar_T) I)) | "paper" (N(0, I)), NULL = default.
 * seed selects the counter-based noise field (same seed -> same image as Python). */
int esrdf_upscale(esrdf_handle* handle, const uint8_t* rgb_in, int w, int h, int steps, const char* sampler,
                  double eta, const char* prior, uint64_t seed, uint8_t* rgb_out, char* err_buf,
                  size_t err_len);

/* As esrdf_upscale, on planar float32 (3, h, w) images in [-1, 1]; chw_out holds 3 * scale^2 * h * w. */
int esrdf_upscale_f32(esrdf_handle* handle, const float* chw_in, int w, int h, int steps, const char* sampler,
                      double eta, const char* prior, uint64_t seed, float* chw_out, char* err_buf,
                      size_t err_len);

/* Release a handle; NULL is allowed. */
void esrdf_close(esrdf_handle* handle);

/* The noise field the sampler uses: float32 (channels, height, width) of field step_index at HR (y0, x0). */
int esrdf_noise_field(uint64_t seed, uint64_t step_index, int64_t y0, int64_t x0, int64_t height,
                      int64_t width, int64_t channels, float* out, char* err_buf, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* ESRDF_C_H */
