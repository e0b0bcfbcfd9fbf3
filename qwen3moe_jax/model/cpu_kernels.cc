// The matrix-vector products of a decode step on the CPU, called through XLA's FFI (cpu_kernels.build compiles this
// file once per machine, without -march flags, so the library runs on any CPU of its architecture).
//
// Why (benchmarks/cpu-2core-llamacpp-decode-2026-11-26-2.md): XLA:CPU (jax 0.10) copies a gathered expert's
// matrices before multiplying them, 36-43% of a decode step on 2 cores, twice the time of the products that then
// read the copies; and its products of a few rows by a small weight matrix stream the weights at about a third of
// memory speed. A decode step reads each weight once per token, so its speed is the speed weights stream at. These
// kernels read them once, in place, in contiguous runs, on XLA's intra-op threads.
//
//   qwen3moe_cpu_matmul:          x [M, K], w [K, N]  ->  x @ w  [M, N]
//   qwen3moe_cpu_experts_swiglu:  rows [M, E], row_expert [M] s32, gate / up [X, E, F], down [X, F, E]  ->  [M, E]
//       out[m] = (silu(rows[m] @ gate[e]) * (rows[m] @ up[e])) @ down[e],  e = row_expert[m];  zero when e >= X
//   qwen3moe_cpu_host_step:       tokens [B] s32, attribute grammar  ->  forced [B] s32, masks [B, W] s32
//       calls the host function set by qwen3moe_set_host_step: the grammar of a constrained decode step
//       (constraints.BlockGrammar). JAX's own host callbacks cost ~0.3 ms a call in a decode step on 2 cores
//       (io_callback also moves the step to JAX's slow dispatch path); this ~0.02 ms (measured).
//
// Each kernel splits its work into tasks that the calling thread and the pool's take in turn, and adds the tasks'
// partial sums in a fixed order. The split depends only on the widths, never on the number of threads or rows, so
// a row's result is the same however many rows run with it, on however many threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kSlice = 256;  // FFN columns an expert task covers: its accumulators stay in L1

// acc[c] += sum_i x[i] * w[i, c0 + c] for c < width, w row-major [K, N]: row by row, so each step reads a
// contiguous run of the weights that the compiler vectorises.
void AccumulateSlice(const float* x, const float* w, int64_t K, int64_t N, int64_t c0, int64_t width, float* acc) {
  for (int64_t i = 0; i < K; ++i) {
    const float xi = x[i];
    const float* w_row = w + i * N + c0;
    for (int64_t c = 0; c < width; ++c) acc[c] += xi * w_row[c];
  }
}

// Runs task(0..tasks-1) on the calling thread and on up to (pool threads - 1) helpers. A helper that starts after
// every task is taken finds none and returns: the shared state outlives this call for it.
void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, std::function<void(int64_t)> task) {
  struct State {
    std::function<void(int64_t)> task;
    int64_t tasks;
    std::atomic<int64_t> next{0}, done{0};
    void Work() {
      for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
        task(t);
        done.fetch_add(1, std::memory_order_release);
      }
    }
  };
  auto state = std::make_shared<State>();
  state->task = std::move(task);
  state->tasks = tasks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), tasks) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([state] { state->Work(); });
  state->Work();
  while (state->done.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

using Matrix = ffi::Buffer<ffi::F32, 2>;
using Experts = ffi::Buffer<ffi::F32, 3>;
using Ids = ffi::Buffer<ffi::S32, 1>;
using MatrixResult = ffi::ResultBuffer<ffi::F32, 2>;

int64_t Slices(int64_t width, int64_t slice) { return (width + slice - 1) / slice; }

// A task: kMatmulRows whole rows of w (a contiguous block, from memory for the first row of x and from cache for
// the others) times the matching columns of x, into that block's partial output [M, N]; the blocks' partials are
// added in block order.
constexpr int64_t kMatmulRows = 64;

ffi::Error Matmul(ffi::ThreadPool pool, Matrix x, Matrix w, MatrixResult out) {
  const int64_t M = x.dimensions()[0], K = x.dimensions()[1], N = w.dimensions()[1];
  if (w.dimensions()[0] != K) return ffi::Error::InvalidArgument("qwen3moe_cpu_matmul: x [M,K] and w [K,N] differ in K");
  const int64_t blocks = Slices(K, kMatmulRows);
  std::vector<float> partials(blocks * M * N, 0.0f);  // [blocks, M, N]
  const float *xs = x.typed_data(), *ws = w.typed_data();
  float* partial_base = partials.data();
  ParallelFor(pool, blocks, [=](int64_t block) {
    const int64_t i0 = block * kMatmulRows, rows = std::min(kMatmulRows, K - i0);
    for (int64_t m = 0; m < M; ++m) {
      AccumulateSlice(xs + m * K + i0, ws + i0 * N, rows, N, 0, N, partial_base + (block * M + m) * N);
    }
  });
  float* result = out->typed_data();
  std::copy_n(partial_base, M * N, result);
  for (int64_t block = 1; block < blocks; ++block) {
    const float* partial = partial_base + block * M * N;
    for (int64_t j = 0; j < M * N; ++j) result[j] += partial[j];
  }
  return ffi::Error::Success();
}

ffi::Error MoeSwiglu(ffi::ThreadPool pool, Matrix rows, Ids row_expert, Experts gate, Experts up, Experts down,
                     MatrixResult out) {
  const auto rows_dims = rows.dimensions(), gate_dims = gate.dimensions(), up_dims = up.dimensions(),
             down_dims = down.dimensions();
  if (row_expert.element_count() != rows_dims[0] || gate_dims[1] != rows_dims[1] ||
      up_dims[0] != gate_dims[0] || up_dims[1] != gate_dims[1] || up_dims[2] != gate_dims[2] ||
      down_dims[0] != gate_dims[0] || down_dims[1] != gate_dims[2] || down_dims[2] != rows_dims[1]) {
    return ffi::Error::InvalidArgument("qwen3moe_cpu_experts_swiglu: shapes do not fit rows [M,E], row_expert [M], "
                                       "gate/up [X,E,F], down [X,F,E]");
  }
  const int64_t pairs = rows_dims[0], E = rows_dims[1], X = gate_dims[0], F = gate_dims[2];
  const int64_t slices = Slices(F, kSlice);
  std::vector<float> partials(pairs * slices * E);  // each task's share of its pair's output
  const float *xs = rows.typed_data(), *gates = gate.typed_data(), *ups = up.typed_data(), *downs = down.typed_data();
  const int32_t* experts = row_expert.typed_data();
  float* partial_base = partials.data();
  // Pair m, FFN columns [c0, c0 + width): that slice of silu(x @ gate) * (x @ up), times the same rows of down.
  ParallelFor(pool, pairs * slices, [=](int64_t t) {
    const int64_t m = t / slices, c0 = (t % slices) * kSlice, width = std::min(kSlice, F - c0);
    const int64_t e = experts[m];
    float* partial = partial_base + t * E;
    std::fill(partial, partial + E, 0.0f);
    if (e < 0 || e >= X) return;  // an expert another device holds: this pair contributes nothing here
    float g[kSlice] = {}, u[kSlice] = {};
    AccumulateSlice(xs + m * E, gates + e * E * F, E, F, c0, width, g);
    AccumulateSlice(xs + m * E, ups + e * E * F, E, F, c0, width, u);
    const float* down_rows = downs + (e * F + c0) * E;
    for (int64_t c = 0; c < width; ++c) {
      const float h = g[c] / (1.0f + std::exp(-g[c])) * u[c];
      for (int64_t j = 0; j < E; ++j) partial[j] += h * down_rows[c * E + j];
    }
  });
  float* result = out->typed_data();
  for (int64_t m = 0; m < pairs; ++m) {
    float* row = result + m * E;
    std::copy_n(partial_base + m * slices * E, E, row);
    for (int64_t s = 1; s < slices; ++s) {
      const float* partial = partial_base + (m * slices + s) * E;
      for (int64_t j = 0; j < E; ++j) row[j] += partial[j];
    }
  }
  return ffi::Error::Success();
}

// The host function (a ctypes callback, which takes Python's GIL itself): the grammar numbered `grammar` takes the
// tokens and fills forced and masks; returns 0, or nonzero when it failed (it has logged why).
using MaskWords = ffi::Buffer<ffi::S32, 2>;
using HostStep = int (*)(int64_t grammar, int64_t rows, int64_t words, const int32_t* tokens, int32_t* forced,
                         int32_t* masks);
std::atomic<HostStep> host_step{nullptr};

// Python's PyGILState_GetThisThreadState, PyGILState_Ensure and PyEval_SaveThread, looked up by cpu_kernels.py (this
// file needs no Python headers). A ctypes callback called from a thread Python does not know creates a Python thread
// state for the call and destroys it after, ~25 us of a ~45 us call here (measured). So a thread without one (an XLA
// worker) is given one for good: Ensure creates it and takes the GIL, SaveThread releases the GIL and keeps it; the
// callback's own Ensure then finds it. A thread that has one already (a Python thread, holding the GIL or not) is
// left as it is: the callback's Ensure and Release take and give back the GIL correctly there by themselves.
using PythonCall = void* (*)();
PythonCall this_thread_state = nullptr, gil_ensure = nullptr, save_thread = nullptr;

ffi::Error CallHostStep(Ids tokens, ffi::Result<Ids> forced, ffi::Result<MaskWords> masks, int64_t grammar) {
  const HostStep step = host_step.load();
  if (step == nullptr) return ffi::Error::Internal("no host step is set (qwen3moe_set_host_step)");
  const auto dims = masks->dimensions();
  if (tokens.dimensions()[0] != dims[0] || forced->dimensions()[0] != dims[0]) {
    return ffi::Error::InvalidArgument("the host step's tokens, forced tokens and masks need one row each");
  }
  if (this_thread_state() == nullptr) {
    gil_ensure();
    save_thread();
  }
  if (step(grammar, dims[0], dims[1], tokens.typed_data(), forced->typed_data(), masks->typed_data()) != 0) {
    return ffi::Error::Internal("the grammar of a decode step failed (its error is in the log)");
  }
  return ffi::Error::Success();
}

}  // namespace

extern "C" void qwen3moe_set_host_step(HostStep step, PythonCall thread_state, PythonCall ensure, PythonCall save) {
  this_thread_state = thread_state;
  gil_ensure = ensure;
  save_thread = save;
  host_step.store(step);
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3moe_cpu_host_step, CallHostStep,
                              ffi::Ffi::Bind()
                                  .Arg<Ids>()
                                  .Ret<Ids>()
                                  .Ret<MaskWords>()
                                  .Attr<int64_t>("grammar"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3moe_cpu_matmul, Matmul,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<Matrix>().Arg<Matrix>().Ret<Matrix>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(qwen3moe_cpu_experts_swiglu, MoeSwiglu,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Matrix>()
                                  .Arg<Ids>()
                                  .Arg<Experts>()
                                  .Arg<Experts>()
                                  .Arg<Experts>()
                                  .Ret<Matrix>());
