// Tile plans, numpy-style edge padding and the blend, against values esrdf.runtime.tiling gives.
#include <cmath>

#include "check.h"

namespace {

std::vector<int> starts_x(const esrdf::TilePlan& p) {
  std::vector<int> xs;
  for (const auto& t : p.tiles) if (t.y0 == 0) xs.push_back(t.x0);
  return xs;
}

void plans_clamp_the_last_tile() {
  const auto p = esrdf::plan_tiles(13, 21, 8, 1);
  CHECK((starts_x(p) == std::vector<int>{0, 7, 13}));  // range(0, 13, 7) + [21 - 8]
  CHECK(p.tiles.size() == 6 && p.padded_height == 13 && p.padded_width == 21);
  const auto small = esrdf::plan_tiles(3, 5, 8, 1);  // smaller than a tile: padded up to it
  CHECK(small.tiles.size() == 1 && small.padded_height == 8 && small.padded_width == 8);
  const auto whole = esrdf::plan_tiles(10, 13, 0, 0, 4);  // tile=0: one tile up to the size multiple
  CHECK(whole.tiles.size() == 1 && whole.tile_height == 12 && whole.tile_width == 16);
  CHECK_ERROR(esrdf::plan_tiles(8, 8, 6, 1, 4), esrdf::ErrorCode::kInvalidArgument, "multiple of 4");
  CHECK_ERROR(esrdf::plan_tiles(8, 8, 8, 8, 4), esrdf::ErrorCode::kInvalidArgument, "overlap");
}

void edge_padding_is_numpys() {
  // np.pad([[0, 1, 2]], ((0, 0), (0, 5)), mode="edge") -> [0 1 2 2 2 2 2 2]: the last sample repeated.
  const auto p = esrdf::plan_tiles(1, 3, 8, 0);
  const float row[3] = {0.f, 1.f, 2.f};
  const auto padded = esrdf::pad_edge(p, row, 1);
  const float want[8] = {0, 1, 2, 2, 2, 2, 2, 2};
  bool same = true;
  for (int y = 0; y < 8; ++y)  // a single row is repeated downwards
    for (int x = 0; x < 8; ++x) same &= padded[static_cast<size_t>(y) * 8 + x] == want[x];
  CHECK(same);
}

void weights_ramp_only_towards_neighbours() {
  const auto p = esrdf::plan_tiles(13, 21, 8, 2);
  const int s = 2, n = 16;
  const auto w = esrdf::tile_weights(p, p.tiles[0], s);  // top-left: neighbours right and below
  CHECK(w[0] == 1.0f);                                   // canvas corner keeps full weight
  CHECK(w[static_cast<size_t>(n) - 1] > 0.0f && w[static_cast<size_t>(n) - 1] < 0.05f);
  // raised cosine at pixel centres over 4 HR pixels: 0.5 - 0.5 cos(pi (i + 0.5) / 4)
  CHECK(std::abs(w[static_cast<size_t>(n) - 4] - float(0.5 - 0.5 * std::cos(M_PI * 3.5 / 4))) < 1e-7f);
  float min_w = 1.f;
  for (const auto& t : p.tiles)
    for (float v : esrdf::tile_weights(p, t, s)) min_w = std::min(min_w, v);
  CHECK(min_w > 0.0f);
}

void blending_agreeing_tiles_returns_the_image() {
  const int c = 3, s = 4;
  const auto p = esrdf::plan_tiles(13, 21, 8, 1);
  const int H = p.padded_height * s, W = p.padded_width * s, th = p.tile_height * s, tw = p.tile_width * s;
  std::vector<float> canvas(static_cast<size_t>(c) * H * W);
  for (int k = 0; k < c; ++k)  // a structured image: smooth gradients plus a fine texture
    for (int y = 0; y < H; ++y)
      for (int x = 0; x < W; ++x)
        canvas[(static_cast<size_t>(k) * H + y) * W + x] = std::sin(0.37f * x + k) * std::cos(0.23f * y) + 0.01f * x;
  esrdf::Blender blender(p, s, c);
  std::vector<float> tile(static_cast<size_t>(c) * th * tw);
  for (const auto& t : p.tiles) {
    for (int k = 0; k < c; ++k)
      for (int y = 0; y < th; ++y)
        for (int x = 0; x < tw; ++x)
          tile[(static_cast<size_t>(k) * th + y) * tw + x] =
              canvas[(static_cast<size_t>(k) * H + t.y0 * s + y) * W + t.x0 * s + x];
    blender.add(t, tile.data());
  }
  const auto out = blender.result();
  float worst = 0.f;
  for (int k = 0; k < c; ++k)
    for (int y = 0; y < 13 * s; ++y)
      for (int x = 0; x < 21 * s; ++x)
        worst = std::max(worst, std::abs(out[(static_cast<size_t>(k) * 13 * s + y) * 21 * s + x] -
                                         canvas[(static_cast<size_t>(k) * H + y) * W + x]));
  CHECK_MSG(worst < 1e-5f, std::to_string(worst));
}

void images_convert_like_python() {
  const uint8_t rgb[6] = {0, 128, 255, 1, 254, 127};  // two pixels
  const auto chw = esrdf::rgb8_to_model_range(rgb, 2, 1);
  CHECK(chw[0] == -1.0f && chw[4] == 1.0f && chw[2] == 128 / 127.5f - 1.0f);
  const auto back = esrdf::model_range_to_rgb8(chw.data(), 2, 1);
  CHECK(std::equal(back.begin(), back.end(), rgb));
}

}  // namespace

int main() {
  plans_clamp_the_last_tile();
  edge_padding_is_numpys();
  weights_ramp_only_towards_neighbours();
  blending_agreeing_tiles_returns_the_image();
  images_convert_like_python();
  return check::finish("test_tiling");
}
