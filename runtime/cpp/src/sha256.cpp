// Streamed SHA-256 of a file with OpenSSL's EVP interface (libcrypto), as esrdf.runtime.bundle.sha256_file.
#include <openssl/evp.h>

#include <cstdio>
#include <memory>
#include <vector>

#include "backends.h"
#include "esrdf/esrdf.h"

namespace esrdf {
namespace {

using Context = std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)>;

Context sha256_context() {
  Context ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    throw Error(ErrorCode::kInternal, "OpenSSL could not initialise SHA-256");
  }
  return ctx;
}

std::string hex_digest(EVP_MD_CTX* ctx) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx, digest, &length);
  static const char* hex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < length; ++i) {
    out += hex[digest[i] >> 4];
    out += hex[digest[i] & 15];
  }
  return out;
}

}  // namespace

std::string detail::sha256_bytes(const void* data, size_t size) {
  Context ctx = sha256_context();
  EVP_DigestUpdate(ctx.get(), data, size);
  return hex_digest(ctx.get());
}

std::string sha256_file(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!file) throw Error(ErrorCode::kNotFound, path + ": cannot open for hashing");
  Context ctx = sha256_context();
  std::vector<unsigned char> buffer(1 << 20);  // graphs can be hundreds of MB: stream in 1 MiB reads
  size_t got = 0;
  while ((got = std::fread(buffer.data(), 1, buffer.size(), file.get())) > 0) {
    EVP_DigestUpdate(ctx.get(), buffer.data(), got);
  }
  if (std::ferror(file.get())) throw Error(ErrorCode::kNotFound, path + ": read error while hashing");
  return hex_digest(ctx.get());
}

}  // namespace esrdf
