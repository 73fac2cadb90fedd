// Crossbar-exact convolution of one chunk of input cycles.
//
// Row-group partial sums come from one grouped convolution over cell levels
// (a row group is whole input channels, so every PE of a layer is one group),
// then a single pass per (image, output channel) digitises every column with
// its ADC, combines cell slices by significance in the shift-adder, applies the
// column's shift mask, subtracts the offset-encoding correction, sums row groups
// in the adder tree and weights each input cycle by its significance and sign.
// The semantics are those of core/ops/crossbar.py:_adc_shift_add_reference; the
// two are compared by property-based tests.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
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
    double adc_qmax,
    double adc_offset_lsb,
    double weight_offset,
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

  const float* ps = psum.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  const auto sw = slice_weight.contiguous();
  const auto st = adc_step.contiguous();
  const auto cv = column_values.contiguous();
  const auto cw = cycle_weight.contiguous();
  const float* slice_w = sw.data_ptr<float>();
  const float* step = st.data_ptr<float>();
  const float* col = cv.data_ptr<float>();
  const float* cyc = cw.data_ptr<float>();
  torch::Tensor noise_t;
  const float* noise = nullptr;
  if (read_noise.has_value()) {
    noise_t = read_noise->contiguous();
    noise = noise_t.data_ptr<float>();
  }
  const float qmax = static_cast<float>(adc_qmax);
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
              const float s_w = s < slices ? slice_w[s] : 0.0f;
              for (int64_t i = 0; i < hw; ++i) {
                const float digit = t > 0 ? std::floor(rest[i] * inv_d) : rest[i];
                rest[i] -= digit * d;
                float analog = digit;
                if (nz != nullptr) analog += nz[i];
                float level = std::nearbyint(analog / s_step + offset_lsb);
                level = std::min(std::max(level, 0.0f), qmax);
                value[i] += level * s_step * s_w;
              }
            }
          }
          const float* input_sum = group + (columns - 1) * hw;
          for (int64_t i = 0; i < hw; ++i) {
            acc[i] += factor * (value[i] - w_offset * input_sum[i]);
          }
        }
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("crossbar_conv2d", &crossbar_conv2d,
        "Row-group partial sums, ADC, shift-add, column masks and adder tree of one layer");
}
