// Thin wrappers around the PTX instructions the FLUTE kernel uses: cp.async,
// mbarriers, ldmatrix and mma.sync. All of them exist on sm_80 and sm_90; the
// sm_90-only ones (mbarrier.try_wait, which lets the hardware suspend the
// waiting warp instead of spinning; bulk copies and their transaction counts;
// griddepcontrol) are chosen at compile time, and callers of the bulk copy keep
// an sm_80 path.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace flute_jax {
namespace ptx {

__device__ __forceinline__ uint32_t SharedAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; with `valid` false it reads nothing and writes zeros.
__device__ __forceinline__ void CpAsync16(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem),
               "r"(valid ? 16 : 0)
               : "memory");
}
// 16-byte copy, skipped entirely when `valid` is false (the destination keeps its bytes).
__device__ __forceinline__ void CpAsync16If(uint32_t smem, const void* gmem, bool valid) {
  asm volatile(
      "{ .reg .pred p; setp.ne.b32 p, %2, 0;\n"
      "  @p cp.async.cg.shared.global [%0], [%1], 16; }\n" ::"r"(smem),
      "l"(gmem), "r"(static_cast<int>(valid))
      : "memory");
}
__device__ __forceinline__ void CpAsyncWaitAll() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// mbarrier: a phase completes when `count` arrivals have happened.
__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrive once this thread's earlier cp.async copies have landed (counts as one of
// the phase's arrivals: .noinc).
__device__ __forceinline__ void MbarArriveOnCopies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared.b64 [%0];\n" ::"r"(bar) : "memory");
}
// Arrive now (release: this thread's earlier shared-memory reads are done).
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("{ .reg .b64 state; mbarrier.arrive.shared.b64 state, [%0]; }\n" ::"r"(bar) : "memory");
}
// sm_90: the current phase also waits for `bytes` more bytes of bulk copies
// (complete_tx) before it completes; not an arrival.
__device__ __forceinline__ void MbarExpectTx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#endif
}
// sm_90: global -> shared copy of `bytes` (a multiple of 16, both addresses
// 16-byte aligned) by the TMA unit, which counts the bytes against `bar`'s
// expected transaction count as they land. Its shared-memory writes are whole
// lines: cp.async's 16-byte writes cost twice the ideal wavefronts (ncu, H200).
__device__ __forceinline__ void BulkCopyToShared(uint32_t smem, const void* gmem, uint32_t bytes, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(smem),
               "l"(gmem), "r"(bytes), "r"(bar)
               : "memory");
#endif
}
// sm_90: the box at coordinates (c0 innermost, c1) of the tensor that the
// CUtensorMap at generic address `tensor_map` (a __grid_constant__ kernel parameter)
// describes, copied by the TMA unit to `smem` in the map's layout and swizzle;
// elements outside the tensor read as zero. The box's bytes count against `bar`.
__device__ __forceinline__ void TensorCopy2d(uint32_t smem, uint64_t tensor_map, int c0, int c1, uint32_t bar) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          smem),
      "l"(tensor_map), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
#endif
}
// sm_90: fetch the CUtensorMap at generic address `tensor_map` (a __grid_constant__
// kernel parameter) into the TMA unit's descriptor cache, so the first tensor copy
// does not wait for it. The map is a launch parameter, not an operand that an
// earlier kernel writes, so this may run before griddepcontrol.wait.
__device__ __forceinline__ void PrefetchTensorMap(uint64_t tensor_map) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(tensor_map) : "memory");
#endif
}
// Wait until the phase with the given parity has completed (acquire).
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  uint32_t done;
  do {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#else
    asm volatile(
        "{ .reg .pred p; mbarrier.test_wait.parity.shared.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
#endif
  } while (!done);
}

// Barrier among the first `threads` threads of the block (id 0 is __syncthreads').
__device__ __forceinline__ void NamedBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Atomic add at GPU scope with acquire-release semantics: publishes what this
// thread (and, through an earlier barrier, its block) wrote, and sees what the
// earlier arrivers published.
__device__ __forceinline__ int AtomicAddAcqRel(int* addr, int v) {
  int old;
  asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], %2;\n" : "=r"(old) : "l"(addr), "r"(v) : "memory");
  return old;
}

// Programmatic dependent launch (sm_90; no-ops on earlier architectures, where
// the host never launches a kernel as a programmatic dependent).
// GridDependencyWait: wait until the grids this one was launched after have
// completed and their memory writes are visible. LaunchDependents: let the grid
// launched after this one start now (it still waits for this grid's completion
// in its own GridDependencyWait before it reads what this grid writes).
__device__ __forceinline__ void GridDependencyWait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void LaunchDependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], uint32_t smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

__device__ __forceinline__ uint32_t LdShared(uint32_t addr) {
  uint32_t v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr));
  return v;
}

__device__ __forceinline__ uint2 LdShared64(uint32_t addr) {
  uint2 v;
  asm volatile("ld.shared.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "r"(addr));
  return v;
}

// c += a * b for one m16n8k16 tile, fp32 accumulate; T is __half or __nv_bfloat16.
template <typename T>
__device__ __forceinline__ void Mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

}  // namespace ptx
}  // namespace flute_jax
