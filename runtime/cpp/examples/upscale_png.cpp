// Read a PNG, upscale it with an ESRDF bundle, write a PNG.
//
//   upscale_png BUNDLE IN.png OUT.png [--steps N] [--sampler ddim|ddpm] [--eta E] [--prior matched|paper]
//               [--seed S] [--backend openvino[:bf16]|aoti|tensorrt]
//   (each sampling flag left out: the bundle's default; no --backend: the library's default)
//
// Uses only the C API (esrdf_c.h), as a service in another language would. PNGs are read with libpng's
// simplified API as 8-bit sRGB RGB: grey and palette images are expanded, 16-bit images reduced, and an
// alpha channel is composited onto black (the Python CLI drops alpha instead, so compare RGB inputs).
// The output is written to a temporary file next to OUT.png and renamed into place.
#include <png.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "esrdf/esrdf_c.h"

namespace {

struct Args {
  std::string bundle, input, output, sampler, prior, backend;  // "": the bundle's / library's default
  int steps = 0;
  double eta = ESRDF_DEFAULT_ETA;
  unsigned long long seed = 0;
};

int usage(const char* why) {
  std::fprintf(stderr,
               "error: %s\nusage: upscale_png BUNDLE IN.png OUT.png [--steps N] [--sampler ddim|ddpm] "
               "[--eta E] [--prior matched|paper] [--seed S] [--backend openvino[:bf16]|aoti|tensorrt]\n",
               why);
  return 2;
}

bool parse(int argc, char** argv, Args& a) {
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg.rfind("--", 0) != 0) {
      positional.push_back(arg);
      continue;
    }
    if (i + 1 >= argc) return false;
    const char* value = argv[++i];
    if (arg == "--steps") a.steps = std::atoi(value);
    else if (arg == "--sampler") a.sampler = value;
    else if (arg == "--eta") a.eta = std::atof(value);
    else if (arg == "--prior") a.prior = value;
    else if (arg == "--seed") a.seed = std::strtoull(value, nullptr, 10);
    else if (arg == "--backend") a.backend = value;
    else return false;
  }
  if (positional.size() != 3) return false;
  a.bundle = positional[0];
  a.input = positional[1];
  a.output = positional[2];
  return true;
}

bool read_png(const std::string& path, std::vector<uint8_t>& rgb, int& width, int& height) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  if (!png_image_begin_read_from_file(&image, path.c_str())) {
    std::fprintf(stderr, "error: %s: %s\n", path.c_str(), image.message);
    return false;
  }
  image.format = PNG_FORMAT_RGB;
  rgb.resize(PNG_IMAGE_SIZE(image));
  if (!png_image_finish_read(&image, nullptr, rgb.data(), 0, nullptr)) {
    std::fprintf(stderr, "error: %s: %s\n", path.c_str(), image.message);
    return false;
  }
  width = static_cast<int>(image.width);
  height = static_cast<int>(image.height);
  return true;
}

bool write_png(const std::string& path, const std::vector<uint8_t>& rgb, int width, int height) {
  png_image image;
  std::memset(&image, 0, sizeof image);
  image.version = PNG_IMAGE_VERSION;
  image.width = static_cast<png_uint_32>(width);
  image.height = static_cast<png_uint_32>(height);
  image.format = PNG_FORMAT_RGB;
  const std::string partial = path + ".esrdf-partial";  // never leave a half-written OUT.png
  if (!png_image_write_to_file(&image, partial.c_str(), 0, rgb.data(), 0, nullptr) ||
      std::rename(partial.c_str(), path.c_str()) != 0) {
    std::fprintf(stderr, "error: %s: %s\n", path.c_str(), image.message[0] ? image.message : "cannot write");
    std::remove(partial.c_str());
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  if (!parse(argc, argv, args)) return usage("bad arguments");
  std::vector<uint8_t> rgb;
  int width = 0, height = 0;
  if (!read_png(args.input, rgb, width, height)) return 1;

  char err[1024];
  esrdf_handle* handle = nullptr;
  int rc = esrdf_open(args.bundle.c_str(), args.backend.c_str(), &handle, err, sizeof err);
  if (rc != ESRDF_OK) {
    std::fprintf(stderr, "error: %s (%s)\n", err, esrdf_status_name(rc));
    return 1;
  }
  const int scale = esrdf_scale(handle);
  std::vector<uint8_t> out(static_cast<size_t>(width) * scale * height * scale * 3);
  rc = esrdf_upscale(handle, rgb.data(), width, height, args.steps,
                     args.sampler.empty() ? nullptr : args.sampler.c_str(), args.eta,
                     args.prior.empty() ? nullptr : args.prior.c_str(), args.seed, out.data(), err, sizeof err);
  esrdf_close(handle);
  if (rc != ESRDF_OK) {
    std::fprintf(stderr, "error: %s (%s)\n", err, esrdf_status_name(rc));
    return 1;
  }
  if (!write_png(args.output, out, width * scale, height * scale)) return 1;
  std::printf("wrote %s (%dx%d)\n", args.output.c_str(), width * scale, height * scale);
  return 0;
}
