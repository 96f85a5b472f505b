// Fixed-shape tiles over an image of any size and their smooth blend (esrdf/runtime/tiling.py).
//
// Tiles step by tile - overlap, the last is clamped to the edge; an image smaller than a tile is edge-
// padded (last row and column repeated) bottom/right and cropped after. Each HR tile is weighted by a separable raised-cosine ramp over
// overlap * scale pixels on every side with a neighbour, sampled at pixel centres so no weight is 0; the
// blend is sum(w x) / sum(w), accumulated in float32 in the order the Python Blender uses.
#include <algorithm>
#include <cmath>

#include "esrdf/esrdf.h"

namespace esrdf {
namespace {

std::vector<int> axis_starts(int size, int tile, int overlap) {
  if (size <= tile) return {0};
  std::vector<int> starts;
  for (int s = 0; s < size - tile; s += tile - overlap) starts.push_back(s);
  starts.push_back(size - tile);  // the last tile is clamped to the edge
  return starts;
}

int round_up(int value, int multiple) { return (value + multiple - 1) / multiple * multiple; }

// numpy's 'edge' padding: every index past the axis reads its last sample.
int edge_index(int i, int size) { return i < size ? i : size - 1; }

std::vector<double> ramp(int length, int ramp_len, bool rise, bool fall) {
  std::vector<double> w(static_cast<size_t>(length), 1.0);
  ramp_len = std::min(ramp_len, length);
  if (ramp_len <= 0) return w;
  std::vector<double> edge(static_cast<size_t>(ramp_len));
  for (int i = 0; i < ramp_len; ++i) {
    edge[i] = 0.5 - 0.5 * std::cos(M_PI * (static_cast<double>(i) + 0.5) / ramp_len);
  }
  if (rise) {
    for (int i = 0; i < ramp_len; ++i) w[i] *= edge[i];
  }
  if (fall) {
    for (int i = 0; i < ramp_len; ++i) w[length - ramp_len + i] *= edge[ramp_len - 1 - i];
  }
  return w;
}

}  // namespace

TilePlan plan_tiles(int height, int width, int tile, int overlap, int multiple_of) {
  if (height < 1 || width < 1) {
    throw Error(ErrorCode::kInvalidArgument,
                "image must be at least 1x1, got " + std::to_string(height) + "x" + std::to_string(width));
  }
  TilePlan p{height, width, 0, 0, 0, 0, 0, {}};
  if (tile == 0) {  // one tile over the whole image, padded up to the size multiple
    p.padded_height = p.tile_height = round_up(height, multiple_of);
    p.padded_width = p.tile_width = round_up(width, multiple_of);
    p.tiles.push_back({0, 0});
    return p;
  }
  if (tile < 0 || tile % multiple_of) {
    throw Error(ErrorCode::kInvalidArgument, "tile must be a positive multiple of " + std::to_string(multiple_of) +
                                                 " LR pixels, got " + std::to_string(tile));
  }
  if (overlap < 0 || overlap >= tile) {
    throw Error(ErrorCode::kInvalidArgument,
                "overlap must be in [0, tile=" + std::to_string(tile) + "), got " + std::to_string(overlap));
  }
  p.padded_height = std::max(height, tile);
  p.padded_width = std::max(width, tile);
  p.tile_height = p.tile_width = tile;
  p.overlap = overlap;
  for (int y : axis_starts(p.padded_height, tile, overlap)) {
    for (int x : axis_starts(p.padded_width, tile, overlap)) p.tiles.push_back({y, x});
  }
  return p;
}

std::vector<float> pad_edge(const TilePlan& plan, const float* chw, int channels) {
  const int h = plan.height, w = plan.width, ph = plan.padded_height, pw = plan.padded_width;
  std::vector<float> out(static_cast<size_t>(channels) * ph * pw);
  for (int c = 0; c < channels; ++c) {
    for (int y = 0; y < ph; ++y) {
      const float* src = chw + (static_cast<size_t>(c) * h + edge_index(y, h)) * w;
      float* dst = out.data() + (static_cast<size_t>(c) * ph + y) * pw;
      for (int x = 0; x < pw; ++x) dst[x] = src[edge_index(x, w)];
    }
  }
  return out;
}

std::vector<float> tile_weights(const TilePlan& plan, const Tile& tile, int scale) {
  const int r = plan.overlap * scale, th = plan.tile_height * scale, tw = plan.tile_width * scale;
  const auto wy = ramp(th, r, tile.y0 > 0, tile.y0 + plan.tile_height < plan.padded_height);
  const auto wx = ramp(tw, r, tile.x0 > 0, tile.x0 + plan.tile_width < plan.padded_width);
  std::vector<float> w(static_cast<size_t>(th) * tw);
  for (int y = 0; y < th; ++y) {
    for (int x = 0; x < tw; ++x) w[static_cast<size_t>(y) * tw + x] = static_cast<float>(wy[y] * wx[x]);
  }
  return w;
}

Blender::Blender(const TilePlan& plan, int scale, int channels)
    : plan_(plan),
      scale_(scale),
      channels_(channels),
      sum_(static_cast<size_t>(channels) * plan.padded_height * scale * plan.padded_width * scale, 0.0f),
      weight_(static_cast<size_t>(plan.padded_height) * scale * plan.padded_width * scale, 0.0f) {}

void Blender::add(const Tile& tile, const float* hr_tile) {
  const auto w = tile_weights(plan_, tile, scale_);
  const int th = plan_.tile_height * scale_, tw = plan_.tile_width * scale_;
  const int cw = plan_.padded_width * scale_, ch = plan_.padded_height * scale_;
  const int y0 = tile.y0 * scale_, x0 = tile.x0 * scale_;
  for (int c = 0; c < channels_; ++c) {
    for (int y = 0; y < th; ++y) {
      float* dst = sum_.data() + (static_cast<size_t>(c) * ch + y0 + y) * cw + x0;
      const float* src = hr_tile + (static_cast<size_t>(c) * th + y) * tw;
      const float* wr = w.data() + static_cast<size_t>(y) * tw;
      for (int x = 0; x < tw; ++x) dst[x] += src[x] * wr[x];
    }
  }
  for (int y = 0; y < th; ++y) {
    float* dst = weight_.data() + static_cast<size_t>(y0 + y) * cw + x0;
    for (int x = 0; x < tw; ++x) dst[x] += w[static_cast<size_t>(y) * tw + x];
  }
}

std::vector<float> Blender::result() const {
  const int h = plan_.height * scale_, w = plan_.width * scale_;
  const int cw = plan_.padded_width * scale_, ch = plan_.padded_height * scale_;
  std::vector<float> out(static_cast<size_t>(channels_) * h * w);
  for (int c = 0; c < channels_; ++c) {
    for (int y = 0; y < h; ++y) {
      for (int x = 0; x < w; ++x) {
        const float weight = weight_[static_cast<size_t>(y) * cw + x];
        if (!(weight > 0.0f)) throw Error(ErrorCode::kInternal, "blend canvas has pixels no tile covered");
        out[(static_cast<size_t>(c) * h + y) * w + x] = sum_[(static_cast<size_t>(c) * ch + y) * cw + x] / weight;
      }
    }
  }
  return out;
}

}  // namespace esrdf
