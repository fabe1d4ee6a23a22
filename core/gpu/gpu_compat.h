// mempipe core/gpu: the portability layer, the one place that knows whether HIP or CUDA
// compiles us.
//
// Kernels are written in the HIP dialect (hipStream_t, hipMalloc, ...). Under nvcc the HIP
// names used by mempipe map onto the CUDA runtime; under hipcc they are the real thing. No
// other file carries a platform #ifdef.
//
// Lanes: every kernel reduces over logical groups of kGpuLanes = 32 threads (the canonical
// score order of retriever/relevancy.h is 32 lanes wide). On AMD (64-wide wavefronts) a
// wavefront holds two independent groups; GpuShflXor32 never crosses a group.
//
//   #include "core/gpu/gpu_compat.h"
//   float s = GpuShflXor32(partial, 16);   // lane ^ 16 of the same 32-lane group
//   float f = mempipe::gpu::ToF32(ptr[i]);  // ptr: const float* / F16* / BF16* -> fp32
//   out[i] = mempipe::gpu::FromF32<BF16>(f);
#ifndef MEMPIPE_CORE_GPU_GPU_COMPAT_H_
#define MEMPIPE_CORE_GPU_GPU_COMPAT_H_

#include <cstdint>
#include <type_traits>

#if defined(__HIPCC__)
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#else
#include <cuda_fp16.h>
#include <cuda_runtime.h>

using hipError_t = cudaError_t;
using hipStream_t = cudaStream_t;
using hipEvent_t = cudaEvent_t;
using hipGraph_t = cudaGraph_t;
using hipGraphExec_t = cudaGraphExec_t;
inline constexpr unsigned int hipStreamNonBlocking = cudaStreamNonBlocking;
inline constexpr cudaStreamCaptureMode hipStreamCaptureModeThreadLocal =
    cudaStreamCaptureModeThreadLocal;
inline constexpr cudaError_t hipSuccess = cudaSuccess;
inline constexpr cudaMemcpyKind hipMemcpyHostToDevice = cudaMemcpyHostToDevice;
inline constexpr cudaMemcpyKind hipMemcpyDeviceToHost = cudaMemcpyDeviceToHost;
inline constexpr cudaMemcpyKind hipMemcpyDeviceToDevice = cudaMemcpyDeviceToDevice;
inline constexpr cudaDeviceAttr hipDeviceAttributeMultiprocessorCount =
    cudaDevAttrMultiProcessorCount;
#define hipGetLastError cudaGetLastError
#define hipGetErrorString cudaGetErrorString
#define hipGetDeviceCount cudaGetDeviceCount
#define hipGetDevice cudaGetDevice
#define hipDeviceGetAttribute cudaDeviceGetAttribute
#define hipMalloc cudaMalloc
#define hipFree cudaFree
#define hipMemcpy cudaMemcpy
#define hipMemcpyAsync cudaMemcpyAsync
#define hipMemsetAsync cudaMemsetAsync
#define hipMallocAsync cudaMallocAsync
#define hipFreeAsync cudaFreeAsync
#define hipStreamCreateWithFlags cudaStreamCreateWithFlags
#define hipEventCreateWithFlags cudaEventCreateWithFlags
#define hipHostMalloc cudaHostAlloc
#define hipHostFree cudaFreeHost
#define hipEventDestroy cudaEventDestroy
#define hipEventRecord cudaEventRecord
#define hipEventQuery cudaEventQuery
#define hipEventSynchronize cudaEventSynchronize
inline constexpr unsigned int hipEventDisableTiming = cudaEventDisableTiming;
inline constexpr cudaError_t hipErrorNotReady = cudaErrorNotReady;
#define hipStreamDestroy cudaStreamDestroy
#define hipStreamBeginCapture cudaStreamBeginCapture
#define hipStreamEndCapture cudaStreamEndCapture
#define hipGraphInstantiateWithFlags cudaGraphInstantiateWithFlags
#define hipGraphLaunch cudaGraphLaunch
#define hipGraphExecDestroy cudaGraphExecDestroy
#define hipGraphDestroy cudaGraphDestroy
#define hipStreamSynchronize cudaStreamSynchronize
#define hipDeviceSynchronize cudaDeviceSynchronize
#define hipSetDevice cudaSetDevice
#define hipHostGetDevicePointer cudaHostGetDevicePointer
#define hipLaunchHostFunc cudaLaunchHostFunc
#define hipStreamIsCapturing cudaStreamIsCapturing
#define hipMemset cudaMemset
using hipStreamCaptureStatus = cudaStreamCaptureStatus;
inline constexpr cudaStreamCaptureStatus hipStreamCaptureStatusNone = cudaStreamCaptureStatusNone;
inline constexpr unsigned int hipHostMallocMapped = cudaHostAllocMapped;
#endif

inline constexpr int kGpuLanes = 32;

#if defined(__HIPCC__)
template <typename V>
__device__ __forceinline__ V GpuShflXor32(V v, int mask) {
  return __shfl_xor(v, mask, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflUp32(V v, int delta) {
  return __shfl_up(v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflDown32(V v, int delta) {
  return __shfl_down(v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShfl32(V v, int src_lane) {
  return __shfl(v, src_lane, kGpuLanes);
}
// HIP exposes no L2 prefetch for gfx90a/gfx940: a no-op, the plain loads still follow.
__device__ __forceinline__ void GpuPrefetchL2(const void*) {}
// Bit i: lane i of this thread's 32-lane group has `pred` (1-D blocks: the group is the low or
// high half of the 64-wide wavefront).
__device__ __forceinline__ uint32_t GpuBallot32(bool pred) {
  return static_cast<uint32_t>(__ballot(pred) >> (threadIdx.x & 32));
}
__device__ __forceinline__ float GpuHalfBitsToFloat(uint16_t b) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ uint16_t GpuFloatToHalfBits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
#else
template <typename V>
__device__ __forceinline__ V GpuShflXor32(V v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflUp32(V v, int delta) {
  return __shfl_up_sync(0xffffffffu, v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShflDown32(V v, int delta) {
  return __shfl_down_sync(0xffffffffu, v, delta, kGpuLanes);
}
template <typename V>
__device__ __forceinline__ V GpuShfl32(V v, int src_lane) {
  return __shfl_sync(0xffffffffu, v, src_lane, kGpuLanes);
}
__device__ __forceinline__ uint32_t GpuBallot32(bool pred) {
  return __ballot_sync(0xffffffffu, pred);
}
// Starts moving the 128-byte line holding `ptr` into L2; holds no register.
__device__ __forceinline__ void GpuPrefetchL2(const void* ptr) {
  asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr));
}
__device__ __forceinline__ float GpuHalfBitsToFloat(uint16_t b) {
  return __half2float(__ushort_as_half(b));
}
__device__ __forceinline__ uint16_t GpuFloatToHalfBits(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
#endif

namespace mempipe::gpu {

// DevicePredicate (core/gpu/gpu_runtime.h) inside a kernel: true when this launch must do
// nothing. Uniform across the grid, so a block may return before any barrier.
__device__ __forceinline__ bool SkipLaunch(const int32_t* flag, int run_when_zero) {
  return flag != nullptr && ((*flag == 0) != (run_when_zero != 0));
}

// The GPU's global timer in nanoseconds: %globaltimer on NVIDIA; on AMD wall_clock64(), a
// constant-rate counter (kAmdWallClockHz on gfx90a/gfx940; the runtime reports it as
// hipDeviceAttributeWallClockRate).
inline constexpr double kAmdWallClockHz = 100e6;
__device__ __forceinline__ int64_t GlobalTimerNs() {
#if defined(__HIPCC__)
#if defined(__HIP_DEVICE_COMPILE__)
  // wall_clock64()'s counter (s_memrealtime); HIP declares it for the device pass only.
  return static_cast<int64_t>(static_cast<double>(__builtin_amdgcn_s_memrealtime()) *
                              (1e9 / kAmdWallClockHz));
#else
  return 0;
#endif
#else
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return static_cast<int64_t>(t);
#endif
}

// A short pause inside a polling loop (frees issue slots for the other warps).
__device__ __forceinline__ void PollPause() {
#if defined(__HIPCC__)
#if defined(__HIP_DEVICE_COMPILE__)
  __builtin_amdgcn_s_sleep(2);
#endif
#else
  __nanosleep(200);
#endif
}

// Storage types inside kernels: fp32 as float, fp16 and bf16 as raw 16-bit patterns (the
// bf16 conversions are plain bit operations, so no vendor bf16 header is needed).
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(F16 v) { return GpuHalfBitsToFloat(v.bits); }
__device__ __forceinline__ float ToF32(BF16 v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T FromF32(float f);
template <>
__device__ __forceinline__ float FromF32<float>(float f) {
  return f;
}
template <>
__device__ __forceinline__ F16 FromF32<F16>(float f) {
  return F16{GpuFloatToHalfBits(f)};
}
template <>
__device__ __forceinline__ BF16 FromF32<BF16>(float f) {
  // Round to nearest even, NaN kept quiet (matches mempipe::BFloat16::FromFloat).
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return BF16{static_cast<uint16_t>((u >> 16) | 0x40)};
  return BF16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

// Tensor-core tile product on one 32-lane group: d += A·B with A 16x16 (rows x k), B 16x8
// (k x cols), fp16 or bf16 operands (T = F16 or BF16) and fp32 accumulators, in PTX's
// m16n8k16 register fragment layout (lane = 4 * row_group + k_pair): a0 = A[lane/4][k 2t,2t+1],
// a1 = A[lane/4 + 8][2t,2t+1], a2 / a3 the same at k 2t+8,2t+9 (t = lane % 4); b0 = B[k 2t,
// 2t+1][lane/4], b1 = B[k 2t+8,2t+9][lane/4]; d0,d1 = D[lane/4][2t,2t+1], d2,d3 = row + 8. Each
// 32-bit word holds the lower k (or column) in its low half. CUDA builds need sm_80 or newer.
// HIP has no such warp-level instruction for both gfx90a and gfx942 in one form: kHasMma16816 is
// false there, kernels take their CUDA-core path, and the stub below is never reached.
#if defined(__HIPCC__)
inline constexpr bool kHasMma16816 = false;
template <typename T>
__device__ __forceinline__ void Mma16816(float (&)[4], uint32_t, uint32_t, uint32_t, uint32_t,
                                         uint32_t, uint32_t) {
  __builtin_trap();
}
#else
inline constexpr bool kHasMma16816 = true;
template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, BF16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}
#endif

// Two fp32 values rounded (nearest even) to T = F16 or BF16 and packed, `lo` in the low half.
template <typename T>
__device__ __forceinline__ uint32_t PackPair(float lo, float hi) {
  return static_cast<uint32_t>(FromF32<T>(lo).bits) |
         (static_cast<uint32_t>(FromF32<T>(hi).bits) << 16);
}

// Elements of a 16-byte vector, and its conversion to fp32.
template <typename T>
inline constexpr int kVec16 = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ void Unpack16(const uint4& raw, float* out) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < kVec16<T>; ++i) out[i] = ToF32(e[i]);
}

}  // namespace mempipe::gpu

#endif  // MEMPIPE_CORE_GPU_GPU_COMPAT_H_
