// Software prefetch of a byte range, for the kernels' streams.
#pragma once

#include <cstdint>

namespace fastvq::cpu {

// prefetcht0 of every 64-byte line of [p, p + bytes). In asm: GCC 12 treats a loop whose body is only
// _mm_prefetch as a loop without effects and keeps at most its first line. static: each file compiles its
// own copy under its own ISA flags (kernels.h: no inline bodies shared across them).
static inline void prefetch_lines(const void* p, int64_t bytes) {
  const char* at = static_cast<const char*>(p);
  for (int64_t line = 0; line < bytes; line += 64) __asm__ volatile("prefetcht0 %0" : : "m"(at[line]));
}

}  // namespace fastvq::cpu
