/* pause: the sandbox image's init, like registry.k8s.io/pause. It holds the pod's
 * namespaces, reaps the zombies of processes re-parented to it (PID namespace sharing), and
 * exits 0 on SIGINT/SIGTERM so a sandbox stop is quick and clean. Static, so the image needs
 * nothing else. */
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

static void onterm(int s) { (void)s; _exit(0); }
static void onchld(int s) {
  (void)s;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction a = {0};
  a.sa_handler = onterm;
  sigaction(SIGINT, &a, NULL);
  sigaction(SIGTERM, &a, NULL);
  a.sa_handler = onchld;
  a.sa_flags = SA_NOCLDSTOP;
  sigaction(SIGCHLD, &a, NULL);
  for (;;) pause();
}
