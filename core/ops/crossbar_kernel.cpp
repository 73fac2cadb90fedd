// Crossbar-exact convolution of one chunk of input cycles.
//
// Row-group partial sums come from one grouped convolution over cell levels
// (a row group is whole input channels, so every PE of a layer is one group),
// then a single pass per (image, output channel) digitises every column with
// its ADC, combines cell slices by significance in the shift-adder, applies the
// column's shift mask, subtracts the offset-encoding correction, sums row groups
// in the adder tree and weights each input cycle by its significance and sign.
// The semantics are those of core/ops/crossbar.py:_adc_shift_add_reference; the
// two are compared by property-based tests. crossbar_matmul computes the same bit for
// bit without the convolution where partial sums are exact integers.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

torch::Tensor crossbar_conv2d(
    const torch::Tensor& cycles_input,   // float [cycles * B, R * c, H, W], integer codes
    const torch::Tensor& weight,         // float [R * columns, c, kh, kw] (packed levels + ones)
    const std::vector<int64_t>& stride,
    const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation,
    int64_t row_groups,
    int64_t out_channels,
    int64_t slices,
    int64_t pack,
    double pack_base,
    const torch::Tensor& slice_weight,   // float [S]
    const torch::Tensor& adc_step,       // float [S]
    const torch::Tensor& adc_inv_step,   // float [S], 1 / adc_step as the reference rounds it
    double adc_qmin,                     // 0 for unsigned sums, -2^(bits-1) for signed
    double adc_qmax,
    double adc_offset_lsb,
    double weight_offset,
    double digit_bias,                   // level added to signed cells so digits pack
    const torch::Tensor& column_values,  // float [R, Cout]
    const torch::Tensor& cycle_weight,   // float [cycles]
    const c10::optional<torch::Tensor>& read_noise,  // float [N, R, Cout, S, HW]
    torch::Tensor out)                   // float [B, Cout, Ho, Wo], accumulated into
{
  TORCH_CHECK(cycles_input.scalar_type() == at::kFloat, "crossbar input must be float32");
  TORCH_CHECK(weight.scalar_type() == at::kFloat, "crossbar weight must be float32");
  const auto psum = at::conv2d(cycles_input, weight, {}, stride, padding, dilation,
                               row_groups).contiguous();
  const int64_t n_rows = psum.size(0);
  const int64_t n_cycles = cycle_weight.size(0);
  TORCH_CHECK(n_rows % n_cycles == 0, "input rows must be cycles x images");
  const int64_t images = n_rows / n_cycles;
  const int64_t hw = psum.size(2) * psum.size(3);
  const int64_t packed = (slices + pack - 1) / pack;
  const int64_t columns = out_channels * packed + 1;
  TORCH_CHECK(psum.size(1) == row_groups * columns, "weight does not match the layout");
  TORCH_CHECK(out.is_contiguous() && out.size(0) == images && out.size(1) == out_channels &&
              out.size(2) * out.size(3) == hw, "output does not match the input");

  TORCH_CHECK(column_values.dim() == 2 && column_values.size(0) == row_groups &&
              column_values.size(1) == out_channels,
              "column values do not match the layout: need [R, Cout]");
  const float* ps = psum.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const auto sw = slice_weight.contiguous();
  const auto st = adc_step.contiguous();
  const auto ist = adc_inv_step.contiguous();
  const auto cv = column_values.contiguous();
  const auto cw = cycle_weight.contiguous();
  const float* slice_w = sw.data_ptr<float>();
  const float* step = st.data_ptr<float>();
  const float* inv_step = ist.data_ptr<float>();
  const float* col = cv.data_ptr<float>();
  const float* cyc = cw.data_ptr<float>();
  torch::Tensor noise_t;
  const float* noise = nullptr;
  if (read_noise.has_value()) {
    noise_t = read_noise->contiguous();
    noise = noise_t.data_ptr<float>();
  }
  const float qmin = static_cast<float>(adc_qmin);
  const float qmax = static_cast<float>(adc_qmax);
  const float bias = static_cast<float>(digit_bias);
  const float offset_lsb = static_cast<float>(adc_offset_lsb);
  const float w_offset = static_cast<float>(weight_offset);
  std::vector<float> digit_scale(pack);
  for (int64_t t = 0; t < pack; ++t) digit_scale[t] = static_cast<float>(std::pow(pack_base, t));

  at::parallel_for(0, images * out_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rest(hw), value(hw);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / out_channels;
      const int64_t o = item % out_channels;
      float* acc = dst + item * hw;
      for (int64_t c = 0; c < n_cycles; ++c) {
        const int64_t n = c * images + b;
        for (int64_t r = 0; r < row_groups; ++r) {
          const float mask = col[r * out_channels + o];
          if (mask == 0.0f) continue;  // switched-off column: no conversion
          const float factor = cyc[c] * mask;
          const float* group = ps + (n * row_groups + r) * columns * hw;
          const float* input_sum = group + (columns - 1) * hw;
          std::fill(value.begin(), value.end(), 0.0f);
          for (int64_t j = 0; j < packed; ++j) {
            const float* p = group + (o * packed + j) * hw;
            std::copy(p, p + hw, rest.begin());
            for (int64_t t = pack - 1; t >= 0; --t) {
              const int64_t s = j * pack + t;
              const float d = digit_scale[t];
              const float inv_d = 1.0f / d;  // exact: d is a power of two
              const float* nz = (noise != nullptr && s < slices)
                  ? noise + (((n * row_groups + r) * out_channels + o) * slices + s) * hw
                  : nullptr;
              const float s_step = s < slices ? step[s] : 1.0f;
              const float s_inv = s < slices ? inv_step[s] : 1.0f;
              const float s_w = s < slices ? slice_w[s] : 0.0f;
              for (int64_t i = 0; i < hw; ++i) {
                const float digit = t > 0 ? std::floor(rest[i] * inv_d) : rest[i];
                rest[i] -= digit * d;
                float analog = bias != 0.0f ? digit - bias * input_sum[i] : digit;
                if (nz != nullptr) analog += nz[i];
                float level = std::nearbyint(analog * s_inv + offset_lsb);
                level = std::min(std::max(level, qmin), qmax);
                value[i] += level * s_step * s_w;
              }
            }
          }
          for (int64_t i = 0; i < hw; ++i) {
            acc[i] += factor * (value[i] - w_offset * input_sum[i]);
          }
        }
      }
    }
  });
  return out;
}

// Splits integer input codes into the chunks the DAC applies per read cycle and lays
// them out as the grouped convolution's input: row (phase * chunks + k) * B + b holds
// chunk k of image b's positive (phase 0) or negative (phase 1) part, with channels
// zero-padded to whole row groups. Same order as core/ops/crossbar.py:input_cycles.
// Returns the stacked chunks and, per cycle, whether any input of it is non-zero.
std::tuple<torch::Tensor, torch::Tensor> stack_input_cycles(
    const torch::Tensor& codes_in,  // float [B, C, H, W], integer codes
    int64_t input_bits, bool input_signed, int64_t dac_bits, int64_t padded_channels)
{
  TORCH_CHECK(codes_in.scalar_type() == at::kFloat && codes_in.dim() == 4,
              "input codes must be float [B, C, H, W]");
  const auto codes = codes_in.contiguous();
  const int64_t images = codes.size(0), channels = codes.size(1);
  const int64_t hw = codes.size(2) * codes.size(3);
  TORCH_CHECK(padded_channels >= channels, "padded channels below input channels");
  const int64_t chunks = (input_bits + dac_bits - 1) / dac_bits;
  const int64_t phases = input_signed ? 2 : 1;
  const int64_t cycles = chunks * phases;
  auto stacked = torch::empty({cycles * images, padded_channels, codes.size(2), codes.size(3)},
                              codes.options());
  const float* src = codes.data_ptr<float>();
  float* dst = stacked.data_ptr<float>();
  const int mask = (1 << dac_bits) - 1;
  std::vector<uint8_t> any(cycles, 0);
  std::mutex merge;
  at::parallel_for(0, images * padded_channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> local(cycles, 0);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / padded_channels;
      const int64_t c = item % padded_channels;
      float* row0 = dst + (b * padded_channels + c) * hw;
      const int64_t cycle_stride = images * padded_channels * hw;
      if (c >= channels) {
        for (int64_t k = 0; k < cycles; ++k) std::fill(row0 + k * cycle_stride,
                                                       row0 + k * cycle_stride + hw, 0.0f);
        continue;
      }
      const float* in = src + (b * channels + c) * hw;
      for (int64_t phase = 0; phase < phases; ++phase) {
        for (int64_t k = 0; k < chunks; ++k) {
          float* out = row0 + (phase * chunks + k) * cycle_stride;
          const int shift = static_cast<int>(k * dac_bits);
          const bool last = k == chunks - 1;
          uint8_t seen = 0;
          for (int64_t i = 0; i < hw; ++i) {
            const float v = phase == 0 ? in[i] : -in[i];
            const int magnitude = v > 0.0f ? static_cast<int>(v) : 0;
            const int chunk = last ? (magnitude >> shift) : ((magnitude >> shift) & mask);
            out[i] = static_cast<float>(chunk);
            seen |= chunk != 0;
          }
          local[phase * chunks + k] |= seen;
        }
      }
    }
    std::lock_guard<std::mutex> guard(merge);
    for (int64_t k = 0; k < cycles; ++k) any[k] |= local[k];
  });
  auto nonzero = torch::empty({cycles}, torch::dtype(torch::kBool));
  for (int64_t k = 0; k < cycles; ++k) nonzero[k] = static_cast<bool>(any[k]);
  return {stacked, nonzero};
}


// Crossbar-exact convolution without a convolution call, for programs whose partial sums
// are exact in float (integer cell levels, packed below 2^24, no read noise): every sum is
// then the same whatever the order of its terms, so the result equals crossbar_conv2d's
// bit for bit. What changes is the layout and the work, which matter on small maps:
//  - one work item is a block of output positions of one image; for each position, cycle
//    and read group it forms the read's input vector (im2col of the DAC chunk) and, unless
//    every input is zero and a zero input reads as zero (it would add exactly nothing),
//    the read's column sums as a row-vector product over its non-zero inputs only;
//  - the ADC and shift-add pass then runs over the output channels of that read at once
//    (contiguous, vectorised) while its column sums are in L1, in the same order of
//    cycles and read groups per output as crossbar_conv2d, with the same float operations.
// No partial-sum tensor, stacked input or convolution is allocated.
//
// A batch mixing tasks (samples sorted by task) passes one weight, column values and
// segment limit per block of images: each block is read with its own task's cells in the
// same call, as if it were read alone.
void crossbar_matmul(
    const torch::Tensor& codes_in,       // float [B, C, H, W], integer codes
    const std::vector<torch::Tensor>& block_weights,  // per block: float [R, c * kh * kw,
                                         // columns], read-major levels, one layout
    const std::vector<int64_t>& block_stops,  // per block: one past its last image
    const std::vector<int64_t>& kernel_size,
    const std::vector<int64_t>& stride,
    const std::vector<int64_t>& padding,
    const std::vector<int64_t>& dilation,
    int64_t out_channels,
    int64_t slices,
    int64_t pack,
    double pack_base,
    const torch::Tensor& slice_weight,   // float [S]
    const torch::Tensor& adc_step,       // float [S]
    const torch::Tensor& adc_inv_step,   // float [S]
    double adc_qmin,
    double adc_qmax,
    double adc_offset_lsb,
    double weight_offset,
    double digit_bias,
    const std::vector<torch::Tensor>& block_column_values,  // per block: float [R, Cout],
                                         // or [images of the block, R, Cout] per image
    int64_t input_bits,
    bool input_signed,
    int64_t dac_bits,
    bool skip_zero,                      // a zero input reads as zero: skip all-zero reads
    const std::vector<int64_t>& block_segment_limits,  // per block, > 0: see below
    torch::Tensor out)                   // float [B, Cout, Ho, Wo] channels-last, added into
{
  TORCH_CHECK(codes_in.scalar_type() == at::kFloat && codes_in.dim() == 4,
              "input codes must be float [B, C, H, W]");
  // segment_limit > 0: two cell slices share each packed column although a read's whole sum
  // may not fit the packed digit (differential pairs at 72 rows and 4-bit inputs). A read
  // whose DAC inputs sum to at most segment_limit fits (limit * largest digit < base); a
  // larger one is summed in segments that each fit, their digits unpacked and added, so
  // every digit is still the exact integer an unpacked layout gives.
  const size_t n_blocks = block_weights.size();
  TORCH_CHECK(n_blocks > 0 && block_stops.size() == n_blocks &&
              block_column_values.size() == n_blocks &&
              block_segment_limits.size() == n_blocks,
              "one weight, stop, column values and segment limit per block");
  for (const int64_t segment_limit : block_segment_limits) {
    TORCH_CHECK(segment_limit <= 0 || (slices == 2 && pack == 2 &&
                                        segment_limit >= (int64_t{1} << dac_bits) - 1),
                "segmented reads need two cell slices packed in one column and a limit of "
                "at least one DAC input");
  }
  const torch::Tensor& weight_t = block_weights[0];
  for (const auto& w : block_weights) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.dim() == 3 && w.is_contiguous() &&
                w.sizes() == weight_t.sizes(),
                "crossbar weights must be float [R, rows, columns], one layout for all blocks");
  }
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
              dilation.size() == 2, "kernel, stride, padding and dilation need two entries");
  // channels-last: each position's channels contiguous (no copy when the model runs so)
  const auto codes = codes_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t images = codes.size(0), height = codes.size(2), width = codes.size(3);
  const int64_t channels = codes.size(1);
  const int64_t row_groups = weight_t.size(0), k_len = weight_t.size(1);
  const int64_t kh = kernel_size[0], kw = kernel_size[1];
  TORCH_CHECK(k_len % (kh * kw) == 0, "weight rows must be whole kernels");
  const int64_t cg = k_len / (kh * kw);
  const int64_t packed = (slices + pack - 1) / pack;
  const int64_t columns = out_channels * packed + 1;
  TORCH_CHECK(weight_t.size(2) == columns, "weight does not match the layout");
  TORCH_CHECK(row_groups * cg >= channels, "row groups hold fewer channels than the input");
  const int64_t out_h = (height + 2 * padding[0] - dilation[0] * (kh - 1) - 1) / stride[0] + 1;
  const int64_t out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) / stride[1] + 1;
  const int64_t positions = out_h * out_w;
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.dim() == 4 &&
              out.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              out.size(0) == images && out.size(1) == out_channels && out.size(2) == out_h &&
              out.size(3) == out_w, "output does not match the input");
  // per image: its block's cells and column values
  std::vector<const float*> image_levels(images), image_columns(images);
  std::vector<int64_t> image_segment_limit(images);
  std::vector<torch::Tensor> column_values(n_blocks);
  int64_t first = 0;
  for (size_t k = 0; k < n_blocks; ++k) {
    const int64_t stop = block_stops[k];
    TORCH_CHECK(first <= stop && stop <= images && (k + 1 < n_blocks || stop == images),
                "block stops must rise to the batch size");
    const auto& cv = block_column_values[k];
    TORCH_CHECK(cv.scalar_type() == at::kFloat &&
                cv.dim() == 2 && cv.size(0) == row_groups && cv.size(1) == out_channels,
                "column values do not match the layout: need [R, Cout] per block");
    column_values[k] = cv.contiguous();
    const float* col_k = column_values[k].data_ptr<float>();
    for (int64_t b = first; b < stop; ++b) {
      image_levels[b] = block_weights[k].data_ptr<float>();
      image_columns[b] = col_k;
      image_segment_limit[b] = block_segment_limits[k];
    }
    first = stop;
  }
  const int64_t chunks = (input_bits + dac_bits - 1) / dac_bits;
  const int64_t phases = input_signed ? 2 : 1;
  const int64_t cycles = chunks * phases;
  // Cycle c applies (max(sign * code, 0) >> shift) & mask, as stack_input_cycles does,
  // and weighs sign * 2^shift, as core/ops/crossbar.py:input_cycles.
  std::vector<int32_t> cycle_sign(cycles), cycle_shift(cycles), cycle_mask(cycles);
  std::vector<float> cycle_weight(cycles);
  for (int64_t c = 0; c < cycles; ++c) {
    const int64_t k = c % chunks;
    cycle_sign[c] = c / chunks == 0 ? 1 : -1;
    cycle_shift[c] = static_cast<int32_t>(k * dac_bits);
    cycle_mask[c] = k == chunks - 1 ? -1 : (1 << dac_bits) - 1;
    cycle_weight[c] = static_cast<float>(cycle_sign[c] * std::pow(2.0, k * dac_bits));
  }

  const auto sw = slice_weight.contiguous();
  const auto st = adc_step.contiguous();
  const auto ist = adc_inv_step.contiguous();
  const float* slice_w = sw.data_ptr<float>();
  const float* step = st.data_ptr<float>();
  const float* inv_step = ist.data_ptr<float>();
  const float* src = codes.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float qmin = static_cast<float>(adc_qmin);
  const float qmax = static_cast<float>(adc_qmax);
  const float bias = static_cast<float>(digit_bias);
  const float offset_lsb = static_cast<float>(adc_offset_lsb);
  const float w_offset = static_cast<float>(weight_offset);
  std::vector<float> digit_scale(pack);
  for (int64_t t = 0; t < pack; ++t) digit_scale[t] = static_cast<float>(std::pow(pack_base, t));
  const int64_t cout = out_channels;
  const int64_t patch = row_groups * k_len;
  const bool pointwise = kh == 1 && kw == 1 && stride[0] == 1 && stride[1] == 1 &&
                         padding[0] == 0 && padding[1] == 0;
  std::vector<int64_t> k_real(row_groups);  // input rows of each read group that exist
  for (int64_t r = 0; r < row_groups; ++r) {
    k_real[r] = std::clamp<int64_t>(channels - r * cg, 0, cg) * kh * kw;
  }
  // two cell slices in one packed column (4-bit weights in 2-bit cells): slice 1 is the
  // packed column's high digit (t = 1), slice 0 its low one, as the general loop takes them
  const bool two_slices_packed = slices == 2 && pack == 2;
  constexpr int64_t kBlock = 16;  // output positions per work item (of one image)
  const int64_t blocks = (positions + kBlock - 1) / kBlock;

  at::parallel_for(0, images * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sums(columns), rest(cout), value(cout);
    std::vector<float> high_sum(cout), low_sum(cout);  // a segmented read's digits
    std::vector<int32_t> codes_patch(patch), nonzero(k_len);
    std::vector<float> chunk(k_len);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / blocks;
      const int64_t p0 = (item % blocks) * kBlock;
      const int64_t np = std::min(kBlock, positions - p0);
      const float* levels = image_levels[b];
      const float* col = image_columns[b];
      const int64_t segment_limit = image_segment_limit[b];
      for (int64_t i = 0; i < np; ++i) {
        const int64_t p = p0 + i;
        // the position's input patch as integer codes, [R, c, kh, kw] (the weight's order)
        if (pointwise) {
          const float* in = src + (b * positions + p) * channels;
          for (int64_t ch = 0; ch < channels; ++ch) {
            codes_patch[ch] = static_cast<int32_t>(in[ch]);
          }
        } else {
          const int64_t oy = p / out_w, ox = p % out_w;
          int32_t* to = codes_patch.data();
          for (int64_t ch = 0; ch < channels; ++ch) {  // padded channels are never read
            for (int64_t ky = 0; ky < kh; ++ky) {
              const int64_t iy = oy * stride[0] - padding[0] + ky * dilation[0];
              for (int64_t kx = 0; kx < kw; ++kx) {
                const int64_t ix = ox * stride[1] - padding[1] + kx * dilation[1];
                const bool inside = iy >= 0 && iy < height && ix >= 0 && ix < width;
                *to++ = inside ? static_cast<int32_t>(
                    src[((b * height + iy) * width + ix) * channels + ch]) : 0;
              }
            }
          }
        }
        float* a_out = dst + (b * positions + p) * cout;  // the position's outputs
        for (int64_t c = 0; c < cycles; ++c) {
          const int32_t sign = cycle_sign[c], shift = cycle_shift[c], mask = cycle_mask[c];
          const float cyc = cycle_weight[c];
          for (int64_t r = 0; r < row_groups; ++r) {
            // the read's inputs (this cycle's DAC chunk) and which of them are non-zero
            const int32_t* in = codes_patch.data() + r * k_len;
            const int64_t rows_read = k_real[r];  // rows past the inputs hold zeros
            int32_t input_total = 0;
            for (int64_t k = 0; k < rows_read; ++k) {  // vectorised
              const int32_t v = (std::max(sign * in[k], 0) >> shift) & mask;
              chunk[k] = static_cast<float>(v);
              input_total += v;
            }
            int64_t n_nonzero = 0;
            for (int64_t k = 0; k < rows_read; ++k) {
              nonzero[n_nonzero] = static_cast<int32_t>(k);
              n_nonzero += chunk[k] != 0.0f;
            }
            if (n_nonzero == 0 && skip_zero) continue;  // adds exactly nothing
            float* __restrict s_row = sums.data();
            const float* w_r = levels + r * k_len * columns;
            const bool segmented = segment_limit > 0 && input_total > segment_limit;
            if (segmented) {
              // segments of the non-zero inputs whose sums fit the packed digit
              const float d = digit_scale[1], inv_d = 1.0f / d;
              std::fill(high_sum.begin(), high_sum.end(), 0.0f);
              std::fill(low_sum.begin(), low_sum.end(), 0.0f);
              float segmented_input = 0.0f;
              int64_t z = 0;
              while (z < n_nonzero) {
                std::fill(sums.begin(), sums.end(), 0.0f);
                int64_t segment = 0;
                for (; z < n_nonzero; ++z) {
                  const int32_t k0 = nonzero[z];
                  const float a0 = chunk[k0];
                  segment += static_cast<int64_t>(a0);
                  if (segment > segment_limit) break;
                  const float* __restrict w0 = w_r + k0 * columns;
                  for (int64_t n = 0; n < columns; ++n) s_row[n] = std::fma(a0, w0[n], s_row[n]);
                }
                for (int64_t o = 0; o < cout; ++o) {
                  const float high = std::floor(s_row[o] * inv_d);
                  high_sum[o] += high;
                  low_sum[o] += s_row[o] - high * d;
                }
                segmented_input += s_row[columns - 1];
              }
              s_row[columns - 1] = segmented_input;
            } else {
              // column sums: integers below 2^24, exact in any order
              std::fill(sums.begin(), sums.end(), 0.0f);
              int64_t z = 0;
              for (; z + 4 <= n_nonzero; z += 4) {
                const int32_t k0 = nonzero[z], k1 = nonzero[z + 1], k2 = nonzero[z + 2],
                              k3 = nonzero[z + 3];
                const float a0 = chunk[k0], a1 = chunk[k1], a2 = chunk[k2], a3 = chunk[k3];
                const float* __restrict w0 = w_r + k0 * columns;
                const float* __restrict w1 = w_r + k1 * columns;
                const float* __restrict w2 = w_r + k2 * columns;
                const float* __restrict w3 = w_r + k3 * columns;
                for (int64_t n = 0; n < columns; ++n) {  // fused multiply-adds: exact here
                  s_row[n] = std::fma(a3, w3[n], std::fma(a2, w2[n], std::fma(
                      a1, w1[n], std::fma(a0, w0[n], s_row[n]))));
                }
              }
              for (; z < n_nonzero; ++z) {
                const int32_t k0 = nonzero[z];
                const float a0 = chunk[k0];
                const float* __restrict w0 = w_r + k0 * columns;
                for (int64_t n = 0; n < columns; ++n) s_row[n] = std::fma(a0, w0[n], s_row[n]);
              }
            }
            // ADC, shift-add, column mask and offset correction of every output channel
            const float input_sum = s_row[columns - 1];
            const float* mask_r = col + r * cout;
            const float correction = w_offset * input_sum;
            const float shift_in = bias * input_sum;
            if (two_slices_packed) {  // the usual layout, in one pass: same operations
              const float d = digit_scale[1], inv_d = 1.0f / d;
              const float step0 = step[0], step1 = step[1], inv0 = inv_step[0],
                          inv1 = inv_step[1], w0 = slice_w[0], w1 = slice_w[1];
              if (!segmented) {
                for (int64_t o = 0; o < cout; ++o) {
                  const float high = std::floor(s_row[o] * inv_d);
                  high_sum[o] = high;
                  low_sum[o] = s_row[o] - high * d;
                }
              }
              for (int64_t o = 0; o < cout; ++o) {
                const float high = high_sum[o];
                const float low = low_sum[o];
                const float analog1 = bias != 0.0f ? high - shift_in : high;
                float level1 = std::nearbyint(analog1 * inv1 + offset_lsb);
                level1 = std::min(std::max(level1, qmin), qmax);
                const float analog0 = bias != 0.0f ? low - shift_in : low;
                float level0 = std::nearbyint(analog0 * inv0 + offset_lsb);
                level0 = std::min(std::max(level0, qmin), qmax);
                const float val = (0.0f + level1 * step1 * w1) + level0 * step0 * w0;
                const float m = mask_r[o];
                const float add = (cyc * m) * (val - correction);
                a_out[o] = m != 0.0f ? a_out[o] + add : a_out[o];
              }
              continue;
            }
            std::fill(value.begin(), value.end(), 0.0f);
            for (int64_t j = 0; j < packed; ++j) {
              float* __restrict rs = rest.data();
              for (int64_t o = 0; o < cout; ++o) rs[o] = s_row[o * packed + j];
              for (int64_t t = pack - 1; t >= 0; --t) {
                const int64_t s = j * pack + t;
                const float d = digit_scale[t];
                const float inv_d = 1.0f / d;  // exact: d is a power of two
                const float s_step = s < slices ? step[s] : 1.0f;
                const float s_inv = s < slices ? inv_step[s] : 1.0f;
                const float s_w = s < slices ? slice_w[s] : 0.0f;
                float* __restrict val = value.data();
                if (t > 0) {
                  for (int64_t o = 0; o < cout; ++o) {
                    const float digit = std::floor(rs[o] * inv_d);
                    rs[o] -= digit * d;
                    const float analog = bias != 0.0f ? digit - shift_in : digit;
                    float level = std::nearbyint(analog * s_inv + offset_lsb);
                    level = std::min(std::max(level, qmin), qmax);
                    val[o] += level * s_step * s_w;
                  }
                } else {
                  for (int64_t o = 0; o < cout; ++o) {
                    const float digit = rs[o];
                    const float analog = bias != 0.0f ? digit - shift_in : digit;
                    float level = std::nearbyint(analog * s_inv + offset_lsb);
                    level = std::min(std::max(level, qmin), qmax);
                    val[o] += level * s_step * s_w;
                  }
                }
              }
            }
            for (int64_t o = 0; o < cout; ++o) {
              const float m = mask_r[o];
              const float add = (cyc * m) * (value[o] - correction);
              a_out[o] = m != 0.0f ? a_out[o] + add : a_out[o];  // switched off: no conversion
            }
          }
        }
      }
    }
  });
}


// A batch mixing tasks, one 1x1 layer over channels-last codes ([pixels, channels] rows,
// samples sorted by task): each block of rows times its own task's [Cin, Cout] codes,
// written in place into out's same rows.
void blocks_pointwise(
    const torch::Tensor& rows,                    // float [N, Cin], integer codes
    torch::Tensor out,                            // float [N, Cout], contiguous
    const std::vector<int64_t>& starts,           // per block: first row
    const std::vector<int64_t>& stops,            // per block: one past its last row
    const std::vector<torch::Tensor>& matrices)   // per block: float [Cin, Cout] codes
{
  TORCH_CHECK(out.is_contiguous() && rows.dim() == 2 && out.dim() == 2 &&
              rows.size(0) == out.size(0), "rows and output must be [N, channels]");
  TORCH_CHECK(starts.size() == stops.size() && starts.size() == matrices.size(),
              "one start, stop and matrix per block");
  for (size_t b = 0; b < starts.size(); ++b) {
    const int64_t start = starts[b], stop = stops[b];
    TORCH_CHECK(0 <= start && start <= stop && stop <= rows.size(0), "block out of range");
    if (stop == start) continue;
    auto block_out = out.narrow(0, start, stop - start);
    at::mm_out(block_out, rows.narrow(0, start, stop - start), matrices[b]);
  }
}


// A batch mixing tasks, one 1x1 layer over channels-last codes ([pixels, channels] rows,
// samples sorted by task so each task owns one block of rows): overwrites, for every task,
// the output channels it changed on its block with one matrix product of the block (read
// in place) by its codes. Sums of integer codes are exact in float, so this equals the
// task's own layer bit for bit.
void block_channels_rows(
    const torch::Tensor& rows,                    // float [N, Cin], integer codes
    torch::Tensor out,                            // float [N, Cout] view, overwritten in part
    const std::vector<int64_t>& starts,           // per task: first row of its block
    const std::vector<int64_t>& stops,            // per task: one past its last row
    const std::vector<torch::Tensor>& channels,   // per task: long [c] output channels
    const std::vector<torch::Tensor>& weights)    // per task: float [Cin, c] codes
{
  TORCH_CHECK(rows.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "codes and output must be float32");
  TORCH_CHECK(rows.dim() == 2 && out.dim() == 2 && rows.size(0) == out.size(0),
              "rows and output must be [N, channels] with the same N");
  TORCH_CHECK(out.stride(1) == 1, "output channels must be contiguous");
  TORCH_CHECK(starts.size() == stops.size() && starts.size() == channels.size() &&
              starts.size() == weights.size(), "one block, channel and weight list per task");
  const int64_t n_rows = rows.size(0), cin = rows.size(1), cout = out.size(1);
  const int64_t out_stride = out.stride(0);
  float* dst = out.data_ptr<float>();
  for (size_t t = 0; t < starts.size(); ++t) {
    const int64_t start = starts[t], stop = stops[t];
    TORCH_CHECK(0 <= start && start <= stop && stop <= n_rows, "block out of range");
    const auto chans = channels[t].contiguous();
    const auto& weight = weights[t];
    const int64_t c = chans.numel();
    TORCH_CHECK(weight.dim() == 2 && weight.size(0) == cin && weight.size(1) == c,
                "weights must be [Cin, channels]");
    if (stop == start || c == 0) continue;
    const int64_t* chan = chans.data_ptr<int64_t>();
    for (int64_t i = 0; i < c; ++i)
      TORCH_CHECK(chan[i] >= 0 && chan[i] < cout, "channel out of range");
    const auto product = at::mm(rows.narrow(0, start, stop - start), weight).contiguous();
    const float* p = product.data_ptr<float>();
    for (int64_t r = 0; r < stop - start; ++r) {
      float* to = dst + (start + r) * out_stride;
      const float* from = p + r * c;
      for (int64_t i = 0; i < c; ++i) to[chan[i]] = from[i];
    }
  }
}


// Round half to even of |y| < 2^22 (what nearbyint does), as two additions that the
// compiler vectorizes: the sum with 1.5 * 2^23 has no fraction bits, so it rounds.
static inline float round_small(float y) {
  constexpr float magic = 12582912.0f;  // 1.5 * 2^23; IEEE keeps both additions
  return (y + magic) - magic;
}

// One row of the periphery: y = fma(x, alpha, beta), clamped and rounded as asked
// (rounding only after a clamp inside +-2^22, see periphery_norm).
// step 1: alpha/beta per element (a channels-last row); step 0: one channel's terms.
// In: float, or int32_t sums of an int8 product (times unit, a power of two: exact, so
// the value is the float product's). Out: float, or int8_t for rounded codes clamped
// inside int8 (exact conversions).
template <typename In>
static inline float periphery_in(In v, float unit) {
  if constexpr (std::is_same_v<In, float>) return v;
  else return static_cast<float>(v) * unit;
}

template <bool CLAMP, bool ROUND, typename In, typename Out>
static inline void periphery_row(const In* __restrict from, Out* __restrict to,
                                 int64_t n, const float* alpha, const float* beta,
                                 int64_t step, float lo, float hi, float unit) {
  if (step == 0) {
    const float a = alpha[0], b = beta[0];
    for (int64_t i = 0; i < n; ++i) {
      float y = std::fma(periphery_in(from[i], unit), a, b);
      if (CLAMP) y = std::min(std::max(y, lo), hi);
      to[i] = static_cast<Out>(ROUND ? round_small(y) : y);
    }
  } else {
    for (int64_t i = 0; i < n; ++i) {
      float y = std::fma(periphery_in(from[i], unit), alpha[i], beta[i]);
      if (CLAMP) y = std::min(std::max(y, lo), hi);
      to[i] = static_cast<Out>(ROUND ? round_small(y) : y);
    }
  }
}


// The digital periphery between two layers in one pass: BatchNorm (inference), then
// optionally a clamp and a round to the next layer's DAC codes. Samples come in blocks
// (one per task of a batch mixing tasks, sorted by task), each with its own terms. The
// arithmetic is ATen's inference BatchNorm kernel's: alpha = weight / sqrt(var + eps),
// beta = bias - mean * alpha (fused), y = x * alpha + beta (fused); core/layers.py uses
// this only after checking it equals F.batch_norm bit for bit on this build.
void periphery_norm(
    const torch::Tensor& x,                       // float [B, C, ...], NCHW or channels-last
    torch::Tensor out,                            // float, laid out as x (int8: codes)
    const std::vector<int64_t>& starts,           // per block: first sample
    const std::vector<int64_t>& stops,            // per block: one past its last sample
    const std::vector<torch::Tensor>& terms,      // per block: float [4, C] (mean, var,
                                                  // weight, bias), channels contiguous
    double eps, bool clamp, double low, double high, bool round,
    double unit)                                  // int32 x: its units (a power of two)
{
  const bool codes_out = out.scalar_type() == at::kChar;
  const bool sums_in = x.scalar_type() == at::kInt;
  TORCH_CHECK((x.scalar_type() == at::kFloat || sums_in) &&
              (out.scalar_type() == at::kFloat || codes_out),
              "input must be float32 or int32, output float32 or int8");
  TORCH_CHECK(sums_in || unit == 1.0, "float input takes no unit");
  TORCH_CHECK(!codes_out || (round && clamp && low >= -128 && high <= 127),
              "int8 output needs codes rounded and clamped inside int8");
  TORCH_CHECK(out.sizes() == x.sizes() && out.strides() == x.strides(),
              "output must be laid out as the input");
  const bool channels_last = !x.is_contiguous() &&
      x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(channels_last || x.is_contiguous(), "input must be NCHW or channels-last");
  const int64_t batch = x.size(0), channels = x.size(1);
  const int64_t pixels = batch * channels == 0 ? 0 : x.numel() / (batch * channels);
  const int64_t blocks = static_cast<int64_t>(starts.size());
  TORCH_CHECK(static_cast<int64_t>(stops.size()) == blocks &&
              static_cast<int64_t>(terms.size()) == blocks, "one stop and terms per start");
  for (const auto& t : terms)
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 2 && t.size(0) == 4 &&
                t.size(1) == channels && t.stride(1) == 1,
                "terms must be float [4, C] with channels contiguous");
  const float* src = sums_in ? nullptr : x.data_ptr<float>();
  const int32_t* src_sums = sums_in ? x.data_ptr<int32_t>() : nullptr;
  const float funit = static_cast<float>(unit);
  float* dst = codes_out ? nullptr : out.data_ptr<float>();
  int8_t* dst_codes = codes_out ? out.data_ptr<int8_t>() : nullptr;
  const float lo = static_cast<float>(low), hi = static_cast<float>(high);
  const float feps = static_cast<float>(eps);
  TORCH_CHECK(!round || (clamp && std::abs(lo) < 4194304.0f && std::abs(hi) < 4194304.0f),
              "rounding needs a clamp inside +-2^22");
  std::vector<float> alpha, beta;
  for (int64_t b = 0; b < blocks; ++b) {
    alpha.assign(channels, 0.0f);
    beta.assign(channels, 0.0f);
    const int64_t start = starts[b], stop = stops[b];
    TORCH_CHECK(0 <= start && start <= stop && stop <= batch, "block out of range");
    const float* m = terms[b].data_ptr<float>();
    const int64_t row = terms[b].stride(0);
    const float* v = m + row;
    const float* w = m + 2 * row;
    const float* bi = m + 3 * row;
    for (int64_t c = 0; c < channels; ++c) {
      const float invstd = 1.0f / std::sqrt(v[c] + feps);
      alpha[c] = invstd * w[c];
      beta[c] = std::fma(-m[c], alpha[c], bi[c]);
    }
    const bool per_row = !(channels_last || pixels == 1);  // NCHW: one channel per row
    // Channels-last rows are one pixel's channels: take several pixels per call, with the
    // terms repeated, so that short rows (16 channels) still run in long vector loops.
    const int64_t repeat = per_row ? 1 : std::max<int64_t>(1, 512 / std::max<int64_t>(1, channels));
    if (!per_row) {
      alpha.resize(channels * repeat);
      beta.resize(channels * repeat);
      for (int64_t k = 1; k < repeat; ++k) {
        std::copy(alpha.begin(), alpha.begin() + channels, alpha.begin() + k * channels);
        std::copy(beta.begin(), beta.begin() + channels, beta.begin() + k * channels);
      }
    }
    const int64_t width = per_row ? pixels : channels;  // elements of one row
    const int64_t first = start * (per_row ? channels : pixels);
    const int64_t rows = (stop - start) * (per_row ? channels : pixels);
    auto run = [&](auto clamp_tag, auto round_tag, const auto* source, auto* base) {
      constexpr bool C = decltype(clamp_tag)::value, R = decltype(round_tag)::value;
      for (int64_t r = first; r < first + rows;) {
        const auto* from = source + r * width;
        auto* to = base + r * width;
        if (per_row) {
          const int64_t c = r % channels;
          periphery_row<C, R>(from, to, width, alpha.data() + c, beta.data() + c, 0, lo, hi,
                              funit);
          ++r;
        } else {
          const int64_t take = std::min(repeat, first + rows - r);
          periphery_row<C, R>(from, to, width * take, alpha.data(), beta.data(), 1, lo, hi,
                              funit);
          r += take;
        }
      }
    };
    auto dispatch = [&](const auto* source) {
      if (codes_out) run(std::true_type{}, std::true_type{}, source, dst_codes);
      else if (clamp && round) run(std::true_type{}, std::true_type{}, source, dst);
      else if (clamp) run(std::true_type{}, std::false_type{}, source, dst);
      else run(std::false_type{}, std::false_type{}, source, dst);
    };
    if (sums_in) dispatch(src_sums);
    else dispatch(src);
  }
}


// The periphery of a training pass, forward and backward in one pass each: BatchNorm at
// the backbone's statistics with learned affine terms, then the ReLU6 and the next
// layer's input fake quantization at its frozen step, ``y = step * round(clamp(
// fma(x, alpha, beta) / step, lo, hi))`` with alpha and beta as periphery_norm forms them
// (the values of F.batch_norm, then torch's division, clamp, round and multiply). The
// gradient passes straight through where ``pass_lo < v < pass_hi`` (v the quotient
// before clamping, recomputed from x in the backward pass instead of saved), then
// through the BatchNorm as ATen's backward kernel computes it: dx = (g * invstd) *
// weight (equal bit for bit), dweight = invstd * sum(g * (x - mean)), dbias = sum(g)
// (equal up to the order of the sums). Torch's operators make nine passes over the activation for this
// (four forward, five backward) and save a copy of it; these make two and save none.
// Activations are channels-last [pixels, C]; the sums go in fixed chunks of pixels
// (the same order whatever the thread count), each chunk's in float, chunks in double.
constexpr int64_t kTrainChunk = 512;  // pixels per chunk of the backward sums

struct TrainTerms {
  std::vector<float> alpha, beta;
  std::vector<float> invstd;  // as ATen's backward forms it: in double, then rounded
};

static TrainTerms train_terms(const torch::Tensor& mean, const torch::Tensor& var,
                              const torch::Tensor& weight, const torch::Tensor& bias,
                              double eps, int64_t channels) {
  for (const auto* t : {&mean, &var, &weight, &bias})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == channels &&
                t->is_contiguous(), "BatchNorm terms must be contiguous float [C]");
  TrainTerms terms{std::vector<float>(channels), std::vector<float>(channels),
                   std::vector<float>(channels)};
  const float* m = mean.data_ptr<float>();
  const float* v = var.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* b = bias.data_ptr<float>();
  const float feps = static_cast<float>(eps);
  for (int64_t c = 0; c < channels; ++c) {
    terms.alpha[c] = (1.0f / std::sqrt(v[c] + feps)) * w[c];
    terms.invstd[c] = static_cast<float>(1.0 / std::sqrt(static_cast<double>(v[c]) + eps));
    terms.beta[c] = std::fma(-m[c], terms.alpha[c], b[c]);
  }
  return terms;
}

// A result laid out as torch's elementwise operators lay it out: NCHW strides where a 1x1
// map makes the two layouts one (the memory is the same; the strides decide which
// algorithm the next convolution's backward picks, and with it the order of its sums).
static torch::Tensor train_like(const torch::Tensor& x) {
  return x.is_contiguous() ? torch::empty(x.sizes(), x.options()) : torch::empty_like(x);
}

static int64_t train_check(const torch::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 4 &&
              x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "training periphery takes channels-last float [B, C, H, W]");
  return x.size(1);
}

torch::Tensor train_periphery_forward(
    const torch::Tensor& x, const torch::Tensor& mean, const torch::Tensor& var,
    const torch::Tensor& weight, const torch::Tensor& bias, double eps, double step,
    double low, double high) {
  const int64_t channels = train_check(x);
  const auto terms = train_terms(mean, var, weight, bias, eps, channels);
  auto out = train_like(x);
  const int64_t pixels = channels == 0 ? 0 : x.numel() / channels;
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const float s = static_cast<float>(step), lo = static_cast<float>(low),
              hi = static_cast<float>(high);
  TORCH_CHECK(std::abs(lo) < 4194304.0f && std::abs(hi) < 4194304.0f,
              "rounding needs a clamp inside +-2^22");
  const float* alpha = terms.alpha.data();
  const float* beta = terms.beta.data();
  at::parallel_for(0, pixels, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, channels)),
                   [&](int64_t first, int64_t last) {
    for (int64_t p = first; p < last; ++p) {
      const float* __restrict from = src + p * channels;
      float* __restrict to = dst + p * channels;
      for (int64_t c = 0; c < channels; ++c) {
        float v = std::fma(from[c], alpha[c], beta[c]) / s;
        v = std::min(std::max(v, lo), hi);
        to[c] = round_small(v) * s;
      }
    }
  });
  return out;
}

template <bool INPUT_GRAD>
static void train_backward_rows(
    const float* __restrict src, const float* __restrict dy, float* __restrict dx,
    float* __restrict centred, float* __restrict sum, const float* __restrict mean,
    const float* __restrict alpha, const float* __restrict beta,
    const float* __restrict invstd, const float* __restrict weight, int64_t channels,
    int64_t start, int64_t stop, float step, float pass_low, float pass_high) {
  for (int64_t p = start; p < stop; ++p) {
    const float* __restrict from = src + p * channels;
    const float* __restrict g_in = dy + p * channels;
    float* __restrict to = INPUT_GRAD ? dx + p * channels : nullptr;
    for (int64_t c = 0; c < channels; ++c) {
      const float x = from[c], grad = g_in[c];  // loaded unconditionally: vectorizes
      const float v = std::fma(x, alpha[c], beta[c]) / step;
      const float g = (v > pass_low && v < pass_high) ? grad : 0.0f;
      centred[c] += g * (x - mean[c]);
      sum[c] += g;
      if constexpr (INPUT_GRAD) to[c] = (g * invstd[c]) * weight[c];  // ATen's order
    }
  }
}

std::vector<torch::Tensor> train_periphery_backward(
    const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& mean,
    const torch::Tensor& var, const torch::Tensor& weight, const torch::Tensor& bias,
    double eps, double step, double pass_low, double pass_high, bool input_grad) {
  const int64_t channels = train_check(x);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == at::kFloat &&
              grad.is_contiguous(at::MemoryFormat::ChannelsLast),
              "gradient must be channels-last float, sized as the input");
  const auto terms = train_terms(mean, var, weight, bias, eps, channels);
  const int64_t pixels = channels == 0 ? 0 : x.numel() / channels;
  const int64_t chunks = (pixels + kTrainChunk - 1) / kTrainChunk;
  auto grad_x = input_grad ? train_like(x) : torch::Tensor();
  std::vector<float> partial(static_cast<size_t>(chunks * 2 * channels), 0.0f);
  const float* src = x.data_ptr<float>();
  const float* dy = grad.data_ptr<float>();
  float* dx = input_grad ? grad_x.data_ptr<float>() : nullptr;
  const float* m = mean.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  const float* alpha = terms.alpha.data();
  const float* beta = terms.beta.data();
  const float* invstd = terms.invstd.data();
  const float s = static_cast<float>(step), plo = static_cast<float>(pass_low),
              phi = static_cast<float>(pass_high);
  at::parallel_for(0, chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      float* centred = partial.data() + k * 2 * channels;  // sum(g * (x - mean))
      const int64_t start = k * kTrainChunk, stop = std::min(pixels, start + kTrainChunk);
      if (dx != nullptr)
        train_backward_rows<true>(src, dy, dx, centred, centred + channels, m, alpha, beta,
                                  invstd, w, channels, start, stop, s, plo, phi);
      else
        train_backward_rows<false>(src, dy, dx, centred, centred + channels, m, alpha, beta,
                                   invstd, w, channels, start, stop, s, plo, phi);
    }
  });
  auto grad_weight = torch::empty({channels}, x.options());
  auto grad_bias = torch::empty({channels}, x.options());
  float* gw = grad_weight.data_ptr<float>();
  float* gb = grad_bias.data_ptr<float>();
  for (int64_t c = 0; c < channels; ++c) {
    double centred = 0.0, sum = 0.0;
    for (int64_t k = 0; k < chunks; ++k) {
      centred += partial[k * 2 * channels + c];
      sum += partial[k * 2 * channels + channels + c];
    }
    gw[c] = static_cast<float>(centred) * terms.invstd[c];
    gb[c] = static_cast<float>(sum);
  }
  return {grad_x, grad_weight, grad_bias};
}


// Int8 products of a 1x1 layer's blocks of rows (one block per task of a batch mixing
// tasks, or one for the whole batch), each block times its own int8 weight, int32 sums:
// one call per layer instead of one oneDNN call per block, whose fixed cost dominates
// over the few rows a task has at small maps. Weights come packed for VNNI (see
// core/ops/int8.py:vnni_matrix): tiles of 32 output channels (the last may have 16; Np =
// Cout rounded up to 16), each tile [ceil(K/4), width, 4] int8 and contiguous, four
// consecutive input channels of one output channel in one 32-bit lane, so that a tile
// streams through memory in order (a block of a few rows reads it once). vpdpbusd
// multiplies unsigned by signed bytes: unsigned rows (DAC codes from a ReLU) go in as
// they are; signed rows are offset by 128 and 128 * (each column's weight sum) is taken
// back. Every sum is exact, so the result equals torch._int_mm's. Machines with AVX2 but
// no VNNI multiply the same tiles with vpmaddubsw (pairs of unsigned-by-signed products
// summed to int16) and vpmaddwd (pairs of those to int32): no pair can saturate int16,
// as unsigned rows are int8 codes >= 0 (at most 127) and signed rows go in as their
// magnitude with the sign moved onto the weight (|a| <= 128, |w| <= 127: 2 * 128 * 127 <
// 2^15), so the sums are exact there too and need no correction. Others run plain loops.
constexpr int64_t kInt8Lanes = 16;    // int32 sums per 512-bit register
constexpr int64_t kInt8Tile = 32;     // output channels per packed weight tile
constexpr int64_t kInt8RowTile = 64;  // rows per parallel work item

static inline int32_t int8_quad(const int8_t* a, int64_t k, int64_t K) {
  // four input codes from k on, zero past the row's end, as one little-endian word
  uint32_t word = 0;
  std::memcpy(&word, a + k, static_cast<size_t>(std::min<int64_t>(4, K - k)));
  return static_cast<int32_t>(word);
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
constexpr bool kInt8Vnni = true;
constexpr bool kInt8Vectorized = true;

// MR rows times NR x 16 output channels over all of K. The weight registers are pinned
// (the empty asm): folded into vpdpbusd's memory operand instead, they are loaded once
// per row and the tile becomes load-bound at half the speed.
template <int MR, int NR, bool SIGNED>
static void int8_tile(const int8_t* a, int64_t lda, int64_t K, const int8_t* tile,
                      int64_t n0, int64_t cout, const int32_t* correction,
                      int32_t* c, int64_t ldc) {
  __m512i acc[MR][NR];
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_setzero_si512();
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  const int64_t quads = (K + 3) / 4, full = K / 4;
  for (int64_t q = 0; q < quads; ++q) {
    const int8_t* bp = tile + q * (NR * 64);
    __m512i b[NR];
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      b[j] = _mm512_loadu_si512(bp + j * 64);
      asm("" : "+v"(b[j]));
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      if (q < full) std::memcpy(&word, a + r * lda + 4 * q, 4);
      else word = int8_quad(a + r * lda, 4 * q, K);
      __m512i av = _mm512_set1_epi32(word);
      if constexpr (SIGNED) av = _mm512_xor_si512(av, flip);
#pragma GCC unroll 8
      for (int j = 0; j < NR; ++j) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], av, b[j]);
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NR; ++j) {
    const int64_t n = n0 + j * kInt8Lanes;
    const int64_t left = cout - n;
    const __mmask16 mask = left >= kInt8Lanes ? static_cast<__mmask16>(0xFFFF)
                                              : static_cast<__mmask16>((1u << left) - 1u);
    const __m512i corr = SIGNED ? _mm512_maskz_loadu_epi32(mask, correction + n)
                                : _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      _mm512_mask_storeu_epi32(c + r * ldc + n, mask, _mm512_sub_epi32(acc[r][j], corr));
  }
}

// A tile of output channels for all rows of a work item: the tile (at most 32 x K bytes)
// stays in L1 while row after row reads it.
template <int NR, bool SIGNED>
static void int8_column_tile(const int8_t* a, int64_t lda, int64_t rows, int64_t K,
                             const int8_t* tile, int64_t n0, int64_t cout,
                             const int32_t* correction, int32_t* c, int64_t ldc) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4)
    int8_tile<4, NR, SIGNED>(a + r * lda, lda, K, tile, n0, cout, correction, c + r * ldc, ldc);
  switch (rows - r) {
    case 3: int8_tile<3, NR, SIGNED>(a + r * lda, lda, K, tile, n0, cout, correction, c + r * ldc, ldc); break;
    case 2: int8_tile<2, NR, SIGNED>(a + r * lda, lda, K, tile, n0, cout, correction, c + r * ldc, ldc); break;
    case 1: int8_tile<1, NR, SIGNED>(a + r * lda, lda, K, tile, n0, cout, correction, c + r * ldc, ldc); break;
    default: break;
  }
}

template <bool SIGNED>
static void int8_block_rows(const int8_t* a, int64_t lda, int64_t rows, int64_t K,
                            const int8_t* packed, int64_t np, int64_t cout,
                            const int32_t* correction, int32_t* c, int64_t ldc) {
  const int64_t quads = (K + 3) / 4;
  int64_t n0 = 0;
  for (; n0 + kInt8Tile <= np; n0 += kInt8Tile)
    int8_column_tile<2, SIGNED>(a, lda, rows, K, packed + n0 * quads * 4, n0, cout,
                                correction, c, ldc);
  if (n0 < np)
    int8_column_tile<1, SIGNED>(a, lda, rows, K, packed + n0 * quads * 4, n0, cout,
                                correction, c, ldc);
}
#elif defined(__AVX2__)
constexpr bool kInt8Vnni = false;
constexpr bool kInt8Vectorized = true;
constexpr int64_t kAvx2Channels = 16;  // output channels per pass: two registers of 8

// MR rows times 16 output channels (two registers of eight int32 sums) over all of K,
// from a packed tile whose quads lie quad_stride bytes apart. The products are exact
// (see above), so the order of the additions does not matter.
template <int MR, bool SIGNED>
static void int8_tile_avx2(const int8_t* a, int64_t lda, int64_t K, const int8_t* tile,
                           int64_t quad_stride, int64_t n0, int64_t cout, int32_t* c,
                           int64_t ldc) {
  __m256i acc[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  const __m256i ones = _mm256_set1_epi16(1);
  const int64_t quads = (K + 3) / 4, full = K / 4;
  for (int64_t q = 0; q < quads; ++q) {
    const int8_t* bp = tile + q * quad_stride;
    const __m256i b0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp));
    const __m256i b1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bp + 32));
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      int32_t word;
      if (q < full) std::memcpy(&word, a + r * lda + 4 * q, 4);
      else word = int8_quad(a + r * lda, 4 * q, K);
      const __m256i av = _mm256_set1_epi32(word);
      __m256i x0 = b0, x1 = b1, ua = av;
      if constexpr (SIGNED) {
        ua = _mm256_abs_epi8(av);
        x0 = _mm256_sign_epi8(b0, av);
        x1 = _mm256_sign_epi8(b1, av);
      }
      acc[r][0] = _mm256_add_epi32(acc[r][0],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(ua, x0), ones));
      acc[r][1] = _mm256_add_epi32(acc[r][1],
                                   _mm256_madd_epi16(_mm256_maddubs_epi16(ua, x1), ones));
    }
  }
  // Lanes hold output channels in the packed order: register h has channels n0 + 8h..
  for (int h = 0; h < 2; ++h) {
    const int64_t n = n0 + 8 * h;
    const int64_t left = cout - n;
    if (left <= 0) break;
    if (left >= 8) {
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + r * ldc + n), acc[r][h]);
    } else {
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(left)),
                                              lanes);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) _mm256_maskstore_epi32(c + r * ldc + n, mask, acc[r][h]);
    }
  }
}

template <bool SIGNED>
static void int8_block_rows(const int8_t* a, int64_t lda, int64_t rows, int64_t K,
                            const int8_t* packed, int64_t np, int64_t cout,
                            const int32_t* /*correction: no offset here*/, int32_t* c,
                            int64_t ldc) {
  const int64_t quads = (K + 3) / 4;
  for (int64_t n0 = 0; n0 < np; n0 += kInt8Tile) {
    const int64_t width = std::min(kInt8Tile, np - n0);
    const int8_t* tile = packed + n0 * quads * 4;
    for (int64_t h = 0; h < width; h += kAvx2Channels) {
      const int8_t* half = tile + h * 4;
      const int64_t n = n0 + h;
      int64_t r = 0;
      for (; r + 4 <= rows; r += 4)
        int8_tile_avx2<4, SIGNED>(a + r * lda, lda, K, half, width * 4, n, cout, c + r * ldc, ldc);
      switch (rows - r) {
        case 3: int8_tile_avx2<3, SIGNED>(a + r * lda, lda, K, half, width * 4, n, cout, c + r * ldc, ldc); break;
        case 2: int8_tile_avx2<2, SIGNED>(a + r * lda, lda, K, half, width * 4, n, cout, c + r * ldc, ldc); break;
        case 1: int8_tile_avx2<1, SIGNED>(a + r * lda, lda, K, half, width * 4, n, cout, c + r * ldc, ldc); break;
        default: break;
      }
    }
  }
}
#else
constexpr bool kInt8Vnni = false;
constexpr bool kInt8Vectorized = false;

template <bool SIGNED>
static void int8_block_rows(const int8_t* a, int64_t lda, int64_t rows, int64_t K,
                            const int8_t* packed, int64_t np, int64_t cout,
                            const int32_t* correction, int32_t* c, int64_t ldc) {
  std::vector<int32_t> acc(static_cast<size_t>(cout));
  for (int64_t r = 0; r < rows; ++r) {
    std::fill(acc.begin(), acc.end(), 0);
    for (int64_t k = 0; k < K; ++k) {
      const int32_t value = static_cast<int32_t>(a[r * lda + k]) + (SIGNED ? 128 : 0);
      for (int64_t n = 0; n < cout; ++n) {
        const int64_t n0 = n / kInt8Tile * kInt8Tile;
        const int64_t width = std::min(kInt8Tile, np - n0);
        const int8_t* tile = packed + n0 * ((K + 3) / 4) * 4;
        acc[n] += value * static_cast<int32_t>(tile[((k / 4) * width + (n - n0)) * 4 + k % 4]);
      }
    }
    for (int64_t n = 0; n < cout; ++n) c[r * ldc + n] = acc[n] - (SIGNED ? correction[n] : 0);
  }
}
#endif

bool int8_vnni() { return kInt8Vnni; }
bool int8_vectorized() { return kInt8Vectorized; }

void int8_blocks_product(
    const torch::Tensor& rows,                    // int8 [N, Cin], rows contiguous
    torch::Tensor out,                            // int32 [N, Cout], contiguous
    const std::vector<int64_t>& starts,           // per block: first row
    const std::vector<int64_t>& stops,            // per block: one past its last row
    const std::vector<torch::Tensor>& packed,     // per block: int8 in [-127, 127], tiles
    const std::vector<torch::Tensor>& corrections,  // per block: int32 [Cout], 128 x sums
    bool signed_rows)                             // false: every code is >= 0
{
  TORCH_CHECK(rows.scalar_type() == at::kChar && out.scalar_type() == at::kInt,
              "rows must be int8 and the output int32");
  TORCH_CHECK(rows.dim() == 2 && out.dim() == 2 && rows.size(0) == out.size(0) &&
              rows.stride(1) == 1 && out.is_contiguous(),
              "rows and output must be [N, channels] with the same N");
  TORCH_CHECK(starts.size() == stops.size() && starts.size() == packed.size() &&
              starts.size() == corrections.size(),
              "one start, stop, packed weight and correction per block");
  const int64_t n_rows = rows.size(0), K = rows.size(1), cout = out.size(1);
  const int64_t quads = (K + 3) / 4;
  const int64_t np = (cout + kInt8Lanes - 1) / kInt8Lanes * kInt8Lanes;
  std::vector<int64_t> tile_block, tile_start, tile_rows;
  for (size_t b = 0; b < starts.size(); ++b) {
    const int64_t start = starts[b], stop = stops[b];
    TORCH_CHECK(0 <= start && start <= stop && stop <= n_rows, "block out of range");
    const auto& w = packed[b];
    TORCH_CHECK(w.scalar_type() == at::kChar && w.is_contiguous() &&
                w.numel() == quads * np * 4,
                "packed weight must be int8 of ceil(Cin / 4) x (Cout rounded up to 16) x 4");
    TORCH_CHECK(corrections[b].scalar_type() == at::kInt && corrections[b].is_contiguous() &&
                corrections[b].numel() == cout, "correction must be int32 [Cout]");
    for (int64_t r = start; r < stop; r += kInt8RowTile) {
      tile_block.push_back(static_cast<int64_t>(b));
      tile_start.push_back(r);
      tile_rows.push_back(std::min(kInt8RowTile, stop - r));
    }
  }
  const int8_t* a = rows.data_ptr<int8_t>();
  const int64_t lda = rows.stride(0);
  int32_t* c = out.data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(tile_block.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const auto b = static_cast<size_t>(tile_block[t]);
      const int64_t r = tile_start[t];
      const int8_t* w = packed[b].data_ptr<int8_t>();
      const int32_t* corr = corrections[b].data_ptr<int32_t>();
      if (signed_rows)
        int8_block_rows<true>(a + r * lda, lda, tile_rows[t], K, w, np, cout, corr, c + r * cout, cout);
      else
        int8_block_rows<false>(a + r * lda, lda, tile_rows[t], K, w, np, cout, corr, c + r * cout, cout);
    }
  });
}

// P adjacent output pixels of blocks_conv2d (the same taps inside the image for all) with
// their channels in registers (16 per vector with AVX-512, 8 with AVX2; up to 64): P x V
// independent sums, so the additions do not wait on each other. False where this build
// has neither or the channels do not fit.
#if defined(__AVX512F__)
struct FloatVectors {  // 16 channels per register; 32 registers hold every pixel's sums
  using Reg = __m512;
  static constexpr int kLanes = 16, kMaxVectors = 4;
  static constexpr int pixels_per_pass(int /*vectors*/) { return 8; }
  static Reg zero() { return _mm512_setzero_ps(); }
  static Reg load(const float* p) { return _mm512_loadu_ps(p); }
  static Reg broadcast(float v) { return _mm512_set1_ps(v); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm512_fmadd_ps(a, b, c); }
  static void store(float* p, Reg v) { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__)
struct FloatVectors {  // 8 channels per register; 16 registers: a few pixels per pass
  using Reg = __m256;
  static constexpr int kLanes = 8, kMaxVectors = 8;
  static constexpr int pixels_per_pass(int vectors) {
    return vectors <= 2 ? 4 : (vectors <= 4 ? 2 : 1);
  }
  static Reg zero() { return _mm256_setzero_ps(); }
  static Reg load(const float* p) { return _mm256_loadu_ps(p); }
  static Reg broadcast(float v) { return _mm256_set1_ps(v); }
  static Reg fmadd(Reg a, Reg b, Reg c) { return _mm256_fmadd_ps(a, b, c); }
  static void store(float* p, Reg v) { _mm256_storeu_ps(p, v); }
};
#endif

#if defined(__AVX512F__) || defined(__AVX2__)
// G pixels per pass (all P where the registers hold their sums), so that G x V sums and
// the V weights stay in registers; the inputs of the next G pixels come from L1.
template <int V, int P>
static void conv_pixels(int64_t cin, int64_t cout, int64_t kw, int64_t y0, int64_t y1,
                        int64_t x0, int64_t x1, const float* src, int64_t first,
                        int64_t pixel_step, int64_t row_step, const float* w, float* to) {
  using F = FloatVectors;
  constexpr int G = P < F::pixels_per_pass(V) ? P : F::pixels_per_pass(V);
  static_assert(P % G == 0, "pixels come in whole groups");
  for (int p0 = 0; p0 < P; p0 += G) {
    typename F::Reg acc[G][V];
    for (int p = 0; p < G; ++p)
      for (int j = 0; j < V; ++j) acc[p][j] = F::zero();
    for (int64_t ky = y0; ky < y1; ++ky)
      for (int64_t kx = x0; kx < x1; ++kx) {
        const float* pixel = src + (first + ky * row_step + kx * cin) + p0 * pixel_step;
        const float* tap = w + (ky * kw + kx) * cin * cout;
        for (int64_t ci = 0; ci < cin; ++ci) {
          typename F::Reg weights[V];
          for (int j = 0; j < V; ++j) weights[j] = F::load(tap + ci * cout + F::kLanes * j);
          for (int p = 0; p < G; ++p) {
            const typename F::Reg v = F::broadcast(pixel[p * pixel_step + ci]);
            for (int j = 0; j < V; ++j)  // exact: fused or not, the same sum
              acc[p][j] = F::fmadd(v, weights[j], acc[p][j]);
          }
        }
      }
    for (int p = 0; p < G; ++p)
      for (int j = 0; j < V; ++j) F::store(to + (p0 + p) * cout + F::kLanes * j, acc[p][j]);
  }
}
#endif

template <int P>
static bool conv_pixels_vectors(int64_t cout, int64_t cin, int64_t kw, int64_t y0, int64_t y1,
                                int64_t x0, int64_t x1, const float* src, int64_t first,
                                int64_t pixel_step, int64_t row_step, const float* w,
                                float* to) {
#if defined(__AVX512F__) || defined(__AVX2__)
  if (cout % FloatVectors::kLanes != 0 || cout / FloatVectors::kLanes > FloatVectors::kMaxVectors)
    return false;
  switch (cout / FloatVectors::kLanes) {
    case 1: conv_pixels<1, P>(cin, cout, kw, y0, y1, x0, x1, src, first, pixel_step, row_step, w, to); return true;
    case 2: conv_pixels<2, P>(cin, cout, kw, y0, y1, x0, x1, src, first, pixel_step, row_step, w, to); return true;
    case 3: conv_pixels<3, P>(cin, cout, kw, y0, y1, x0, x1, src, first, pixel_step, row_step, w, to); return true;
    case 4: conv_pixels<4, P>(cin, cout, kw, y0, y1, x0, x1, src, first, pixel_step, row_step, w, to); return true;
    case 6: conv_pixels<6, P>(cin, cout, kw, y0, y1, x0, x1, src, first, pixel_step, row_step, w, to); return true;
    case 8: conv_pixels<8, P>(cin, cout, kw, y0, y1, x0, x1, src, first, pixel_step, row_step, w, to); return true;
    default: return false;
  }
#else
  return false;
#endif
}

// Whether blocks_conv2d keeps output channels in vector registers (AVX-512 or AVX2
// builds): its plain loops elsewhere take several times oneDNN's time, and callers then
// use oneDNN.
bool blocks_conv2d_vectorized() {
#if defined(__AVX512F__) || defined(__AVX2__)
  return true;
#else
  return false;
#endif
}

// A convolution over channels-last integer codes whose blocks of samples each have their
// own code-unit weight (one block per task of a batch mixing tasks, or one for the
// batch): the stem of a mixed batch in one call instead of one oneDNN call per task,
// whose fixed cost (about 0.1 ms) is most of a few samples' work. Every product and
// partial sum is an integer times the weight's power-of-two unit below 2^24, so the
// float sums are exact in any order and equal the convolution's bit for bit.
void blocks_conv2d(
    const torch::Tensor& x,                       // float [B, Cin, H, W], channels-last
    torch::Tensor out,                            // float [B, Cout, Ho, Wo], channels-last
    const std::vector<int64_t>& starts,           // per block: first sample
    const std::vector<int64_t>& stops,            // per block: one past its last sample
    const std::vector<torch::Tensor>& taps,       // per block: float [kh, kw, Cin, Cout]
    int64_t stride, int64_t padding)
{
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat &&
              x.dim() == 4 && out.dim() == 4, "input and output must be float [B, C, H, W]");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast) &&
              out.is_contiguous(at::MemoryFormat::ChannelsLast),
              "input and output must be channels-last");
  TORCH_CHECK(starts.size() == stops.size() && starts.size() == taps.size(),
              "one start, stop and weight per block");
  TORCH_CHECK(stride >= 1 && padding >= 0, "stride must be positive, padding not negative");
  const int64_t batch = x.size(0), cin = x.size(1), height = x.size(2), width = x.size(3);
  const int64_t cout = out.size(1), out_h = out.size(2), out_w = out.size(3);
  TORCH_CHECK(out.size(0) == batch, "output must have the input's samples");
  std::vector<int64_t> block_of(static_cast<size_t>(batch), -1);
  int64_t kh = 0, kw = 0;
  for (size_t b = 0; b < starts.size(); ++b) {
    TORCH_CHECK(0 <= starts[b] && starts[b] <= stops[b] && stops[b] <= batch,
                "block out of range");
    const auto& t = taps[b];
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 4 &&
                t.size(2) == cin && t.size(3) == cout, "weights must be float [kh, kw, Cin, Cout]");
    TORCH_CHECK(b == 0 || (t.size(0) == kh && t.size(1) == kw), "one kernel size for all blocks");
    kh = t.size(0);
    kw = t.size(1);
    for (int64_t i = starts[b]; i < stops[b]; ++i) block_of[static_cast<size_t>(i)] = static_cast<int64_t>(b);
  }
  TORCH_CHECK(out_h == (height + 2 * padding - kh) / stride + 1 &&
              out_w == (width + 2 * padding - kw) / stride + 1, "output size does not match");
  for (int64_t i = 0; i < batch; ++i) TORCH_CHECK(block_of[static_cast<size_t>(i)] >= 0, "sample in no block");
  const float* src = x.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, batch * out_h, 1, [&](int64_t lo, int64_t hi) {
    std::vector<float> acc(static_cast<size_t>(cout));
    for (int64_t row = lo; row < hi; ++row) {
      const int64_t n = row / out_h, oy = row % out_h;
      const float* w = taps[static_cast<size_t>(block_of[static_cast<size_t>(n)])].data_ptr<float>();
      const int64_t y0 = std::max<int64_t>(0, padding - oy * stride);
      const int64_t y1 = std::min<int64_t>(kh, height + padding - oy * stride);
      const int64_t row_step = width * cin;
      for (int64_t ox = 0; ox < out_w;) {
        // the taps that fall inside the image
        const int64_t x0 = std::max<int64_t>(0, padding - ox * stride);
        const int64_t x1 = std::min<int64_t>(kw, width + padding - ox * stride);
        float* to = dst + ((n * out_h + oy) * out_w + ox) * cout;
        // offset of the input under tap (0, 0), which may lie outside the image (never
        // read there)
        const int64_t first = ((n * height + oy * stride - padding) * width +
                               ox * stride - padding) * cin;
        constexpr int64_t kPixels = 8;
        if (x0 == 0 && x1 == kw && ox + kPixels <= out_w &&
            (ox + kPixels - 1) * stride - padding + kw <= width &&
            conv_pixels_vectors<kPixels>(cout, cin, kw, y0, y1, 0, kw, src, first,
                                         stride * cin, row_step, w, to)) {
          ox += kPixels;
          continue;
        }
        ++ox;
        if (conv_pixels_vectors<1>(cout, cin, kw, y0, y1, x0, x1, src, first, stride * cin,
                                   row_step, w, to)) continue;
        const auto tap_input = [&](int64_t ky, int64_t kx) {
          return src + (first + ky * row_step + kx * cin);
        };
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t ky = y0; ky < y1; ++ky)
          for (int64_t kx = x0; kx < x1; ++kx) {
            const float* pixel = tap_input(ky, kx);
            const float* tap = w + (ky * kw + kx) * cin * cout;
            for (int64_t ci = 0; ci < cin; ++ci)
              for (int64_t co = 0; co < cout; ++co) acc[co] += pixel[ci] * tap[ci * cout + co];
          }
        std::copy(acc.begin(), acc.end(), to);
      }
    }
  });
}

// A training step's stacked fold (core/learning/stacked_fold.py): the padded codes of
// many layers as one [R, rows] matrix, a row per (layer, output channel, row group).
// Row i of layer l is output channel (i - start) / groups, row group (i - start) %
// groups; its element r is column g * rows + r of the layer's [Cout, weight_rows] weight
// (none past weight_rows: padding). A row is the codes times the row's column value, or
// a spare PE's codes where spare_slot names one; the weight is that times the channel's
// scale. The same two products, in the same order, as the fold written with torch's
// operators, so the weights are equal bit for bit.
static void check_fold_layers(const std::vector<int64_t>& starts,
                              const std::vector<int64_t>& groups,
                              const std::vector<int64_t>& weight_rows,
                              const std::vector<torch::Tensor>& scales,
                              const torch::Tensor& codes, const torch::Tensor& spare_slot,
                              int64_t n_spare) {
  TORCH_CHECK(codes.scalar_type() == at::kFloat && codes.dim() == 2 && codes.is_contiguous(),
              "codes must be float [R, rows], contiguous");
  const int64_t n_rows = codes.size(0), rows = codes.size(1);
  TORCH_CHECK(starts.size() == groups.size() + 1 && groups.size() == weight_rows.size() &&
              groups.size() == scales.size() && starts.front() == 0 && starts.back() == n_rows,
              "one start (and the end), group count, weight width and scale per layer");
  for (size_t l = 0; l < groups.size(); ++l) {
    const int64_t layer_rows = starts[l + 1] - starts[l];
    TORCH_CHECK(groups[l] > 0 && layer_rows >= 0 && layer_rows % groups[l] == 0 &&
                weight_rows[l] <= groups[l] * rows, "layer rows do not match its groups");
    TORCH_CHECK(scales[l].scalar_type() == at::kFloat && scales[l].is_contiguous() &&
                scales[l].numel() == layer_rows / groups[l], "scale must be float [Cout]");
  }
  TORCH_CHECK(spare_slot.scalar_type() == at::kLong && spare_slot.is_contiguous() &&
              spare_slot.numel() == n_rows, "spare_slot must be long [R]");
  const int64_t* slot = spare_slot.data_ptr<int64_t>();
  for (int64_t i = 0; i < n_rows; ++i)
    TORCH_CHECK(slot[i] >= -1 && slot[i] < n_spare, "spare slot out of range");
}

// Calls row(i, l, o, g, width) for every row i of the stack (layer l, output channel o,
// row group g, width of its elements inside the weight), rows split among threads.
template <typename Row>
static void for_each_fold_row(const std::vector<int64_t>& starts,
                              const std::vector<int64_t>& groups,
                              const std::vector<int64_t>& weight_rows, int64_t rows,
                              const Row& row) {
  at::parallel_for(0, starts.back(), 256, [&](int64_t lo, int64_t hi) {
    size_t l = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), lo) -
                                   starts.begin()) - 1;
    for (int64_t i = lo; i < hi; ++i) {
      while (i >= starts[l + 1]) ++l;
      const int64_t o = (i - starts[l]) / groups[l], g = (i - starts[l]) % groups[l];
      row(i, l, o, g, std::max<int64_t>(0, std::min(rows, weight_rows[l] - g * rows)));
    }
  });
}

std::vector<torch::Tensor> stacked_fold_forward(
    const torch::Tensor& codes,                  // float [R, rows], contiguous
    const torch::Tensor& row_values,             // float [R] (column values) or empty
    const torch::Tensor& spare,                  // float [S, rows]: spare PEs' codes
    const torch::Tensor& spare_slot,             // long [R]: row of spare, or -1
    const std::vector<int64_t>& starts,          // per layer: first row; then R
    const std::vector<int64_t>& groups,          // per layer: row groups
    const std::vector<int64_t>& weight_rows,     // per layer: Cin * kh * kw
    const std::vector<torch::Tensor>& scales)    // per layer: float [Cout]
{
  check_fold_layers(starts, groups, weight_rows, scales, codes, spare_slot, spare.size(0));
  const int64_t n_rows = codes.size(0), rows = codes.size(1);
  const bool masked = row_values.numel() > 0;
  TORCH_CHECK(!masked || (row_values.scalar_type() == at::kFloat &&
                          row_values.is_contiguous() && row_values.numel() == n_rows),
              "row values must be float [R]");
  TORCH_CHECK(spare.scalar_type() == at::kFloat && spare.dim() == 2 && spare.is_contiguous() &&
              (spare.size(0) == 0 || spare.size(1) == rows), "spare must be float [S, rows]");
  std::vector<torch::Tensor> weights;
  std::vector<float*> out;
  for (size_t l = 0; l < groups.size(); ++l) {
    weights.push_back(at::empty({(starts[l + 1] - starts[l]) / groups[l], weight_rows[l]},
                                codes.options()));
    out.push_back(weights.back().data_ptr<float>());
  }
  const float* c = codes.data_ptr<float>();
  const float* v = masked ? row_values.data_ptr<float>() : nullptr;
  const float* sp = spare.size(0) ? spare.data_ptr<float>() : nullptr;
  const int64_t* slot = spare_slot.data_ptr<int64_t>();
  for_each_fold_row(starts, groups, weight_rows, rows,
                    [&](int64_t i, size_t l, int64_t o, int64_t g, int64_t width) {
    const float scale = scales[l].data_ptr<float>()[o];
    float* to = out[l] + o * weight_rows[l] + g * rows;
    const float* from = c + i * rows;
    if (slot[i] >= 0) {
      const float* codes_of_spare = sp + slot[i] * rows;
      for (int64_t r = 0; r < width; ++r) to[r] = codes_of_spare[r] * scale;
    } else if (masked) {
      const float value = v[i];
      for (int64_t r = 0; r < width; ++r) {
        const float folded = from[r] * value;  // rounded, as torch's product is
        to[r] = folded * scale;
      }
    } else {
      for (int64_t r = 0; r < width; ++r) to[r] = from[r] * scale;
    }
  });
  return weights;
}

// Its backward from each layer's weight gradient: the row products whose sums over a
// row are the column values' gradients (the gradient of a row, the weight's times the
// scale and zero on padding and spare rows, times the codes; torch sums them, as its
// own backward of the fold does), and the spare PEs' codes' gradients.
std::vector<torch::Tensor> stacked_fold_backward(
    const std::vector<torch::Tensor>& grads,     // per layer: float [Cout, weight_rows]
    const torch::Tensor& codes,                  // float [R, rows], contiguous
    const torch::Tensor& spare_slot,             // long [R]: row of spare, or -1
    int64_t n_spare,                             // S
    bool row_products,                           // false: no column values to differentiate
    const std::vector<int64_t>& starts,
    const std::vector<int64_t>& groups,
    const std::vector<int64_t>& weight_rows,
    const std::vector<torch::Tensor>& scales)
{
  check_fold_layers(starts, groups, weight_rows, scales, codes, spare_slot, n_spare);
  const int64_t n_rows = codes.size(0), rows = codes.size(1);
  TORCH_CHECK(grads.size() == groups.size(), "one gradient per layer");
  for (size_t l = 0; l < grads.size(); ++l)
    TORCH_CHECK(grads[l].scalar_type() == at::kFloat && grads[l].is_contiguous() &&
                grads[l].numel() == (starts[l + 1] - starts[l]) / groups[l] * weight_rows[l],
                "gradient must be float [Cout, weight_rows], contiguous");
  auto products = row_products ? at::empty({n_rows, rows}, codes.options())
                               : at::empty({0, rows}, codes.options());
  auto spare_grad = at::empty({n_spare, rows}, codes.options());
  const float* c = codes.data_ptr<float>();
  float* prod = row_products ? products.data_ptr<float>() : nullptr;
  float* sg = n_spare ? spare_grad.data_ptr<float>() : nullptr;
  const int64_t* slot = spare_slot.data_ptr<int64_t>();
  for_each_fold_row(starts, groups, weight_rows, rows,
                    [&](int64_t i, size_t l, int64_t o, int64_t g, int64_t width) {
    const float scale = scales[l].data_ptr<float>()[o];
    const float* grad = grads[l].data_ptr<float>() + o * weight_rows[l] + g * rows;
    const float* from = c + i * rows;
    if (slot[i] >= 0) {
      float* to = sg + slot[i] * rows;
      for (int64_t r = 0; r < width; ++r) to[r] = grad[r] * scale;
      for (int64_t r = width; r < rows; ++r) to[r] = 0.0f;
    }
    if (!row_products) return;
    float* to = prod + i * rows;
    if (slot[i] >= 0) {  // the spare codes replaced this row: no gradient reaches it
      for (int64_t r = 0; r < rows; ++r) to[r] = 0.0f * from[r];
      return;
    }
    for (int64_t r = 0; r < width; ++r) {
      const float row_grad = grad[r] * scale;  // rounded, as torch's product is
      to[r] = row_grad * from[r];
    }
    for (int64_t r = width; r < rows; ++r) to[r] = 0.0f * from[r];
  });
  return {products, spare_grad};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("crossbar_conv2d", &crossbar_conv2d,
        "Row-group partial sums, ADC, shift-add, column masks and adder tree of one layer");
  m.def("crossbar_matmul", &crossbar_matmul,
        "crossbar_conv2d as matrix products over im2col rows, for exact partial sums, "
        "each block of images with its own cells");
  m.def("periphery_norm", &periphery_norm,
        "BatchNorm, clamp and round in one pass, per block of samples with its own terms");
  m.def("train_periphery_forward", &train_periphery_forward,
        "A training pass's BatchNorm, ReLU6 and fake quantization in one pass");
  m.def("train_periphery_backward", &train_periphery_backward,
        "Its gradients (input, BatchNorm weight and bias) in one pass");
  m.def("stacked_fold_forward", &stacked_fold_forward,
        "A training step's stacked fold: every layer's weight in one pass");
  m.def("stacked_fold_backward", &stacked_fold_backward,
        "Its backward: row products for the column values' gradients, spare PEs' gradients");
  m.def("blocks_pointwise", &blocks_pointwise,
        "Each block of rows of a 1x1 layer times its own task's codes");
  m.def("block_channels_rows", &block_channels_rows,
        "Every task's changed output channels of a 1x1 layer on its own block of rows");
  m.def("int8_blocks_product", &int8_blocks_product,
        "Each block of rows of a 1x1 layer times its own int8 weight (packed), int32 sums");
  m.def("blocks_conv2d", &blocks_conv2d,
        "A convolution over channels-last codes, each block of samples with its own weight");
  m.def("int8_vnni", &int8_vnni, "Whether int8_blocks_product runs on AVX-512 VNNI");
  m.def("int8_vectorized", &int8_vectorized,
        "Whether int8_blocks_product has vector loops here (AVX-512 VNNI or AVX2)");
  m.def("blocks_conv2d_vectorized", &blocks_conv2d_vectorized,
        "Whether blocks_conv2d runs its vectorized loops (AVX-512 or AVX2)");
  m.def("stack_input_cycles", &stack_input_cycles,
        "Input codes split into DAC cycles, stacked and channel-padded for the operator");
}
