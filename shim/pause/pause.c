/* pause: PID 1 of a pod's namespaces, started by containerd-shim-crisp-v2.
 * It holds the namespaces open, reaps the zombies of processes re-parented to
 * it (the pod's shared pid namespace), and exits 0 on SIGTERM/SIGINT.
 *
 * No libc: a few raw system calls, so the binary is about a kilobyte and its
 * resident size a few pages (static glibc alone is 650 kB, and each shim keeps
 * its own copy in a memfd). Signals arrive through a signalfd instead of
 * handlers: blocked signals are queued even for a pid namespace's init, and no
 * sa_restorer trampoline is needed. Built by shim/build.rs. */
#include <asm/unistd.h>

#define SIGINT 2
#define SIGTERM 15
#define SIGCHLD 17
#define SIG_SETMASK 2
#define WNOHANG 1
#define BIT(s) (1UL << ((s)-1))

#if defined(__x86_64__)
static long sys(long n, long a, long b, long c, long d) {
  long r;
  register long r10 __asm__("r10") = d;
  __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10) : "rcx", "r11", "memory");
  return r;
}
#elif defined(__aarch64__)
static long sys(long n, long a, long b, long c, long d) {
  register long x8 __asm__("x8") = n;
  register long x0 __asm__("x0") = a;
  register long x1 __asm__("x1") = b;
  register long x2 __asm__("x2") = c;
  register long x3 __asm__("x3") = d;
  __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
  return x0;
}
#else
#error "pause: add this architecture's syscall convention"
#endif

static void __attribute__((noreturn)) quit(int code) {
  for (;;)
    sys(__NR_exit_group, code, 0, 0, 0);
}

#if defined(__x86_64__)
__attribute__((force_align_arg_pointer))
#endif
void __attribute__((noreturn)) _start(void) {
  unsigned long mask = BIT(SIGTERM) | BIT(SIGINT) | BIT(SIGCHLD);
  unsigned int info[32]; /* struct signalfd_siginfo: 128 bytes, ssi_signo first */
  long fd;

  /* Nothing the shim had open belongs to the pod. */
  sys(__NR_close_range, 3, ~0U, 0, 0);
  if (sys(__NR_chdir, (long)"/", 0, 0, 0) < 0)
    quit(1);
  if (sys(__NR_rt_sigprocmask, SIG_SETMASK, (long)&mask, 0, sizeof mask) < 0)
    quit(1);
  fd = sys(__NR_signalfd4, -1, (long)&mask, sizeof mask, 0);
  if (fd < 0)
    quit(1);
  for (;;) {
    if (sys(__NR_read, fd, (long)info, sizeof info, 0) != (long)sizeof info)
      continue;
    if (info[0] == SIGTERM || info[0] == SIGINT)
      quit(0);
    while (sys(__NR_wait4, -1, 0, WNOHANG, 0) > 0) {
    }
  }
}
