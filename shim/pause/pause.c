/* pause: PID 1 of a pod's namespaces, started by containerd-shim-crisp-v2.
 * It holds the namespaces open, reaps the zombies of processes re-parented to
 * it (the pod's shared pid namespace), and exits 0 on SIGTERM/SIGINT.
 * Built static (-Os) by shim/build.rs and embedded in the shim. */
#define _GNU_SOURCE
#include <signal.h>
#include <stddef.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static void on_term(int sig) {
  (void)sig;
  _exit(0);
}

static void on_chld(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction sa = {0};
  sigset_t none;

  /* Nothing the shim had open belongs to the pod. */
  syscall(SYS_close_range, 3U, ~0U, 0U);
  if (chdir("/") != 0)
    return 1;
  sigemptyset(&sa.sa_mask);
  sa.sa_handler = on_term;
  if (sigaction(SIGTERM, &sa, NULL) < 0 || sigaction(SIGINT, &sa, NULL) < 0)
    return 1;
  sa.sa_handler = on_chld;
  sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  if (sigaction(SIGCHLD, &sa, NULL) < 0)
    return 1;
  /* The signal mask survives exec: make sure ours are deliverable. */
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, NULL);
  for (;;)
    pause();
}
