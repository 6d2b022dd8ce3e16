/* Training hook for the shim's function order: records the entry PC of every function the
 * first time it runs (sanitizer-coverage trace-pc-guard, one guard per function). */
#include <fcntl.h>
#include <stdint.h>
#include <unistd.h>

/* Set by the build (-D): where every process of the trained shim appends its entry PCs. */

void __sanitizer_cov_trace_pc_guard_init(uint32_t *start, uint32_t *stop) {
  static uint32_t n;
  if (start == stop || *start) return;
  for (uint32_t *g = start; g < stop; g++) *g = ++n;
}

void __sanitizer_cov_trace_pc_guard(uint32_t *guard) {
  if (!*guard) return;
  *guard = 0;
  uintptr_t pc = (uintptr_t)__builtin_return_address(0);
  /* Opened per call: the shim closes and reuses descriptors, a kept one could be another file. */
  int fd = open(SHIM_COV_FILE, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd < 0) return;
  (void)!write(fd, &pc, sizeof pc);
  close(fd);
}
