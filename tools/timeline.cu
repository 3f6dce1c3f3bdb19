// Developer tool (GPU): where one decode-kernel call spends its time, block by block.
//
//   nvcc -std=c++17 -O3 -arch=sm_90a -DFLUTE_JAX_TIMELINE -Icsrc \
//        -I$(python3 -c "import jax.ffi; print(jax.ffi.include_dir())") \
//        tools/timeline.cu csrc/qgemm_wgmma.cu -o /tmp/timeline
//   /tmp/timeline M K N [bits=4] [group=128] [reps=20] [tile]
//
// With `tile` it runs the wgmma tile kernel's plan instead (sm_90a, larger M); it is
// also a plain CUDA program on the production launch path, for compute-sanitizer,
// which does not run under JAX here.
//
// It runs the production launch path (MakeFlutePlan + LaunchQgemmFlute with the
// call site's counters; with FLUTE_JAX_COUNTERS=workspace the counter-zeroing
// kernel, then the decode kernel as its programmatic dependent) on
// random codes, scales, table and x, with L2 flushed before each call (not with
// FLUTE_TIMELINE_HOT=1 in the environment), and reads
// back the %globaltimer stamps that thread 0 of each block writes when the probe
// is compiled in (flute_common.cuh, Stamp). Times are relative to the first
// block's start, averaged over the reps (medians and maxima over blocks).
// Speed of record comes from `python -m flute_jax.bench`, not from this tool.
#include "../csrc/qgemm_flute.cu"

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace flute_jax {
cudaError_t TileTimelineCopy(void* host, size_t bytes, bool to_device);  // csrc/qgemm_wgmma.cu
}

namespace {

#define CHECK(call)                                                                        \
  do {                                                                                     \
    cudaError_t e_ = (call);                                                               \
    if (e_ != cudaSuccess) {                                                               \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_)); \
      std::exit(1);                                                                        \
    }                                                                                      \
  } while (0)

// Deterministic pseudo-random fill: 32-bit words, or bf16 values in [lo, hi).
__device__ uint32_t Hash(uint64_t i) {
  uint64_t z = i * 0x9E3779B97F4A7C15ull + 0x632BE59BD9B4E019ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return static_cast<uint32_t>(z ^ (z >> 31));
}
__global__ void FillWords(uint32_t* w, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    w[i] = Hash(seed * 0x100000000ull + i);
}
__global__ void FillBf16(__nv_bfloat16* v, int64_t n, uint64_t seed, float lo, float hi) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n; i += int64_t{gridDim.x} * blockDim.x)
    v[i] = __float2bfloat16(lo + (hi - lo) * (Hash(seed * 0x100000000ull + i) >> 8) * (1.f / 16777216.f));
}

double Median(std::vector<double> v) {
  if (v.empty()) return 0.0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  using namespace flute_jax;
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s M K N [bits=4] [group=128] [reps=20] [tile]\n", argv[0]);
    return 2;
  }
  const int64_t m = std::atoll(argv[1]), k = std::atoll(argv[2]), n = std::atoll(argv[3]);
  const int bits = argc > 4 ? std::atoi(argv[4]) : 4;
  const int64_t group = argc > 5 ? std::atoll(argv[5]) : 128;
  const int reps = argc > 6 ? std::atoi(argv[6]) : 20;
  const bool tile = argc > 7 && std::string(argv[7]) == "tile";
  // FLUTE_TIMELINE_HOT=1: no L2 flush, so the operands stay in L2 from the call
  // before (what a prefetch of the weights into L2 could give at best).
  const bool hot = std::getenv("FLUTE_TIMELINE_HOT") != nullptr;
  const FlutePlan plan = MakeFlutePlan(m, k, n, group, bits, true, true, /*want_wgmma=*/tile);
  if (!plan.fast || plan.wgmma != tile) {
    std::fprintf(stderr, "the %s kernel does not take this call\n", tile ? "tile" : "decode");
    return 2;
  }
  QgemmDims d{m, k, n, (n + 15) / 16, (k + group - 1) / group, group, bits};
  // FLUTE_TIMELINE_EPILOGUE=swiglu: the fused SwiGLU epilogue (N % 16 == 0); y is then allocated
  // with N / 2 columns exactly, so compute-sanitizer's memcheck sees any store past them.
  const char* epilogue = std::getenv("FLUTE_TIMELINE_EPILOGUE");
  if (epilogue != nullptr && std::string(epilogue) == "swiglu") {
    if (n % 16 != 0) {
      std::fprintf(stderr, "the swiglu epilogue needs N a multiple of 16\n");
      return 2;
    }
    d.epilogue = kEpilogueSwiglu;
  }
  const int64_t y_cols = OutputColumns(n, d.epilogue);
  const int64_t code_words = plan.k_units * d.n_blocks * 128 * bits;
  uint32_t* codes;
  __nv_bfloat16 *x, *scales, *table, *y;
  void *workspace, *flush;
  const size_t flush_bytes = size_t{256} << 20;  // > L2 (50 MB on H100/H200)
  CHECK(cudaMalloc(&codes, code_words * 4));
  CHECK(cudaMalloc(&x, m * k * 2));
  CHECK(cudaMalloc(&scales, d.groups * n * 2));
  CHECK(cudaMalloc(&table, (1 << bits) * 2));
  CHECK(cudaMalloc(&y, m * y_cols * 2));
  CHECK(cudaMalloc(&workspace, plan.workspace_bytes));
  // The call site's own Stream-K counters, zeroed once, as the FFI handler passes
  // them (csrc/call_counters.h); FLUTE_JAX_COUNTERS=workspace: zeroed per launch.
  const char* counters_mode = std::getenv("FLUTE_JAX_COUNTERS");
  int* call_counters = nullptr;
  if (counters_mode == nullptr || std::string(counters_mode) != "workspace") {
    CHECK(cudaMalloc(&call_counters, FluteCounterCount(plan) * sizeof(int)));
    CHECK(cudaMemset(call_counters, 0, FluteCounterCount(plan) * sizeof(int)));
  }
  CHECK(cudaMalloc(&flush, flush_bytes));
  FillWords<<<1024, 256>>>(codes, code_words, 1);
  FillBf16<<<1024, 256>>>(x, m * k, 2, -1.f, 1.f);
  FillBf16<<<1024, 256>>>(scales, d.groups * n, 3, 0.005f, 0.02f);
  FillBf16<<<1, 32>>>(table, 1 << bits, 4, -1.f, 1.f);
  CHECK(cudaDeviceSynchronize());

  cudaStream_t stream;
  CHECK(cudaStreamCreate(&stream));
  cudaEvent_t start, stop;
  CHECK(cudaEventCreate(&start));
  CHECK(cudaEventCreate(&stop));
  // (Decode launches cover M in launches of rows_per_launch rows; the tile kernel's
  // Stream-K columns are row_tiles x feature columns.)
  std::printf("M=%lld K=%lld N=%lld bits=%d group=%lld: grid %d, %d rows per %s, %d x %d columns of %d features x %d "
              "units, %lld iterations\n",
              (long long)m, (long long)k, (long long)n, bits, (long long)group, plan.grid, plan.rows_per_launch,
              plan.wgmma ? "tile" : "launch", plan.row_tiles, plan.columns, plan.column_n, plan.k_units,
              (long long)plan.row_tiles * plan.columns * plan.k_units);

  constexpr int kS = flute::kStamps;
  const char* names[kS - 1] = {"entry", "table built", "first stage", "compute done", "counter", "fix-up done", "exit"};
  std::vector<double> med_sum(kS - 1, 0.0), max_sum(kS - 1, 0.0);
  double span_sum = 0.0, event_sum = 0.0, entry_spread_sum = 0.0;
  std::vector<unsigned long long> host(plan.grid * kS);
  std::vector<unsigned long long> zeros(8192 * kS, 0);
  // The stamps of the kernel that runs: the tile kernel stamps its own translation unit's
  // copy of the timeline, the decode kernel this one's.
  auto copy_timeline = [tile](unsigned long long* h, size_t bytes, bool to_device) {
    if (tile) return TileTimelineCopy(h, bytes, to_device);
    return to_device ? cudaMemcpyToSymbol(flute::g_timeline, h, bytes) : cudaMemcpyFromSymbol(h, flute::g_timeline, bytes);
  };
  for (int rep = -3; rep < reps; ++rep) {  // 3 warm-up calls
    CHECK(copy_timeline(zeros.data(), zeros.size() * 8, true));
    if (!hot) CHECK(cudaMemsetAsync(flush, rep & 0xff, flush_bytes, stream));
    CHECK(cudaEventRecord(start, stream));
    CHECK(LaunchQgemmFlute(stream, true, x, codes, scales, table, y, workspace, call_counters, d, plan));
    CHECK(cudaEventRecord(stop, stream));
    CHECK(cudaStreamSynchronize(stream));
    if (rep < 0) continue;
    float event_ms = 0.f;
    CHECK(cudaEventElapsedTime(&event_ms, start, stop));
    CHECK(copy_timeline(host.data(), host.size() * 8, false));
    unsigned long long t0 = ~0ull, t_end = 0, last_entry = 0;
    for (int b = 0; b < plan.grid; ++b) {
      t0 = std::min(t0, host[b * kS]);
      last_entry = std::max(last_entry, host[b * kS]);
      t_end = std::max(t_end, host[b * kS + 6]);
    }
    for (int i = 0; i < kS - 1; ++i) {
      std::vector<double> v;
      for (int b = 0; b < plan.grid; ++b)
        if (host[b * kS + i]) v.push_back((host[b * kS + i] - t0) * 1e-3);
      med_sum[i] += Median(v);
      max_sum[i] += v.empty() ? 0.0 : *std::max_element(v.begin(), v.end());
    }
    span_sum += (t_end - t0) * 1e-3;
    entry_spread_sum += (last_entry - t0) * 1e-3;
    event_sum += event_ms * 1e3;
    if (rep == reps - 1) {  // the last call's blocks, for a closer look
      std::FILE* f = std::fopen("timeline_blocks.csv", "w");
      if (f) {
        std::fprintf(f, "block,sm,iterations");
        for (int i = 0; i < kS - 1; ++i) std::fprintf(f, ",%s", names[i]);
        std::fprintf(f, "\n");
        for (int b = 0; b < plan.grid; ++b) {
          const unsigned long long meta = host[b * kS + kS - 1];
          std::fprintf(f, "%d,%llu,%llu", b, meta & 0xffff, meta >> 16);
          for (int i = 0; i < kS - 1; ++i)
            std::fprintf(f, ",%.3f", host[b * kS + i] ? (host[b * kS + i] - t0) * 1e-3 : -1.0);
          std::fprintf(f, "\n");
        }
        std::fclose(f);
      }
    }
  }
  if (tile) std::printf("tile kernel: %d calls ran\n", reps + 3);
  std::printf("us after the first block's start, mean of %d calls (median / max over blocks):\n", reps);
  for (int i = 0; i < kS - 1; ++i)
    std::printf("  %-13s %7.2f / %7.2f\n", names[i], med_sum[i] / reps, max_sum[i] / reps);
  std::printf("  blocks started within %.2f us; kernel span %.2f us; events around the launch %.2f us\n",
              entry_spread_sum / reps, span_sum / reps, event_sum / reps);
  return 0;
}
